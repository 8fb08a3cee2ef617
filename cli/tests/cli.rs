//! The command-line client against the real viewer-api on port 0.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The viewer-api binary, built on demand (it belongs to another package).
fn viewer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("viewer-api");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "viewer-api",
            "--bin",
            "viewer-api",
        ])
        .status()
        .unwrap();
    assert!(status.success() && bin.exists(), "cannot build viewer-api");
    bin
}

struct Viewer {
    child: Child,
    addr: String,
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(dir: &Path, addr: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_consortium-cli"))
        .arg("--server")
        .arg(format!("http://{addr}"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_radiologist_reads_a_study_from_the_command_line() {
    let viewer = viewer_bin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let samples_dir = dir.join("samples");
    let samples = sample_dicom::generate(&samples_dir, &sample_dicom::Options::demo(11)).unwrap();
    let ct = samples.iter().find(|f| f.modality == "CT").unwrap().clone();
    let study: Vec<_> = samples
        .iter()
        .filter(|f| f.study_instance_uid == ct.study_instance_uid)
        .collect();

    // Real storage holding the study, as its clinic sent it.
    let data = dir.join("data");
    {
        let storage = storage::Storage::open(&data).unwrap();
        for f in &study {
            let bytes = std::fs::read(&f.path).unwrap();
            let (ts, offset) = storage::part10::parse_file_header(&bytes).unwrap();
            let attrs = storage::attrs::read_bytes(&bytes[offset..], &ts).unwrap();
            let mut spool = storage
                .spool(&attrs.sop_class_uid, &attrs.sop_instance_uid, &ts, 1 << 30)
                .unwrap();
            spool.write(&bytes[offset..]).unwrap();
            let spooled = storage.finish_spool(spool).unwrap();
            let source = storage::Source {
                clinic_id: f.issuer_of_patient_id.clone(),
                calling_ae: "TEST_CT".into(),
            };
            storage.commit(spooled, attrs, &source).await.unwrap();
        }
    }
    let config = dir.join("center.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nae_title = \"COUNTYPACS\"\nlisten = \"127.0.0.1:0\"\n\
             [storage]\ndata_dir = \"{}\"\n\
             [viewer]\nlisten = \"127.0.0.1:0\"\nworklist_settle_s = 0\n\
             [[clinics]]\nid = \"{}\"\nname = \"Clinic\"\nae_titles = [\"TEST_CT\"]\n\
             [[clinics]]\nid = \"county\"\nname = \"County\"\nae_titles = [\"COUNTYWS1\"]\nrole = \"county\"\n",
            data.display(),
            ct.issuer_of_patient_id
        ),
    )
    .unwrap();
    let mut child = Command::new(&viewer)
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let server = Viewer {
        addr: line
            .trim()
            .strip_prefix("listening on ")
            .unwrap()
            .to_string(),
        child,
    };
    let mut admin = Command::new(&viewer)
        .arg("--config")
        .arg(&config)
        .args([
            "admin",
            "create-user",
            "dr.li",
            "--role",
            "radiologist",
            "--clinic",
            "county",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    admin
        .stdin
        .take()
        .unwrap()
        .write_all(b"reading-room-7\n")
        .unwrap();
    assert!(admin.wait().unwrap().success());
    let addr = server.addr.as_str();

    // Wrong password: a clear message and a failing exit status.
    let out = cli(dir, addr, &["login", "dr.li"], "nope\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong user name or password"));
    // Not logged in yet.
    let out = cli(dir, addr, &["worklist"], "");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not logged in"));

    let said = ok(cli(dir, addr, &["login", "dr.li"], "reading-room-7\n"));
    assert!(said.contains("logged in as dr.li"), "{said}");
    assert!(ok(cli(dir, addr, &["whoami"], "")).contains("dr.li (Radiologist"));
    let uid = ct.study_instance_uid.as_str();
    let list = ok(cli(dir, addr, &["worklist", "--modality", "CT"], ""));
    assert!(list.contains(uid), "{list}");
    assert!(ok(cli(dir, addr, &["claim", uid], "")).contains("claimed"));
    let claimed = ok(cli(dir, addr, &["worklist", "--status", "claimed"], ""));
    assert!(claimed.contains("claimed by dr.li"), "{claimed}");
    assert!(ok(cli(dir, addr, &["release", uid], "")).contains("released"));

    // Watch prints the current items first.
    let mut watch = Command::new(env!("CARGO_BIN_EXE_consortium-cli"))
        .arg("--server")
        .arg(format!("http://{addr}"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .arg("watch")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(watch.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(
        first.starts_with("current") && first.contains(uid),
        "{first}"
    );

    let listing = ok(cli(dir, addr, &["study", uid], ""));
    assert!(listing.contains(&ct.sop_instance_uid));
    // A reader that goes (`| head`): status 141, as SIGPIPE, no panic.
    let cut = Command::new(env!("CARGO_BIN_EXE_consortium-cli"))
        .arg("--server")
        .arg(format!("http://{addr}"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(["study", uid])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cut = {
        let mut cut = cut;
        drop(cut.stdout.take()); // closed before anything is printed
        cut.wait_with_output().unwrap()
    };
    assert_eq!(cut.status.code(), Some(141), "{cut:?}");
    assert!(
        !String::from_utf8_lossy(&cut.stderr).contains("panicked"),
        "{cut:?}"
    );
    let json = ok(cli(dir, addr, &["study", uid, "--json"], ""));
    assert!(json.trim_start().starts_with('[') && json.contains("\"0020000D\""));
    // One series: its rows of the listing (each row ends with its series).
    let series = listing.lines().nth(1).unwrap().rsplit('\t').next().unwrap();
    let one = ok(cli(dir, addr, &["study", uid, "--series", series], ""));
    let of_series: Vec<&str> = listing.lines().filter(|l| l.ends_with(series)).collect();
    assert_eq!(one.lines().skip(1).collect::<Vec<_>>(), of_series, "{one}");
    ok(cli(dir, addr, &["priors", uid], ""));

    let png = dir.join("frame.png");
    let said = ok(cli(
        dir,
        addr,
        &[
            "render",
            &ct.sop_instance_uid,
            "--preset",
            "lung",
            "--out",
            png.to_str().unwrap(),
        ],
        "",
    ));
    assert!(said.contains("frame.png"));
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    let frames = dir.join("frames");
    let series = ct_series(&listing, &ct.sop_instance_uid);
    let said = ok(cli(
        dir,
        addr,
        &[
            "series",
            &series,
            "--size",
            "64",
            "--out",
            frames.to_str().unwrap(),
        ],
        "",
    ));
    // One file per frame of the series' instances (the listing's third column).
    let expected: usize = listing
        .lines()
        .filter(|l| l.contains(&series))
        .map(|l| l.split('\t').nth(2).unwrap().parse::<usize>().unwrap())
        .sum();
    let written = std::fs::read_dir(&frames).unwrap().count();
    assert_eq!(written, expected, "{said}");
    assert!(expected > 0);

    let raw = dir.join("raw.dcm");
    let said = ok(cli(
        dir,
        addr,
        &["raw", &ct.sop_instance_uid, "--out", raw.to_str().unwrap()],
        "",
    ));
    assert!(said.contains("(verified)"), "{said}");
    let got = std::fs::read(&raw).unwrap();
    let original = std::fs::read(&ct.path).unwrap();
    let (_, a) = storage::part10::parse_file_header(&got).unwrap();
    let (_, b) = storage::part10::parse_file_header(&original).unwrap();
    assert_eq!(&got[a..], &original[b..], "the dataset exactly as sent");

    // Plaintext to another machine is refused before anything is sent.
    let out = Command::new(env!("CARGO_BIN_EXE_consortium-cli"))
        .args(["--server", "http://192.0.2.10:50051", "--token-file"])
        .arg(dir.join("token"))
        .arg("whoami")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to send"));
    // The token file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    assert!(ok(cli(dir, addr, &["logout"], "")).contains("logged out"));
    let out = cli(dir, addr, &["whoami"], "");
    assert!(!out.status.success());
}

/// The series UID of `sop` in a `study` listing.
fn ct_series(listing: &str, sop: &str) -> String {
    listing
        .lines()
        .find(|l| l.contains(sop))
        .and_then(|l| l.split('\t').nth(5))
        .unwrap()
        .to_string()
}
