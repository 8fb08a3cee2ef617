//! Blobs in an S3-compatible bucket (`[storage.s3]`), against a real S3
//! server on loopback (moto's, installed by scripts/install-deps.sh): every
//! instance is in the bucket byte for byte, nothing under the data
//! directory's `blobs/`, retrieval and storage commitment read it back, and
//! a store that is down fails the C-STORE with nothing indexed.

mod common;

use std::path::Path;
use std::process::Command;

use common::commit::commit_scu;
use common::s3::S3Server;
use common::scu::{self, CT_IMAGE_STORAGE, Reply};
use common::{Gateway, GatewaySpec};

const SECRET: &str = "s3-secret-never-logged";

fn gateway_on(dir: &Path, s3: &S3Server) -> Gateway {
    let spec = GatewaySpec {
        storage_extra: common::s3::storage_section(s3.port, SECRET),
        ..Default::default()
    };
    Gateway::start(dir, &spec)
}

/// `(blob key, dataset offset, SHA-256)` of an instance's current version.
fn indexed(gw: &Gateway, uid: &str) -> (String, usize, String) {
    gw.index()
        .query_row(
            "SELECT blob_key, dataset_offset, sha256 FROM instances WHERE sop_instance_uid = ?1",
            [uid],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize, r.get(2)?)),
        )
        .unwrap()
}

fn files_under(dir: &Path) -> usize {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .map(|p| if p.is_dir() { files_under(&p) } else { 1 })
            .sum(),
        Err(_) => 0,
    }
}

#[test]
fn instances_are_kept_in_the_bucket_and_read_back_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path());
    s3.create_bucket();
    let gw = gateway_on(dir.path(), &s3);

    // Four small slices, and one over the 16 MiB part size (a multipart upload).
    let study = "2.25.8080";
    let sizes = [4096, 4096, 4096, 4096, 20 << 20];
    let sent: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let uid = format!("{study}.{i}");
            let ds = scu::ct_dataset(&uid, study, n);
            (uid, ds)
        })
        .collect();
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE])];
    let scu::Association::Accepted(mut sender) =
        scu::associate(gw.port, "COUNTYWS1", common::AE, contexts)
    else {
        panic!("association refused")
    };
    for (uid, ds) in &sent {
        assert_eq!(
            sender.store(1, CT_IMAGE_STORAGE, uid, ds),
            Reply::Status(0),
            "{}",
            gw.log()
        );
    }
    assert!(sender.release());

    assert_eq!(gw.instance_count(), sent.len() as i64);
    for (uid, ds) in &sent {
        let (key, offset, sha) = indexed(&gw, uid);
        let object = s3
            .object(&key)
            .unwrap_or_else(|| panic!("{key} not in the bucket"));
        assert_eq!(common::sha256(&object), sha, "{uid}: the bucket's bytes");
        assert!(object[offset..] == ds[..], "{uid}: dataset as sent");
    }
    assert_eq!(files_under(&gw.data_dir.join("blobs")), 0, "no local blobs");
    assert_eq!(gw.spool_files(), 0);

    // Retrieval reads the bucket: getscu receives the bytes sent.
    let received = common::getscu_study(&gw, dir.path(), "COUNTYWS1", study);
    assert_eq!(received.len(), sent.len());
    for (uid, ds) in &sent {
        assert!(received[uid] == *ds, "{uid}: getscu received other bytes");
    }

    // Commitment re-verifies the bucket's bytes: all committed, then a
    // damaged object is reported failed (0x0110) and the rest still committed.
    let refs: Vec<(&str, &str)> = sent
        .iter()
        .map(|(uid, _)| (CT_IMAGE_STORAGE, uid.as_str()))
        .collect();
    let report = commit_scu(gw.port, "COUNTYWS1", &refs);
    assert_eq!(report.event_type, 1, "{report:?}");
    assert_eq!(report.committed.len(), sent.len());
    let (damaged_key, _, _) = indexed(&gw, &sent[1].0);
    s3.put_object(&damaged_key, b"not the instance");
    let report = commit_scu(gw.port, "COUNTYWS1", &refs);
    assert_eq!(report.event_type, 2, "{report:?}");
    assert_eq!(report.failed_reason(&sent[1].0), Some(0x0110));
    assert_eq!(report.committed.len(), sent.len() - 1);

    let log = gw.log();
    assert!(!log.contains(SECRET), "the secret key reached the log");
}

#[test]
fn a_store_that_is_down_fails_the_c_store_and_indexes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(dir.path());
    s3.create_bucket();
    let gw = gateway_on(dir.path(), &s3);
    let mut sender = scu::associate_ct(gw.port);
    let first = scu::ct_dataset("2.25.8091", "2.25.809", 4096);
    assert_eq!(
        sender.store(1, CT_IMAGE_STORAGE, "2.25.8091", &first),
        Reply::Status(0)
    );

    s3.stop();
    let second = scu::ct_dataset("2.25.8092", "2.25.809", 4096);
    // Out of resources: a transient failure the sender may retry.
    assert_eq!(
        sender.store(1, CT_IMAGE_STORAGE, "2.25.8092", &second),
        Reply::Status(0xA700)
    );
    assert!(sender.release());
    assert_eq!(gw.instance_count(), 1, "nothing indexed for the failed one");
    assert_eq!(gw.spool_files(), 0, "its spool file is gone");
    gw.assert_serving();
    assert!(
        gw.log().contains("C-STORE failed"),
        "the failure is logged: {}",
        gw.log()
    );
}

/// A bucket that does not exist (or credentials that may not write) stops
/// the gateway at start, with the reason, instead of failing every C-STORE.
#[test]
fn a_missing_bucket_stops_the_gateway_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path()); // no bucket created
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nae_title = \"{}\"\nlisten = \"127.0.0.1:0\"\n\n[storage]\ndata_dir = \"data\"\n{}",
            common::AE,
            common::s3::storage_section(s3.port, SECRET)
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pacs-gateway"))
        .current_dir(dir.path())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "never said it was listening");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the blob store cannot be written"),
        "{stderr}"
    );
    assert!(!stderr.contains(SECRET));
}
