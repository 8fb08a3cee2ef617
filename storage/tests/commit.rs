//! The storage contract through its public API, on the local filesystem and
//! on an in-memory object store.

use std::sync::Arc;

use storage::{Source, Storage, StoreOutcome};

const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

fn el(tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    let mut out = Vec::new();
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    out.extend_from_slice(&v);
    out
}

fn dataset(sop_uid: &str, description: &str) -> Vec<u8> {
    dataset_named(sop_uid, description, "Zhang^San=张^三")
}

async fn store(storage: &Storage, ds: &[u8]) -> StoreOutcome {
    store_as(storage, ds, "xinzhen").await
}

async fn store_as(storage: &Storage, ds: &[u8], clinic: &str) -> StoreOutcome {
    let attrs = storage::attrs::read_bytes(ds, EXPLICIT_LE).unwrap();
    let mut spool = storage
        .spool(CT, &attrs.sop_instance_uid, EXPLICIT_LE, 1 << 20)
        .unwrap();
    for chunk in ds.chunks(7) {
        spool.write(chunk).unwrap();
    }
    let spooled = storage.finish_spool(spool).unwrap();
    let source = Source {
        clinic_id: clinic.into(),
        calling_ae: format!("{}_CT", clinic.to_uppercase()),
    };
    storage.commit(spooled, attrs, &source).await.unwrap()
}

async fn contract(storage: &Storage) {
    let first = dataset("2.25.100", "head");
    assert_eq!(store(storage, &first).await, StoreOutcome::Stored);
    assert_eq!(store(storage, &first).await, StoreOutcome::AlreadyStored);

    let reader = storage.reader().unwrap();
    let rec = reader.instance("2.25.100").unwrap().unwrap();
    assert_eq!(rec.study_instance_uid, "2.25.10");
    assert_eq!(rec.clinic_id, "xinzhen");
    // The blob is a Part 10 file whose dataset is byte-for-byte what was received.
    let blob = storage.blobs().get(&rec.blob_key).await.unwrap();
    assert_eq!(&blob[rec.dataset_offset as usize..], &first[..]);
    assert_eq!(&blob[128..132], b"DICM");

    // Same UID, different bytes: a new current version, the old one kept.
    let second = dataset("2.25.100", "head, corrected");
    match store(storage, &second).await {
        StoreOutcome::NewVersion { previous_sha256 } => assert_eq!(previous_sha256, rec.sha256),
        other => panic!("unexpected {other:?}"),
    }
    let rec2 = reader.instance("2.25.100").unwrap().unwrap();
    assert_ne!(rec2.sha256, rec.sha256);
    let versions = reader.versions("2.25.100").unwrap();
    assert_eq!(versions.len(), 2);
    assert!(versions[0].superseded_at.is_some() && versions[1].superseded_at.is_none());
    assert!(
        storage
            .blobs()
            .size(&versions[0].blob_key)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(reader.instance_count().unwrap(), 1);
    assert!(storage.verify().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_filesystem_contract_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = Storage::open(dir.path()).unwrap();
        contract(&storage).await;
        // Only two blob files exist: the identical re-send made no copy.
        let count = walk(&dir.path().join("blobs")).len();
        assert_eq!(count, 2);
        // A spool abandoned mid-receive leaves nothing behind.
        let mut spool = storage.spool(CT, "2.25.999", EXPLICIT_LE, 1 << 20).unwrap();
        spool.write(b"partial").unwrap();
        drop(spool);
        assert!(walk(&dir.path().join("spool")).is_empty());
    }
    let reopened = Storage::open(dir.path()).unwrap();
    let reader = reopened.reader().unwrap();
    assert_eq!(reader.instance_count().unwrap(), 1);
    assert!(reopened.verify().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_object_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(object_store::memory::InMemory::new());
    let storage = Storage::open_with_store(dir.path(), store).unwrap();
    contract(&storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limit_refuses_oversized_instances() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path()).unwrap();
    let mut spool = storage.spool(CT, "2.25.1", EXPLICIT_LE, 10).unwrap();
    assert!(spool.write(&[0u8; 8]).is_ok());
    assert!(matches!(
        spool.write(&[0u8; 8]),
        Err(storage::Error::TooLarge { limit: 10 })
    ));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clinic_cannot_take_over_a_study() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path()).unwrap();
    store_as(&storage, &dataset("2.25.300", "from A"), "xinzhen").await;
    // Clinic B reuses the Study Instance UID (and sends the same instance too).
    store_as(&storage, &dataset("2.25.301", "from B"), "baishui").await;
    store_as(&storage, &dataset("2.25.300", "from A"), "baishui").await;
    let reader = storage.reader().unwrap();
    let (clinic, description): (String, String) = reader
        .connection()
        .query_row(
            "SELECT p.clinic_id, st.description FROM studies st JOIN patients p ON p.pk = st.patient_pk
             WHERE st.study_uid = '2.25.10'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (clinic.as_str(), description.as_str()),
        ("xinzhen", "from A")
    );
    assert_eq!(
        reader.instance("2.25.300").unwrap().unwrap().clinic_id,
        "xinzhen"
    );
    // Both senders of those bytes get them committed; a third clinic does not.
    let refs = [(CT.to_string(), "2.25.300".to_string())];
    for (clinic, expected) in [
        ("xinzhen", storage::CommitCheck::Committed),
        ("baishui", storage::CommitCheck::Committed),
        ("county", storage::CommitCheck::NoSuchInstance),
    ] {
        let checks = storage.check_committed(Some(clinic), &refs).await.unwrap();
        assert_eq!(checks, vec![expected], "{clinic}");
    }
    // A new version from xinzhen: baishui sent the old bytes, which are
    // still kept (as the superseded version), so they stay committed.
    store_as(&storage, &dataset("2.25.300", "from A, again"), "xinzhen").await;
    let checks = storage
        .check_committed(Some("baishui"), &refs)
        .await
        .unwrap();
    assert_eq!(checks, vec![storage::CommitCheck::Committed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clinics_bytes_under_a_held_uid_are_kept_but_never_current() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path()).unwrap();
    let ours = dataset_named("2.25.400", "from A", "Wang^Fang=王^芳");
    assert_eq!(
        store_as(&storage, &ours, "xinzhen").await,
        StoreOutcome::Stored
    );
    let reader = storage.reader().unwrap();
    let owner_record = reader.instance("2.25.400").unwrap().unwrap();
    // Clinic B sends other bytes (another patient's name) under that UID.
    let theirs = dataset_named("2.25.400", "from B", "Li^Lei=李^雷");
    let kept = StoreOutcome::KeptBesideOwner {
        owner: "xinzhen".into(),
    };
    assert_eq!(store_as(&storage, &theirs, "baishui").await, kept);
    assert_eq!(store_as(&storage, &theirs, "baishui").await, kept);
    // What everyone reads is still the owner's instance, and its patient.
    assert_eq!(reader.instance("2.25.400").unwrap().unwrap(), owner_record);
    let blob = storage.blobs().get(&owner_record.blob_key).await.unwrap();
    assert_eq!(&blob[owner_record.dataset_offset as usize..], &ours[..]);
    let names: Vec<String> = reader
        .connection()
        .prepare("SELECT name_search FROM patients")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(names.len(), 1, "no patient row from B's bytes: {names:?}");
    assert!(names[0].contains("WANG"), "{names:?}");
    // B's bytes are kept (once), recorded as a version that never was current.
    let versions = reader.versions("2.25.400").unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0].superseded_at, None);
    assert!(versions[1].superseded_at.is_some());
    assert_ne!(versions[1].sha256, owner_record.sha256);
    assert!(
        storage
            .blobs()
            .size(&versions[1].blob_key)
            .await
            .unwrap()
            .is_some()
    );
    // Each clinic gets the bytes it sent committed; county the current ones.
    let refs = [(CT.to_string(), "2.25.400".to_string())];
    for clinic in [Some("xinzhen"), Some("baishui"), None] {
        let checks = storage.check_committed(clinic, &refs).await.unwrap();
        assert_eq!(checks, vec![storage::CommitCheck::Committed], "{clinic:?}");
    }
    assert!(storage.verify().await.unwrap().is_empty());

    // A true UID clash across SOP classes: B's MR object under A's CT UID
    // is committed for B as the MR it is.
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    store_as(&storage, &dataset("2.25.401", "CT from A"), "xinzhen").await;
    let mut mr = dataset("2.25.401", "MR from B");
    let at = mr
        .windows(CT.len())
        .position(|w| w == CT.as_bytes())
        .unwrap();
    mr[at..at + MR.len()].copy_from_slice(MR.as_bytes()); // same length
    assert!(matches!(
        store_as(&storage, &mr, "baishui").await,
        StoreOutcome::KeptBesideOwner { .. }
    ));
    let checks = storage
        .check_committed(Some("baishui"), &[(MR.to_string(), "2.25.401".to_string())])
        .await
        .unwrap();
    assert_eq!(checks, vec![storage::CommitCheck::Committed]);
}

fn dataset_named(sop_uid: &str, description: &str, name: &str) -> Vec<u8> {
    let mut ds = Vec::new();
    ds.extend(el(0x0008_0005, b"CS", b"ISO_IR 192"));
    ds.extend(el(0x0008_0016, b"UI", CT.as_bytes()));
    ds.extend(el(0x0008_0018, b"UI", sop_uid.as_bytes()));
    ds.extend(el(0x0008_0060, b"CS", b"CT"));
    ds.extend(el(0x0008_1030, b"LO", description.as_bytes()));
    ds.extend(el(0x0010_0010, b"PN", name.as_bytes()));
    ds.extend(el(0x0010_0020, b"LO", b"P1"));
    ds.extend(el(0x0020_000D, b"UI", b"2.25.10"));
    ds.extend(el(0x0020_000E, b"UI", b"2.25.11"));
    ds
}

/// (patients, studies, series, study description, patient name_search, last_received_at)
fn study_state(storage: &Storage) -> (i64, i64, i64, String, String, String) {
    let reader = storage.reader().unwrap();
    reader
        .connection()
        .query_row(
            "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM studies),
                    (SELECT count(*) FROM series), st.description, p.name_search, st.last_received_at
             FROM studies st JOIN patients p ON p.pk = st.patient_pk WHERE st.study_uid = '2.25.10'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_attributes_keep_rows_and_changed_ones_update_them() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path()).unwrap();
    store(&storage, &dataset_named("2.25.400", "head", "Zhang^San")).await;
    let first = study_state(&storage);
    assert_eq!(
        (
            first.0,
            first.1,
            first.2,
            first.3.as_str(),
            first.4.as_str()
        ),
        (1, 1, 1, "head", "ZHANG^SAN")
    );

    // The same attributes again: one patient, study and series; only the
    // arrival time moves on.
    store(&storage, &dataset_named("2.25.401", "head", "Zhang^San")).await;
    let same = study_state(&storage);
    assert_eq!(
        (same.0, same.1, same.2, &same.3, &same.4),
        (1, 1, 1, &first.3, &first.4)
    );
    assert!(same.5 > first.5, "{} then {}", first.5, same.5);

    // Corrected attributes from the same clinic are applied, indexes too.
    store(
        &storage,
        &dataset_named("2.25.402", "head and neck", "Zhang^Sanfeng"),
    )
    .await;
    let corrected = study_state(&storage);
    assert_eq!(
        (
            corrected.0,
            corrected.1,
            corrected.2,
            corrected.3.as_str(),
            corrected.4.as_str()
        ),
        (1, 1, 1, "head and neck", "ZHANG^SANFENG")
    );
    let reader = storage.reader().unwrap();
    let by_name: i64 = reader
        .connection()
        .query_row(
            "SELECT count(*) FROM patients INDEXED BY patients_by_name WHERE name_search = 'ZHANG^SANFENG'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(by_name, 1);
    drop(reader);

    // Another clinic's different description changes nothing but the time.
    store_as(
        &storage,
        &dataset_named("2.25.403", "other", "Zhang^Sanfeng"),
        "baishui",
    )
    .await;
    let other = study_state(&storage);
    assert_eq!(other.3, "head and neck");
    assert!(other.5 > corrected.5);
}
