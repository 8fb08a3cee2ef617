//! Test harness: the real `pacs-gateway` binary on port 0 with its own data
//! directory, a raw DICOM Upper Layer client for protocol faults (PDUs
//! encoded by dicom-ul), and helpers to inspect what was stored.
#![allow(dead_code, unreachable_pub)]

pub mod commit;
pub mod s3;
pub mod scu;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const AE: &str = "COUNTYPACS";
pub const CT_AE: &str = "XINZHEN_CT";

/// Configuration for a test gateway; `gateway_extra` is appended to
/// `[gateway]`, `storage_extra` to `[storage]`.
pub struct GatewaySpec {
    pub gateway_extra: String,
    pub storage_extra: String,
    pub clinics: String,
    /// The data directory on a tmpfs of this many bytes, mounted in a
    /// user and mount namespace of the gateway's own (`unshare`): a real
    /// filesystem that fills up, without root.
    pub data_tmpfs_bytes: Option<u64>,
}

impl Default for GatewaySpec {
    fn default() -> Self {
        GatewaySpec {
            gateway_extra: String::new(),
            storage_extra: String::new(),
            clinics: r#"
[[clinics]]
id = "xinzhen"
name = "新镇乡卫生院"
ae_titles = ["XINZHEN_CT", "XINZHEN_US"]
addresses = ["127.0.0.1"]

[[clinics]]
id = "baishui"
name = "白水镇卫生院"
ae_titles = ["BAISHUI_DR", "BAISHUI_ECG"]

[[clinics]]
id = "county"
name = "县医院"
ae_titles = ["COUNTYWS1"]
role = "county"

[[clinics]]
id = "faraway"
name = "远方卫生院"
ae_titles = ["FARAWAY_CT"]
addresses = ["10.20.30.40"]
"#
            .to_string(),
            data_tmpfs_bytes: None,
        }
    }
}

pub struct Gateway {
    pub child: Child,
    pub port: u16,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Gateway {
    pub fn start(dir: &Path, spec: &GatewaySpec) -> Gateway {
        let data_dir = dir.join("data");
        let config_path = dir.join("gateway.toml");
        // A relative data directory, as in the README's example: the
        // gateway runs in `dir`.
        let config = format!(
            "[gateway]\nae_title = \"{AE}\"\nlisten = \"127.0.0.1:0\"\n{}\n\n[storage]\ndata_dir = \"data\"\n{}\n{}",
            spec.gateway_extra, spec.storage_extra, spec.clinics
        );
        std::fs::write(&config_path, config).unwrap();
        match spec.data_tmpfs_bytes {
            None => Gateway::start_with(config_path, data_dir, dir.join("gateway.log")),
            Some(bytes) => {
                Gateway::start_on_tmpfs(config_path, data_dir, dir.join("gateway.log"), bytes)
            }
        }
    }

    /// Like [`Gateway::start_with`], the data directory on a fresh tmpfs of
    /// `bytes` seen only by the gateway; `data_dir` then reaches it through
    /// `/proc/<pid>/root`.
    fn start_on_tmpfs(
        config_path: PathBuf,
        data_dir: PathBuf,
        log_path: PathBuf,
        bytes: u64,
    ) -> Gateway {
        let usable = Command::new("/usr/bin/unshare")
            .args(["--user", "--map-root-user", "--mount", "true"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            usable,
            "these tests need user namespaces (unshare --user --mount): \
             sysctl kernel.unprivileged_userns_clone=1, and on Ubuntu \
             kernel.apparmor_restrict_unprivileged_userns=0"
        );
        let data_dir = std::path::absolute(data_dir).unwrap();
        std::fs::create_dir_all(&data_dir).unwrap();
        let mut cmd = Command::new("/usr/bin/unshare");
        cmd.args([
            "--user",
            "--map-root-user",
            "--mount",
            "--",
            "/bin/sh",
            "-c",
        ])
        .arg(r#"mount -t tmpfs -o size="$3" tmpfs "$2" && exec "$0" --config "$1""#)
        .arg(env!("CARGO_BIN_EXE_pacs-gateway"))
        .arg(&config_path)
        .arg(&data_dir)
        .arg(bytes.to_string());
        let mut gw = Gateway::spawn(cmd, config_path, data_dir.clone(), log_path);
        // unshare and sh exec the gateway: the pid stays the same.
        gw.data_dir = PathBuf::from(format!("/proc/{}/root{}", gw.pid(), data_dir.display()));
        gw
    }

    /// Starts again on the same configuration and data.
    pub fn restart(self) -> Gateway {
        let (config, data, log) = (
            self.config_path.clone(),
            self.data_dir.clone(),
            self.log_path.clone(),
        );
        assert!(
            !data.starts_with("/proc"),
            "a tmpfs data directory is gone with its gateway"
        );
        drop(self);
        Gateway::start_with(config, data, log)
    }

    fn start_with(config_path: PathBuf, data_dir: PathBuf, log_path: PathBuf) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pacs-gateway"));
        cmd.arg("--config").arg(&config_path);
        Gateway::spawn(cmd, config_path, data_dir, log_path)
    }

    fn spawn(
        mut cmd: Command,
        config_path: PathBuf,
        data_dir: PathBuf,
        log_path: PathBuf,
    ) -> Gateway {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut child = cmd
            .current_dir(config_path.parent().expect("config in a directory"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start pacs-gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on 127.0.0.1:")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Gateway {
            child,
            port,
            data_dir,
            config_path,
            log_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, keeping the handle for `restart`.
    pub fn sigkill_in_place(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let status = terminate(&mut self.child);
        std::mem::forget(self);
        status
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Read-only view of the index.
    pub fn index(&self) -> rusqlite::Connection {
        let mut path = self.data_dir.join("index.sqlite");
        if self.data_dir.starts_with("/proc") {
            // SQLite resolves the /proc/<pid>/root link to "/", outside the
            // gateway's tmpfs: read a copy (taken while the gateway is idle).
            static COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let copy = self.log_path.with_file_name(format!("index-copy-{n}"));
            std::fs::create_dir_all(&copy).unwrap();
            // The two files are copied one after the other: again until
            // neither changed meanwhile (a write or checkpoint between
            // them would give an inconsistent pair).
            let files = ["index.sqlite", "index.sqlite-wal"];
            let state = || {
                files.map(|f| {
                    std::fs::metadata(self.data_dir.join(f))
                        .map(|m| (m.len(), m.modified().ok()))
                        .ok()
                })
            };
            loop {
                let before = state();
                for file in files {
                    let from = self.data_dir.join(file);
                    if from.exists() {
                        std::fs::copy(&from, copy.join(file)).unwrap();
                    }
                }
                if state() == before {
                    break;
                }
            }
            path = copy.join("index.sqlite");
        }
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap()
    }

    pub fn instance_count(&self) -> i64 {
        self.index()
            .query_row("SELECT count(*) FROM instances", [], |r| r.get(0))
            .unwrap()
    }

    /// Files left in the spool directory (partial receptions).
    pub fn spool_files(&self) -> usize {
        std::fs::read_dir(self.data_dir.join("spool"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// `(blob path, dataset offset)` of the current version of an instance.
    pub fn blob_of(&self, sop_instance_uid: &str) -> Option<(PathBuf, usize)> {
        use rusqlite::OptionalExtension;
        self.index()
            .query_row(
                "SELECT blob_key, dataset_offset FROM instances WHERE sop_instance_uid = ?1",
                [sop_instance_uid],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
            )
            .optional()
            .unwrap()
            .map(|(key, off)| (self.data_dir.join("blobs").join(key), off as usize))
    }

    /// Asserts the gateway still answers C-ECHO.
    pub fn assert_serving(&self) {
        let out = echoscu(self.port, CT_AE, AE);
        assert!(
            out.status.success(),
            "gateway stopped serving: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Peak resident set size of the gateway process, in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().unwrap()
}

impl Drop for Gateway {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// getscu as `calling` for study `study` into a fresh directory; the
/// received files by SOP Instance UID.
pub fn getscu_study(
    gw: &Gateway,
    dir: &Path,
    calling: &str,
    study: &str,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    getscu_keys(
        gw,
        &dir.join(format!("got-{calling}")),
        calling,
        &[
            "QueryRetrieveLevel=STUDY".into(),
            format!("StudyInstanceUID={study}"),
        ],
    )
}

/// DCMTK getscu (Study Root) with query `keys`, received into `out_dir`:
/// each instance's dataset by SOP Instance UID.
pub fn getscu_keys(
    gw: &Gateway,
    out_dir: &Path,
    calling: &str,
    keys: &[String],
) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::create_dir_all(out_dir).unwrap();
    let mut cmd = Command::new("/usr/bin/getscu");
    cmd.args(["-S", "+B", "-od"])
        .arg(out_dir)
        .args(["-aet", calling, "-aec", AE]);
    for k in keys {
        cmd.args(["-k", k]);
    }
    let out = cmd
        .arg("127.0.0.1")
        .arg(gw.port.to_string())
        .env("TCP_NODELAY", "1")
        .output()
        .expect("run /usr/bin/getscu (Debian dcmtk)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = files_in(out_dir);
    let by_uid: std::collections::BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).unwrap();
            let ds = dataset_of(&bytes).to_vec();
            let ts = transfer_syntax_of(&bytes);
            let uid = storage::attrs::read_bytes(&ds, &ts)
                .unwrap()
                .sop_instance_uid;
            (uid, ds)
        })
        .collect();
    assert_eq!(by_uid.len(), files.len(), "an instance received twice");
    by_uid
}

/// The files in `dir`, sorted.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

pub fn echoscu(port: u16, calling: &str, called: &str) -> std::process::Output {
    Command::new("/usr/bin/echoscu")
        .args([
            "-aet",
            calling,
            "-aec",
            called,
            "127.0.0.1",
            &port.to_string(),
        ])
        .env("TCP_NODELAY", "1")
        .output()
        .expect("run /usr/bin/echoscu (Debian dcmtk)")
}

pub fn storescu(
    port: u16,
    calling: &str,
    extra: &[&str],
    files: &[PathBuf],
) -> std::process::Output {
    let mut cmd = Command::new("/usr/bin/storescu");
    cmd.args(["-aet", calling, "-aec", AE])
        .args(extra)
        .arg("127.0.0.1")
        .arg(port.to_string())
        .args(files)
        .env("TCP_NODELAY", "1");
    cmd.output().expect("run /usr/bin/storescu (Debian dcmtk)")
}

/// The storescu option that proposes a file's own transfer syntax first
/// (storescu proposes only uncompressed syntaxes unless told otherwise).
/// Runs `tests/py/<script>` (pynetdicom, a client we did not write) with
/// the gateway's port then `args`; its standard output, once it succeeded.
pub fn pynetdicom(script: &str, port: u16, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/py")
                .join(script),
        )
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("python3 with pynetdicom (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn propose_flag(ts: &str) -> &'static str {
    match ts {
        "1.2.840.10008.1.2" => "-xi",
        "1.2.840.10008.1.2.2" => "-xb",
        "1.2.840.10008.1.2.4.50" => "-xy",
        "1.2.840.10008.1.2.4.70" => "-xs",
        "1.2.840.10008.1.2.5" => "-xr",
        "1.2.840.10008.1.2.4.80" => "-xt",
        "1.2.840.10008.1.2.4.81" => "-xu",
        "1.2.840.10008.1.2.4.90" => "-xv",
        "1.2.840.10008.1.2.4.91" => "-xw",
        "1.2.840.10008.1.2.1.99" => "-xd",
        _ => "-xe",
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The dataset of a Part 10 file (everything after the meta group).
pub fn dataset_of(file: &[u8]) -> &[u8] {
    let (_, offset) = storage::part10::parse_file_header(file).expect("Part 10 file");
    &file[offset..]
}

pub fn transfer_syntax_of(file: &[u8]) -> String {
    storage::part10::parse_file_header(file)
        .expect("Part 10 file")
        .0
}

/// DCMTK `storescp` in bit-preserving mode: records exactly what a client
/// sent, as a reference for "stored exactly as received".
pub struct ReferenceScp {
    child: Child,
    pub port: u16,
    pub out_dir: PathBuf,
}

impl ReferenceScp {
    pub fn start(out_dir: &Path, prefer_flag: &str) -> ReferenceScp {
        std::fs::create_dir_all(out_dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("/usr/bin/storescp")
            .args(["+B", prefer_flag, "-aet", AE, "-od"])
            .arg(out_dir)
            .arg(port.to_string())
            .env("TCP_NODELAY", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run /usr/bin/storescp (Debian dcmtk)");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        ReferenceScp {
            child,
            port,
            out_dir: out_dir.to_owned(),
        }
    }

    /// SOP Instance UID -> dataset bytes of every file received.
    pub fn received(mut self) -> std::collections::HashMap<String, Vec<u8>> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut out = std::collections::HashMap::new();
        for entry in std::fs::read_dir(&self.out_dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let ts = transfer_syntax_of(&bytes);
            let ds = dataset_of(&bytes).to_vec();
            let attrs = storage::attrs::read_bytes(&ds, &ts).unwrap();
            out.insert(attrs.sop_instance_uid, ds);
        }
        out
    }
}

impl Drop for ReferenceScp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
