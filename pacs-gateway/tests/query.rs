//! C-FIND with clients we did not write: DCMTK findscu and pynetdicom.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Gateway, GatewaySpec};
use sample_dicom::Options;

/// A gateway holding the demo samples, each sent by its own clinic's AE.
fn loaded(dir: &Path, spec: &GatewaySpec) -> Gateway {
    let files = sample_dicom::generate(&dir.join("samples"), &Options::demo(31)).unwrap();
    let gw = Gateway::start(dir, spec);
    let mut groups: std::collections::BTreeMap<(String, String), Vec<PathBuf>> = Default::default();
    for f in &files {
        groups
            .entry((f.clinic_ae.clone(), f.transfer_syntax.clone()))
            .or_default()
            .push(f.path.clone());
    }
    for ((ae, ts), paths) in groups {
        let out = common::storescu(gw.port, &ae, &[common::propose_flag(&ts)], &paths);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(gw.instance_count(), files.len() as i64);
    gw
}

/// Runs findscu (Study Root) and returns the response identifiers it wrote.
fn findscu(
    port: u16,
    calling: &str,
    keys: &[&str],
    out_dir: &Path,
) -> (bool, Vec<dicom_object::DefaultDicomObject>) {
    findscu_in(port, "-S", calling, keys, out_dir)
}

/// Runs findscu with information model `root` (`-S` study, `-P` patient).
fn findscu_in(
    port: u16,
    root: &str,
    calling: &str,
    keys: &[&str],
    out_dir: &Path,
) -> (bool, Vec<dicom_object::DefaultDicomObject>) {
    std::fs::create_dir_all(out_dir).unwrap();
    let mut cmd = Command::new("/usr/bin/findscu");
    cmd.args([root, "-X", "-od"])
        .arg(out_dir)
        .args(["-aet", calling, "-aec", common::AE]);
    for k in keys {
        cmd.args(["-k", k]);
    }
    let out = cmd
        .arg("127.0.0.1")
        .arg(port.to_string())
        .env("TCP_NODELAY", "1")
        .env("DCMDICTPATH", dcmtk_dictionaries())
        .output()
        .expect("run /usr/bin/findscu (Debian dcmtk)");
    let mut files: Vec<_> = std::fs::read_dir(out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let objs = files
        .iter()
        .map(|p| dicom_object::open_file(p).unwrap())
        .collect();
    (out.status.success(), objs)
}

/// DCMTK's standard dictionary plus ours (the private sending-clinic key).
fn dcmtk_dictionaries() -> String {
    let standard = std::fs::read_dir("/usr/share")
        .unwrap()
        .map(|e| e.unwrap().path().join("dicom.dic"))
        .find(|p| p.exists() && p.to_string_lossy().contains("libdcmtk"))
        .expect("DCMTK's dicom.dic");
    let ours = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/dcmtk/consortium.dic"
    );
    format!("{}:{ours}", standard.display())
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

fn count(gw: &Gateway, sql: &str) -> usize {
    gw.index()
        .query_row(sql, [], |r| r.get::<_, i64>(0))
        .unwrap() as usize
}

/// Patient Root (findscu -P): PATIENT level answers each patient once,
/// with their study count; STUDY level under a patient ID answers that
/// patient's studies; `?` matches exactly one character.
#[test]
fn findscu_patient_root_at_patient_and_study_levels() {
    use dicom_dictionary_std::tags;
    let dir = tempfile::tempdir().unwrap();
    let gw = loaded(dir.path(), &GatewaySpec::default());
    let scratch = dir.path().join("find");
    let (ok, patients) = findscu_in(
        gw.port,
        "-P",
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=PATIENT",
            "PatientID",
            "PatientName",
            "NumberOfPatientRelatedStudies",
        ],
        &scratch.join("patients"),
    );
    assert!(ok);
    assert_eq!(patients.len(), count(&gw, "SELECT count(*) FROM patients"));
    let id = text(&patients[0], tags::PATIENT_ID);
    let studies_of = |id: &str| {
        count(
            &gw,
            &format!(
                "SELECT count(*) FROM studies st JOIN patients p ON p.pk = st.patient_pk \
                 WHERE p.patient_id = '{id}'"
            ),
        )
    };
    let n: usize = text(&patients[0], tags::NUMBER_OF_PATIENT_RELATED_STUDIES)
        .parse()
        .unwrap();
    assert_eq!(n, studies_of(&id), "{id}");

    let (ok, studies) = findscu_in(
        gw.port,
        "-P",
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=STUDY",
            &format!("PatientID={id}"),
            "StudyInstanceUID",
        ],
        &scratch.join("studies"),
    );
    assert!(ok);
    assert_eq!(studies.len(), studies_of(&id));

    // All but the last character, then `?`: IDs of exactly that length.
    let pattern = format!("{}?", &id[..id.len() - 1]);
    let (ok, matched) = findscu_in(
        gw.port,
        "-P",
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=PATIENT",
            &format!("PatientID={pattern}"),
        ],
        &scratch.join("wildcard"),
    );
    assert!(ok);
    let expected = count(
        &gw,
        &format!("SELECT count(*) FROM patients WHERE patient_id GLOB '{pattern}'"),
    );
    assert!(expected >= 1);
    assert_eq!(matched.len(), expected);
    assert!(matched.iter().all(|p| {
        let got = text(p, tags::PATIENT_ID);
        got.len() == id.len() && got.starts_with(&id[..id.len() - 1])
    }));
}

#[test]
fn findscu_queries_at_every_level_with_scope_and_audit() {
    use dicom_dictionary_std::tags;
    let dir = tempfile::tempdir().unwrap();
    let gw = loaded(dir.path(), &GatewaySpec::default());
    let scratch = dir.path().join("find");

    // County reading station: every study.
    let (ok, studies) = findscu(
        gw.port,
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=STUDY",
            "StudyInstanceUID",
            "PatientName",
            "ModalitiesInStudy",
            "NumberOfStudyRelatedInstances",
        ],
        &scratch.join("all"),
    );
    assert!(ok);
    assert_eq!(studies.len(), count(&gw, "SELECT count(*) FROM studies"));
    // Only requested keys come back (plus the level and character set).
    for s in &studies {
        assert!(s.element_opt(tags::ACCESSION_NUMBER).unwrap().is_none());
        let uid = text(s, tags::STUDY_INSTANCE_UID);
        let n: usize = text(s, tags::NUMBER_OF_STUDY_RELATED_INSTANCES)
            .parse()
            .unwrap();
        let expected = count(
            &gw,
            &format!(
                "SELECT count(*) FROM instances i JOIN series se ON se.pk = i.series_pk \
                 JOIN studies st ON st.pk = se.study_pk WHERE st.study_uid = '{uid}'"
            ),
        );
        assert_eq!(n, expected, "{uid}");
    }

    // A township clinic sees only its own patients.
    let (_, own) = findscu(
        gw.port,
        "XINZHEN_CT",
        &["QueryRetrieveLevel=STUDY", "StudyInstanceUID"],
        &scratch.join("own"),
    );
    assert_eq!(
        own.len(),
        count(
            &gw,
            "SELECT count(*) FROM studies st JOIN patients p ON p.pk = st.patient_pk WHERE p.clinic_id = 'xinzhen'"
        )
    );
    assert!(own.len() < studies.len());

    // The sending clinic, a private key in the block of "CONSORTIUM CENTER"
    // (block 0x10 here: (0009,0010) creator, (0009,1001) clinic id).
    let (ok, from_baishui) = findscu(
        gw.port,
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=STUDY",
            "StudyInstanceUID",
            "(0009,0010)=CONSORTIUM CENTER",
            "(0009,1001)=baishui",
        ],
        &scratch.join("by-clinic"),
    );
    assert!(ok);
    assert_eq!(
        from_baishui.len(),
        count(
            &gw,
            "SELECT count(*) FROM studies WHERE clinic_id = 'baishui'"
        )
    );
    assert!(!from_baishui.is_empty() && from_baishui.len() < studies.len());
    for s in &from_baishui {
        assert_eq!(
            text(s, dicom_core::Tag(0x0009, 0x0010)),
            "CONSORTIUM CENTER"
        );
        assert_eq!(text(s, dicom_core::Tag(0x0009, 0x1001)), "baishui");
    }
    // Universal: returned for every study, under another block number.
    let (_, labelled) = findscu(
        gw.port,
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=STUDY",
            "StudyInstanceUID",
            "(0009,0042)=CONSORTIUM CENTER",
            "(0009,4201)",
        ],
        &scratch.join("labelled"),
    );
    assert_eq!(labelled.len(), studies.len());
    let clinics: std::collections::BTreeSet<String> = labelled
        .iter()
        .map(|s| text(s, dicom_core::Tag(0x0009, 0x4201)))
        .collect();
    assert!(
        clinics.contains("xinzhen") && clinics.contains("baishui"),
        "{clinics:?}"
    );

    // The SHA-256 of each instance's current bytes, an IMAGE-level private
    // key (the upload tool's "already present" check), here in block 0x42;
    // a township clinic sees no hash of bytes another clinic sent.
    let baishui_study = text(&from_baishui[0], tags::STUDY_INSTANCE_UID);
    let image_keys = [
        "QueryRetrieveLevel=IMAGE".to_string(),
        format!("StudyInstanceUID={baishui_study}"),
        "SOPInstanceUID".into(),
        "(0009,0042)=CONSORTIUM CENTER".into(),
        "(0009,4210)".into(),
    ];
    let image_keys: Vec<&str> = image_keys.iter().map(String::as_str).collect();
    let (_, hashed) = findscu(gw.port, "COUNTYWS1", &image_keys, &scratch.join("sha"));
    assert!(!hashed.is_empty());
    for i in &hashed {
        let uid = text(i, tags::SOP_INSTANCE_UID);
        let expected: String = gw
            .index()
            .query_row(
                "SELECT sha256 FROM instances WHERE sop_instance_uid = ?1",
                [&uid],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(text(i, dicom_core::Tag(0x0009, 0x4210)), expected, "{uid}");
    }
    let (_, foreign) = findscu(gw.port, "XINZHEN_CT", &image_keys, &scratch.join("sha-x"));
    assert!(foreign.is_empty(), "another clinic's instances and hashes");

    // Chinese name prefix, UTF-8 query, matched on the ideographic group.
    let name: String = gw
        .index()
        .query_row(
            "SELECT name FROM patients WHERE name LIKE '%=%' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let ideographic = name.split('=').nth(1).unwrap();
    let family = ideographic.split('^').next().unwrap();
    let pattern = format!("PatientName={family}*");
    let (ok, by_name) = findscu(
        gw.port,
        "COUNTYWS1",
        &[
            "SpecificCharacterSet=ISO_IR 192",
            "QueryRetrieveLevel=STUDY",
            &pattern,
            "StudyInstanceUID",
        ],
        &scratch.join("name"),
    );
    assert!(ok && !by_name.is_empty());
    for s in &by_name {
        let n = text(s, tags::PATIENT_NAME);
        assert!(
            n.split('=').any(|g| g.starts_with(family)),
            "{n} does not match {family}*"
        );
        assert_eq!(text(s, tags::SPECIFIC_CHARACTER_SET), "ISO_IR 192");
    }

    // Date range with modality.
    let (_, ranged) = findscu(
        gw.port,
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=STUDY",
            "StudyDate=20230101-20241231",
            "ModalitiesInStudy=CT",
            "StudyInstanceUID",
        ],
        &scratch.join("range"),
    );
    let expected = count(
        &gw,
        "SELECT count(*) FROM studies st WHERE st.study_date BETWEEN '20230101' AND '20241231' \
         AND EXISTS (SELECT 1 FROM series x WHERE x.study_pk = st.pk AND x.modality = 'CT')",
    );
    assert_eq!(ranged.len(), expected);
    for s in &ranged {
        let d = text(s, tags::STUDY_DATE);
        assert!(("20230101".."20241232").contains(&d.as_str()), "{d}");
    }

    // Modality alone (searched from the series' modality index), a list too.
    for (modalities, sql) in [("US", "= 'US'"), ("CT\\MR", "IN ('CT', 'MR')")] {
        let (_, found) = findscu(
            gw.port,
            "COUNTYWS1",
            &[
                "QueryRetrieveLevel=STUDY",
                &format!("ModalitiesInStudy={modalities}"),
                "StudyInstanceUID",
            ],
            &scratch.join(format!("modality-{}", modalities.len())),
        );
        let expected = count(
            &gw,
            &format!(
                "SELECT count(*) FROM studies st WHERE EXISTS \
                 (SELECT 1 FROM series x WHERE x.study_pk = st.pk AND x.modality {sql})"
            ),
        );
        assert!(expected > 0, "the samples have {modalities} studies");
        assert_eq!(found.len(), expected, "{modalities}");
        for s in &found {
            let m = text(s, tags::MODALITIES_IN_STUDY);
            assert!(
                m.split('\\')
                    .any(|x| modalities.split('\\').any(|y| x == y)),
                "{m}"
            );
        }
    }

    // Series and image levels within one study.
    let study = text(&studies[0], tags::STUDY_INSTANCE_UID);
    let (_, series) = findscu(
        gw.port,
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=SERIES",
            &format!("StudyInstanceUID={study}"),
            "SeriesInstanceUID",
            "Modality",
        ],
        &scratch.join("series"),
    );
    assert_eq!(
        series.len(),
        count(
            &gw,
            &format!(
                "SELECT count(*) FROM series se JOIN studies st ON st.pk = se.study_pk WHERE st.study_uid = '{study}'"
            )
        )
    );
    let (_, images) = findscu(
        gw.port,
        "COUNTYWS1",
        &[
            "QueryRetrieveLevel=IMAGE",
            &format!("StudyInstanceUID={study}"),
            "SOPInstanceUID",
            "InstanceNumber",
        ],
        &scratch.join("images"),
    );
    assert_eq!(
        images.len(),
        count(
            &gw,
            &format!(
                "SELECT count(*) FROM instances i JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = se.study_pk WHERE st.study_uid = '{study}'"
            )
        )
    );

    // Every query is audited with who and how many.
    let audited = count(
        &gw,
        "SELECT count(*) FROM audit WHERE action = 'C-FIND' AND outcome = 'success'",
    );
    assert_eq!(audited, 12);
    let (ae, matches): (String, i64) = gw
        .index()
        .query_row(
            "SELECT calling_ae, matches FROM audit WHERE calling_ae = 'XINZHEN_CT' ORDER BY pk LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((ae.as_str(), matches as usize), ("XINZHEN_CT", own.len()));
    assert!(
        !gw.log().contains(family),
        "patient names must not appear in logs"
    );
}

#[test]
fn pynetdicom_gb18030_query_finds_utf8_names() {
    let dir = tempfile::tempdir().unwrap();
    let gw = loaded(dir.path(), &GatewaySpec::default());
    let name: String = gw
        .index()
        .query_row("SELECT name FROM patients WHERE name_charset = 'ISO_IR 192' AND name LIKE '%=%' LIMIT 1", [], |r| r.get(0))
        .unwrap();
    let family = name
        .split('=')
        .nth(1)
        .unwrap()
        .split('^')
        .next()
        .unwrap()
        .to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/find_scu.py");
    let run = |args: &[&str]| {
        let out = Command::new("python3")
            .arg(script)
            .arg(gw.port.to_string())
            .args(args)
            .output()
            .expect("python3 with pynetdicom");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let found = run(&["COUNTYWS1", "GB18030", &format!("{family}*")]);
    assert!(found.contains(&family), "{found}");
    assert!(found.contains("\"statuses\": [65280"), "{found}");
    assert!(found.contains(", 0], \"names\""), "final success: {found}");
    let expected: i64 = gw
        .index()
        .query_row(
            "SELECT count(*) FROM studies st JOIN patients p ON p.pk = st.patient_pk WHERE p.name LIKE ?1",
            [format!("%={family}%")],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(found.matches("65280").count() as i64, expected, "{found}");
}

#[test]
fn c_cancel_ends_the_stream_with_fe00() {
    use common::scu::{self, Reply, el};
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let mut sender = scu::associate_ct(gw.port);
    for i in 0..20 {
        let uid = format!("2.25.{}", 8_000 + i);
        assert_eq!(
            sender.store(
                1,
                scu::CT_IMAGE_STORAGE,
                &uid,
                &scu::ct_dataset(&uid, "2.25.80", 64)
            ),
            Reply::Status(0)
        );
    }
    assert!(sender.release());
    const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
    let scu::Association::Accepted(mut scu) = scu::associate(
        gw.port,
        "COUNTYWS1",
        common::AE,
        &[(1, STUDY_ROOT_FIND, &[scu::EXPLICIT_LE])],
    ) else {
        panic!("association refused")
    };
    let find_rq = scu::command(&[
        (0x0002, scu::uid_value(STUDY_ROOT_FIND)),
        (0x0100, 0x0020u16.to_le_bytes().to_vec()),
        (0x0110, 9u16.to_le_bytes().to_vec()),
        (0x0700, 0u16.to_le_bytes().to_vec()),
        (0x0800, 0u16.to_le_bytes().to_vec()),
    ]);
    let identifier = [
        el(0x0008_0018, b"UI", b""),
        el(0x0008_0052, b"CS", b"IMAGE"),
    ]
    .concat();
    let cancel_rq = scu::command(&[
        (0x0100, 0x0FFFu16.to_le_bytes().to_vec()),
        (0x0120, 9u16.to_le_bytes().to_vec()),
        (0x0800, 0x0101u16.to_le_bytes().to_vec()),
    ]);
    // Request and cancel in one write: the cancel is waiting before any match is sent.
    let burst = [
        scu::pdata(1, true, true, &find_rq),
        scu::pdata(1, false, true, &identifier),
        scu::pdata(1, true, true, &cancel_rq),
    ]
    .concat();
    scu.send_raw(&burst).unwrap();
    // Pending responses (if any) then the final status.
    let mut statuses = Vec::new();
    loop {
        match scu.reply() {
            Reply::Status(0xFF00) => {
                statuses.push(0xFF00);
                let _ = scu::read_any(&mut scu.stream); // its identifier
            }
            Reply::Status(s) => {
                statuses.push(s);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(statuses.last(), Some(&0xFE00), "{statuses:x?}");
    assert!(
        statuses.len() < 21,
        "the stream stopped early: {statuses:x?}"
    );
    assert!(scu.release());
    let outcome: String = gw
        .index()
        .query_row(
            "SELECT outcome FROM audit WHERE action = 'C-FIND'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(outcome, "cancelled");
}

#[test]
fn match_limit_answers_a700_instead_of_exhausting_memory() {
    let dir = tempfile::tempdir().unwrap();
    let spec = GatewaySpec {
        gateway_extra: "max_find_results = 3".into(),
        ..Default::default()
    };
    let gw = loaded(dir.path(), &spec);
    let (ok, results) = findscu(
        gw.port,
        "COUNTYWS1",
        &["QueryRetrieveLevel=IMAGE", "SOPInstanceUID"],
        &dir.path().join("lim"),
    );
    assert!(!ok || results.len() == 3);
    assert_eq!(results.len(), 3);
    let outcome: String = gw
        .index()
        .query_row("SELECT outcome FROM audit", [], |r| r.get(0))
        .unwrap();
    assert!(outcome.contains("too many matches"), "{outcome}");
    // On the wire (pynetdicom shows every status): three matches, then
    // 0xA700, not success.
    let said = common::pynetdicom("find_scu.py", gw.port, &["COUNTYWS1", "ISO_IR 192", "*"]);
    assert!(
        said.contains("\"statuses\": [65280, 65280, 65280, 42752]"),
        "{said}"
    );
}

/// Another clinic's instances filed under a clinic's study (another series
/// under the same Study Instance UID, an instance in the owner's series,
/// other bytes under one of its SOP Instance UIDs) are neither listed,
/// counted nor matched in that clinic's answers; the county sees all.
#[test]
fn a_clinic_finds_and_counts_only_what_it_sent() {
    use common::scu::{self, CT_IMAGE_STORAGE, Reply};
    use dicom_dictionary_std::tags;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE])];
    // (SOP Instance UID, pixel bytes, in a second series of modality MR)
    let send = |calling: &str, datasets: &[(&str, usize, bool)]| {
        let scu::Association::Accepted(mut sender) =
            scu::associate(gw.port, calling, common::AE, contexts)
        else {
            panic!("{calling} refused")
        };
        for (uid, pixels, mr) in datasets {
            let mut ds = scu::ct_dataset(uid, "2.25.88", *pixels);
            if *mr {
                // Same lengths: the series UID and the modality only.
                replace(&mut ds, b"2.25.88.1", b"2.25.88.2");
                replace(&mut ds, b"CS\x02\x00CT", b"CS\x02\x00MR");
            }
            assert_eq!(
                sender.store(1, CT_IMAGE_STORAGE, uid, &ds),
                Reply::Status(0)
            );
        }
        assert!(sender.release());
    };
    send(
        "XINZHEN_CT",
        &[("2.25.881", 4096, false), ("2.25.882", 4096, false)],
    );
    send(
        "BAISHUI_DR",
        &[
            ("2.25.883", 4096, false),
            ("2.25.884", 4096, true),
            ("2.25.881", 2048, false),
        ],
    );

    let scratch = dir.path().join("found");
    let find = |calling: &str, level: &str, keys: &[&str]| {
        let out = scratch.join(format!(
            "{calling}-{level}-{}",
            keys.join("-").replace(['=', '\\'], "_")
        ));
        let mut all = vec![
            format!("QueryRetrieveLevel={level}"),
            "StudyInstanceUID=2.25.88".into(),
        ];
        all.extend(keys.iter().map(|k| k.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let (ok, found) = findscu(gw.port, calling, &all, &out);
        assert!(ok, "findscu as {calling} at {level}");
        found
    };
    let study_keys = [
        "NumberOfStudyRelatedInstances",
        "NumberOfStudyRelatedSeries",
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    ];
    let uids = |found: &[dicom_object::DefaultDicomObject]| {
        let mut v: Vec<String> = found
            .iter()
            .map(|o| text(o, tags::SOP_INSTANCE_UID))
            .collect();
        v.sort();
        v
    };

    let own = find("XINZHEN_CT", "STUDY", &study_keys);
    assert_eq!(own.len(), 1);
    let o = &own[0];
    assert_eq!(text(o, tags::NUMBER_OF_STUDY_RELATED_INSTANCES), "2");
    assert_eq!(text(o, tags::NUMBER_OF_STUDY_RELATED_SERIES), "1");
    assert_eq!(text(o, tags::MODALITIES_IN_STUDY), "CT");
    assert_eq!(text(o, tags::SOP_CLASSES_IN_STUDY), CT_IMAGE_STORAGE);
    assert_eq!(text(o, tags::NUMBER_OF_PATIENT_RELATED_STUDIES), "1");
    assert_eq!(text(o, tags::NUMBER_OF_PATIENT_RELATED_SERIES), "1");
    assert_eq!(text(o, tags::NUMBER_OF_PATIENT_RELATED_INSTANCES), "2");
    // The other clinic's MR series does not make the study match MR.
    assert!(find("XINZHEN_CT", "STUDY", &["ModalitiesInStudy=MR"]).is_empty());
    assert_eq!(
        find("XINZHEN_CT", "STUDY", &["ModalitiesInStudy=CT"]).len(),
        1
    );
    let series = find(
        "XINZHEN_CT",
        "SERIES",
        &["SeriesInstanceUID", "NumberOfSeriesRelatedInstances"],
    );
    assert_eq!(series.len(), 1);
    assert_eq!(text(&series[0], tags::SERIES_INSTANCE_UID), "2.25.88.1");
    assert_eq!(
        text(&series[0], tags::NUMBER_OF_SERIES_RELATED_INSTANCES),
        "2"
    );
    let images = find("XINZHEN_CT", "IMAGE", &["SOPInstanceUID"]);
    assert_eq!(uids(&images), ["2.25.881", "2.25.882"]);

    // The other clinic's instances sit under the first clinic's patient:
    // listing them would show it that patient.
    assert!(find("BAISHUI_DR", "STUDY", &study_keys).is_empty());
    assert!(find("BAISHUI_DR", "IMAGE", &["SOPInstanceUID"]).is_empty());

    let county = find("COUNTYWS1", "STUDY", &study_keys);
    let c = &county[0];
    assert_eq!(text(c, tags::NUMBER_OF_STUDY_RELATED_INSTANCES), "4");
    assert_eq!(text(c, tags::NUMBER_OF_STUDY_RELATED_SERIES), "2");
    assert_eq!(text(c, tags::MODALITIES_IN_STUDY), "CT\\MR");
    assert_eq!(
        find("COUNTYWS1", "STUDY", &["ModalitiesInStudy=MR"]).len(),
        1
    );
    let images = find("COUNTYWS1", "IMAGE", &["SOPInstanceUID"]);
    assert_eq!(
        uids(&images),
        ["2.25.881", "2.25.882", "2.25.883", "2.25.884"]
    );
}

/// Replaces the one occurrence of `from` in `bytes` with `to` (same length).
fn replace(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("present");
    bytes[at..at + to.len()].copy_from_slice(to);
}

/// Runs tests/py/find_keys.py (pynetdicom, implicit VR) at `level`: the
/// statuses, and each match's values by keyword or tag.
/// Study-level C-FIND by pynetdicom as COUNTYWS1 with `keys`: the
/// statuses, the matching Study Instance UIDs (sorted), and every row.
fn find_studies(
    port: u16,
    keys: &[&str],
) -> (
    Vec<u16>,
    Vec<String>,
    Vec<std::collections::BTreeMap<String, String>>,
) {
    let mut k = vec!["StudyInstanceUID="];
    k.extend_from_slice(keys);
    let (statuses, rows) = find_keys(port, "COUNTYWS1", "STUDY", &k);
    let mut uids: Vec<String> = rows.iter().map(|r| r["StudyInstanceUID"].clone()).collect();
    uids.sort();
    (statuses, uids, rows)
}

fn find_keys(
    port: u16,
    calling: &str,
    level: &str,
    keys: &[&str],
) -> (Vec<u16>, Vec<std::collections::BTreeMap<String, String>>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/find_keys.py");
    let out = Command::new("python3")
        .arg(script)
        .args([&port.to_string(), calling, level])
        .args(keys)
        .output()
        .expect("python3 with pynetdicom");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[derive(serde::Deserialize)]
    struct Found {
        statuses: Vec<u16>,
        rows: Vec<std::collections::BTreeMap<String, String>>,
    }
    let found: Found = serde_json::from_slice(&out.stdout).unwrap();
    (found.statuses, found.rows)
}

/// A county workstation's association with one CT context (id 1).
fn county_ct_sender(gw: &Gateway) -> common::scu::Scu {
    let contexts: &[(u8, &str, &[&str])] = &[(
        1,
        common::scu::CT_IMAGE_STORAGE,
        &[common::scu::EXPLICIT_LE],
    )];
    let common::scu::Association::Accepted(scu) =
        common::scu::associate(gw.port, "COUNTYWS1", common::AE, contexts)
    else {
        panic!("association refused")
    };
    scu
}

/// One CT instance with the given patient name and study time.
fn named_instance(uid: &str, study: &str, name: &str, time: &str) -> Vec<u8> {
    use common::scu::el;
    [
        el(0x0008_0005, b"CS", b"ISO_IR 192"),
        el(0x0008_0016, b"UI", common::scu::CT_IMAGE_STORAGE.as_bytes()),
        el(0x0008_0018, b"UI", uid.as_bytes()),
        el(0x0008_0030, b"TM", time.as_bytes()),
        el(0x0008_0060, b"CS", b"CT"),
        el(0x0010_0010, b"PN", name.as_bytes()),
        el(0x0010_0020, b"LO", format!("P{study}").as_bytes()),
        el(0x0020_000D, b"UI", study.as_bytes()),
        el(0x0020_000E, b"UI", format!("{study}.1").as_bytes()),
        el(0x7FE0_0010, b"OW", &[0u8; 64]),
    ]
    .concat()
}

/// PS3.4 C.2.2.2 details, with pynetdicom over implicit VR: person names
/// without their insignificant trailing delimiters and by component group
/// (an empty group matches any), times of different precision in a range,
/// the private sending-clinic key read as UN, 0xFF01 for a value given to
/// a key the level cannot match, Retrieve AE Title, and another vendor's
/// private creator (no warning).
#[test]
fn names_times_and_unapplied_keys_match_as_ps3_4_says() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let mut scu = county_ct_sender(&gw);
    for (uid, study, name, time) in [
        ("2.25.5011", "2.25.501", "Wang^XiaoDong=王^小东=", "1030"),
        ("2.25.5021", "2.25.502", "LI^NA^", "103000.5"),
        ("2.25.5031", "2.25.503", "Zhao^Lei", "113000"),
        ("2.25.5041", "2.25.504", "Zhang^^^", "0900"),
        ("2.25.5051", "2.25.505", "Müller^Jörg", "120000"),
    ] {
        assert_eq!(
            scu.store(
                1,
                common::scu::CT_IMAGE_STORAGE,
                uid,
                &named_instance(uid, study, name, time)
            ),
            common::scu::Reply::Status(0)
        );
    }
    assert!(scu.release());
    let studies = |keys: &[&str]| {
        let (statuses, uids, _) = find_studies(gw.port, keys);
        (statuses, uids)
    };
    let found = |keys: &[&str]| studies(keys).1;
    // Names: by ideographic group alone, both groups, trailing delimiters.
    assert_eq!(found(&["PatientName==王^小东"]), ["2.25.501"]);
    assert_eq!(found(&["PatientName=Wang^XiaoDong=王^小东"]), ["2.25.501"]);
    assert_eq!(found(&["PatientName=wang^xiaodong"]), ["2.25.501"]);
    assert_eq!(found(&["PatientName=LI^NA"]), ["2.25.502"]);
    assert_eq!(found(&["PatientName=Li^Na^^"]), ["2.25.502"]);
    assert!(found(&["PatientName=Wang^XiaoDong=李^小东"]).is_empty());
    // A family name alone is found by "any given name" too.
    assert_eq!(found(&["PatientName=ZHANG^*"]), ["2.25.504"]);
    assert_eq!(found(&["PatientName=zhang"]), ["2.25.504"]);
    // Only delimiters: universal.
    assert_eq!(found(&["PatientName=^"]).len(), 5);
    // Times: "1030" is 10:30:00, inside "103000-"; an upper bound "1030"
    // includes 10:30:00.5.
    assert_eq!(
        found(&["StudyTime=103000-"]),
        ["2.25.501", "2.25.502", "2.25.503", "2.25.505"]
    );
    assert_eq!(
        found(&["StudyTime=-1030"]),
        ["2.25.501", "2.25.502", "2.25.504"]
    );
    assert_eq!(found(&["StudyTime=103000.6-"]), ["2.25.503", "2.25.505"]);
    // The sending clinic's private key arrives as UN over implicit VR.
    let creator = "(0009,0010):LO=CONSORTIUM CENTER";
    assert_eq!(found(&[creator, "(0009,1001):LO=county"]).len(), 5);
    assert!(found(&[creator, "(0009,1001):LO=baishui"]).is_empty());
    // Pending statuses: 0xFF00 normally; 0xFF01 when a key's value is not
    // applied (Modality is a SERIES key; SOPClassesInStudy is computed).
    let (statuses, _) = studies(&[]);
    assert_eq!(statuses, [0xFF00, 0xFF00, 0xFF00, 0xFF00, 0xFF00, 0]);
    let (statuses, uids) = studies(&["Modality=MR"]);
    assert_eq!((statuses[0], uids.len()), (0xFF01, 5));
    let (statuses, _) = studies(&["SOPClassesInStudy=1.2.3"]);
    assert_eq!(statuses[0], 0xFF01);
    // Another vendor's private block: not echoed (its elements would come
    // back without their creator), a value in it not applied.
    let vendor = "(0011,0010):LO=OTHER VENDOR";
    let (statuses, rows) = find_keys(
        gw.port,
        "COUNTYWS1",
        "STUDY",
        &["StudyInstanceUID=", vendor, "(0011,1001):LO="],
    );
    assert_eq!(statuses[0], 0xFF00);
    assert!(
        rows.iter()
            .all(|r| !r.keys().any(|k| k.starts_with("(0011"))),
        "{rows:?}"
    );
    let (statuses, _) = studies(&[vendor, "(0011,1001):LO=X"]);
    assert_eq!(statuses[0], 0xFF01);
    // Answers in the query's character set when it can carry them: GB18030
    // always, ISO_IR 100 for Latin-1 names; UTF-8 otherwise.
    let names_in = |charset: &str, name: &str| {
        let (_, rows) = find_keys(
            gw.port,
            "COUNTYWS1",
            "STUDY",
            &[
                &format!("SpecificCharacterSet={charset}"),
                &format!("PatientName={name}"),
            ],
        );
        let mut got: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r["SpecificCharacterSet"].clone(), r["PatientName"].clone()))
            .collect();
        got.sort();
        got
    };
    let pair = |cs: &str, name: &str| (cs.to_string(), name.to_string());
    assert_eq!(
        names_in("GB18030", "=王^小东"),
        [pair("GB18030", "Wang^XiaoDong=王^小东")]
    );
    assert_eq!(
        names_in("ISO_IR 100", "Müller*"),
        [pair("ISO_IR 100", "Müller^Jörg")]
    );
    assert_eq!(
        names_in("ISO_IR 100", "W*"),
        [pair("ISO_IR 192", "Wang^XiaoDong=王^小东")]
    );

    // Where to retrieve from: this center, online.
    let (_, rows) = find_keys(
        gw.port,
        "COUNTYWS1",
        "SERIES",
        &[
            "StudyInstanceUID=2.25.502",
            "SeriesInstanceUID=",
            "RetrieveAETitle=",
            "InstanceAvailability=",
        ],
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["RetrieveAETitle"], common::AE);
    assert_eq!(rows[0]["InstanceAvailability"], "ONLINE");
}

/// Text decoded whole in the query's character set: a GB18030 character
/// whose second byte is 0x5C (昞 is 95 5C) is not a value delimiter, and
/// ISO 2022 code extensions are read. A stored code that is not ASCII (a
/// PatientSex of 男) comes back empty instead of making the answer
/// unencodable. Keys not supported (another attribute, a sequence) are
/// answered with 0xFF01.
#[test]
fn query_text_is_decoded_whole_and_unsupported_keys_warn() {
    use common::scu::el;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let mut scu = county_ct_sender(&gw);
    for (uid, study, name, sex, referring) in [
        (
            "2.25.6011",
            "2.25.601",
            "Li^Bing=李^昞",
            "M",
            "Zhou^Min^^=周^敏",
        ),
        (
            "2.25.6021",
            "2.25.602",
            "Wang^XiaoDong=王^小东",
            "男",
            "de la Cruz^José",
        ),
    ] {
        let ds = [
            el(0x0008_0005, b"CS", b"ISO_IR 192"),
            el(0x0008_0016, b"UI", common::scu::CT_IMAGE_STORAGE.as_bytes()),
            el(0x0008_0018, b"UI", uid.as_bytes()),
            el(0x0008_0060, b"CS", b"CT"),
            el(0x0008_0090, b"PN", referring.as_bytes()),
            el(0x0010_0010, b"PN", name.as_bytes()),
            el(0x0010_0020, b"LO", format!("P{study}").as_bytes()),
            el(0x0010_0040, b"CS", sex.as_bytes()),
            el(0x0020_000D, b"UI", study.as_bytes()),
            el(0x0020_000E, b"UI", format!("{study}.1").as_bytes()),
            el(0x7FE0_0010, b"OW", &[0u8; 64]),
        ]
        .concat();
        assert_eq!(
            scu.store(1, common::scu::CT_IMAGE_STORAGE, uid, &ds),
            common::scu::Reply::Status(0)
        );
    }
    assert!(scu.release());
    let studies = |keys: &[&str]| find_studies(gw.port, keys);
    let (_, found, _) = studies(&["SpecificCharacterSet=GB18030", "PatientName==李^昞"]);
    assert_eq!(found, ["2.25.601"]);
    let (_, found, _) = studies(&["SpecificCharacterSet=GB18030", "PatientName=*=李*"]);
    assert_eq!(found, ["2.25.601"]);
    let (_, found, _) = studies(&[
        "SpecificCharacterSet=\\ISO 2022 IR 58",
        "PatientName==王^小东",
    ]);
    assert_eq!(found, ["2.25.602"]);
    // Trailing "any" components: WANG^*^*^* is WANG with any given,
    // middle and prefix, also none.
    for pattern in ["WANG^*^*^*", "WANG^^*", "wang*^*"] {
        let key = format!("PatientName={pattern}");
        let (_, found, _) = studies(&[&key]);
        assert_eq!(found, ["2.25.602"], "{pattern}");
    }
    // The referring physician is a person name too: case, insignificant
    // trailing delimiters, component groups, non-ASCII letters.
    for (query, study) in [
        ("ZHOU^MIN", "2.25.601"),
        ("zhou^*", "2.25.601"),
        ("=周^敏", "2.25.601"),
        ("DE LA CRUZ^JOSÉ", "2.25.602"),
    ] {
        let key = format!("ReferringPhysicianName={query}");
        let (_, found, _) = studies(&[&key]);
        assert_eq!(found, [study], "{query}");
    }
    // PatientSex: "M" as stored; the invalid "男" empty; the query ends
    // with success instead of an aborted association.
    let (statuses, _, rows) = studies(&["PatientSex="]);
    assert_eq!(statuses, [0xFF00, 0xFF00, 0], "{rows:?}");
    let mut sexes: Vec<(String, String)> = rows
        .iter()
        .map(|r| (r["StudyInstanceUID"].clone(), r["PatientSex"].clone()))
        .collect();
    sexes.sort();
    assert_eq!(
        sexes,
        [
            ("2.25.601".to_string(), "M".to_string()),
            ("2.25.602".to_string(), String::new())
        ]
    );
    // Not supported: Occupation (returned empty) and a sequence key.
    let (statuses, found, rows) = studies(&["(0010,2180):SH="]);
    assert_eq!(statuses, [0xFF01, 0xFF01, 0]);
    assert_eq!(found.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r.get("Occupation").is_some_and(String::is_empty)),
        "{rows:?}"
    );
    let (statuses, _, _) = studies(&["(0008,1032):SQ="]);
    assert_eq!(statuses, [0xFF01, 0xFF01, 0]);
}

/// Combined date and time matching (PS3.4 C.2.2.2.5), granted by extended
/// negotiation to pynetdicom: Study Date 5-7 January with Study Time
/// 10:00-18:00 is one span, 5 January 10:00 to 7 January 18:00. Without
/// the negotiation the two ranges apply each on its own, as before.
#[test]
fn combined_date_and_time_ranges_when_negotiated() {
    use common::scu;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let mut sender = scu::associate_ct(gw.port);
    let studies = [
        ("2.25.901", "20260105", "0900"),
        ("2.25.902", "20260106", "0800"),
        ("2.25.903", "20260107", "1700"),
        ("2.25.904", "20260107", "1900"),
        ("2.25.905", "20260105", "2300"),
        ("2.25.906", "20260108", "1200"),
        ("2.25.907", "20260106", ""),
    ];
    for (study, date, time) in studies {
        let uid = format!("{study}.1");
        let mut ds = scu::ct_dataset(&uid, study, 64);
        // Study Date and Time go before Modality (0008,0060).
        let modality = ds
            .windows(6)
            .position(|w| w == [0x08, 0x00, 0x60, 0x00, b'C', b'S'])
            .unwrap();
        let mut dated = scu::el(0x0008_0020, b"DA", date.as_bytes());
        dated.extend(scu::el(0x0008_0030, b"TM", time.as_bytes()));
        ds.splice(modality..modality, dated);
        assert_eq!(
            sender.store(1, scu::CT_IMAGE_STORAGE, &uid, &ds),
            scu::Reply::Status(0)
        );
    }
    let find = |mode: &str| {
        common::pynetdicom(
            "find_datetime.py",
            gw.port,
            &["COUNTYWS1", "20260105-20260107", "1000-1800", mode],
        )
    };
    let combined = find("combined");
    assert!(combined.contains("\"granted\": \"0001\""), "{combined}");
    assert!(
        combined.contains("\"studies\": [\"2.25.902\", \"2.25.903\", \"2.25.905\", \"2.25.907\"]"),
        "{combined}"
    );
    let separate = find("separate");
    assert!(separate.contains("\"granted\": null"), "{separate}");
    assert!(
        separate.contains("\"studies\": [\"2.25.903\"]"),
        "{separate}"
    );
}

/// InstitutionName as a matching key, and date ranges open at either end,
/// through DCMTK findscu: the studies the index says.
#[test]
fn findscu_matches_institution_and_open_ended_date_ranges() {
    use dicom_dictionary_std::tags;
    let dir = tempfile::tempdir().unwrap();
    let gw = loaded(dir.path(), &GatewaySpec::default());
    let scratch = dir.path().join("find");
    let (institution, date): (String, String) = gw
        .index()
        .query_row(
            "SELECT institution, study_date FROM studies WHERE institution != '' \
             ORDER BY study_date LIMIT 1 OFFSET 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let study_uids = |objs: &[dicom_object::DefaultDicomObject]| {
        let mut uids: Vec<String> = objs
            .iter()
            .map(|o| text(o, tags::STUDY_INSTANCE_UID))
            .collect();
        uids.sort();
        uids
    };
    let index = gw.index();
    let index_uids = |condition: &str, value: &str| {
        let mut stmt = index
            .prepare(&format!(
                "SELECT study_uid FROM studies WHERE {condition} ORDER BY study_uid"
            ))
            .unwrap();
        stmt.query_map([value], |r| r.get::<_, String>(0))
            .unwrap()
            .map(Result::unwrap)
            .collect::<Vec<_>>()
    };
    for (name, key, condition, value) in [
        (
            "institution",
            format!("InstitutionName={institution}"),
            "institution = ?1",
            institution.clone(),
        ),
        (
            "from",
            format!("StudyDate={date}-"),
            "study_date >= ?1 AND study_date != ''",
            date.clone(),
        ),
        (
            "until",
            format!("StudyDate=-{date}"),
            "study_date <= ?1 AND study_date != ''",
            date.clone(),
        ),
    ] {
        let (ok, found) = findscu(
            gw.port,
            "COUNTYWS1",
            &[
                "SpecificCharacterSet=ISO_IR 192",
                "QueryRetrieveLevel=STUDY",
                "StudyInstanceUID",
                &key,
            ],
            &scratch.join(name),
        );
        assert!(ok, "{name}");
        let expected = index_uids(condition, &value);
        assert!(!expected.is_empty(), "{name}");
        assert_eq!(study_uids(&found), expected, "{name}");
    }
}
