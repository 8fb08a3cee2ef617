//! Test support: real storage filled with sample studies, the real
//! `viewer-api` binary on port 0, users made with its admin command, and the
//! generated gRPC clients.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use consortium_proto::v1::LoginRequest;
use consortium_proto::v1::identity_service_client::IdentityServiceClient;
use consortium_proto::v1::image_service_client::ImageServiceClient;
use consortium_proto::v1::study_service_client::StudyServiceClient;
use consortium_proto::v1::worklist_service_client::WorklistServiceClient;
use sample_dicom::SampleFile;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_viewer-api");

/// The demo sample set, generated once per test binary (the list comes
/// with the generation) and kept in one place under the target directory:
/// the same seed gives the same bytes, so every test binary and every run
/// shares one copy instead of leaving one behind in /tmp.
pub fn demo_samples() -> &'static (PathBuf, Vec<SampleFile>) {
    static SAMPLES: OnceLock<(PathBuf, Vec<SampleFile>)> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let dir = root.join("viewer-demo-samples-7");
        let fresh = tempfile::tempdir_in(root).unwrap();
        let files = sample_dicom::generate(fresh.path(), &sample_dicom::Options::demo(7)).unwrap();
        let files = files
            .into_iter()
            .map(|mut f| {
                f.path = dir.join(f.path.strip_prefix(fresh.path()).unwrap());
                f
            })
            .collect();
        // The first run moves its copy into place; later ones drop theirs
        // (a non-empty directory is never replaced).
        let _ = std::fs::rename(fresh.path(), &dir);
        (dir, files)
    })
}

/// A configuration for a center whose data directory is `dir/data`.
pub fn config_text(dir: &Path, viewer_extra: &str) -> String {
    format!(
        r#"
[gateway]
ae_title = "COUNTYPACS"
listen = "127.0.0.1:0"

[storage]
data_dir = "{data}"

[viewer]
listen = "127.0.0.1:0"
worklist_settle_s = 1
lease_s = 3
{viewer_extra}

[[clinics]]
id = "xinzhen"
name = "Xinzhen township health center"
ae_titles = ["XINZHEN_CT"]

[[clinics]]
id = "baishui"
name = "Baishui township health center"
ae_titles = ["BAISHUI_DR"]

[[clinics]]
id = "county"
name = "County imaging center"
ae_titles = ["COUNTYWS1"]
role = "county"
"#,
        data = dir.join("data").display()
    )
}

/// Stores `files` through the storage layer as clinic `clinic_of(file)` sent them.
pub async fn ingest(data_dir: &Path, files: &[(PathBuf, String)]) {
    ingest_into(storage::Storage::open(data_dir).unwrap(), files).await;
}

/// Like [`ingest`], into the storage a configuration file describes.
pub async fn ingest_configured(config: &Path, files: &[(PathBuf, String)]) {
    let config = consortium_config::Config::from_file(config).unwrap();
    ingest_into(
        storage::Storage::open_configured(&config.storage).unwrap(),
        files,
    )
    .await;
}

async fn ingest_into(storage: storage::Storage, files: &[(PathBuf, String)]) {
    for (path, clinic) in files {
        let bytes = std::fs::read(path).unwrap();
        let (ts, offset) = storage::part10::parse_file_header(&bytes).expect("Part 10 file");
        let dataset = &bytes[offset..];
        let attrs = storage::attrs::read_bytes(dataset, &ts).unwrap();
        let mut spool = storage
            .spool(&attrs.sop_class_uid, &attrs.sop_instance_uid, &ts, 1 << 32)
            .unwrap();
        spool.write(dataset).unwrap();
        let spooled = storage.finish_spool(spool).unwrap();
        let source = storage::Source {
            clinic_id: clinic.clone(),
            calling_ae: format!("{}_CT", clinic.to_uppercase()),
        };
        storage.commit(spooled, attrs, &source).await.unwrap();
    }
}

/// Sample files with the clinic that sent them (the issuer of their patient ID).
pub fn with_clinic<'a>(files: impl IntoIterator<Item = &'a SampleFile>) -> Vec<(PathBuf, String)> {
    files
        .into_iter()
        .map(|f| (f.path.clone(), f.issuer_of_patient_id.clone()))
        .collect()
}

/// A running `viewer-api`.
pub struct Server {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub addr: String,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// A fresh directory with a configuration (see [`config_text`]).
    pub fn prepare(viewer_extra: &str) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("center.toml");
        std::fs::write(&config, config_text(tmp.path(), viewer_extra)).unwrap();
        (tmp, config)
    }

    /// Starts the binary on `config` and waits for `listening on`.
    pub fn start(tmp: tempfile::TempDir, config: PathBuf) -> Server {
        let dir = tmp.path().to_owned();
        let log = std::fs::File::create(dir.join("viewer.log")).unwrap();
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "viewer-api did not start: {line:?}\n{}",
                    std::fs::read_to_string(dir.join("viewer.log")).unwrap_or_default()
                )
            })
            .to_string();
        Server {
            dir,
            config,
            addr,
            child: Some(child),
            _tmp: Some(tmp),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("viewer.log")).unwrap_or_default()
    }

    /// Runs `viewer-api admin ...` with `stdin` as its standard input.
    pub fn admin(&self, args: &[&str], stdin: &str) -> std::process::Output {
        admin(&self.config, args, stdin)
    }

    /// Creates a user with password `password-<username>`.
    pub fn user(&self, username: &str, role: &str, clinic: &str) {
        let out = self.admin(
            &["create-user", username, "--role", role, "--clinic", clinic],
            &format!("password-{username}\n"),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Logs in as a user made by [`Server::user`]; returns the token.
    pub async fn login(&self, username: &str) -> String {
        let mut identity = IdentityServiceClient::new(self.channel().await);
        identity
            .login(LoginRequest {
                username: username.into(),
                password: format!("password-{username}"),
            })
            .await
            .unwrap()
            .into_inner()
            .token
    }

    pub async fn clients(&self) -> Clients {
        let ch = self.channel().await;
        Clients {
            identity: IdentityServiceClient::new(ch.clone()),
            worklist: WorklistServiceClient::new(ch.clone()),
            studies: StudyServiceClient::new(ch.clone()),
            images: ImageServiceClient::new(ch).max_decoding_message_size(64 << 20),
        }
    }

    /// Audit rows as (username, action, study_uid, outcome), oldest first.
    pub fn audit(&self) -> Vec<(String, String, String, String)> {
        let conn = rusqlite::Connection::open(self.data_dir().join("index.sqlite")).unwrap();
        let mut stmt = conn
            .prepare("SELECT username, action, study_uid, outcome FROM audit ORDER BY pk")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        for _ in 0..100 {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill().unwrap();
        panic!("viewer-api did not stop on SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn admin(config: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("admin")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command refused before it reads its password exits without reading
    // standard input: a broken pipe here is its answer, not a failure.
    let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

pub struct Clients {
    pub identity: IdentityServiceClient<Channel>,
    pub worklist: WorklistServiceClient<Channel>,
    pub studies: StudyServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

/// `msg` with `authorization: Bearer <token>`.
pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// A server holding `files` (with their clinics), users created for each role:
/// `rad1`, `rad2` (radiologists, county), `tech_x` (technician, xinzhen),
/// `staff_b` (clinic staff, baishui), `admin` (administrator, county).
pub async fn center_with(files: &[(PathBuf, String)], viewer_extra: &str) -> Server {
    let (tmp, config) = Server::prepare(viewer_extra);
    ingest(&tmp.path().join("data"), files).await;
    let server = Server::start(tmp, config);
    server.user("rad1", "radiologist", "county");
    server.user("rad2", "radiologist", "county");
    server.user("tech_x", "technician", "xinzhen");
    server.user("staff_b", "clinic_staff", "baishui");
    server.user("admin", "administrator", "county");
    server
}

/// Baishui's first non-ECG demo instance, copied into `dir` as `name` and
/// edited (see [`edited_copy`]): another clinic's instance filed where the
/// edits say.
pub fn baishui_instance_with(
    dir: &Path,
    name: &str,
    edits: &[(&str, &str)],
) -> (PathBuf, &'static SampleFile) {
    let b = demo_samples()
        .1
        .iter()
        .find(|f| f.issuer_of_patient_id == "baishui" && f.modality != "ECG")
        .unwrap();
    (edited_copy(&b.path, dir, name, edits), b)
}

/// `file` copied into `dir` as `name` and edited by DCMTK's `dcmodify`
/// (`edits`: keyword and value).
pub fn edited_copy(file: &Path, dir: &Path, name: &str, edits: &[(&str, &str)]) -> PathBuf {
    let copy = dir.join(name);
    std::fs::copy(file, &copy).unwrap();
    let mut cmd = std::process::Command::new("/usr/bin/dcmodify");
    cmd.arg("-nb");
    for (keyword, value) in edits {
        cmd.args(["-m", &format!("{keyword}={value}")]);
    }
    let out = cmd
        .arg(&copy)
        .output()
        .expect("run /usr/bin/dcmodify (Debian dcmtk)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    copy
}

/// The Series Instance UID of a Part 10 file.
pub fn series_of(file: &Path) -> String {
    dicom_object::open_file(file)
        .unwrap()
        .element(dicom_dictionary_std::tags::SERIES_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string()
}
