//! A success status is a promise: instances acknowledged before a SIGKILL
//! are present and byte-identical after restart, no index row points at a
//! missing blob, a huge instance streams with bounded memory, and a second
//! gateway on the same data directory refuses to start.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::scu::{self, CT_IMAGE_STORAGE, Reply};
use common::{Gateway, GatewaySpec};

#[test]
fn sigkill_during_concurrent_bulk_send_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    for round in 0..3u32 {
        let stop = Arc::new(AtomicBool::new(false));
        let senders: Vec<_> = (0..4u32)
            .map(|t| {
                let (acked, stop, port) = (acked.clone(), stop.clone(), gw.port);
                std::thread::spawn(move || {
                    let mut scu = scu::associate_ct(port);
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let uid = format!(
                            "2.25.{}",
                            1_000_000_000 + round * 100_000_000 + t * 10_000_000 + i
                        );
                        let ds = scu::ct_dataset(&uid, &format!("2.25.5{round}{t}"), 120_000);
                        match scu.store(1, CT_IMAGE_STORAGE, &uid, &ds) {
                            Reply::Status(0) => {
                                acked.lock().unwrap().push((uid, common::sha256(&ds)))
                            }
                            _ => break, // the gateway died under us
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(400 + 150 * u64::from(round)));
        let before = acked.lock().unwrap().len();
        gw.sigkill_in_place();
        stop.store(true, Ordering::Relaxed);
        for s in senders {
            s.join().unwrap();
        }
        assert!(before > 0, "round {round} made progress before the kill");
        gw = gw.restart();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "only {} instances acknowledged",
        acked.len()
    );
    eprintln!(
        "{} instances acknowledged across 3 SIGKILLs, all verified",
        acked.len()
    );
    for (uid, sha) in &acked {
        let (blob, offset) = gw
            .blob_of(uid)
            .unwrap_or_else(|| panic!("acknowledged {uid} missing after SIGKILL"));
        let bytes = std::fs::read(&blob).unwrap();
        assert_eq!(&common::sha256(&bytes[offset..]), sha, "{uid} changed");
    }
    let data_dir = gw.data_dir.clone();
    assert!(gw.stop().success(), "SIGTERM ends the gateway cleanly");
    // No index row points at a missing or different blob.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let storage = storage::Storage::open(&data_dir).unwrap();
    let problems = rt.block_on(storage.verify()).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn half_gigabyte_instance_streams_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.dcm");
    let sample = sample_dicom::write_large_instance(&path, 512 << 20, 5).unwrap();
    assert!(sample.size >= 512 << 20);
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let contexts: &[(u8, &str, &[&str])] = &[(1, &sample.sop_class_uid, &[scu::EXPLICIT_LE])];
    let scu::Association::Accepted(mut scu) =
        scu::associate(gw.port, "XINZHEN_CT", common::AE, contexts)
    else {
        panic!("association refused")
    };
    // Stream the file's dataset as is, 256 KiB per PDU.
    let original_offset = storage::part10::parse_file_header(&read_prefix(&path))
        .unwrap()
        .1 as u64;
    let mut file = std::fs::File::open(&path).unwrap();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(original_offset)).unwrap();
    let reply = scu.store_stream(
        1,
        &sample.sop_class_uid,
        &sample.sop_instance_uid,
        file,
        sample.size - original_offset,
    );
    assert_eq!(reply, Reply::Status(0));
    assert!(scu.release());
    let peak = gw.peak_rss();
    assert!(
        peak < 96 << 20,
        "gateway peak RSS {} MiB for a 512 MiB instance",
        peak >> 20
    );
    let (blob, offset) = gw.blob_of(&sample.sop_instance_uid).unwrap();
    assert_eq!(
        hash_from(&blob, offset as u64),
        hash_from(&path, original_offset),
        "stored dataset differs"
    );
}

fn read_prefix(path: &std::path::Path) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; 4096];
    let n = std::fs::File::open(path).unwrap().read(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn hash_from(path: &std::path::Path, offset: u64) -> String {
    use sha2::Digest;
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(std::io::SeekFrom::Start(offset)).unwrap();
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A second gateway started on the same data directory (a second `make
/// run`, an operator's mistake) refuses to start, with the reason, instead
/// of discarding the first one's spool; the first one serves on.
#[test]
fn a_second_gateway_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_pacs-gateway"))
        .current_dir(dir.path())
        .arg("--config")
        .arg(&gw.config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It must give up at once; one that started serving is stopped here.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second gateway on the same data directory kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = second.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "never listening: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    gw.assert_serving();
    let scu::Association::Accepted(mut scu) = scu::associate(
        gw.port,
        common::CT_AE,
        common::AE,
        &[(1, scu::CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE])],
    ) else {
        panic!("refused")
    };
    let ds = scu::ct_dataset("2.25.991", "2.25.99", 1024);
    assert_eq!(
        scu.store(1, scu::CT_IMAGE_STORAGE, "2.25.991", &ds),
        scu::Reply::Status(0)
    );
    assert!(scu.release());
}
