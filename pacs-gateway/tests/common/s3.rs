//! A real S3-compatible server on loopback for tests: moto's `moto_server`
//! (PyPI `moto[server]`, installed by scripts/install-deps.sh). Also used by
//! the viewer-api's tests (`#[path]`), so it depends on nothing else here.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The bucket tests keep blobs in.
pub const BUCKET: &str = "consortium-blobs";

/// The `[storage.s3]` section for a server on `port` (plain HTTP on loopback).
pub fn storage_section(port: u16, secret: &str) -> String {
    format!(
        "[storage.s3]\nbucket = \"{BUCKET}\"\nendpoint = \"http://127.0.0.1:{port}\"\nallow_http = true\naccess_key_id = \"consortium\"\nsecret_access_key = \"{secret}\"\n"
    )
}

/// `moto_server` on 127.0.0.1, port 0; killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
    log: std::path::PathBuf,
}

impl S3Server {
    pub fn start(dir: &Path) -> S3Server {
        let log = dir.join("moto.log");
        // Owned by the server from the start: dropped (killed) on any panic.
        let mut server = S3Server {
            child: Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", "0"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect(
                    "run moto_server (PyPI moto[server], installed by scripts/install-deps.sh)",
                ),
            port: 0,
            log: log.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split("Running on http://127.0.0.1:").nth(1) {
                server.port = rest
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not start: {text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One HTTP/1.1 request with a dummy signature (moto does not check
    /// signatures, but reads the account from the access key); the status
    /// and the body.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=consortium/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00\r\n\r\n",
            self.port,
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        let split = reply
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP response");
        let head = String::from_utf8_lossy(&reply[..split]).to_string();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "chunked responses are not read here: {head}"
        );
        (status, reply[split + 4..].to_vec())
    }

    /// The server's request log so far: a line per request, such as
    /// `"GET /bucket/key HTTP/1.1" 206 -` (206: a ranged GET).
    pub fn requests(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn create_bucket(&self) {
        let (status, body) = self.request("PUT", &format!("/{BUCKET}"), b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        match self.request("GET", &format!("/{BUCKET}/{key}"), b"") {
            (200, body) => Some(body),
            (404, _) => None,
            (status, body) => panic!("GET {key}: {status} {}", String::from_utf8_lossy(&body)),
        }
    }

    pub fn put_object(&self, key: &str, bytes: &[u8]) {
        let (status, _) = self.request("PUT", &format!("/{BUCKET}/{key}"), bytes);
        assert_eq!(status, 200);
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
