//! DICOM Part 10 file framing: the preamble and File Meta Information group
//! written in front of a dataset received over the network.
//!
//! The meta group depends only on the SOP class, SOP instance and transfer
//! syntax, so identical received bytes always give an identical blob (and
//! therefore the same content-addressed key).

/// Our Implementation Class UID (a UUID-derived 2.25 UID).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.245208735227353112479946613823418770733";
/// Our Implementation Version Name (at most 16 characters).
pub const IMPLEMENTATION_VERSION_NAME: &str = "CONSORTIUM_01";

/// Returns the 128-byte preamble, `DICM` and the File Meta Information group.
pub fn file_header(sop_class_uid: &str, sop_instance_uid: &str, transfer_syntax: &str) -> Vec<u8> {
    let mut group = Vec::with_capacity(256);
    push_element(&mut group, 0x0001, b"OB", &[0, 1]);
    push_element(&mut group, 0x0002, b"UI", &uid_value(sop_class_uid));
    push_element(&mut group, 0x0003, b"UI", &uid_value(sop_instance_uid));
    push_element(&mut group, 0x0010, b"UI", &uid_value(transfer_syntax));
    push_element(
        &mut group,
        0x0012,
        b"UI",
        &uid_value(IMPLEMENTATION_CLASS_UID),
    );
    let mut name = IMPLEMENTATION_VERSION_NAME.as_bytes().to_vec();
    if name.len() % 2 == 1 {
        name.push(b' ');
    }
    push_element(&mut group, 0x0013, b"SH", &name);

    let mut out = Vec::with_capacity(128 + 4 + 12 + group.len());
    out.resize(128, 0);
    out.extend_from_slice(b"DICM");
    push_element(&mut out, 0x0000, b"UL", &(group.len() as u32).to_le_bytes());
    out.extend_from_slice(&group);
    out
}

fn uid_value(uid: &str) -> Vec<u8> {
    let mut v = uid.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    v
}

fn push_element(out: &mut Vec<u8>, element: u16, vr: &[u8; 2], value: &[u8]) {
    out.extend_from_slice(&0x0002u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(vr);
    if vr == b"OB" {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(value);
}

/// Reads the transfer syntax and dataset offset back from a Part 10 header.
/// Returns `None` if `bytes` does not start with a well-formed header.
pub fn parse_file_header(bytes: &[u8]) -> Option<(String, usize)> {
    if bytes.len() < 144 || &bytes[128..132] != b"DICM" || bytes[132..136] != [2, 0, 0, 0] {
        return None;
    }
    if &bytes[136..138] != b"UL" {
        return None;
    }
    let group_len = u32::from_le_bytes(bytes[140..144].try_into().ok()?) as usize;
    let end = 144usize.checked_add(group_len)?;
    let mut pos = 144;
    let mut ts = None;
    while pos + 8 <= end.min(bytes.len()) {
        // A group length that runs past group 0002 is a damaged header.
        if bytes[pos..pos + 2] != [2, 0] {
            return None;
        }
        let element = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]);
        let vr = &bytes[pos + 4..pos + 6];
        let (len, header) = if matches!(vr, b"OB" | b"OW" | b"UN" | b"SQ" | b"UT") {
            let len = u32::from_le_bytes(bytes.get(pos + 8..pos + 12)?.try_into().ok()?) as usize;
            (len, 12)
        } else {
            (
                u16::from_le_bytes([bytes[pos + 6], bytes[pos + 7]]) as usize,
                8,
            )
        };
        let value = bytes.get(pos + header..pos + header + len)?;
        if element == 0x0010 {
            ts = Some(trim_uid(value));
        }
        pos += header + len;
    }
    Some((ts?, end))
}

fn trim_uid(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_end_matches(['\0', ' '])
        .to_string()
}

/// True when `uid` is a syntactically valid DICOM UID (PS3.5 9.1).
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
                && (c == "0" || !c.starts_with('0'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = file_header(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3.45",
            "1.2.840.10008.1.2.1",
        );
        assert_eq!(h.len() % 2, 0);
        let (ts, offset) = parse_file_header(&h).unwrap();
        assert_eq!(ts, "1.2.840.10008.1.2.1");
        assert_eq!(offset, h.len());
    }

    #[test]
    fn a_group_length_past_group_0002_is_refused() {
        let mut h = file_header(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3.45",
            "1.2.840.10008.1.2.1",
        );
        let len = u32::from_le_bytes(h[140..144].try_into().unwrap());
        // The group length now also covers a Patient's Name after the header.
        h[140..144].copy_from_slice(&(len + 16).to_le_bytes());
        h.extend_from_slice(&[0x10, 0, 0x10, 0, b'P', b'N', 8, 0]);
        h.extend_from_slice(b"Doe^Jon ");
        assert_eq!(parse_file_header(&h), None);
    }

    #[test]
    fn uid_validation() {
        assert!(is_valid_uid("1.2.840.10008.1.2"));
        assert!(is_valid_uid("2.25.0"));
        assert!(!is_valid_uid("1.02.3"));
        assert!(!is_valid_uid("1..2"));
        assert!(!is_valid_uid("../../etc/passwd"));
        assert!(!is_valid_uid(&"1".repeat(65)));
    }
}
