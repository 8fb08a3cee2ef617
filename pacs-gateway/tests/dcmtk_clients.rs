//! Real clients we did not write: DCMTK's `echoscu` and `storescu` sending
//! every kind of sample object, in several transfer syntaxes.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{Gateway, GatewaySpec, ReferenceScp, dataset_of, storescu, transfer_syntax_of};
use sample_dicom::{Options, SampleFile};

fn clinic_of(ae: &str) -> &'static str {
    match ae {
        "XINZHEN_CT" | "XINZHEN_US" => "xinzhen",
        "BAISHUI_DR" | "BAISHUI_ECG" => "baishui",
        "COUNTYWS1" => "county",
        other => panic!("sample AE {other} not in the test registry"),
    }
}

/// Files grouped by sending AE and transfer syntax.
fn by_sender(files: &[SampleFile]) -> BTreeMap<(String, String), Vec<PathBuf>> {
    let mut groups: BTreeMap<(String, String), Vec<PathBuf>> = BTreeMap::new();
    for f in files {
        groups
            .entry((f.clinic_ae.clone(), f.transfer_syntax.clone()))
            .or_default()
            .push(f.path.clone());
    }
    groups
}

fn blob_files(gw: &Gateway) -> usize {
    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p)
            .map(|d| {
                d.map(|e| {
                    let path = e.unwrap().path();
                    if path.is_dir() { walk(&path) } else { 1 }
                })
                .sum()
            })
            .unwrap_or(0)
    }
    walk(&gw.data_dir.join("blobs"))
}

#[test]
fn every_sample_object_is_stored_byte_for_byte_and_attributed() {
    let dir = tempfile::tempdir().unwrap();
    let files = sample_dicom::generate(&dir.path().join("samples"), &Options::small(7)).unwrap();
    let syntaxes: std::collections::BTreeSet<_> =
        files.iter().map(|f| f.transfer_syntax.as_str()).collect();
    assert!(
        syntaxes.len() >= 5,
        "samples cover several transfer syntaxes: {syntaxes:?}"
    );
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    assert!(
        common::echoscu(gw.port, "XINZHEN_CT", common::AE)
            .status
            .success()
    );

    // What storescu actually sends (it re-encodes some elements) is
    // recorded by DCMTK's own storescp in bit-preserving mode.
    let mut sent = std::collections::HashMap::new();
    for (i, ((ae, ts), paths)) in by_sender(&files).into_iter().enumerate() {
        let flag = common::propose_flag(&ts);
        let out = storescu(gw.port, &ae, &[flag], &paths);
        assert!(
            out.status.success(),
            "storescu as {ae} ({ts}) failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            gw.log()
        );
        let reference = ReferenceScp::start(
            &dir.path().join(format!("reference-{i}")),
            &flag.replace('-', "+"),
        );
        let out = common::storescu(reference.port, &ae, &[flag], &paths);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        sent.extend(reference.received());
    }
    assert_eq!(gw.instance_count(), files.len() as i64);
    let index = gw.index();
    for f in &files {
        let (blob, offset) = gw.blob_of(&f.sop_instance_uid).expect("indexed");
        let stored = std::fs::read(&blob).unwrap();
        assert_eq!(
            transfer_syntax_of(&stored),
            f.transfer_syntax,
            "{}",
            f.path.display()
        );
        assert!(
            stored[offset..] == sent[&f.sop_instance_uid][..],
            "{} not stored byte-for-byte as sent",
            f.path.display()
        );
        let (clinic, ae, sha): (String, String, String) = index
            .query_row(
                "SELECT clinic_id, calling_ae, sha256 FROM instances WHERE sop_instance_uid = ?1",
                [&f.sop_instance_uid],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(clinic, clinic_of(&f.clinic_ae));
        assert_eq!(ae, f.clinic_ae);
        assert_eq!(sha, common::sha256(&stored));
    }
    // Patient names in GB18030 and UTF-8 are both indexed as Unicode.
    let names: Vec<String> = index
        .prepare("SELECT name FROM patients")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        names
            .iter()
            .any(|n| n.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)))
    );
    let charsets: Vec<String> = index
        .prepare("SELECT DISTINCT name_charset FROM patients")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        charsets.iter().any(|c| c.contains("GB18030")),
        "{charsets:?}"
    );

    // Re-sending the same files stores nothing twice.
    let blobs_before = blob_files(&gw);
    for ((ae, ts), paths) in by_sender(&files) {
        assert!(
            storescu(gw.port, &ae, &[common::propose_flag(&ts)], &paths)
                .status
                .success()
        );
    }
    assert_eq!(blob_files(&gw), blobs_before);
    assert_eq!(gw.instance_count(), files.len() as i64);
}

#[test]
fn uncompressed_objects_in_each_proposed_transfer_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let files = sample_dicom::generate(&dir.path().join("samples"), &Options::small(11)).unwrap();
    let native: Vec<&SampleFile> = files
        .iter()
        .filter(|f| f.transfer_syntax == "1.2.840.10008.1.2.1" && f.clinic_ae == "XINZHEN_CT")
        .collect();
    assert!(!native.is_empty());
    let paths: Vec<PathBuf> = native.iter().map(|f| f.path.clone()).collect();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    // storescu converts on the fly to what it proposes (implicit VR only
    // with -xi); we store what it sent, as a new version of each instance.
    for (flag, ts) in [
        ("-xi", "1.2.840.10008.1.2"),
        ("-xe", "1.2.840.10008.1.2.1"),
        ("-xi", "1.2.840.10008.1.2"),
    ] {
        let out = storescu(gw.port, "XINZHEN_CT", &[flag], &paths);
        assert!(
            out.status.success(),
            "{flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for f in &native {
            let (blob, _) = gw.blob_of(&f.sop_instance_uid).unwrap();
            let stored = std::fs::read(blob).unwrap();
            assert_eq!(transfer_syntax_of(&stored), ts, "{flag}");
            // What we stored is what storage's own reader understands.
            let attrs = storage::attrs::read_bytes(dataset_of(&stored), ts).unwrap();
            assert_eq!(attrs.sop_instance_uid, f.sop_instance_uid);
        }
    }
    // Each change of syntax made a new version; going back to implicit VR
    // made the earlier implicit version current again: two versions each.
    let versions: i64 = gw
        .index()
        .query_row("SELECT count(*) FROM instance_versions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(versions, 2 * native.len() as i64);
    assert_eq!(gw.instance_count(), native.len() as i64);
}

#[test]
fn compressed_syntaxes_proposed_by_storescu_are_stored_as_received() {
    let dir = tempfile::tempdir().unwrap();
    let files = sample_dicom::generate(&dir.path().join("samples"), &Options::small(13)).unwrap();
    let compressed: Vec<&SampleFile> = files
        .iter()
        .filter(|f| {
            matches!(
                f.transfer_syntax.as_str(),
                "1.2.840.10008.1.2.4.50" | "1.2.840.10008.1.2.5" | "1.2.840.10008.1.2.1.99"
            )
        })
        .collect();
    let kinds: std::collections::BTreeSet<_> = compressed
        .iter()
        .map(|f| f.transfer_syntax.as_str())
        .collect();
    assert_eq!(
        kinds.len(),
        3,
        "JPEG baseline, RLE and deflated samples exist"
    );
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    for f in &compressed {
        // Propose the file's compressed syntax first, for its SOP class only.
        let flag = common::propose_flag(&f.transfer_syntax);
        let out = storescu(
            gw.port,
            &f.clinic_ae,
            &["-R", flag],
            std::slice::from_ref(&f.path),
        );
        assert!(
            out.status.success(),
            "{}: {}",
            f.transfer_syntax,
            String::from_utf8_lossy(&out.stderr)
        );
        let (blob, offset) = gw.blob_of(&f.sop_instance_uid).unwrap();
        let stored = std::fs::read(blob).unwrap();
        assert_eq!(transfer_syntax_of(&stored), f.transfer_syntax);
        let reference = ReferenceScp::start(
            &dir.path().join(format!("ref-{}", f.sop_instance_uid)),
            &flag.replace('-', "+"),
        );
        let out = storescu(
            reference.port,
            &f.clinic_ae,
            &["-R", flag],
            std::slice::from_ref(&f.path),
        );
        assert!(out.status.success());
        let sent = reference.received();
        assert!(
            stored[offset..] == sent[&f.sop_instance_uid][..],
            "{} not stored as sent",
            f.transfer_syntax
        );
    }
}
