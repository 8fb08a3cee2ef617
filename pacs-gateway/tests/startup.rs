//! The command line: `--listen` and `--data-dir` override the configuration
//! file; standard output is exactly one line, `listening on HOST:PORT`;
//! Ctrl-C (SIGINT) stops the gateway cleanly, as SIGTERM does.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::scu::{self, Reply};

#[test]
fn flags_override_the_file_one_line_is_said_and_ctrl_c_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    // An address no one here can bind, and a data directory never used.
    let config = format!(
        "[gateway]\nae_title = \"{}\"\nlisten = \"192.0.2.1:104\"\n\n[storage]\ndata_dir = \"from-file\"\n{}",
        common::AE,
        common::GatewaySpec::default().clinics
    );
    std::fs::write(dir.path().join("gateway.toml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pacs-gateway"))
        .current_dir(dir.path())
        .args(["--config", "gateway.toml", "--listen", "127.0.0.1:0"])
        .args(["--data-dir", "from-flag"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("listening on 127.0.0.1:")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();

    let mut sender = scu::associate_ct(port);
    let ds = scu::ct_dataset("2.25.501", "2.25.50", 256);
    assert_eq!(
        sender.store(1, scu::CT_IMAGE_STORAGE, "2.25.501", &ds),
        Reply::Status(0)
    );
    assert!(sender.release());
    assert!(dir.path().join("from-flag/index.sqlite").exists());
    assert!(!dir.path().join("from-file").exists());

    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "nothing after the one line");
}
