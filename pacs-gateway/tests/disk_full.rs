//! A full disk: the data directory on a small tmpfs of the gateway's own
//! (a real filesystem that runs out of space, see `GatewaySpec::
//! data_tmpfs_bytes`). Instances that do not fit are refused with 0xA700
//! ("send again later"), everything acknowledged is kept and indexed,
//! nothing half-written is left, and the gateway keeps serving. With the
//! default reserve, instances are refused while the index and the audit
//! trail still have room.

mod common;

use common::scu::{self, CT_IMAGE_STORAGE, Reply};
use common::{Gateway, GatewaySpec};

const MIB: u64 = 1 << 20;

/// A file of `bytes` taking room on the gateway's filesystem, to be
/// deleted to give the room back.
fn ballast(gw: &Gateway, bytes: u64) -> std::path::PathBuf {
    let path = gw.data_dir.join("ballast");
    std::fs::write(&path, vec![1u8; bytes as usize]).unwrap();
    path
}

/// Stores instance number `i` (1 MiB of pixel data): its status, UID and
/// dataset SHA-256.
fn store(gw: &Gateway, scu: &mut scu::Scu, i: u32) -> (u16, String, String) {
    let uid = format!("2.25.77{i:04}");
    let ds = scu::ct_dataset(&uid, "2.25.770", MIB as usize);
    let Reply::Status(status) = scu.store(1, CT_IMAGE_STORAGE, &uid, &ds) else {
        panic!("association lost at instance {i}:\n{}", gw.log());
    };
    (status, uid, common::sha256(&ds))
}

/// Sends 1 MiB instances until `stop_after_refusals` in a row are refused;
/// the statuses in order, with the SOP Instance UIDs and dataset SHA-256s
/// of the acknowledged ones.
fn fill(
    gw: &Gateway,
    scu: &mut scu::Scu,
    stop_after_refusals: usize,
) -> (Vec<u16>, Vec<(String, String)>) {
    let (mut statuses, mut acked, mut refused_in_a_row) = (Vec::new(), Vec::new(), 0);
    for i in 0..200 {
        let (status, uid, sha) = store(gw, scu, i);
        statuses.push(status);
        if status == 0 {
            acked.push((uid, sha));
            refused_in_a_row = 0;
        } else {
            refused_in_a_row += 1;
            if refused_in_a_row == stop_after_refusals {
                break;
            }
        }
    }
    (statuses, acked)
}

fn assert_kept(gw: &Gateway, acked: &[(String, String)]) {
    assert_eq!(
        gw.instance_count(),
        acked.len() as i64,
        "indexed = acknowledged"
    );
    for (uid, sha) in acked {
        let (blob, offset) = gw
            .blob_of(uid)
            .unwrap_or_else(|| panic!("acknowledged {uid} not indexed"));
        let bytes = std::fs::read(&blob).unwrap();
        assert_eq!(&common::sha256(&bytes[offset..]), sha, "{uid} changed");
    }
    assert!(gw.data_dir.join("spool").is_dir(), "spool not reachable");
    assert_eq!(gw.spool_files(), 0, "partial instances left in the spool");
}

#[test]
fn a_disk_that_fills_up_refuses_instances_and_keeps_every_acknowledged_one() {
    let dir = tempfile::tempdir().unwrap();
    let spec = GatewaySpec {
        // No reserve: the filesystem itself runs out (ENOSPC).
        storage_extra: "min_free_bytes = 0".into(),
        data_tmpfs_bytes: Some(24 * MIB),
        ..Default::default()
    };
    let gw = Gateway::start(dir.path(), &spec);
    let ballast = ballast(&gw, 4 * MIB);
    let mut scu = scu::associate_ct(gw.port);
    let (statuses, mut acked) = fill(&gw, &mut scu, 3);
    assert!(acked.len() >= 10, "stored only {} of 24 MiB", acked.len());
    assert!(
        statuses.iter().all(|s| *s == 0 || *s == 0xA700),
        "only success or 0xA700 (out of resources): {statuses:04X?}"
    );
    assert_eq!(&statuses[statuses.len() - 3..], [0xA700; 3]);
    assert!(gw.log().contains("No space left on device"), "{}", gw.log());
    assert_kept(&gw, &acked);
    gw.assert_serving();
    // Room again: the same association stores again.
    std::fs::remove_file(ballast).unwrap();
    let (status, uid, sha) = store(&gw, &mut scu, 500);
    assert_eq!(status, 0, "{}", gw.log());
    acked.push((uid, sha));
    assert_kept(&gw, &acked);
}

#[test]
fn the_reserve_refuses_instances_while_the_index_still_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let spec = GatewaySpec {
        storage_extra: format!("min_free_bytes = {}", 12 * MIB),
        data_tmpfs_bytes: Some(32 * MIB),
        ..Default::default()
    };
    let gw = Gateway::start(dir.path(), &spec);
    let ballast = ballast(&gw, 2 * MIB);
    let mut scu = scu::associate_ct(gw.port);
    let (statuses, mut acked) = fill(&gw, &mut scu, 2);
    assert_eq!(&statuses[statuses.len() - 2..], [0xA700; 2]);
    // About 18 MiB fit above the reserve; the filesystem never ran out.
    assert!(
        (12..=18).contains(&acked.len()),
        "{} instances stored with a 12 MiB reserve on 32 MiB",
        acked.len()
    );
    let log = gw.log();
    assert!(log.contains("storage full"), "{log}");
    assert!(!log.contains("No space left on device"), "{log}");
    assert_kept(&gw, &acked);
    // The index and its audit trail still take writes: a query is answered
    // and recorded.
    let out = std::process::Command::new("/usr/bin/findscu")
        .args(["-S", "-aet", "COUNTYWS1", "-aec", common::AE])
        .args([
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID=2.25.770",
        ])
        .arg("127.0.0.1")
        .arg(gw.port.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audited: i64 = gw
        .index()
        .query_row(
            "SELECT count(*) FROM audit WHERE action = 'C-FIND' AND outcome = 'success'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(audited, 1);
    // Room again: stored again.
    std::fs::remove_file(ballast).unwrap();
    let (status, uid, sha) = store(&gw, &mut scu, 500);
    assert_eq!(status, 0, "{}", gw.log());
    acked.push((uid, sha));
    assert_kept(&gw, &acked);
}
