//! C-GET and C-MOVE with DCMTK getscu and movescu (storescp as the move
//! destination): byte-identical when the receiver takes the stored syntax,
//! pixel-identical when it had to be transcoded; unknown and unreachable
//! destinations fail cleanly with the counts right.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use common::scu::{self, CT_IMAGE_STORAGE, Reply};
use common::{Gateway, GatewaySpec, ReferenceScp};
use dicom_dictionary_std::tags;

/// A gateway holding one 5-slice CT study (explicit VR LE) sent by the
/// county station, and a spec with `destinations` appended.
fn with_study(dir: &Path, destinations: &str) -> (Gateway, Vec<String>) {
    let spec = GatewaySpec {
        clinics: format!("{}\n{destinations}", GatewaySpec::default().clinics),
        ..Default::default()
    };
    let gw = Gateway::start(dir, &spec);
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE])];
    let scu::Association::Accepted(mut sender) =
        scu::associate(gw.port, "COUNTYWS1", common::AE, contexts)
    else {
        panic!()
    };
    let uids: Vec<String> = (0..5).map(|i| format!("2.25.66{i}")).collect();
    for uid in &uids {
        assert_eq!(
            sender.store(
                1,
                CT_IMAGE_STORAGE,
                uid,
                &scu::ct_dataset(uid, "2.25.66", 8192)
            ),
            Reply::Status(0)
        );
    }
    assert!(sender.release());
    (gw, uids)
}

fn stored_dataset(gw: &Gateway, uid: &str) -> Vec<u8> {
    let (blob, offset) = gw.blob_of(uid).unwrap();
    std::fs::read(blob).unwrap()[offset..].to_vec()
}

#[test]
fn getscu_retrieves_a_study_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, uids) = with_study(dir.path(), "");
    let got = common::getscu_study(&gw, dir.path(), "COUNTYWS1", "2.25.66");
    assert_eq!(got.len(), uids.len());
    for (uid, ds) in got {
        assert!(ds == stored_dataset(&gw, &uid), "{uid} differs");
    }
    // Sent as stored: nothing said converted.
    assert_eq!(
        audited_outcome(&gw, "C-GET"),
        "completed 5, failed 0, warning 0, status 0x0000"
    );
}

#[test]
fn movescu_to_storescp_as_stored_and_transcoded() {
    let dir = tempfile::tempdir().unwrap();
    // Two destinations: one takes what we send as is, one takes implicit VR only.
    let plain = ReferenceScp::start(&dir.path().join("plain"), "+xa");
    let implicit = ReferenceScp::start(&dir.path().join("implicit"), "+xi");
    // storescp does not check the called AE title, so each gets its own name here.
    let destinations = format!(
        "[[destinations]]\nae_title = \"PLAINSCP\"\nhost = \"127.0.0.1\"\nport = {}\n\n\
         [[destinations]]\nae_title = \"IMPLICITSCP\"\nhost = \"127.0.0.1\"\nport = {}\n",
        plain.port, implicit.port
    );
    let (gw, uids) = with_study(dir.path(), &destinations);
    let movescu = |dest: &str| movescu_study(gw.port, dest);
    let out = movescu("PLAINSCP");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A study that matches nothing: success with no sub-operation, at once,
    // with the destination up (no association to it, which would propose no context
    // and wait for storescp's 30 s timeout).
    let started = std::time::Instant::now();
    let out = movescu_for(gw.port, "PLAINSCP", "2.25.67");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "a move of nothing hung for {:?}",
        started.elapsed()
    );
    assert!(audited_outcome(&gw, "C-MOVE").starts_with("completed 0, failed 0"));

    // ... and nothing more than the study reached it.
    let received = plain.received();
    assert_eq!(received.len(), uids.len());
    for uid in &uids {
        assert!(
            received[uid] == stored_dataset(&gw, uid),
            "{uid} not byte-identical"
        );
    }
    let out = movescu("IMPLICITSCP");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let transcoded = implicit.received();
    assert_eq!(transcoded.len(), uids.len());
    for uid in &uids {
        let ours = dicom_object::InMemDicomObject::read_dataset_with_ts(
            &stored_dataset(&gw, uid)[..],
            &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        let theirs = dicom_object::InMemDicomObject::read_dataset_with_ts(
            &transcoded[uid][..],
            &dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        let pixels = |o: &dicom_object::InMemDicomObject| {
            o.element(tags::PIXEL_DATA)
                .unwrap()
                .to_bytes()
                .unwrap()
                .to_vec()
        };
        assert_eq!(
            pixels(&ours),
            pixels(&theirs),
            "{uid} pixels differ after transcoding"
        );
        assert_ne!(
            transcoded[uid],
            stored_dataset(&gw, uid),
            "it was transcoded"
        );
    }
    assert!(audited_outcome(&gw, "C-MOVE").starts_with("completed 5, failed 0"));
}

#[test]
fn unknown_and_unreachable_destinations_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let destinations = format!(
        "[[destinations]]\nae_title = \"DOWNSCP\"\nhost = \"127.0.0.1\"\nport = {dead_port}\n"
    );
    let (gw, uids) = with_study(dir.path(), &destinations);
    let movescu = |dest: &str| movescu_study(gw.port, dest);
    let out = movescu("NOWHERE");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MoveDestinationUnknown"), "{err}");
    assert_eq!(
        audited_outcome(&gw, "C-MOVE"),
        "refused: destination unknown"
    );
    // The destination is checked first, before the identifier is used to
    // list anything: an unknown one is 0xA801 even when the identifier
    // names nothing (which alone would be 0xA900).
    let out = movescu_for(gw.port, "NOWHERE", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("MoveDestinationUnknown"), "{err}");

    let out = movescu("DOWNSCP");
    assert_every_sub_operation_failed(&gw, &out, uids.len());
    gw.assert_serving();
}

/// A township clinic has its studies moved only to its own stations or the
/// county's: never to another clinic's machine, nor to a destination
/// outside the consortium (which the county's stations may use).
#[test]
fn a_clinic_moves_only_to_its_own_or_the_countys_stations() {
    let dir = tempfile::tempdir().unwrap();
    let scps: Vec<(&str, ReferenceScp)> = ["XINZHEN_US", "COUNTYWS1", "BAISHUI_DR", "ARCHIVE"]
        .into_iter()
        .map(|ae| (ae, ReferenceScp::start(&dir.path().join(ae), "+xa")))
        .collect();
    let destinations: String = scps
        .iter()
        .map(|(ae, scp)| {
            format!(
                "[[destinations]]\nae_title = \"{ae}\"\nhost = \"127.0.0.1\"\nport = {}\n\n",
                scp.port
            )
        })
        .collect();
    let spec = GatewaySpec {
        clinics: format!("{}\n{destinations}", GatewaySpec::default().clinics),
        ..Default::default()
    };
    let gw = Gateway::start(dir.path(), &spec);
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE])];
    let scu::Association::Accepted(mut sender) =
        scu::associate(gw.port, "XINZHEN_CT", common::AE, contexts)
    else {
        panic!("refused")
    };
    for uid in ["2.25.551", "2.25.552"] {
        let ds = scu::ct_dataset(uid, "2.25.55", 2048);
        assert_eq!(
            sender.store(1, CT_IMAGE_STORAGE, uid, &ds),
            Reply::Status(0)
        );
    }
    assert!(sender.release());
    let files_at = |ae: &str| {
        let (_, scp) = scps.iter().find(|(a, _)| *a == ae).unwrap();
        std::fs::read_dir(&scp.out_dir).unwrap().count()
    };

    for dest in ["BAISHUI_DR", "ARCHIVE"] {
        let out = movescu_as(gw.port, "XINZHEN_CT", dest, "2.25.55");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("MoveDestinationUnknown"), "{dest}: {err}");
        assert_eq!(
            audited_outcome(&gw, "C-MOVE"),
            "refused: destination not allowed for this clinic"
        );
        assert_eq!(files_at(dest), 0, "nothing reached {dest}");
    }
    for dest in ["XINZHEN_US", "COUNTYWS1"] {
        let out = movescu_as(gw.port, "XINZHEN_CT", dest, "2.25.55");
        assert!(
            out.status.success(),
            "{dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            audited_outcome(&gw, "C-MOVE"),
            "completed 2, failed 0, warning 0, status 0x0000"
        );
        assert_eq!(files_at(dest), 2, "both reached {dest}");
    }
    // The county's station may move anywhere configured.
    let out = movescu_as(gw.port, "COUNTYWS1", "ARCHIVE", "2.25.55");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(files_at("ARCHIVE"), 2);
    // The audit trail says what went where, not only how many.
    let detail: String = gw
        .index()
        .query_row(
            "SELECT detail FROM audit WHERE action = 'C-MOVE' ORDER BY pk DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        detail.starts_with("to ARCHIVE; level=STUDY;")
            && detail.contains("2.25.55")
            && detail.ends_with("; 2 instances"),
        "{detail}"
    );
}

/// movescu was told 0xA702 and the audit trail says all `n` failed.
fn assert_every_sub_operation_failed(gw: &Gateway, out: &std::process::Output, n: usize) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Refused: OutOfResourcesSubOperations"),
        "{err}"
    );
    assert_eq!(
        audited_outcome(gw, "C-MOVE"),
        format!("completed 0, failed {n}, warning 0, status 0xA702")
    );
}

#[test]
fn compressed_instances_are_decoded_for_a_receiver_without_the_codec() {
    let dir = tempfile::tempdir().unwrap();
    // storescp without +xa accepts only uncompressed syntaxes.
    let native = ReferenceScp::start(&dir.path().join("native"), "+xe");
    let destinations = format!(
        "[[destinations]]\nae_title = \"NATIVESCP\"\nhost = \"127.0.0.1\"\nport = {}\n",
        native.port
    );
    let spec = GatewaySpec {
        clinics: format!("{}\n{destinations}", GatewaySpec::default().clinics),
        ..Default::default()
    };
    let gw = Gateway::start(dir.path(), &spec);
    let files = sample_dicom::generate(
        &dir.path().join("samples"),
        &sample_dicom::Options::small(41),
    )
    .unwrap();
    let mut compressed: Vec<sample_dicom::SampleFile> = files
        .iter()
        .filter(|f| {
            matches!(
                f.transfer_syntax.as_str(),
                "1.2.840.10008.1.2.5" | "1.2.840.10008.1.2.4.50"
            )
        })
        .cloned()
        .collect();
    assert!(compressed.len() >= 2);
    // Uncompressed CT and MR slices recompressed by other tools: JPEG-LS
    // Lossless by DCMTK's dcmcjpls, JPEG 2000 Lossless by GDCM's gdcmconv,
    // JPEG Lossless and deflated by DCMTK's dcmcjpeg and dcmconv.
    let cts: Vec<_> = files
        .iter()
        .filter(|f| {
            matches!(f.modality.as_str(), "CT" | "MR")
                && matches!(
                    f.transfer_syntax.as_str(),
                    "1.2.840.10008.1.2.1" | "1.2.840.10008.1.2"
                )
        })
        .collect();
    assert!(cts.len() >= 2, "{}", cts.len());
    // And lossy or not in the syntaxes that carry both, with what the
    // decoded copy must say in Lossy Image Compression (0028,2110): JPEG-LS
    // near-lossless (NEAR 2) says "01"; a reversible JPEG 2000 codestream
    // under 4.91 with "00" keeps "00" (lossless images are not relabelled
    // lossy); an irreversible one whose file wrongly says "00" gets "01".
    let mut lossy_flag: HashMap<String, &str> = HashMap::new();
    for (i, (tool, args, ts)) in [
        ("dcmcjpls", &[][..], "1.2.840.10008.1.2.4.80"),
        ("gdcmconv", &["--j2k"][..], "1.2.840.10008.1.2.4.90"),
        ("dcmcjpls", &["+en"][..], "1.2.840.10008.1.2.4.81"),
        ("gdcmconv", &["--j2k"][..], "1.2.840.10008.1.2.4.91"),
        (
            "gdcmconv",
            &["--j2k", "--lossy", "--irreversible", "-q", "40"][..],
            "1.2.840.10008.1.2.4.91",
        ),
        // JPEG Lossless (first-order prediction) and deflated, by DCMTK.
        ("dcmcjpeg", &["+e1"][..], "1.2.840.10008.1.2.4.70"),
        ("dcmconv", &["+td"][..], "1.2.840.10008.1.2.1.99"),
    ]
    .into_iter()
    .enumerate()
    {
        let f = cts[i % cts.len()];
        let path = dir.path().join(format!("{i}-{tool}.dcm"));
        let out = Command::new(format!("/usr/bin/{tool}"))
            .args(args)
            .arg(&f.path)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut bytes = std::fs::read(&path).unwrap();
        // The lossy copies' own "01" made "00", so that only the
        // codestream can tell (NEAR 2; the 9-7 wavelet).
        let says_lossless = |bytes: &mut Vec<u8>| {
            let at = find(bytes, b"\x28\x00\x10\x21CS\x02\x0001").unwrap();
            bytes[at + 9] = b'0';
        };
        let flag = if ts == "1.2.840.10008.1.2.4.91" && args.len() == 1 {
            // gdcmconv wrote 4.90: the same codestream, labelled 4.91.
            let at = find(&bytes, b"1.2.840.10008.1.2.4.90").unwrap();
            bytes[at..at + 22].copy_from_slice(b"1.2.840.10008.1.2.4.91");
            "00"
        } else if matches!(ts, "1.2.840.10008.1.2.4.81" | "1.2.840.10008.1.2.4.91") {
            says_lossless(&mut bytes);
            "01"
        } else {
            ""
        };
        std::fs::write(&path, &bytes).unwrap();
        // (DCMTK gives a lossy copy a UID of its own.)
        let uid_of = |bytes: &[u8]| {
            storage::attrs::read_bytes(common::dataset_of(bytes), ts)
                .unwrap()
                .sop_instance_uid
        };
        if compressed
            .iter()
            .any(|c| c.sop_instance_uid == uid_of(&bytes))
        {
            // A slice used again: as an instance of its own.
            let out = Command::new("/usr/bin/dcmodify")
                .args(["-nb", "-gin"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            bytes = std::fs::read(&path).unwrap();
        }
        let uid = uid_of(&bytes);
        assert_eq!(common::transfer_syntax_of(&bytes), ts, "{tool} {args:?}");
        if !flag.is_empty() {
            lossy_flag.insert(uid.clone(), flag);
        }
        compressed.push(sample_dicom::SampleFile {
            path,
            transfer_syntax: ts.to_string(),
            sop_instance_uid: uid,
            ..f.clone()
        });
    }
    for f in &compressed {
        let out = common::storescu(
            gw.port,
            "COUNTYWS1",
            &["-R", common::propose_flag(&f.transfer_syntax)],
            std::slice::from_ref(&f.path),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for f in &compressed {
        let out = Command::new("/usr/bin/movescu")
            .args([
                "-S",
                "-aet",
                "COUNTYWS1",
                "-aec",
                common::AE,
                "-aem",
                "NATIVESCP",
            ])
            .args(["-k", "QueryRetrieveLevel=IMAGE"])
            .args(["-k", &format!("StudyInstanceUID={}", f.study_instance_uid)])
            .args([
                "-k",
                &format!("SeriesInstanceUID={}", series_of(&gw, &f.sop_instance_uid)),
            ])
            .args(["-k", &format!("SOPInstanceUID={}", f.sop_instance_uid)])
            .arg("127.0.0.1")
            .arg(gw.port.to_string())
            .env("TCP_NODELAY", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            gw.log()
        );
    }
    let received_dir = native.out_dir.clone();
    let received = native.received();
    // What we produce is as valid as what was stored: dciodvfy (dicom3tools)
    // finds no error in a decoded copy that it does not find in the stored
    // object (Photometric Interpretation, Pixel Data length and VR, the
    // file meta group all rewritten).
    for entry in std::fs::read_dir(&received_dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let ts = common::transfer_syntax_of(&bytes);
        let uid = storage::attrs::read_bytes(common::dataset_of(&bytes), &ts)
            .unwrap()
            .sop_instance_uid;
        let (blob, _) = gw.blob_of(&uid).unwrap();
        let (stored_report, stored_errors) = dciodvfy(&blob);
        let (ours_report, ours_errors) = dciodvfy(&path);
        let new: Vec<&String> = ours_errors
            .iter()
            .filter(|e| !stored_errors.contains(e))
            .collect();
        assert!(
            new.is_empty(),
            "decoded {uid} has new errors {new:?}\n--- decoded:\n{ours_report}\n--- stored:\n{stored_report}"
        );
    }
    for f in &compressed {
        let got = &received[&f.sop_instance_uid];
        let ours = dicom_object::InMemDicomObject::read_dataset_with_ts(
            &got[..],
            &dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        let pixels = ours
            .element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .to_vec();
        // DCMTK decodes the stored blob independently.
        let (blob, _) = gw.blob_of(&f.sop_instance_uid).unwrap();
        let (tool, args): (&str, &[&str]) = match f.transfer_syntax.as_str() {
            "1.2.840.10008.1.2.5" => ("dcmdrle", &[]),
            "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => ("dcmdjpls", &[]),
            "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => ("gdcmconv", &["--raw"]),
            "1.2.840.10008.1.2.1.99" => ("dcmconv", &["+te"]),
            _ => ("dcmdjpeg", &[]),
        };
        let lossless_jpeg = f.transfer_syntax == "1.2.840.10008.1.2.4.70";
        let decoded = dir.path().join(format!("{}.native", f.sop_instance_uid));
        let out = Command::new(format!("/usr/bin/{tool}"))
            .args(args)
            .arg(&blob)
            .arg(&decoded)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reference = dicom_object::open_file(&decoded).unwrap();
        let expected = reference
            .element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .to_vec();
        assert_eq!(pixels.len(), expected.len(), "{tool}");
        if let Some(flag) = lossy_flag.get(&f.sop_instance_uid) {
            assert_eq!(
                text_of(&ours, tags::LOSSY_IMAGE_COMPRESSION),
                *flag,
                "{}",
                f.transfer_syntax
            );
            // Near-lossless and irreversible: decoders may differ a little.
            let worst = worst_difference(&ours, &pixels, &expected);
            assert!(worst <= 3, "{tool}: decode differs by up to {worst}");
        } else if tool != "dcmdjpeg" || lossless_jpeg {
            // Lossless: exactly the pixels the other tool decodes.
            assert!(pixels == expected, "{tool}: lossless decode differs");
        } else {
            // Lossy JPEG: IDCT implementations may differ by a unit or two.
            let worst = worst_difference(&ours, &pixels, &expected);
            assert!(
                worst <= 3,
                "JPEG decode differs from DCMTK's by up to {worst}"
            );
            assert_eq!(text_of(&ours, tags::LOSSY_IMAGE_COMPRESSION), "01");
        }
    }
    assert!(
        gw.log()
            .contains("transcoding for a receiver that did not accept the stored syntax")
    );
    // The audit trail says the destination got a converted copy.
    assert_eq!(
        audited_outcome(&gw, "C-MOVE"),
        "completed 1, failed 0, warning 0 (1 converted to an uncompressed syntax), status 0x0000"
    );
}

/// dciodvfy's report on a Part 10 file, and its lines starting with "Error".
fn dciodvfy(path: &Path) -> (String, Vec<String>) {
    let out = Command::new("/usr/bin/dciodvfy")
        .arg(path)
        .output()
        .expect("run /usr/bin/dciodvfy (Debian dicom3tools)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = report
        .lines()
        .filter(|l| l.starts_with("Error"))
        .map(str::to_string)
        .collect();
    (report, errors)
}

fn series_of(gw: &Gateway, sop_instance_uid: &str) -> String {
    gw.index()
        .query_row(
            "SELECT se.series_uid FROM instances i JOIN series se ON se.pk = i.series_pk WHERE i.sop_instance_uid = ?1",
            [sop_instance_uid],
            |r| r.get(0),
        )
        .unwrap_or_else(|e| panic!("{sop_instance_uid:?}: {e}"))
}

/// The largest difference between two decodings of `obj`'s pixels, sample
/// by sample (16-bit samples compared as numbers, signed or not).
fn worst_difference(obj: &dicom_object::InMemDicomObject, a: &[u8], b: &[u8]) -> i64 {
    let number = |tag| text_of(obj, tag).parse::<u16>().unwrap();
    let (bits, signed) = (
        number(tags::BITS_ALLOCATED),
        number(tags::PIXEL_REPRESENTATION) == 1,
    );
    let samples = |p: &[u8]| -> Vec<i64> {
        match (bits, signed) {
            (16, false) => p
                .chunks_exact(2)
                .map(|c| i64::from(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            (16, true) => p
                .chunks_exact(2)
                .map(|c| i64::from(i16::from_le_bytes([c[0], c[1]])))
                .collect(),
            _ => p.iter().map(|&v| i64::from(v)).collect(),
        }
    };
    samples(a)
        .iter()
        .zip(samples(b))
        .map(|(x, y)| (x - y).abs())
        .max()
        .unwrap()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn text_of(obj: &dicom_object::InMemDicomObject, tag: dicom_core::Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// pynetdicom's C-GET of the test study (CT Image Storage only), each
/// instance received into `out_dir`; its JSON summary (final status and
/// counts).
fn pynetdicom_get(gw: &Gateway, out_dir: &Path) -> String {
    std::fs::create_dir_all(out_dir).unwrap();
    let out_dir = out_dir.to_str().unwrap();
    common::pynetdicom("get_scu.py", gw.port, &["COUNTYWS1", "2.25.66", out_dir])
}

#[test]
fn pynetdicom_c_get_receives_the_stored_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, uids) = with_study(dir.path(), "");
    let out_dir = dir.path().join("py");
    let text = pynetdicom_get(&gw, &out_dir);
    assert!(
        text.contains("\"status\": 0, \"completed\": 5, \"failed\": 0"),
        "{text}"
    );
    for uid in &uids {
        let got = std::fs::read(out_dir.join(format!("{uid}.bin"))).unwrap();
        assert!(got == stored_dataset(&gw, uid), "{uid} differs");
    }
}

/// A C-GET at SERIES level (DCMTK getscu) brings that series' instances
/// and no other of its study's.
#[test]
fn getscu_at_series_level_gets_that_series_only() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = with_study(dir.path(), "");
    // Two more instances of the study, in a second series.
    let mut sender = scu::associate_ct(gw.port);
    let second: Vec<String> = (0..2).map(|i| format!("2.25.667{i}")).collect();
    for uid in &second {
        let mut ds = scu::ct_dataset(uid, "2.25.66", 512);
        let series = ds
            .windows(9)
            .position(|w| w == b"2.25.66.1")
            .expect("the series UID");
        ds[series + 8] = b'2';
        assert_eq!(
            sender.store(1, CT_IMAGE_STORAGE, uid, &ds),
            Reply::Status(0)
        );
    }
    assert!(sender.release());
    let got = common::getscu_keys(
        &gw,
        &dir.path().join("series"),
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=SERIES".into(),
            "StudyInstanceUID=2.25.66".into(),
            "SeriesInstanceUID=2.25.66.2".into(),
        ],
    );
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), second);
    for uid in &second {
        assert!(got[uid] == stored_dataset(&gw, uid), "{uid} differs");
    }
}

/// A C-GET whose requestor takes one instance's SOP class in no context:
/// that sub-operation fails (the reason in the log), the rest are sent,
/// and the final response says so: 0xB000 with 5 completed and 1 failed.
#[test]
fn a_c_get_with_an_instance_the_requestor_cannot_take_ends_in_partial_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, uids) = with_study(dir.path(), "");
    // An MR instance in the same study (the CT dataset with MR's class).
    let contexts: &[(u8, &str, &[&str])] = &[(1, scu::MR_IMAGE_STORAGE, &[scu::EXPLICIT_LE])];
    let scu::Association::Accepted(mut sender) =
        scu::associate(gw.port, "COUNTYWS1", common::AE, contexts)
    else {
        panic!()
    };
    let mr = "2.25.669";
    let ds = scu::ct_dataset(mr, "2.25.66", 1024);
    let class_at = ds
        .windows(CT_IMAGE_STORAGE.len())
        .position(|w| w == CT_IMAGE_STORAGE.as_bytes())
        .unwrap();
    let mut ds = ds;
    ds[class_at..class_at + scu::MR_IMAGE_STORAGE.len()]
        .copy_from_slice(scu::MR_IMAGE_STORAGE.as_bytes());
    assert_eq!(
        sender.store(1, scu::MR_IMAGE_STORAGE, mr, &ds),
        Reply::Status(0)
    );
    assert!(sender.release());

    // pynetdicom's requestor takes CT Image Storage only.
    let out_dir = dir.path().join("py");
    let text = pynetdicom_get(&gw, &out_dir);
    assert!(
        text.contains("\"status\": 45056, \"completed\": 5, \"failed\": 1"),
        "{text}"
    );
    for uid in &uids {
        assert!(out_dir.join(format!("{uid}.bin")).exists(), "{uid}");
    }
    assert!(!out_dir.join(format!("{mr}.bin")).exists());
    let log = gw.log();
    assert!(
        log.contains("no accepted context") && log.contains(scu::MR_IMAGE_STORAGE),
        "{log}"
    );
}

/// DCMTK movescu: the test study, at STUDY level, to `dest`.
fn movescu_study(port: u16, dest: &str) -> std::process::Output {
    movescu_for(port, dest, "2.25.66")
}

/// DCMTK movescu: study `study_uid`, at STUDY level, to `dest`.
fn movescu_for(port: u16, dest: &str, study_uid: &str) -> std::process::Output {
    movescu_as(port, "COUNTYWS1", dest, study_uid)
}

/// DCMTK movescu as `calling`: study `study_uid`, at STUDY level, to `dest`.
fn movescu_as(port: u16, calling: &str, dest: &str, study_uid: &str) -> std::process::Output {
    movescu_command(port, calling, dest, study_uid)
        .output()
        .expect("run /usr/bin/movescu (Debian dcmtk)")
}

fn movescu_command(port: u16, calling: &str, dest: &str, study_uid: &str) -> Command {
    let mut cmd = Command::new("/usr/bin/movescu");
    cmd.args(["-S", "-aet", calling, "-aec", common::AE, "-aem", dest])
        .args(["-k", "QueryRetrieveLevel=STUDY", "-k"])
        .arg(format!("StudyInstanceUID={study_uid}"))
        .arg("127.0.0.1")
        .arg(port.to_string())
        .env("TCP_NODELAY", "1");
    cmd
}

#[test]
fn a_cancelled_c_get_does_not_cancel_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, uids) = with_study(dir.path(), "");
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/get_cancel_scu.py"
        ))
        .arg(gw.port.to_string())
        .arg("COUNTYWS1")
        .arg("2.25.66")
        .output()
        .expect("python3 with pynetdicom");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("\"first\": 65024"),
        "the first C-GET ends cancelled: {text}"
    );
    assert!(
        text.contains(&format!(
            "\"second\": 0, \"second_completed\": {}",
            uids.len()
        )),
        "the second C-GET completes: {text}"
    );
}

#[test]
fn a_clinic_retrieves_only_the_bytes_it_sent() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE])];
    let send = |calling: &str, datasets: &[(&str, Vec<u8>)]| {
        let scu::Association::Accepted(mut sender) =
            scu::associate(gw.port, calling, common::AE, contexts)
        else {
            panic!("{calling} refused")
        };
        for (uid, ds) in datasets {
            assert_eq!(sender.store(1, CT_IMAGE_STORAGE, uid, ds), Reply::Status(0));
        }
        assert!(sender.release());
    };
    let ours = [
        ("2.25.771", scu::ct_dataset("2.25.771", "2.25.77", 4096)),
        ("2.25.772", scu::ct_dataset("2.25.772", "2.25.77", 4096)),
    ];
    send("XINZHEN_CT", &ours);
    // Another clinic files a series under the same study, and sends other
    // bytes under one of the first clinic's SOP Instance UIDs.
    let theirs = [
        ("2.25.773", scu::ct_dataset("2.25.773", "2.25.77", 4096)),
        ("2.25.771", scu::ct_dataset("2.25.771", "2.25.77", 2048)),
    ];
    send("BAISHUI_DR", &theirs);

    let got = common::getscu_study(&gw, dir.path(), "XINZHEN_CT", "2.25.77");
    let expected: std::collections::BTreeMap<_, _> = ours
        .iter()
        .map(|(uid, ds)| (uid.to_string(), ds.clone()))
        .collect();
    assert!(
        got == expected,
        "xinzhen gets exactly its own two instances, as it sent them"
    );
    // The county station sees the whole study, with the owner's bytes current.
    let got = common::getscu_study(&gw, dir.path(), "COUNTYWS1", "2.25.77");
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        ["2.25.771", "2.25.772", "2.25.773"]
    );
    assert!(
        got["2.25.771"] == ours[0].1,
        "the owner's bytes stay current"
    );
    assert!(got["2.25.773"] == theirs[0].1);
}

/// A raw association as the county station (`scp_role`: SOP classes it
/// offers to receive as C-STORE SCP, for C-GET), accepted.
fn raw_county_association(
    gw: &Gateway,
    contexts: &[(u8, &str, &[&str])],
    scp_role: &[&str],
) -> std::net::TcpStream {
    use dicom_ul::pdu::{Pdu, RequestorRoles, UserVariableItem};
    use std::io::Write;
    let mut rq = scu::request("COUNTYWS1", common::AE, contexts);
    if let Pdu::AssociationRQ(a) = &mut rq {
        for class in scp_role {
            a.user_variables
                .push(UserVariableItem::ScuScpRoleSelectionSubItem(
                    class.to_string(),
                    RequestorRoles {
                        scu: false,
                        scp: true,
                    },
                ));
        }
    }
    let mut stream = scu::connect(gw.port);
    stream.write_all(&scu::encode(&rq)).unwrap();
    assert!(matches!(
        scu::read_any(&mut stream),
        Some(scu::RawPdu::Other(Pdu::AssociationAC(_)))
    ));
    stream
}

/// The outcome of the newest audit row for `action`, waiting up to 10 s.
fn audited_outcome(gw: &Gateway, action: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let row: Option<String> = gw
            .index()
            .query_row(
                "SELECT outcome FROM audit WHERE action = ?1 ORDER BY pk DESC LIMIT 1",
                [action],
                |r| r.get(0),
            )
            .ok();
        if let Some(o) = row {
            return o;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit row for {action}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn abort_pdu() -> Vec<u8> {
    scu::encode(&dicom_ul::pdu::Pdu::AbortRQ {
        source: dicom_ul::pdu::AbortRQSource::ServiceUser,
    })
}

#[test]
fn a_query_cut_short_is_still_audited() {
    use std::io::Write;
    const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = with_study(dir.path(), "");
    let mut stream = raw_county_association(&gw, &[(1, STUDY_ROOT_FIND, &[scu::EXPLICIT_LE])], &[]);
    let find_rq = scu::query_rq(STUDY_ROOT_FIND, 0x0020, 9);
    let mut identifier = scu::el(0x0008_0052, b"CS", b"IMAGE");
    identifier.extend(scu::el(0x0008_0018, b"UI", b""));
    identifier.extend(scu::el(0x0020_000D, b"UI", b"2.25.66"));
    // The query and an A-ABORT in one write: the gateway finds the abort
    // waiting before it sends its first match.
    let mut bytes = scu::pdata(1, true, true, &find_rq);
    bytes.extend(scu::pdata(1, false, true, &identifier));
    bytes.extend(abort_pdu());
    stream.write_all(&bytes).unwrap();
    drop(stream);
    assert_eq!(
        audited_outcome(&gw, "C-FIND"),
        "0 matches sent, then the association ended: aborted by the peer"
    );
    gw.assert_serving();
}

#[test]
fn a_retrieve_cut_short_is_still_audited() {
    use std::io::Write;
    const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = with_study(dir.path(), "");
    let contexts: &[(u8, &str, &[&str])] = &[
        (1, STUDY_ROOT_GET, &[scu::EXPLICIT_LE]),
        (3, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE]),
    ];
    let mut stream = raw_county_association(&gw, contexts, &[CT_IMAGE_STORAGE]);
    let get_rq = scu::query_rq(STUDY_ROOT_GET, 0x0010, 7);
    let mut identifier = scu::el(0x0008_0052, b"CS", b"STUDY");
    identifier.extend(scu::el(0x0020_000D, b"UI", b"2.25.66"));
    stream
        .write_all(&scu::pdata(1, true, true, &get_rq))
        .unwrap();
    stream
        .write_all(&scu::pdata(1, false, true, &identifier))
        .unwrap();
    // The first sub-operation's C-STORE-RQ arrives: abort instead of answering.
    loop {
        match scu::read_any(&mut stream) {
            Some(scu::RawPdu::PData(pdvs)) if pdvs.iter().any(|p| !p.1) => break,
            Some(scu::RawPdu::PData(_)) => {}
            other => panic!("expected the first C-STORE-RQ, got {:?}", other.is_some()),
        }
    }
    stream.write_all(&abort_pdu()).unwrap();
    drop(stream);
    let outcome = audited_outcome(&gw, "C-GET");
    assert!(
        outcome.starts_with(
            "completed 0, failed 0, warning 0, then the association ended: aborted by the peer"
        ),
        "{outcome}"
    );
    gw.assert_serving();
}

/// A move destination that answers the first C-STORE-RQ for another
/// message ID: the gateway must stop using that association (abort it)
/// and count every instance as failed, not credit the answer to the next.
#[test]
fn a_destination_out_of_step_is_given_up() {
    use dicom_ul::pdu::{
        AssociationAC, Pdu, PresentationContextResult, PresentationContextResultReason,
    };
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let destination = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let Some(scu::RawPdu::Other(Pdu::AssociationRQ(rq))) = scu::read_any(&mut stream) else {
            panic!("expected A-ASSOCIATE-RQ")
        };
        let ac = Pdu::AssociationAC(AssociationAC {
            protocol_version: 1,
            calling_ae_title: rq.calling_ae_title.clone(),
            called_ae_title: rq.called_ae_title.clone(),
            application_context_name: rq.application_context_name.clone(),
            presentation_contexts: rq
                .presentation_contexts
                .iter()
                .map(|pc| PresentationContextResult {
                    id: pc.id,
                    reason: PresentationContextResultReason::Acceptance,
                    transfer_syntax: pc.transfer_syntaxes[0].clone(),
                })
                .collect(),
            user_variables: rq.user_variables.clone(),
        });
        stream.write_all(&scu::encode(&ac)).unwrap();
        // Wait for the first dataset's last fragment, then answer wrongly.
        loop {
            match scu::read_any(&mut stream) {
                Some(scu::RawPdu::PData(pdvs)) if pdvs.iter().any(|p| !p.1 && p.2) => break,
                Some(scu::RawPdu::PData(_)) => {}
                _ => panic!("expected a C-STORE-RQ"),
            }
        }
        let rsp = scu::command(&[
            (0x0002, scu::uid_value(CT_IMAGE_STORAGE)),
            (0x0100, 0x8001u16.to_le_bytes().to_vec()),
            (0x0120, 999u16.to_le_bytes().to_vec()),
            (0x0800, 0x0101u16.to_le_bytes().to_vec()),
            (0x0900, 0u16.to_le_bytes().to_vec()),
        ]);
        stream.write_all(&scu::pdata(1, true, true, &rsp)).unwrap();
        // What comes next: an A-ABORT (or the connection closing), not a
        // second C-STORE-RQ.
        matches!(
            scu::read_any(&mut stream),
            Some(scu::RawPdu::Other(Pdu::AbortRQ { .. })) | None
        )
    });
    let destinations =
        format!("[[destinations]]\nae_title = \"ODDSCP\"\nhost = \"127.0.0.1\"\nport = {port}\n");
    let dir = tempfile::tempdir().unwrap();
    let (gw, uids) = with_study(dir.path(), &destinations);
    let out = movescu_study(gw.port, "ODDSCP");
    assert!(
        destination.join().unwrap(),
        "the gateway went on using a destination association out of step"
    );
    assert_every_sub_operation_failed(&gw, &out, uids.len());
    gw.assert_serving();
}

/// A P-DATA-TF may carry the end of one message and the next message
/// (PS3.8 9.3.5). Here a C-GET's first C-STORE-RSP and a C-CANCEL of the
/// C-GET arrive in one PDU: the cancel must be seen, not dropped.
#[test]
fn a_cancel_in_the_pdu_of_a_store_response_stops_the_get() {
    use std::io::Write;
    const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";
    let dir = tempfile::tempdir().unwrap();
    let (gw, uids) = with_study(dir.path(), "");
    assert_eq!(uids.len(), 5);
    let contexts: &[(u8, &str, &[&str])] = &[
        (1, STUDY_ROOT_GET, &[scu::EXPLICIT_LE]),
        (3, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE]),
    ];
    let mut stream = raw_county_association(&gw, contexts, &[CT_IMAGE_STORAGE]);
    let mut identifier = scu::el(0x0008_0052, b"CS", b"STUDY");
    identifier.extend(scu::el(0x0020_000D, b"UI", b"2.25.66"));
    let get_rq = scu::query_rq(STUDY_ROOT_GET, 0x0010, 7);
    stream
        .write_all(&scu::pdata_pdvs(&[
            (1, true, true, &get_rq),
            (1, false, true, &identifier),
        ]))
        .unwrap();
    let (mut stores, mut answered_with_cancel) = (0, false);
    let final_rsp = loop {
        let (command, _) = scu::read_message(&mut stream).expect("a message from the gateway");
        match scu::command_u16(&command, 0x0100) {
            Some(0x0001) => {
                stores += 1;
                let id = scu::command_u16(&command, 0x0110).unwrap();
                let rsp = scu::command(&[
                    (0x0002, scu::uid_value(CT_IMAGE_STORAGE)),
                    (0x0100, 0x8001u16.to_le_bytes().to_vec()),
                    (0x0120, id.to_le_bytes().to_vec()),
                    (0x0800, 0x0101u16.to_le_bytes().to_vec()),
                    (0x0900, 0u16.to_le_bytes().to_vec()),
                ]);
                if answered_with_cancel {
                    stream.write_all(&scu::pdata(3, true, true, &rsp)).unwrap();
                } else {
                    // The first answer and the cancel, in one PDU.
                    answered_with_cancel = true;
                    let cancel = scu::cancel_rq(7);
                    stream
                        .write_all(&scu::pdata_pdvs(&[
                            (3, true, true, &rsp),
                            (1, true, true, &cancel),
                        ]))
                        .unwrap();
                }
            }
            Some(0x8010) if scu::command_u16(&command, 0x0900) == Some(0xFF00) => {}
            Some(0x8010) => break command,
            other => panic!("unexpected command field {other:?}"),
        }
    };
    assert_eq!(
        scu::command_u16(&final_rsp, 0x0900),
        Some(0xFE00),
        "C-GET not cancelled"
    );
    assert_eq!(
        scu::command_u16(&final_rsp, 0x1021),
        Some(1),
        "completed sub-operations"
    );
    assert_eq!(stores, 1, "instances sent after the cancel");
    gw.assert_serving();
}

/// A C-FIND, its identifier and a C-CANCEL of it in one PDU: the query is
/// cancelled, and the association stays in step (a C-ECHO after it is
/// answered).
#[test]
fn a_cancel_in_the_pdu_of_its_query_is_seen() {
    use std::io::Write;
    const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = with_study(dir.path(), "");
    let contexts: &[(u8, &str, &[&str])] = &[
        (1, STUDY_ROOT_FIND, &[scu::EXPLICIT_LE]),
        (3, scu::VERIFICATION, &[scu::EXPLICIT_LE]),
    ];
    let mut stream = raw_county_association(&gw, contexts, &[]);
    let mut identifier = scu::el(0x0008_0052, b"CS", b"IMAGE");
    identifier.extend(scu::el(0x0008_0018, b"UI", b""));
    identifier.extend(scu::el(0x0020_000D, b"UI", b"2.25.66"));
    let find_rq = scu::query_rq(STUDY_ROOT_FIND, 0x0020, 9);
    let cancel = scu::cancel_rq(9);
    stream
        .write_all(&scu::pdata_pdvs(&[
            (1, true, true, &find_rq),
            (1, false, true, &identifier),
            (1, true, true, &cancel),
        ]))
        .unwrap();
    let final_status = loop {
        let (command, _) = scu::read_message(&mut stream).expect("a C-FIND response");
        assert_eq!(scu::command_u16(&command, 0x0100), Some(0x8020));
        match scu::command_u16(&command, 0x0900) {
            Some(0xFF00 | 0xFF01) => {}
            status => break status,
        }
    };
    assert_eq!(final_status, Some(0xFE00), "C-FIND not cancelled");
    stream
        .write_all(&scu::pdata(3, true, true, &scu::echo_rq(10)))
        .unwrap();
    let (echo_rsp, _) = scu::read_message(&mut stream).expect("a C-ECHO response");
    assert_eq!(scu::command_u16(&echo_rsp, 0x0100), Some(0x8030));
    assert_eq!(scu::command_u16(&echo_rsp, 0x0120), Some(10));
    assert_eq!(scu::command_u16(&echo_rsp, 0x0900), Some(0));
}

/// A requester that goes while the move destination takes its time over a
/// C-STORE ends the move then: its association and the destination's are
/// not held until that answer comes (up to 10 minutes).
#[test]
fn a_requester_gone_mid_move_ends_it_without_waiting_for_the_destination() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (slow, mut said, destinations) = slow_destination("60");
    let mut line = String::new();
    let (gw, _) = with_study(dir.path(), &destinations);
    let mut requester = Stopped(
        movescu_command(gw.port, "COUNTYWS1", "SLOWSCP", "2.25.66")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    // The first C-STORE is at the destination, which sits on it for 60 s.
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "received");
    requester.0.kill().unwrap();
    requester.0.wait().unwrap();
    // Within 10 s, where the destination's answer takes 60.
    let outcome = audited_outcome(&gw, "C-MOVE");
    drop(slow);
    assert_eq!(
        outcome,
        "completed 0, failed 0, warning 0, then the association ended: connection closed by the peer"
    );
}

/// A child process killed however the test ends.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A slow C-MOVE destination (pynetdicom, `seconds` per C-STORE), where
/// "received" lines come as each C-STORE arrives, and its
/// `[[destinations]]` section.
fn slow_destination(
    seconds: &str,
) -> (
    Stopped,
    std::io::BufReader<std::process::ChildStdout>,
    String,
) {
    use std::io::BufRead;
    let mut slow = Stopped(
        Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/slow_scp.py"))
            .args(["SLOWSCP", seconds])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run python3 (pynetdicom is installed by scripts/install-deps.sh)"),
    );
    let mut said = std::io::BufReader::new(slow.0.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("slow_scp.py said {line:?}"))
        .parse()
        .unwrap();
    let destination =
        format!("[[destinations]]\nae_title = \"SLOWSCP\"\nhost = \"127.0.0.1\"\nport = {port}\n");
    (slow, said, destination)
}

/// pynetdicom's C-MOVE of the test study to SLOWSCP: every response as
/// (status, remaining, completed, failed, warning).
fn move_responses(gw: &Gateway, cancel_after: Option<u32>) -> Vec<[i64; 5]> {
    let cancel_after = cancel_after.map(|n| n.to_string());
    let mut args = vec!["COUNTYWS1", "SLOWSCP", "2.25.66"];
    args.extend(cancel_after.as_deref());
    let said: serde_json::Value =
        serde_json::from_str(&common::pynetdicom("move_scu.py", gw.port, &args)).unwrap();
    said["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let n = |i: usize| r[i].as_i64().unwrap();
            [n(0), n(1), n(2), n(3), n(4)]
        })
        .collect()
}

/// C-MOVE's pending responses count the sub-operations (remaining,
/// completed, failed, warning add up to the study's 5), and C-CANCEL stops
/// the move: final 0xFE00 with what was done, the rest never sent.
#[test]
fn c_move_pending_counts_add_up_and_a_cancel_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_slow, said, destinations) = slow_destination("0.3");
    let (gw, _) = with_study(dir.path(), &destinations);

    let whole = move_responses(&gw, None);
    let (last, pending) = whole.split_last().unwrap();
    assert_eq!(last[0], 0, "{whole:?}");
    assert_eq!(last[2..], [5, 0, 0], "{whole:?}");
    assert!(!pending.is_empty(), "{whole:?}");
    for r in pending {
        assert_eq!(r[0], 0xFF00, "{whole:?}");
        assert_eq!(r[1] + r[2] + r[3] + r[4], 5, "{whole:?}");
    }

    let cancelled = move_responses(&gw, Some(1));
    let last = cancelled.last().unwrap();
    assert_eq!(last[0], 0xFE00, "{cancelled:?}");
    let done = last[2] + last[3] + last[4];
    assert!((1..5).contains(&done), "{cancelled:?}");
    // The destination got the first move's five, and of the second those
    // done (and at most the one on its way when the cancel came): never
    // the rest.
    drop(_slow);
    let received = std::io::BufRead::lines(said)
        .map_while(Result::ok)
        .filter(|l| l == "received")
        .count() as i64;
    assert!(
        (5 + last[2]..=6 + last[2]).contains(&received) && received < 10,
        "{received} received; {cancelled:?}"
    );
}
