//! The upload tool end to end against the real gateway on port 0.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

/// The gateway binary, built on demand (it belongs to another package).
fn gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("pacs-gateway");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "pacs-gateway",
            "--bin",
            "pacs-gateway",
        ])
        .status()
        .unwrap();
    assert!(
        status.success() && bin.exists(),
        "cannot build pacs-gateway"
    );
    bin
}

struct Gateway {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Gateway {
    fn start(dir: &Path, listen: &str) -> Gateway {
        Gateway::start_with(dir, listen, "")
    }

    /// With `extra` lines in the `[gateway]` section.
    fn start_with(dir: &Path, listen: &str, extra: &str) -> Gateway {
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nae_title = \"COUNTYPACS\"\nlisten = \"{listen}\"\n{extra}\n\n[storage]\ndata_dir = \"{}\"\n\n\
                 [[clinics]]\nid = \"xinzhen\"\nname = \"新镇乡卫生院\"\nae_titles = [\"XINZHEN_CT\"]\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("gateway.log"))
            .unwrap();
        let mut child = Command::new(gateway_bin())
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
        Gateway {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    fn index(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.dir.join("data/index.sqlite"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap()
    }

    fn count(&self, sql: &str) -> i64 {
        self.index().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

fn upload(port: u16, record: &Path, extra: &[&str], inputs: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_consortium-upload"))
        .args([
            "--port",
            &port.to_string(),
            "--calling-ae",
            "XINZHEN_CT",
            "--retries",
            "2",
        ])
        .arg("--record")
        .arg(record)
        .args(extra)
        .args(inputs)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn summary_count(out: &str, what: &str) -> usize {
    let line = out
        .lines()
        .find(|l| l.starts_with("summary:"))
        .expect("summary line");
    line.split(", ")
        .find(|part| part.ends_with(what))
        .and_then(|part| part.trim_start_matches("summary: ").split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {what:?} in {line}"))
}

fn sha_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn uploads_a_folder_commits_everything_and_reruns_send_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(21)).unwrap();
    std::fs::write(samples.join("notes.txt"), "not DICOM").unwrap();
    std::fs::write(samples.join("xinzhen/photo.jpg"), [0xFF, 0xD8, 0xFF, 0xE0]).unwrap();
    let gw = Gateway::start(dir.path(), "127.0.0.1:0");
    let record = dir.path().join("record.sqlite");

    // Dry run: lists, sends nothing.
    let dry = upload(gw.port, &record, &["--dry-run"], &[&samples]);
    assert!(dry.status.success());
    assert_eq!(
        stdout(&dry)
            .lines()
            .filter(|l| l.starts_with("would send"))
            .count(),
        files.len()
    );
    assert_eq!(gw.count("SELECT count(*) FROM instances"), 0);

    let report = dir.path().join("report.tsv");
    let out = upload(
        gw.port,
        &record,
        &["--report", report.to_str().unwrap()],
        &[&samples],
    );
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(summary_count(&text, "stored"), files.len());
    assert_eq!(summary_count(&text, "committed"), files.len());
    assert_eq!(summary_count(&text, "non-DICOM files skipped"), 2);
    // Every file has its line in the report.
    let report = std::fs::read_to_string(&report).unwrap();
    assert_eq!(
        report
            .lines()
            .filter(|l| l.contains("\tcommitted\t"))
            .count(),
        files.len()
    );
    assert_eq!(
        report.lines().filter(|l| l.contains("\tskipped\t")).count(),
        2
    );
    assert!(text.contains("notes.txt: not a DICOM Part 10 file"));
    // The summary matches what the center holds, byte for byte.
    assert_eq!(
        gw.count("SELECT count(*) FROM instances"),
        files.len() as i64
    );
    let index = gw.index();
    for f in &files {
        let (key, offset): (String, i64) = index
            .query_row(
                "SELECT blob_key, dataset_offset FROM instances WHERE sop_instance_uid = ?1",
                [&f.sop_instance_uid],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let stored = std::fs::read(dir.path().join("data/blobs").join(key)).unwrap();
        let original = std::fs::read(&f.path).unwrap();
        let (_, file_offset) = storage::part10::parse_file_header(&original).unwrap();
        assert_eq!(
            sha_hex(&stored[offset as usize..]),
            sha_hex(&original[file_offset..]),
            "{}",
            f.path.display()
        );
    }

    // A re-run skips everything confirmed.
    let again = upload(gw.port, &record, &[], &[&samples]);
    let text = stdout(&again);
    assert!(again.status.success(), "{text}");
    assert_eq!(summary_count(&text, "stored"), 0);
    assert_eq!(
        summary_count(&text, "already committed before"),
        files.len()
    );

    // Another workstation (no record) with the same files, one of them
    // changed: the center already holds the others byte for byte, so only
    // the changed one is sent; the rest are confirmed and recorded.
    let changed = &files
        .iter()
        .find(|f| f.modality == "CT" && f.transfer_syntax == "1.2.840.10008.1.2.1")
        .expect("an uncompressed CT slice")
        .path;
    let mut bytes = std::fs::read(changed).unwrap();
    let pixel = bytes.len() - 100; // inside the pixel data, the header intact
    bytes[pixel] ^= 0x01;
    std::fs::write(changed, &bytes).unwrap();
    let fresh = dir.path().join("other-record.sqlite");
    let report = dir.path().join("report-2.tsv");
    let other = upload(
        gw.port,
        &fresh,
        &["--report", report.to_str().unwrap()],
        &[&samples],
    );
    let text = stdout(&other);
    assert!(
        other.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert_eq!(
        summary_count(&text, "stored"),
        1,
        "{text}\n{}",
        String::from_utf8_lossy(&other.stderr)
    );
    assert_eq!(
        summary_count(&text, "already present at the center"),
        files.len() - 1
    );
    let report = std::fs::read_to_string(&report).unwrap();
    assert_eq!(
        report
            .lines()
            .filter(|l| l.contains("\talready present\t"))
            .count(),
        files.len() - 1
    );
    assert!(report.contains(&format!("{}\tcommitted\t", changed.display())));
    assert_eq!(record_rows(&fresh), files.len() as i64);
    assert_eq!(
        gw.count("SELECT count(*) FROM instance_versions"),
        files.len() as i64 + 1,
        "only the changed file is a new version"
    );
}

#[test]
fn bad_files_are_reported_and_the_rest_still_committed() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(22)).unwrap();
    // A truncated copy and an unreadable (empty) file with a DICOM name.
    let original = std::fs::read(&files[0].path).unwrap();
    std::fs::write(
        samples.join("truncated.dcm"),
        &original[..original.len() / 2],
    )
    .unwrap();
    std::fs::write(samples.join("empty.dcm"), b"").unwrap();
    let gw = Gateway::start(dir.path(), "127.0.0.1:0");
    // A dry run already names the unusable file and fails as the run would.
    let dry = upload(
        gw.port,
        &dir.path().join("record.sqlite"),
        &["--dry-run"],
        &[&samples],
    );
    assert_eq!(dry.status.code(), Some(1), "{}", stdout(&dry));
    assert!(stdout(&dry).contains("truncated.dcm: unusable DICOM file"));
    let out = upload(gw.port, &dir.path().join("record.sqlite"), &[], &[&samples]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("truncated.dcm: unusable DICOM file"),
        "{text}"
    );
    assert_eq!(summary_count(&text, "unusable DICOM files"), 1);
    assert_eq!(summary_count(&text, "committed"), files.len());
}

#[test]
fn copies_conflicting_uids_cut_headers_and_links() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(24)).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    let outside = sample_dicom::generate(&elsewhere, &sample_dicom::Options::small(25)).unwrap();
    // An identical copy: sent once.
    std::fs::copy(&files[0].path, samples.join("copy-of-first.dcm")).unwrap();
    // The same SOP Instance UID with other bytes: neither is sent.
    let mut other = std::fs::read(&files[1].path).unwrap();
    *other.last_mut().unwrap() ^= 0xFF;
    std::fs::write(samples.join("edited-second.dcm"), &other).unwrap();
    // A DICOM file cut inside its File Meta Information: an error, not "not DICOM".
    let head = std::fs::read(&files[2].path).unwrap();
    std::fs::write(samples.join("cut-header.dcm"), &head[..140]).unwrap();
    // A link to a file elsewhere is followed; a link back up does not loop.
    std::os::unix::fs::symlink(&outside[0].path, samples.join("linked.dcm")).unwrap();
    std::os::unix::fs::symlink(&samples, samples.join("loop")).unwrap();
    // A link to nothing: listed and skipped, not an error.
    std::os::unix::fs::symlink(dir.path().join("gone"), samples.join("gone.dcm")).unwrap();

    let gw = Gateway::start(dir.path(), "127.0.0.1:0");
    let out = upload(gw.port, &dir.path().join("record.sqlite"), &[], &[&samples]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(
        summary_count(&text, "identical copies skipped"),
        1,
        "{text}"
    );
    assert_eq!(summary_count(&text, "unusable DICOM files"), 3, "{text}");
    assert!(text.contains("gone.dcm: a link to nothing"), "{text}");
    assert!(
        text.contains("cut-header.dcm: unusable DICOM file: its File Meta Information"),
        "{text}"
    );
    assert!(text.contains("with different bytes"), "{text}");
    // Everything else, the linked file included, and nothing of the conflict.
    // (one held back for its conflict, one more through the link)
    let sent = files.len() - 1 + 1;
    assert_eq!(summary_count(&text, "committed"), sent, "{text}");
    assert_eq!(gw.count("SELECT count(*) FROM instances"), sent as i64);
    let held = |uid: &str| -> i64 {
        gw.index()
            .query_row(
                "SELECT count(*) FROM instances WHERE sop_instance_uid = ?1",
                [uid],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(held(&files[1].sop_instance_uid), 0, "the conflict");
    assert_eq!(held(&outside[0].sop_instance_uid), 1, "the linked file");
}

/// A center that takes no compressed syntax (DCMTK storescp as shipped,
/// bit-preserving): the tool falls back to the uncompressed context it
/// proposed and sends each compressed file's dataset converted.
#[test]
fn a_refused_syntax_falls_back_to_uncompressed() {
    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(26)).unwrap();
    let compressed: Vec<_> = files
        .iter()
        .filter(|f| {
            !matches!(
                f.transfer_syntax.as_str(),
                "1.2.840.10008.1.2"
                    | "1.2.840.10008.1.2.1"
                    | "1.2.840.10008.1.2.2"
                    | "1.2.840.10008.1.2.1.99"
            )
        })
        .collect();
    assert!(
        !compressed.is_empty(),
        "the sample set has compressed files"
    );
    let received = dir.path().join("received");
    std::fs::create_dir_all(&received).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut scp = Command::new("/usr/bin/storescp")
        .args(["+B", "-aet", "COUNTYPACS", "-od"])
        .arg(&received)
        .arg(port.to_string())
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run /usr/bin/storescp (Debian dcmtk)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "storescp did not start");
        std::thread::sleep(Duration::from_millis(25));
    }
    let inputs: Vec<&Path> = compressed.iter().map(|f| f.path.as_path()).collect();
    let out = upload(port, &dir.path().join("record.sqlite"), &[], &inputs);
    let _ = scp.kill();
    let _ = scp.wait();
    let text = stdout(&out);
    // storescp offers no storage commitment: nothing can be confirmed.
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(summary_count(&text, "stored"), compressed.len(), "{text}");
    let got: Vec<Vec<u8>> = std::fs::read_dir(&received)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert_eq!(got.len(), compressed.len());
    for f in &compressed {
        assert!(
            text.contains(&format!(
                "converted {}: sent as {EXPLICIT_LE}",
                f.path.display()
            )),
            "{text}"
        );
        let original = std::fs::read(&f.path).unwrap();
        let (ts, offset) = storage::part10::parse_file_header(&original).unwrap();
        let expected = storage::transcode::convert(&original, offset, &ts, EXPLICIT_LE).unwrap();
        let arrived = got
            .iter()
            .find(|g| {
                let (_, o) = storage::part10::parse_file_header(g).unwrap();
                g[o..] == expected[..]
            })
            .is_some();
        assert!(
            arrived,
            "{} arrived converted, byte for byte",
            f.path.display()
        );
    }
}

#[test]
fn unknown_calling_ae_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    sample_dicom::generate(&samples, &sample_dicom::Options::small(23)).unwrap();
    let gw = Gateway::start(dir.path(), "127.0.0.1:0");
    let out = Command::new(env!("CARGO_BIN_EXE_consortium-upload"))
        .args(["--port", &gw.port.to_string(), "--calling-ae", "STRANGER"])
        .arg("--record")
        .arg(dir.path().join("record.sqlite"))
        .arg(&samples)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("calling AE title not recognized by the center"),
        "{err}"
    );
    assert_eq!(gw.count("SELECT count(*) FROM instances"), 0);
}

#[test]
fn gateway_killed_mid_upload_then_rerun_completes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::demo(24)).unwrap();
    let mut gw = Gateway::start(dir.path(), "127.0.0.1:0");
    let port = gw.port;
    let record = dir.path().join("record.sqlite");
    let tool = Command::new(env!("CARGO_BIN_EXE_consortium-upload"))
        .args([
            "--port",
            &port.to_string(),
            "--calling-ae",
            "XINZHEN_CT",
            "--retries",
            "1",
        ])
        .args(["--associations", "2"])
        .arg("--record")
        .arg(&record)
        .arg(&samples)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while gw.count("SELECT count(*) FROM instances") < 20 {
        assert!(Instant::now() < deadline, "upload made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.kill();
    let first = tool.wait_with_output().unwrap();
    assert!(
        !first.status.success(),
        "the interrupted upload must not claim success"
    );
    drop(gw);

    // Same data, same port: re-running completes the set.
    let gw = Gateway::start(dir.path(), &format!("127.0.0.1:{port}"));
    let second = upload(port, &record, &[], &[&samples]);
    let text = stdout(&second);
    assert!(
        second.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // Stored before the kill but not confirmed: the center says it holds
    // them, so they are not sent again.
    assert_eq!(
        summary_count(&text, "committed")
            + summary_count(&text, "already committed before")
            + summary_count(&text, "already present at the center"),
        files.len()
    );
    // Exactly one instance and one version per file: nothing duplicated.
    assert_eq!(
        gw.count("SELECT count(*) FROM instances"),
        files.len() as i64
    );
    assert_eq!(
        gw.count("SELECT count(*) FROM instance_versions"),
        files.len() as i64
    );
}

#[test]
fn dicomdir_and_config_file_and_missing_uid() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(25)).unwrap();
    let cts: Vec<_> = files.iter().filter(|f| f.modality == "CT").collect();
    let media = media_with(dir.path(), &cts);
    // Two records edited in place (same lengths, so the records' offsets
    // hold): one names its file with an extension, as much media does; one
    // tries to leave the media's folder. The first is sent, the second is
    // named and skipped, and neither stops the rest.
    assert!(cts.len() >= 3, "{} CT files", cts.len());
    let dicomdir = media.join("DICOMDIR");
    let mut bytes = std::fs::read(&dicomdir).unwrap();
    for (from, to) in [
        (b"IMAGES\\IM0002", b"IMAGES\\IM2.DCM"),
        (b"IMAGES\\IM0001", b"IMAGES\\..\\IM01"),
    ] {
        let at = bytes
            .windows(from.len())
            .position(|w| w == from.as_slice())
            .expect("record in the DICOMDIR");
        bytes[at..at + to.len()].copy_from_slice(to);
    }
    std::fs::write(&dicomdir, bytes).unwrap();
    std::fs::rename(media.join("IMAGES/IM0002"), media.join("IMAGES/IM2.DCM")).unwrap();

    // One copy without its SOP Instance UID (DCMTK's dcmodify erases it).
    let broken = dir.path().join("no-uid.dcm");
    std::fs::copy(&cts[0].path, &broken).unwrap();
    let modify = Command::new("/usr/bin/dcmodify")
        .args(["-nb", "-ea", "(0008,0018)"])
        .arg(&broken)
        .output()
        .expect("run /usr/bin/dcmodify (Debian dcmtk)");
    assert!(
        modify.status.success(),
        "{}",
        String::from_utf8_lossy(&modify.stderr)
    );

    let gw = Gateway::start(dir.path(), "127.0.0.1:0");
    let config = dir.path().join("upload.toml");
    std::fs::write(
        &config,
        format!(
            "port = {}\ncalling_ae = \"XINZHEN_CT\"\nassociations = 2\nrecord = \"{}\"\n",
            gw.port,
            dir.path().join("record.sqlite").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_consortium-upload"))
        .arg("--config")
        .arg(&config)
        .arg(media.join("DICOMDIR"))
        .arg(&broken)
        .output()
        .unwrap();
    let text = stdout(&out);
    // The DICOMDIR's instances are committed but the one behind the bad
    // record; that record and the UID-less file are named, and fail the run.
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(summary_count(&text, "committed"), cts.len() - 1, "{text}");
    assert!(
        text.contains(
            r#"DICOMDIR record not followed: invalid Referenced File ID "IMAGES\\..\\IM01""#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "no-uid.dcm: unusable DICOM file: required attribute SOP Instance UID is missing"
        ),
        "{text}"
    );
    assert_eq!(
        gw.count("SELECT count(*) FROM instances"),
        cts.len() as i64 - 1
    );

    // The same media as Linux shows a disc in lower case, its DICOMDIR
    // named bare from inside it: every usable record is still found.
    let lower = dir.path().join("lower");
    std::fs::create_dir_all(lower.join("images")).unwrap();
    std::fs::copy(&dicomdir, lower.join("dicomdir")).unwrap();
    for entry in std::fs::read_dir(media.join("IMAGES")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().to_lowercase();
        std::fs::copy(entry.path(), lower.join("images").join(name)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_consortium-upload"))
        .arg("--config")
        .arg(&config)
        .args(["--dry-run", "dicomdir"])
        .current_dir(&lower)
        .output()
        .unwrap();
    let text = stdout(&out);
    let listed = text
        .lines()
        .filter(|l| l.starts_with("already committed ") || l.starts_with("would send "))
        .count();
    assert_eq!(listed, cts.len() - 1, "{text}");
}

/// A TCP proxy on loopback in front of the center at `port` that cuts the
/// connection whenever `poison` passes towards the center (a weak link
/// that always drops during one file).
fn poisoning_proxy(port: u16, poison: &'static [u8]) -> u16 {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            std::thread::spawn(move || {
                let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
                    return;
                };
                let (mut from_client, mut to_server) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut from_server, mut to_client) = (server, client);
                let back = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(Shutdown::Both);
                });
                let (mut buf, mut seen) = (vec![0u8; 64 * 1024], Vec::new());
                loop {
                    let n = match from_client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(poison.len()).any(|w| w == poison)
                        || to_server.write_all(&buf[..n]).is_err()
                    {
                        break;
                    }
                    seen.drain(..seen.len().saturating_sub(poison.len()));
                }
                let _ = to_server.shutdown(Shutdown::Both);
                let _ = from_client.shutdown(Shutdown::Both);
                let _ = back.join();
            });
        }
    });
    proxy_port
}

#[test]
fn files_the_link_always_drops_fail_alone() {
    const POISON: &[u8] = b"LINK-DROPS-HERE-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let mut files = sample_dicom::generate(&samples, &sample_dicom::Options::small(29)).unwrap();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    // Two files next to each other in the order one association sends
    // them (by path), not deflated (their scan inflates the dataset), get
    // the marker in their pixel data: the link drops during each of them.
    let deflated = |f: &sample_dicom::SampleFile| {
        let bytes = std::fs::read(&f.path).unwrap();
        bytes[..1024.min(bytes.len())]
            .windows(22)
            .any(|w| w == b"1.2.840.10008.1.2.1.99")
    };
    let at = (0..files.len() - 3)
        .find(|&i| !deflated(&files[i]) && !deflated(&files[i + 1]))
        .expect("two files in a row that are not deflated");
    let poisoned: Vec<PathBuf> = files[at..at + 2].iter().map(|f| f.path.clone()).collect();
    for path in &poisoned {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2 + 512;
        bytes[middle..middle + POISON.len()].copy_from_slice(POISON);
        std::fs::write(path, bytes).unwrap();
    }

    let gw = Gateway::start(dir.path(), "127.0.0.1:0");
    let proxy = poisoning_proxy(gw.port, POISON);
    let record = dir.path().join("record.sqlite");
    let out = upload(proxy, &record, &["--associations", "1"], &[&samples]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(summary_count(&text, "failed"), 2, "{text}");
    assert_eq!(summary_count(&text, "committed"), files.len() - 2, "{text}");
    for path in &poisoned {
        assert!(
            text.lines()
                .any(|l| l.contains("FAILED") && l.contains(&*path.to_string_lossy())),
            "{text}"
        );
    }
    assert_eq!(
        gw.count("SELECT count(*) FROM instances"),
        files.len() as i64 - 2
    );
}

/// `dir/media`: copies of `files` as IMAGES/IM0000... (8-character file
/// IDs) under a DICOMDIR made by DCMTK's dcmmkdir.
fn media_with(dir: &Path, files: &[&sample_dicom::SampleFile]) -> PathBuf {
    let media = dir.join("media");
    std::fs::create_dir_all(media.join("IMAGES")).unwrap();
    for (i, f) in files.iter().enumerate() {
        std::fs::copy(&f.path, media.join(format!("IMAGES/IM{i:04}"))).unwrap();
    }
    let mkdir = Command::new("/usr/bin/dcmmkdir")
        .args(["--recurse", "IMAGES"])
        .current_dir(&media)
        .output()
        .expect("run /usr/bin/dcmmkdir (Debian dcmtk)");
    assert!(
        mkdir.status.success(),
        "{}",
        String::from_utf8_lossy(&mkdir.stderr)
    );
    media
}

fn record_rows(record: &Path) -> i64 {
    rusqlite::Connection::open(record)
        .and_then(|c| c.query_row("SELECT count(*) FROM committed", [], |r| r.get(0)))
        .unwrap_or(0)
}

/// The tool itself killed part way (SIGKILL: no chance to tidy up): what
/// the center confirmed before is already in the record, so the re-run
/// sends only the rest.
#[test]
fn a_killed_upload_resumes_from_what_was_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::demo(25)).unwrap();
    let gw = Gateway::start(dir.path(), "127.0.0.1:0");
    let record = dir.path().join("record.sqlite");
    let mut tool = Command::new(env!("CARGO_BIN_EXE_consortium-upload"))
        .args(["--port", &gw.port.to_string(), "--calling-ae", "XINZHEN_CT"])
        .args(["--associations", "1"])
        .arg("--record")
        .arg(&record)
        .arg(&samples)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while record_rows(&record) == 0 {
        assert!(Instant::now() < deadline, "no confirmation recorded");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        tool.try_wait().unwrap().is_none(),
        "the upload ended before it could be interrupted"
    );
    tool.kill().unwrap();
    tool.wait().unwrap();
    let recorded = record_rows(&record) as usize;
    assert!(recorded > 0 && recorded < files.len(), "{recorded}");

    let again = upload(gw.port, &record, &[], &[&samples]);
    let text = stdout(&again);
    assert!(again.status.success(), "{text}");
    assert_eq!(summary_count(&text, "already committed before"), recorded);
    // Sent before the kill but not yet confirmed: the center holds them and
    // confirms them now, so they are not sent again.
    assert_eq!(
        summary_count(&text, "stored") + summary_count(&text, "already present at the center"),
        files.len() - recorded
    );
    assert_eq!(
        gw.count("SELECT count(*) FROM instance_versions"),
        files.len() as i64
    );
}

/// "Committed" is only said on the center's word of this run: files the
/// record calls committed are confirmed again, and when the center no
/// longer holds them (here: a new, empty center at the same address) they
/// are reported, forgotten, and sent by the next run.
#[test]
fn a_record_the_center_no_longer_confirms_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(26)).unwrap();
    let record = dir.path().join("record.sqlite");
    let first_dir = dir.path().join("first");
    std::fs::create_dir_all(&first_dir).unwrap();
    let mut gw = Gateway::start(&first_dir, "127.0.0.1:0");
    let port = gw.port;
    assert!(upload(port, &record, &[], &[&samples]).status.success());
    gw.kill();
    drop(gw);

    let second_dir = dir.path().join("second");
    std::fs::create_dir_all(&second_dir).unwrap();
    let gw = Gateway::start(&second_dir, &format!("127.0.0.1:{port}"));
    let report = dir.path().join("lapsed.tsv");
    let lapsed = upload(
        port,
        &record,
        &["--report", report.to_str().unwrap()],
        &[&samples],
    );
    let text = stdout(&lapsed);
    assert!(!lapsed.status.success(), "{text}");
    assert_eq!(summary_count(&text, "already committed before"), 0);
    assert_eq!(summary_count(&text, "not committed"), files.len());
    let report = std::fs::read_to_string(&report).unwrap();
    assert_eq!(
        report
            .lines()
            .filter(|l| l.contains("\tnot committed\tcommitted in an earlier run"))
            .count(),
        files.len(),
        "{report}"
    );
    assert!(
        text.contains("committed in an earlier run, but not confirmed now (0x0112"),
        "{text}"
    );
    assert_eq!(record_rows(&record), 0);

    let resent = upload(port, &record, &[], &[&samples]);
    let text = stdout(&resent);
    assert!(resent.status.success(), "{text}");
    assert_eq!(summary_count(&text, "committed"), files.len());
    assert_eq!(
        gw.count("SELECT count(*) FROM instances"),
        files.len() as i64
    );

    // One stored object damaged at the center (same size, other bytes): its
    // file is reported (0x0110), forgotten, and repaired by the next run.
    let key: String = gw
        .index()
        .query_row("SELECT blob_key FROM instances LIMIT 1", [], |r| r.get(0))
        .unwrap();
    let blob = second_dir.join("data/blobs").join(key);
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&blob, bytes).unwrap();
    let damaged = upload(port, &record, &[], &[&samples]);
    let text = stdout(&damaged);
    assert!(!damaged.status.success(), "{text}");
    assert!(text.contains("not confirmed now (0x0110"), "{text}");
    assert_eq!(record_rows(&record), files.len() as i64 - 1);
    let repaired = upload(port, &record, &[], &[&samples]);
    let text = stdout(&repaired);
    assert!(repaired.status.success(), "{text}");
    assert_eq!(summary_count(&text, "stored"), 1);
    assert_eq!(
        summary_count(&text, "already committed before"),
        files.len() - 1
    );
}

/// A center that answers 0xA700 (out of resources) to everything: the tool
/// stops after a few answers in a row instead of retrying every file with
/// backoff, and says why.
#[test]
fn a_center_out_of_resources_ends_the_upload_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(27)).unwrap();
    // Every sample is over this limit: each C-STORE is answered 0xA700.
    let gw = Gateway::start_with(dir.path(), "127.0.0.1:0", "max_instance_bytes = 64");
    let record = dir.path().join("record.sqlite");
    let started = Instant::now();
    let out = upload(gw.port, &record, &["--associations", "1"], &[&samples]);
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("(out of resources) to 3 files in a row"),
        "{text}"
    );
    // Not "refused": the center's state, not a verdict on the files.
    assert!(
        text.contains(
            "(out of resources: instance exceeds the limit of 64 bytes) once; run again later"
        ),
        "{text}"
    );
    assert_eq!(
        summary_count(&text, "refused") + summary_count(&text, "failed"),
        files.len()
    );
    // --retries 2: three answers, backoffs of 0.5 and 1 s.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(gw.count("SELECT count(*) FROM instances"), 0);
}

/// A center that confirms the commitment request but never reports on
/// the association (it would report on a new one, which the tool does not
/// listen for): the run ends after the report wait, once per phase, with
/// the reason, nothing said committed and nothing recorded.
#[test]
fn a_center_that_never_reports_ends_the_upload_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(31)).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/no_report_scp.py");
    let actions = dir.path().join("n-actions.log");
    let mut scp = Command::new("python3")
        .arg(script)
        .arg(&actions)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with pynetdicom");
    let mut line = String::new();
    BufReader::new(scp.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("the SCP's port");
    let record = dir.path().join("record.sqlite");
    let started = Instant::now();
    let out = upload(
        port,
        &record,
        &["--associations", "1", "--report-wait", "2"],
        &[&samples],
    );
    let _ = scp.kill();
    let _ = scp.wait();
    let text = stdout(&out);
    let errors = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}\n{errors}");
    assert!(
        errors.contains("the center sent no storage commitment report within 2 s"),
        "{errors}"
    );
    // (This SCP takes most, not all, of the sample classes.)
    let stored = summary_count(&text, "stored");
    assert!(stored * 2 > files.len(), "{text}");
    assert_eq!(summary_count(&text, "committed"), 0, "{text}");
    assert_eq!(summary_count(&text, "not committed"), stored, "{text}");
    assert_eq!(record_rows(&record), 0);
    // Asked once while sending and once at the end, not again and again
    // (each ask waits the full report wait).
    let asked = std::fs::read_to_string(&actions).unwrap_or_default();
    assert_eq!(asked.lines().count(), 2, "{asked}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// A storage SCP on loopback that accepts the storage contexts (and
/// nothing else), and answers every C-STORE with success for message ID
/// 999, not the one it was asked: a center out of step.
fn misanswering_scp() -> u16 {
    use dicom_ul::pdu::{
        AssociationAC, Pdu, PresentationContextResult, PresentationContextResultReason,
        UserVariableItem, read_pdu, write_pdu,
    };
    use std::io::{Read, Write};
    fn read_raw(s: &mut std::net::TcpStream) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 6];
        s.read_exact(&mut head).ok()?;
        let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).ok()?;
        let mut whole = head.to_vec();
        whole.extend(body);
        Some((head[0], whole))
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let Some((_, rq)) = read_raw(&mut s) else {
                    return;
                };
                let Ok(Some(Pdu::AssociationRQ(rq))) = read_pdu(&rq[..], 1 << 20, false) else {
                    return;
                };
                let results = rq
                    .presentation_contexts
                    .iter()
                    .map(|pc| {
                        let storage = pc.abstract_syntax.starts_with("1.2.840.10008.5.1.4.1.1.");
                        PresentationContextResult {
                            id: pc.id,
                            reason: if storage {
                                PresentationContextResultReason::Acceptance
                            } else {
                                PresentationContextResultReason::AbstractSyntaxNotSupported
                            },
                            transfer_syntax: pc.transfer_syntaxes[0].clone(),
                        }
                    })
                    .collect();
                let ac = Pdu::AssociationAC(AssociationAC {
                    protocol_version: 1,
                    calling_ae_title: rq.calling_ae_title,
                    called_ae_title: rq.called_ae_title,
                    application_context_name: rq.application_context_name,
                    presentation_contexts: results,
                    user_variables: vec![UserVariableItem::MaxLength(65_536)],
                });
                let mut out = Vec::new();
                write_pdu(&mut out, &ac).unwrap();
                let _ = s.write_all(&out);
                while let Some((kind, pdu)) = read_raw(&mut s) {
                    if kind != 0x04 {
                        // A-RELEASE-RQ (or an abort): answer and end.
                        let _ = s.write_all(&[0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
                        return;
                    }
                    // The last fragment of a dataset: answer for message 999.
                    let mut rest = &pdu[6..];
                    let mut answer = None;
                    while rest.len() >= 6 {
                        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                        let (context, header) = (rest[4], rest[5]);
                        if header == 0x02 {
                            answer = Some(context);
                        }
                        rest = &rest[4 + len..];
                    }
                    if let Some(context) = answer {
                        let rsp = consortium_dimse::Response::new(0x8001, 999, 0x0000).encode();
                        let mut pdu = vec![0x04, 0];
                        pdu.extend_from_slice(&((rsp.len() + 6) as u32).to_be_bytes());
                        pdu.extend_from_slice(&((rsp.len() + 2) as u32).to_be_bytes());
                        pdu.extend_from_slice(&[context, 0x03]);
                        pdu.extend_from_slice(&rsp);
                        if s.write_all(&pdu).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// Answers for another message say nothing about the file sent: no file is
/// taken as stored, each fails with the reason, and the run fails.
#[test]
fn a_center_out_of_step_stores_nothing_by_our_count() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(33)).unwrap();
    let port = misanswering_scp();
    let record = dir.path().join("record.sqlite");
    let out = upload(port, &record, &["--associations", "1"], &[&samples]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(summary_count(&text, "stored"), 0, "{text}");
    assert_eq!(summary_count(&text, "failed"), files.len(), "{text}");
    assert!(
        text.contains("the center answered message 999 while message 1 was outstanding"),
        "{text}"
    );
    assert_eq!(record_rows(&record), 0);
}

/// A DICOMDIR's file that is a symbolic link leading out of the media's
/// folder (a Rock Ridge disc can carry one) is named and not sent; the
/// rest of the media is.
#[test]
fn a_dicomdir_record_leading_outside_its_folder_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::small(35)).unwrap();
    let cts: Vec<_> = files
        .iter()
        .filter(|f| f.modality == "CT")
        .take(2)
        .collect();
    assert_eq!(cts.len(), 2);
    let media = media_with(dir.path(), &cts);
    // The second file now lives elsewhere; the media holds a link to it.
    let outside = dir.path().join("elsewhere.dcm");
    std::fs::rename(media.join("IMAGES/IM0001"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, media.join("IMAGES/IM0001")).unwrap();
    let out = upload(
        1,
        &dir.path().join("record.sqlite"),
        &["--dry-run"],
        &[&media.join("DICOMDIR")],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            r#"DICOMDIR record not followed: Referenced File ID "IMAGES\\IM0001" leads outside the DICOMDIR's folder"#
        ),
        "{text}"
    );
    let listed: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("would send "))
        .collect();
    assert_eq!(listed.len(), 1, "{text}");
    assert!(listed[0].contains("IM0000"), "{text}");
}

/// A center that admits one association per clinic at a time refuses the
/// committer's association while the lane sends: the tool gives up asking
/// during the run, asks again once the lane is done, and every instance is
/// still committed and recorded.
#[test]
fn a_center_admitting_one_association_still_commits_everything() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    // Enough files that sending outlasts the committer's first gathering.
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::demo(37)).unwrap();
    let gw = Gateway::start_with(dir.path(), "127.0.0.1:0", "max_associations_per_clinic = 1");
    let record = dir.path().join("record.sqlite");
    let out = upload(gw.port, &record, &["--associations", "1"], &[&samples]);
    let text = stdout(&out);
    let errors = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}\n{errors}");
    assert_eq!(summary_count(&text, "committed"), files.len(), "{text}");
    assert_eq!(summary_count(&text, "not committed"), 0, "{text}");
    all_at_the_center_after_a_refusal(&gw, dir.path(), &record, files.len());
}

/// Asked for more associations than the center admits a clinic at once
/// (transient A-ASSOCIATE-RJ), the refused lanes hand their files to the
/// admitted ones: everything is sent and committed, nothing fails.
#[test]
fn lanes_the_center_does_not_admit_hand_their_files_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let files = sample_dicom::generate(&samples, &sample_dicom::Options::demo(41)).unwrap();
    let gw = Gateway::start_with(dir.path(), "127.0.0.1:0", "max_associations_per_clinic = 2");
    let record = dir.path().join("record.sqlite");
    // No retries: a refused lane that waited for a place instead would
    // fail its files at once (as it would after its retries on an upload
    // outlasting them).
    let args = ["--associations", "4", "--retries", "0"];
    let out = upload(gw.port, &record, &args, &[&samples]);
    let text = stdout(&out);
    let errors = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}\n{errors}");
    assert_eq!(summary_count(&text, "committed"), files.len(), "{text}");
    assert_eq!(summary_count(&text, "failed"), 0, "{text}");
    assert!(
        errors.contains("its files go to the other associations"),
        "{errors}"
    );
    // Each file went on an association proposed for it: sent as it is
    // (the demo's syntaxes are all accepted), never converted.
    assert!(!text.contains("converted "), "{text}");
    all_at_the_center_after_a_refusal(&gw, dir.path(), &record, files.len());
}

/// Every one of `files` instances is at the center and in the record, and
/// the center did refuse an association on its clinic limit (else the
/// test calling this would not test what it says).
fn all_at_the_center_after_a_refusal(gw: &Gateway, dir: &Path, record: &Path, files: usize) {
    assert_eq!(gw.count("SELECT count(*) FROM instances"), files as i64);
    assert_eq!(record_rows(record), files as i64);
    let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap();
    assert!(log.contains("clinic association limit reached"), "{log}");
}

/// Media with no DICOM instance on it (an empty mount point, a folder of
/// reports) is an error, not "all 0 instances are committed"; a FIFO
/// given by name is listed, not opened (which would wait forever); and a
/// dry run leaves no record behind.
#[test]
fn nothing_to_send_fails_clearly_and_a_dry_run_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), "127.0.0.1:0");
    let media = dir.path().join("media");
    std::fs::create_dir_all(&media).unwrap();
    std::fs::write(media.join("report.txt"), b"not an image").unwrap();
    let fifo = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let record = dir.path().join("records").join("record.sqlite");

    let dry = upload(gw.port, &record, &["--dry-run"], &[&media, &fifo]);
    let errors = String::from_utf8_lossy(&dry.stderr);
    assert_eq!(dry.status.code(), Some(1), "{}\n{errors}", stdout(&dry));
    assert!(errors.contains("no DICOM instances found"), "{errors}");
    assert!(!record.exists() && !record.parent().unwrap().exists());

    let out = upload(gw.port, &record, &[], &[&media, &fifo]);
    let (text, errors) = (stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{text}\n{errors}");
    assert!(errors.contains("no DICOM instances found"), "{errors}");
    assert!(text.contains("pipe: not a regular file"), "{text}");
    assert!(!text.contains("instances are committed"), "{text}");
}
