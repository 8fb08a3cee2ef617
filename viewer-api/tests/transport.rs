//! Running it: TLS with a configured certificate, plaintext refused off
//! loopback, a clean stop on SIGTERM, and discovery by a generic client
//! (Python grpcio with server reflection and the health service).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Server, authed, center_with, demo_samples, with_clinic};
use consortium_proto::v1::WhoAmIRequest;
use consortium_proto::v1::identity_service_client::IdentityServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A test CA and a server certificate for localhost and 127.0.0.1 it signed.
fn certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec[..],
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test consortium CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec[..],
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_when_configured_and_plaintext_only_on_loopback() {
    // Plaintext on a non-loopback address: refused before binding anything.
    let (tmp, config) = Server::prepare("");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "listen = \"127.0.0.1:0\"\nworklist",
        "listen = \"0.0.0.0:0\"\nworklist",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(common::BIN)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing plaintext"));
    assert!(out.stdout.is_empty());
    drop(tmp);

    // A certificate that is not one: refused before "listening on".
    let (tmp, config) = Server::prepare("");
    std::fs::write(tmp.path().join("bad.pem"), "not a certificate").unwrap();
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "lease_s = 3",
        &format!(
            "lease_s = 3\ntls_cert = \"{0}\"\ntls_key = \"{0}\"",
            tmp.path().join("bad.pem").display()
        ),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(common::BIN)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "never said it was listening");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS certificate or key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(tmp);

    // With a certificate and key: TLS, verified against the test CA.
    let (tmp, config) = Server::prepare("");
    certificates(tmp.path());
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "lease_s = 3",
        &format!(
            "lease_s = 3\ntls_cert = \"{}\"\ntls_key = \"{}\"",
            tmp.path().join("server.pem").display(),
            tmp.path().join("server.key").display()
        ),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let ca = std::fs::read(tmp.path().join("ca.pem")).unwrap();
    let server = Server::start(tmp, config);
    server.user("rad1", "radiologist", "county");
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let channel = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut identity = IdentityServiceClient::new(channel);
    let token = identity
        .login(consortium_proto::v1::LoginRequest {
            username: "rad1".into(),
            password: "password-rad1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let me = identity
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.user.unwrap().username, "rad1");
    // A plaintext client gets nowhere.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let err = IdentityServiceClient::new(ch)
            .who_am_i(authed(WhoAmIRequest {}, &token))
            .await
            .unwrap_err();
        assert_ne!(err.code(), tonic::Code::Ok);
    }
    // A connection that never starts its TLS handshake is closed once the
    // handshake time is up, not held open.
    let started = std::time::Instant::now();
    let mut silent = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 16];
    let read = std::io::Read::read(&mut silent, &mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)) && started.elapsed() < Duration::from_secs(20),
        "{read:?} after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    // SIGTERM stops it cleanly.
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_grpc_client_discovers_and_calls_through_reflection() {
    let (_, samples) = demo_samples();
    let files = with_clinic(
        samples
            .iter()
            .filter(|f| f.issuer_of_patient_id == "baishui")
            .take(3),
    );
    let server = center_with(&files, "").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/reflection_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&server.addr)
        .arg("rad1")
        .arg("password-rad1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services: Vec<&str> = found["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in [
        "consortium.v1.IdentityService",
        "consortium.v1.WorklistService",
        "consortium.v1.StudyService",
        "consortium.v1.ImageService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&s), "{s} missing from {services:?}");
    }
    assert_eq!(found["health"], "SERVING");
    assert_eq!(found["image_health"], "SERVING");
    assert_eq!(found["role"], "ROLE_RADIOLOGIST");
    assert!(found["items"].as_u64().unwrap() >= 1, "{found}");
    assert_eq!(found["first_status"], "ITEM_STATUS_UNREAD");
    assert_eq!(found["without_token"], "UNAUTHENTICATED");
    // The server is still serving after all that.
    let status = server.terminate();
    assert!(status.success());
}
