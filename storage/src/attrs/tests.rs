use super::*;

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

fn el(tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" { 0 } else { b' ' });
    }
    let mut out = Vec::new();
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(vr);
    if matches!(vr, b"OB" | b"OW" | b"SQ" | b"UN" | b"UT") {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&v);
    out
}

fn implicit(tag: u32, value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    out.extend_from_slice(&v);
    out
}

fn item_header(tag: u32, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out
}

fn undefined_sq(tag: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((tag >> 16) as u16).to_le_bytes());
    out.extend_from_slice(&(tag as u16).to_le_bytes());
    out.extend_from_slice(b"SQ\0\0");
    out.extend_from_slice(&UNDEFINED.to_le_bytes());
    out
}

fn base(charset: &str, name: &[u8]) -> Vec<u8> {
    let mut ds = Vec::new();
    ds.extend(el(0x0008_0005, b"CS", charset.as_bytes()));
    ds.extend(el(0x0008_0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2"));
    ds.extend(el(0x0008_0018, b"UI", b"2.25.1001"));
    ds.extend(el(0x0008_0020, b"DA", b"20260301"));
    ds.extend(el(0x0008_0060, b"CS", b"CT"));
    ds.extend(el(0x0010_0010, b"PN", name));
    ds.extend(el(0x0010_0020, b"LO", b"XZ0001"));
    // Other Patient IDs Sequence, undefined length, one undefined-length item.
    ds.extend(undefined_sq(0x0010_1002));
    ds.extend(item_header(ITEM, UNDEFINED));
    ds.extend(el(0x0010_0020, b"LO", b"110101199003070011"));
    ds.extend(el(0x0010_0021, b"LO", b"RESIDENT"));
    ds.extend(el(0x0010_0022, b"CS", b"TEXT"));
    ds.extend(item_header(ITEM_DELIMITATION, 0));
    ds.extend(item_header(SEQUENCE_DELIMITATION, 0));
    ds.extend(el(0x0020_000D, b"UI", b"2.25.1"));
    ds.extend(el(0x0020_000E, b"UI", b"2.25.2"));
    ds.extend(el(0x0020_0013, b"IS", b"7"));
    ds
}

#[test]
fn reads_utf8_names_and_resident_ids() {
    let mut ds = base("ISO_IR 192", "Wang^Xiaoming=王^小明".as_bytes());
    ds.extend(el(PIXEL_DATA, b"OW", &[0u8; 64]));
    let attrs = read_bytes(&ds, EXPLICIT_LE).unwrap();
    assert_eq!(attrs.patient_name.text, "Wang^Xiaoming=王^小明");
    assert_eq!(attrs.sop_instance_uid, "2.25.1001");
    assert_eq!(attrs.instance_number, Some(7));
    assert_eq!(
        attrs.other_patient_ids,
        vec![OtherPatientId {
            id: "110101199003070011".into(),
            issuer: "RESIDENT".into(),
            type_of_id: "TEXT".into()
        }]
    );
}

#[test]
fn decodes_gb18030_names() {
    let gb = SpecificCharacterSet::from_code("GB18030").unwrap();
    let raw = gb.encode("Li^Hua=李^华").unwrap();
    let attrs = read_bytes(&base("GB18030", &raw), EXPLICIT_LE).unwrap();
    assert_eq!(attrs.patient_name.text, "Li^Hua=李^华");
    assert_eq!(attrs.patient_name.raw, raw);
}

#[test]
fn decodes_iso_2022_code_extensions() {
    // GB2312 (ISO 2022 IR 58) after its escape sequence, as older Chinese
    // modalities write it: "Zhang^San=张^三".
    let raw = b"Zhang^San=\x1b$)A\xd5\xc5^\xc8\xfd".to_vec();
    let attrs = read_bytes(&base("\\ISO 2022 IR 58", &raw), EXPLICIT_LE).unwrap();
    assert_eq!(attrs.patient_name.text, "Zhang^San=张^三");
    assert_eq!(attrs.patient_name.raw, raw);
    let attrs = read_bytes(&base("ISO 2022 IR 6\\ISO 2022 IR 58", &raw), EXPLICIT_LE).unwrap();
    assert_eq!(attrs.patient_name.text, "Zhang^San=张^三");
    // Written single-valued, with the escape sequence all the same.
    let attrs = read_bytes(&base("ISO 2022 IR 58", &raw), EXPLICIT_LE).unwrap();
    assert_eq!(attrs.patient_name.text, "Zhang^San=张^三");
}

#[test]
fn reads_implicit_vr() {
    let mut ds = Vec::new();
    ds.extend(implicit(0x0008_0016, b"1.2.840.10008.5.1.4.1.1.7"));
    ds.extend(implicit(0x0008_0018, b"2.25.5"));
    ds.extend(implicit(0x0010_0020, b"P1"));
    ds.extend(implicit(0x0020_000D, b"2.25.6"));
    ds.extend(implicit(0x0020_000E, b"2.25.7"));
    ds.extend(implicit(PIXEL_DATA, &[1u8; 16]));
    let attrs = read_bytes(&ds, IMPLICIT_LE).unwrap();
    assert_eq!(attrs.patient_id, "P1");
    assert_eq!(attrs.series_instance_uid, "2.25.7");
}

#[test]
fn refuses_truncated_dataset() {
    let mut ds = base("ISO_IR 192", b"A^B");
    ds.extend(el(PIXEL_DATA, b"OW", &[0u8; 64]));
    ds.truncate(ds.len() - 10);
    assert!(matches!(
        read_bytes(&ds, EXPLICIT_LE),
        Err(DatasetError::BadLength { .. })
    ));
    let ds = base("ISO_IR 192", b"A^B");
    assert_eq!(
        read_bytes(&ds[..ds.len() - 3], EXPLICIT_LE),
        Err(DatasetError::Truncated)
    );
}

#[test]
fn refuses_absurd_length_without_allocating() {
    let mut ds = base("ISO_IR 192", b"A^B");
    let mut forged = el(0x0010_0010, b"UT", b"x");
    forged[8..12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    ds.splice(0..0, forged);
    match read_bytes(&ds, EXPLICIT_LE) {
        Err(DatasetError::BadLength { length, .. }) => assert_eq!(length, 0xFFFF_FFF0),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn refuses_deep_nesting() {
    let mut ds = base("ISO_IR 192", b"A^B");
    for _ in 0..100 {
        ds.extend(undefined_sq(0x0040_A730));
        ds.extend(item_header(ITEM, UNDEFINED));
    }
    assert_eq!(read_bytes(&ds, EXPLICIT_LE), Err(DatasetError::TooDeep));
}

#[test]
fn refuses_missing_sop_instance_uid() {
    let ds: Vec<u8> = base("ISO_IR 192", b"A^B");
    let start = ds
        .windows(4)
        .position(|w| w == [0x08, 0x00, 0x18, 0x00])
        .unwrap();
    let mut without = ds[..start].to_vec();
    without.extend_from_slice(&ds[start + 8 + 10..]);
    assert_eq!(
        read_bytes(&without, EXPLICIT_LE),
        Err(DatasetError::MissingAttribute("SOP Instance UID"))
    );
}

#[test]
fn walks_encapsulated_pixel_data() {
    let mut ds = base("ISO_IR 192", b"A^B");
    let mut pixel = Vec::new();
    pixel.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00]);
    pixel.extend_from_slice(b"OB\0\0");
    pixel.extend_from_slice(&UNDEFINED.to_le_bytes());
    pixel.extend(item_header(ITEM, 0));
    pixel.extend(item_header(ITEM, 4));
    pixel.extend_from_slice(&[1, 2, 3, 4]);
    let mut complete = pixel.clone();
    complete.extend(item_header(SEQUENCE_DELIMITATION, 0));
    let mut ok = ds.clone();
    ok.extend(complete);
    assert!(read_bytes(&ok, "1.2.840.10008.1.2.4.50").is_ok());
    ds.extend(pixel);
    assert_eq!(
        read_bytes(&ds, "1.2.840.10008.1.2.4.50"),
        Err(DatasetError::Truncated)
    );
}

#[test]
fn reads_deflated_datasets() {
    use std::io::Write;
    let ds = base("ISO_IR 192", "Wang^Xiaoming=王^小明".as_bytes());
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&ds).unwrap();
    let deflated = enc.finish().unwrap();
    let attrs = read_bytes(&deflated, "1.2.840.10008.1.2.1.99").unwrap();
    assert_eq!(attrs.patient_name.text, "Wang^Xiaoming=王^小明");
}

/// A deflate stream that does not inflate is the sender's fault (0xC000
/// at the gateway); only a spool file the center cannot read is its own.
#[test]
fn a_corrupt_deflate_stream_is_malformed_and_an_unreadable_spool_is_local() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.dcm");
    // Block type 3 does not exist in deflate (RFC 1951 3.2.3).
    std::fs::write(&path, [0xFFu8; 64]).unwrap();
    let corrupt = read_file(&path, 0, "1.2.840.10008.1.2.1.99", 1 << 20);
    assert!(
        matches!(corrupt, Err(DatasetError::Malformed(_))),
        "{corrupt:?}"
    );
    let missing = read_file(
        &dir.path().join("gone.dcm"),
        0,
        "1.2.840.10008.1.2.1",
        1 << 20,
    );
    assert!(matches!(missing, Err(DatasetError::Io(_))), "{missing:?}");
    assert!(crate::Error::Dataset(missing.unwrap_err()).is_resource_failure());
    assert!(!crate::Error::Dataset(corrupt.unwrap_err()).is_resource_failure());
}

#[test]
fn a_deflated_dataset_is_inflated_only_up_to_the_limit() {
    use std::io::Write;
    // 8 MiB of zero pixels deflate to about 8 KiB: a small decompression bomb.
    let mut ds = base("ISO_IR 192", b"Bomb^Test");
    ds.extend(el(PIXEL_DATA, b"OB", &vec![0u8; 8 << 20]));
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&ds).unwrap();
    let deflated = enc.finish().unwrap();
    assert!(deflated.len() < 64 * 1024, "{} bytes", deflated.len());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.dcm");
    std::fs::write(&path, &deflated).unwrap();
    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    let limited = read_file(&path, 0, DEFLATED, 1 << 20);
    assert!(
        matches!(limited, Err(DatasetError::InflatesBeyond { limit }) if limit == 1 << 20),
        "{limited:?}"
    );
    // The same file within a limit it fits: read to its end.
    let attrs = read_file(&path, 0, DEFLATED, ds.len() as u64).unwrap();
    assert_eq!(attrs.patient_name.text, "Bomb^Test");
    assert!(matches!(
        read_file(&path, 0, DEFLATED, ds.len() as u64 - 1),
        Err(DatasetError::InflatesBeyond { .. })
    ));
    // A garbled length beyond the limit in a stream that ends first is a
    // truncated dataset (0xC000 to a sender), not a bomb (0xA700).
    let mut garbled = base("ISO_IR 192", b"Cut^Short");
    garbled.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
    garbled.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    garbled.extend_from_slice(&[1u8; 100]);
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&garbled).unwrap();
    std::fs::write(&path, enc.finish().unwrap()).unwrap();
    let cut = read_file(&path, 0, DEFLATED, 1 << 20);
    assert!(matches!(cut, Err(DatasetError::Truncated)), "{cut:?}");
}

#[test]
fn reads_big_endian() {
    fn be(tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((tag >> 16) as u16).to_be_bytes());
        out.extend_from_slice(&(tag as u16).to_be_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value);
        out
    }
    let mut ds = Vec::new();
    ds.extend(be(0x0008_0016, b"UI", b"1.2.840.10008.5.1.4.1.1.7\0"));
    ds.extend(be(0x0008_0018, b"UI", b"2.25.5"));
    ds.extend(be(0x0020_000D, b"UI", b"2.25.6"));
    ds.extend(be(0x0020_000E, b"UI", b"2.25.7"));
    ds.extend(be(0x0020_0013, b"IS", b"12"));
    let attrs = read_bytes(&ds, "1.2.840.10008.1.2.2").unwrap();
    assert_eq!(attrs.sop_class_uid, "1.2.840.10008.5.1.4.1.1.7");
    assert_eq!(attrs.instance_number, Some(12));
}

#[test]
fn keeps_a_bounded_number_of_other_patient_ids() {
    let mut ds = base("ISO_IR 192", b"A^B");
    ds.extend(undefined_sq(0x0010_1002));
    for i in 0..10_000 {
        ds.extend(item_header(ITEM, UNDEFINED));
        ds.extend(el(0x0010_0020, b"LO", format!("ID{i}").as_bytes()));
        ds.extend(el(0x0010_0020, b"LO", b"REPEATED"));
        ds.extend(item_header(ITEM_DELIMITATION, 0));
    }
    ds.extend(item_header(SEQUENCE_DELIMITATION, 0));
    // A repeated top-level tag: the first occurrence wins.
    ds.extend(el(0x0020_0013, b"IS", b"99"));
    let attrs = read_bytes(&ds, EXPLICIT_LE).unwrap();
    assert_eq!(attrs.other_patient_ids.len(), MAX_OTHER_IDS);
    assert_eq!(attrs.other_patient_ids[1].id, "ID0");
    assert_eq!(attrs.instance_number, Some(7));
}

#[test]
fn refuses_a_truncated_deflate_stream() {
    use std::io::Write;
    let mut ds = base("ISO_IR 192", b"A^B");
    ds.extend(el(PIXEL_DATA, b"OW", &[7u8; 4096]));
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&ds).unwrap();
    let deflated = enc.finish().unwrap();
    assert!(read_bytes(&deflated, "1.2.840.10008.1.2.1.99").is_ok());
    for cut in [deflated.len() - 1, deflated.len() / 2, 10] {
        assert!(
            read_bytes(&deflated[..cut], "1.2.840.10008.1.2.1.99").is_err(),
            "a deflate stream cut at {cut} of {} was accepted",
            deflated.len()
        );
    }
}

#[test]
fn a_file_reads_like_memory_across_skips_beyond_its_buffer() {
    // Skipped values of every size between collected attributes: small ones
    // within the read buffer, a private one of 40 KiB beyond it.
    let mut ds = Vec::new();
    ds.extend(el(0x0008_0005, b"CS", b"ISO_IR 192"));
    ds.extend(el(0x0008_0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2"));
    ds.extend(el(0x0008_0018, b"UI", b"2.25.1001"));
    ds.extend(el(0x0008_0020, b"DA", b"20260301"));
    ds.extend(el(0x0009_0010, b"LO", b"SKIPPED PRIVATE"));
    ds.extend(el(0x0009_1010, b"OB", &vec![0xAB; 40 * 1024]));
    ds.extend(el(0x0010_0010, b"PN", "Zhao^Lei=赵^磊".as_bytes()));
    ds.extend(el(0x0010_0020, b"LO", b"XZ0042"));
    ds.extend(el(0x0018_0050, b"DS", b"1.25"));
    ds.extend(el(0x0020_000D, b"UI", b"2.25.1"));
    ds.extend(el(0x0020_000E, b"UI", b"2.25.2"));
    ds.extend(el(0x0020_0013, b"IS", b"9"));
    ds.extend(el(PIXEL_DATA, b"OW", &[0u8; 64]));
    let preamble = vec![0x55u8; 300];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("instance.dcm");
    std::fs::write(&path, [preamble.as_slice(), &ds].concat()).unwrap();

    let from_file = read_file(&path, preamble.len() as u64, EXPLICIT_LE, u64::MAX).unwrap();
    let from_memory = read_bytes(&ds, EXPLICIT_LE).unwrap();
    assert_eq!(from_file.patient_id, "XZ0042");
    assert_eq!(from_file.patient_name.text, "Zhao^Lei=赵^磊");
    assert_eq!(from_file.series_instance_uid, "2.25.2");
    assert_eq!(from_file.instance_number, Some(9));
    assert_eq!(format!("{from_file:?}"), format!("{from_memory:?}"));

    // A file cut inside the large value is refused, not misread.
    std::fs::write(&path, [preamble.as_slice(), &ds[..30_000]].concat()).unwrap();
    let cut = read_file(&path, preamble.len() as u64, EXPLICIT_LE, u64::MAX);
    assert!(
        matches!(cut, Err(DatasetError::BadLength { length: 40960, .. })),
        "{cut:?}"
    );
}

#[test]
fn query_text_is_decoded_whole_and_in_memory_inflation_is_bounded() {
    use std::io::Write;
    // GB18030: 昞 is 95 5C; the 5C is not a value delimiter.
    let mut ds = el(0x0008_0005, b"CS", b"GB18030");
    ds.extend(el(0x0008_0052, b"CS", b"STUDY"));
    ds.extend(el(0x0010_0010, b"PN", b"=\xc0\xee^\x95\x5c"));
    let texts = top_level_text(&ds, EXPLICIT_LE).unwrap();
    let name = texts.iter().find(|(t, _)| *t == 0x0010_0010).unwrap();
    assert_eq!(name.1, "=李^昞");
    assert_eq!(texts.len(), 3);
    // 70 MiB of zeros deflate to a few KiB: walking them in memory stops
    // at 64 MiB.
    let mut bomb = el(0x0008_0052, b"CS", b"STUDY");
    bomb.extend(el(0x0011_1010, b"OB", &vec![0u8; 70 << 20]));
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&bomb).unwrap();
    let deflated = enc.finish().unwrap();
    assert!(deflated.len() < 1 << 20);
    assert!(matches!(
        validate(&deflated, "1.2.840.10008.1.2.1.99"),
        Err(DatasetError::InflatesBeyond { .. })
    ));
}
