//! Validation of generated files with `dciodvfy` (Debian `dicom3tools`)
//! and dicom-object, plus determinism and the large streamed instance.
//!
//! `dciodvfy` (dicom3tools 2022) reads implicit/explicit VR LE, explicit VR
//! BE and encapsulated (RLE, JPEG) Pixel Data, but not the Deflated
//! Explicit VR Little Endian syntax: it parses the deflated bytes as if
//! they were plain and fails. For deflated files the test therefore
//! inflates the data set and validates the same object written as
//! explicit VR little endian (identical data set bytes, only the Transfer
//! Syntax UID in the file meta group changes). The same inflated copy is
//! what dicom-object opens, since this workspace builds dicom-object
//! without its `deflate` feature.
//!
//! RLE and JPEG files are also decompressed by DCMTK's `dcmdrle` /
//! `dcmdjpeg` (an independent decoder) and the result validated again.

use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_dictionary_std::tags;
use dicom_object::FileMetaTable;
use sample_dicom::{Options, Profile, SampleFile, generate, write_large_instance};

const DCIODVFY: &str = "/usr/bin/dciodvfy";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const RLE: &str = "1.2.840.10008.1.2.5";
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sample-dicom-test-")
        .tempdir()
        .expect("create temp dir")
}

/// Run dciodvfy; return its combined output and the lines starting with
/// `Error`.
fn dciodvfy(path: &Path) -> (String, Vec<String>) {
    assert!(
        Path::new(DCIODVFY).exists(),
        "{DCIODVFY} not found: install Debian package dicom3tools"
    );
    let out = Command::new(DCIODVFY)
        .arg(path)
        .output()
        .expect("run dciodvfy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = text
        .lines()
        .filter(|l| l.starts_with("Error"))
        .map(str::to_string)
        .collect();
    (text, errors)
}

/// The path dciodvfy and dicom-object should read: the file itself, or for
/// deflated files an inflated explicit VR LE copy in `scratch`.
fn readable_copy(f: &SampleFile, scratch: &Path) -> PathBuf {
    if f.transfer_syntax != DEFLATED {
        return f.path.clone();
    }
    let bytes = std::fs::read(&f.path).unwrap();
    assert_eq!(&bytes[128..132], b"DICM");
    let mut cursor = Cursor::new(&bytes[128..]);
    let mut meta = FileMetaTable::from_reader(&mut cursor).expect("read file meta");
    assert_eq!(meta.transfer_syntax(), DEFLATED);
    let start = 128 + cursor.position() as usize;
    let mut dataset = Vec::new();
    flate2::read::DeflateDecoder::new(&bytes[start..])
        .read_to_end(&mut dataset)
        .expect("inflate data set");
    meta.transfer_syntax = EXPLICIT_LE.to_string();
    meta.update_information_group_length();
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out).unwrap();
    out.extend_from_slice(&dataset);
    let name = format!("inflated-{}.dcm", f.sop_instance_uid);
    let path = scratch.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

/// Decompress with a dcmtk tool if installed.
fn dcmtk_decompress(tool: &str, input: &Path, scratch: &Path) -> PathBuf {
    let out = scratch.join(format!(
        "{tool}-{}",
        input.file_name().unwrap().to_string_lossy()
    ));
    let o = Command::new(format!("/usr/bin/{tool}"))
        .arg(input)
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("/usr/bin/{tool} (Debian dcmtk) not runnable: {e}"));
    assert!(
        o.status.success(),
        "{tool} failed on {}: {}",
        input.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// dciodvfy must report no `Error` lines for `files`, and each must open
/// with dicom-object with the expected identifiers.
fn validate_all(files: &[SampleFile]) {
    let scratch = tempdir();
    let mut failures = Vec::new();
    for f in files {
        let path = readable_copy(f, scratch.path());
        let (text, errors) = dciodvfy(&path);
        if !errors.is_empty() {
            failures.push(format!(
                "{} ({}, {}):\n{}",
                f.path.display(),
                f.modality,
                f.transfer_syntax,
                text
            ));
        }
        let obj = dicom_object::open_file(&path)
            .unwrap_or_else(|e| panic!("dicom-object cannot open {}: {e}", f.path.display()));
        let get = |tag| {
            obj.element(tag)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches(['\0', ' '])
                .to_string()
        };
        assert_eq!(get(tags::SOP_INSTANCE_UID), f.sop_instance_uid);
        assert_eq!(get(tags::SOP_CLASS_UID), f.sop_class_uid);
        assert_eq!(get(tags::STUDY_INSTANCE_UID), f.study_instance_uid);
        assert_eq!(get(tags::MODALITY), f.modality);
        assert_eq!(get(tags::PATIENT_ID), f.patient_id);
        assert_eq!(obj.meta().transfer_syntax().trim_end_matches('\0'), {
            if f.transfer_syntax == DEFLATED {
                EXPLICIT_LE
            } else {
                f.transfer_syntax.as_str()
            }
        });
        let tool = match f.transfer_syntax.as_str() {
            RLE => "dcmdrle",
            JPEG_BASELINE => "dcmdjpeg",
            _ => continue,
        };
        let decompressed = dcmtk_decompress(tool, &f.path, scratch.path());
        let (text, errors) = dciodvfy(&decompressed);
        if !errors.is_empty() {
            failures.push(format!("{} after {tool}:\n{}", f.path.display(), text));
        }
    }
    assert!(
        failures.is_empty(),
        "dciodvfy reported errors:\n\n{}",
        failures.join("\n")
    );
}

#[test]
fn small_profile_passes_dciodvfy() {
    let dir = tempdir();
    let files = generate(dir.path(), &Options::small(42)).unwrap();
    assert!(
        files.len() >= 10 && files.len() <= 16,
        "{} files",
        files.len()
    );
    let total: u64 = files.iter().map(|f| f.size).sum();
    assert!(total < 10_000_000, "small profile is {total} bytes");

    // every kind and syntax is covered
    let kinds: Vec<&str> = files.iter().map(|f| f.sop_class_uid.as_str()).collect();
    for sop in [
        "1.2.840.10008.5.1.4.1.1.2",     // CT
        "1.2.840.10008.5.1.4.1.1.4",     // MR
        "1.2.840.10008.5.1.4.1.1.1.1",   // DX for presentation
        "1.2.840.10008.5.1.4.1.1.1",     // CR
        "1.2.840.10008.5.1.4.1.1.3.1",   // US multi-frame
        "1.2.840.10008.5.1.4.1.1.9.1.1", // 12-lead ECG
        "1.2.840.10008.5.1.4.1.1.104.1", // encapsulated PDF
    ] {
        assert!(kinds.contains(&sop), "missing SOP class {sop}");
    }
    let syntaxes: Vec<&str> = files.iter().map(|f| f.transfer_syntax.as_str()).collect();
    for ts in [
        "1.2.840.10008.1.2",
        EXPLICIT_LE,
        "1.2.840.10008.1.2.2",
        DEFLATED,
        RLE,
        JPEG_BASELINE,
    ] {
        assert!(syntaxes.contains(&ts), "missing transfer syntax {ts}");
    }
    let aes: Vec<&str> = files.iter().map(|f| f.clinic_ae.as_str()).collect();
    for ae in [
        "XINZHEN_CT",
        "XINZHEN_US",
        "BAISHUI_DR",
        "BAISHUI_ECG",
        "COUNTYWS1",
    ] {
        assert!(aes.contains(&ae), "missing AE {ae}");
    }
    // one person has a prior at another clinic: same resident ID, two issuers
    let cross = files.iter().any(|a| {
        files.iter().any(|b| {
            a.resident_id == b.resident_id && a.issuer_of_patient_id != b.issuer_of_patient_id
        })
    });
    assert!(cross, "no patient seen at two clinics");

    validate_all(&files);
}

#[test]
fn demo_profile_passes_dciodvfy() {
    let dir = tempdir();
    let files = generate(dir.path(), &Options::demo(1)).unwrap();
    assert!(
        (100..=200).contains(&files.len()),
        "{} demo files",
        files.len()
    );
    let clinics: std::collections::BTreeSet<&str> = files
        .iter()
        .map(|f| f.issuer_of_patient_id.as_str())
        .collect();
    assert_eq!(
        clinics.into_iter().collect::<Vec<_>>(),
        ["baishui", "county", "xinzhen"]
    );
    // the paths follow <clinic>/study-NNNN/<MODALITY>-NNNN.dcm
    for f in &files {
        let rel = f.path.strip_prefix(dir.path()).unwrap();
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(parts.len(), 3, "{}", rel.display());
        assert!(parts[1].starts_with("study-"));
        assert!(parts[2].starts_with(&format!("{}-", f.modality)));
    }
    // validating every slice adds little: take the first instance of each
    // (study, modality, transfer syntax)
    let mut seen = std::collections::HashSet::new();
    let sample: Vec<SampleFile> = files
        .iter()
        .filter(|f| {
            seen.insert((
                f.study_instance_uid.clone(),
                f.modality.clone(),
                f.transfer_syntax.clone(),
            ))
        })
        .cloned()
        .collect();
    validate_all(&sample);
}

#[test]
fn character_sets_and_names() {
    let dir = tempdir();
    let files = generate(dir.path(), &Options::small(3)).unwrap();
    let mut charsets = Vec::new();
    for f in files.iter().filter(|f| f.transfer_syntax != DEFLATED) {
        let obj = dicom_object::open_file(&f.path).unwrap();
        let cs = obj
            .element(tags::SPECIFIC_CHARACTER_SET)
            .unwrap()
            .to_str()
            .unwrap()
            .trim()
            .to_string();
        let name = obj
            .element(tags::PATIENT_NAME)
            .unwrap()
            .to_str()
            .unwrap()
            .into_owned();
        // alphabetic=ideographic, e.g. Wang^Xiaoming=王^小明
        let (alpha, ideo) = name.trim().split_once('=').expect("two name groups");
        assert!(alpha.is_ascii() && alpha.contains('^'), "{name}");
        assert!(!ideo.is_ascii() && ideo.contains('^'), "{name}");
        let other = obj.element(tags::OTHER_PATIENT_I_DS_SEQUENCE).unwrap();
        let item = &other.items().unwrap()[0];
        let rid = item.element(tags::PATIENT_ID).unwrap().to_str().unwrap();
        assert_eq!(rid.trim(), f.resident_id);
        assert_eq!(rid.trim().len(), 18);
        charsets.push(cs);
    }
    assert!(charsets.iter().any(|c| c == "ISO_IR 192"));
    assert!(charsets.iter().any(|c| c == "GB18030"));
}

#[test]
fn same_seed_same_bytes() {
    let a = tempdir();
    let b = tempdir();
    let c = tempdir();
    let fa = generate(a.path(), &Options::small(7)).unwrap();
    let fb = generate(b.path(), &Options::small(7)).unwrap();
    let fc = generate(c.path(), &Options::small(8)).unwrap();
    assert_eq!(fa.len(), fb.len());
    for (x, y) in fa.iter().zip(&fb) {
        assert_eq!(x.path.strip_prefix(a.path()), y.path.strip_prefix(b.path()));
        assert_eq!(x.sop_instance_uid, y.sop_instance_uid);
        assert_eq!(
            std::fs::read(&x.path).unwrap(),
            std::fs::read(&y.path).unwrap(),
            "{} differs between runs",
            x.path.display()
        );
    }
    assert_ne!(fa[0].sop_instance_uid, fc[0].sop_instance_uid);
    assert_ne!(
        std::fs::read(&fa[0].path).unwrap(),
        std::fs::read(&fc[0].path).unwrap()
    );
}

#[test]
fn large_instance_is_streamed_and_valid() {
    let dir = tempdir();
    let path = dir.path().join("large.dcm");
    let min = 8 << 20;
    let f = write_large_instance(&path, min, 11).unwrap();
    assert!(f.size >= min, "{} < {min}", f.size);
    assert_eq!(f.size, std::fs::metadata(&path).unwrap().len());
    assert_eq!(f.transfer_syntax, EXPLICIT_LE);
    let (text, errors) = dciodvfy(&path);
    assert!(errors.is_empty(), "dciodvfy:\n{text}");
    let obj = dicom_object::open_file(&path).unwrap();
    let frames: usize = obj
        .element(tags::NUMBER_OF_FRAMES)
        .unwrap()
        .to_int()
        .unwrap();
    let pixels = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
    assert_eq!(pixels.len(), frames * 512 * 512 * 2);
    assert_eq!(f.sop_instance_uid, {
        let u = obj.element(tags::SOP_INSTANCE_UID).unwrap();
        u.to_str().unwrap().trim_end_matches('\0').to_string()
    });
    // too large for a 32-bit Pixel Data length
    let err = write_large_instance(&dir.path().join("huge.dcm"), 5 << 30, 1).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
}

#[test]
fn profile_names_parse() {
    assert_eq!("small".parse::<Profile>().unwrap(), Profile::Small);
    assert_eq!("bench".parse::<Profile>().unwrap(), Profile::Bench);
    assert_eq!("demo".parse::<Profile>().unwrap(), Profile::Demo);
    assert!("huge".parse::<Profile>().is_err());
    assert_eq!(Options::demo(5).profile, Profile::Demo);
}
