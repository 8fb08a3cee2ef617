//! A raw, blocking DICOM Upper Layer client for tests: PDUs are encoded and
//! decoded by dicom-ul, and the test decides exactly which bytes go out, so
//! it can send what no well-behaved SCU would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRJ, AssociationRQ, Pdu, PresentationContextProposed,
    PresentationContextResultReason, UserVariableItem, read_pdu, write_pdu,
};

pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const MR_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.4";
pub const VERIFICATION: &str = "1.2.840.10008.1.1";
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";

pub struct Scu {
    pub stream: TcpStream,
    /// Accepted `(context id, abstract syntax, transfer syntax)`.
    pub accepted: Vec<(u8, String, String)>,
    pub peer_max_pdu: u32,
    next_message_id: u16,
}

pub enum Association {
    Accepted(Scu),
    Rejected(AssociationRJ),
    Aborted,
    Closed,
}

/// What the gateway answered to a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Status(u16),
    Aborted,
    ReleaseRequested,
    Closed,
}

pub fn encode(pdu: &Pdu) -> Vec<u8> {
    let mut out = Vec::new();
    write_pdu(&mut out, pdu).unwrap();
    out
}

pub fn request(calling: &str, called: &str, contexts: &[(u8, &str, &[&str])]) -> Pdu {
    request_with_max_pdu(calling, called, contexts, 65_536)
}

pub fn request_with_max_pdu(
    calling: &str,
    called: &str,
    contexts: &[(u8, &str, &[&str])],
    max_pdu: u32,
) -> Pdu {
    Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: calling.into(),
        called_ae_title: called.into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: contexts
            .iter()
            .map(|(id, abs, ts)| PresentationContextProposed {
                id: *id,
                abstract_syntax: abs.to_string(),
                transfer_syntaxes: ts.iter().map(|t| t.to_string()).collect(),
            })
            .collect(),
        user_variables: vec![
            UserVariableItem::MaxLength(max_pdu),
            UserVariableItem::ImplementationClassUID("1.2.3.4.5".into()),
        ],
    })
}

pub fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

pub fn associate(
    port: u16,
    calling: &str,
    called: &str,
    contexts: &[(u8, &str, &[&str])],
) -> Association {
    let mut stream = connect(port);
    stream
        .write_all(&encode(&request(calling, called, contexts)))
        .unwrap();
    match read_any(&mut stream) {
        Some(RawPdu::Other(Pdu::AssociationAC(ac))) => {
            let accepted = ac
                .presentation_contexts
                .iter()
                .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
                .map(|pc| {
                    let abs = contexts
                        .iter()
                        .find(|c| c.0 == pc.id)
                        .unwrap()
                        .1
                        .to_string();
                    (pc.id, abs, pc.transfer_syntax.clone())
                })
                .collect();
            let peer_max_pdu = ac
                .user_variables
                .iter()
                .find_map(|v| match v {
                    UserVariableItem::MaxLength(n) => Some(*n),
                    _ => None,
                })
                .unwrap_or(16_384);
            Association::Accepted(Scu {
                stream,
                accepted,
                peer_max_pdu,
                next_message_id: 1,
            })
        }
        Some(RawPdu::Other(Pdu::AssociationRJ(rj))) => Association::Rejected(rj),
        Some(RawPdu::Other(Pdu::AbortRQ { .. })) => Association::Aborted,
        _ => Association::Closed,
    }
}

/// Associates for CT storage in explicit VR little endian, or panics.
pub fn associate_ct(port: u16) -> Scu {
    match associate(
        port,
        super::CT_AE,
        super::AE,
        &[
            (1, CT_IMAGE_STORAGE, &[EXPLICIT_LE]),
            (3, MR_IMAGE_STORAGE, &[EXPLICIT_LE]),
            (5, VERIFICATION, &[IMPLICIT_LE]),
        ],
    ) {
        Association::Accepted(scu) => scu,
        _ => panic!("association refused"),
    }
}

pub enum RawPdu {
    /// PDVs: (context, is_command, is_last, data).
    PData(Vec<(u8, bool, bool, Vec<u8>)>),
    Other(Pdu),
}

pub fn read_any(stream: &mut TcpStream) -> Option<RawPdu> {
    let mut header = [0u8; 6];
    stream.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    assert!(len < 64 << 20, "gateway sent an absurd PDU length");
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    if header[0] == 0x04 {
        let mut pdvs = Vec::new();
        let mut rest = &body[..];
        while rest.len() >= 6 {
            let l = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            pdvs.push((
                rest[4],
                rest[5] & 1 != 0,
                rest[5] & 2 != 0,
                rest[6..4 + l].to_vec(),
            ));
            rest = &rest[4 + l..];
        }
        return Some(RawPdu::PData(pdvs));
    }
    let mut whole = header.to_vec();
    whole.extend_from_slice(&body);
    read_pdu(&whole[..], 1 << 20, false)
        .ok()
        .flatten()
        .map(RawPdu::Other)
}

pub fn command(elements: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (element, value) in elements {
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&element.to_le_bytes());
        body.extend_from_slice(&(value.len() as u32).to_le_bytes());
        body.extend_from_slice(value);
    }
    let mut out = Vec::new();
    out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn uid_value(uid: &str) -> Vec<u8> {
    let mut v = uid.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    v
}

pub fn store_rq(message_id: u16, sop_class: &str, sop_instance: &str) -> Vec<u8> {
    command(&[
        (0x0002, uid_value(sop_class)),
        (0x0100, 0x0001u16.to_le_bytes().to_vec()),
        (0x0110, message_id.to_le_bytes().to_vec()),
        (0x0700, 0u16.to_le_bytes().to_vec()),
        (0x0800, 0x0000u16.to_le_bytes().to_vec()),
        (0x1000, uid_value(sop_instance)),
    ])
}

/// A C-FIND/C-GET/C-MOVE request command (`command_field`) for
/// `sop_class`, announcing an identifier.
pub fn query_rq(sop_class: &str, command_field: u16, message_id: u16) -> Vec<u8> {
    command(&[
        (0x0002, uid_value(sop_class)),
        (0x0100, command_field.to_le_bytes().to_vec()),
        (0x0110, message_id.to_le_bytes().to_vec()),
        (0x0700, 0u16.to_le_bytes().to_vec()),
        (0x0800, 0x0000u16.to_le_bytes().to_vec()),
    ])
}

pub fn echo_rq(message_id: u16) -> Vec<u8> {
    command(&[
        (0x0002, uid_value(VERIFICATION)),
        (0x0100, 0x0030u16.to_le_bytes().to_vec()),
        (0x0110, message_id.to_le_bytes().to_vec()),
        (0x0800, 0x0101u16.to_le_bytes().to_vec()),
    ])
}

/// A C-CANCEL-RQ for the request `message_id`.
pub fn cancel_rq(message_id: u16) -> Vec<u8> {
    command(&[
        (0x0100, 0x0FFFu16.to_le_bytes().to_vec()),
        (0x0120, message_id.to_le_bytes().to_vec()),
        (0x0800, 0x0101u16.to_le_bytes().to_vec()),
    ])
}

/// One P-DATA-TF PDU carrying several PDVs: (context, is_command, is_last, data).
pub fn pdata_pdvs(pdvs: &[(u8, bool, bool, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (context, is_command, is_last, data) in pdvs {
        body.extend_from_slice(&((data.len() + 2) as u32).to_be_bytes());
        body.push(*context);
        body.push(u8::from(*is_command) | (u8::from(*is_last) << 1));
        body.extend_from_slice(data);
    }
    let mut out = vec![0x04, 0];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend(body);
    out
}

/// The next DIMSE message read off `stream`: its command set and whether
/// a dataset followed (read and dropped). `None` when the stream ended or
/// something other than P-DATA-TF came.
pub fn read_message(stream: &mut TcpStream) -> Option<(Vec<u8>, bool)> {
    let mut command = Vec::new();
    loop {
        let Some(RawPdu::PData(pdvs)) = read_any(stream) else {
            return None;
        };
        for (_, is_command, is_last, data) in pdvs {
            if is_command {
                command.extend_from_slice(&data);
                if is_last && command_u16(&command, 0x0800) == Some(0x0101) {
                    return Some((command, false));
                }
            } else if is_last {
                return Some((command, true));
            }
        }
    }
}

/// One P-DATA-TF PDU with one PDV.
pub fn pdata(context: u8, is_command: bool, is_last: bool, data: &[u8]) -> Vec<u8> {
    pdata_pdvs(&[(context, is_command, is_last, data)])
}

impl Scu {
    pub fn context_for(&self, abstract_syntax: &str) -> u8 {
        self.accepted
            .iter()
            .find(|(_, a, _)| a == abstract_syntax)
            .map(|(id, _, _)| *id)
            .expect("context accepted")
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends a message split into PDUs no larger than the gateway's maximum.
    /// Write errors are ignored: the following `reply` reports the closed
    /// connection.
    pub fn send_message(&mut self, context: u8, is_command: bool, data: &[u8]) {
        let max = (self.peer_max_pdu as usize - 6).min(64 * 1024);
        let chunks: Vec<&[u8]> = data.chunks(max).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let pdu = pdata(context, is_command, i + 1 == chunks.len(), chunk);
            if self.stream.write_all(&pdu).is_err() {
                return;
            }
        }
    }

    pub fn next_id(&mut self) -> u16 {
        self.next_message_id = self.next_message_id.wrapping_add(1);
        self.next_message_id
    }

    /// Sends a C-STORE and returns the gateway's reply.
    pub fn store(
        &mut self,
        context: u8,
        sop_class: &str,
        sop_instance: &str,
        dataset: &[u8],
    ) -> Reply {
        let id = self.next_id();
        self.send_message(context, true, &store_rq(id, sop_class, sop_instance));
        self.send_message(context, false, dataset);
        self.reply()
    }

    /// Sends a C-STORE whose `len`-byte dataset is streamed from `reader`.
    pub fn store_stream(
        &mut self,
        context: u8,
        sop_class: &str,
        sop_instance: &str,
        mut reader: impl Read,
        len: u64,
    ) -> Reply {
        let id = self.next_id();
        self.send_message(context, true, &store_rq(id, sop_class, sop_instance));
        let max = (self.peer_max_pdu as usize - 6).min(256 * 1024);
        let mut buf = vec![0u8; max];
        let mut left = len;
        while left > 0 {
            let n = (left as usize).min(max);
            reader.read_exact(&mut buf[..n]).unwrap();
            left -= n as u64;
            if self
                .stream
                .write_all(&pdata(context, false, left == 0, &buf[..n]))
                .is_err()
            {
                break;
            }
        }
        self.reply()
    }

    pub fn echo(&mut self, context: u8) -> Reply {
        let id = self.next_id();
        self.send_message(context, true, &echo_rq(id));
        self.reply()
    }

    /// Reads until a DIMSE response status, an abort or a close.
    pub fn reply(&mut self) -> Reply {
        let mut command = Vec::new();
        loop {
            match read_any(&mut self.stream) {
                None => return Reply::Closed,
                Some(RawPdu::Other(Pdu::AbortRQ { .. })) => return Reply::Aborted,
                Some(RawPdu::Other(Pdu::ReleaseRQ)) => return Reply::ReleaseRequested,
                Some(RawPdu::Other(other)) => panic!("unexpected PDU {other:?}"),
                Some(RawPdu::PData(pdvs)) => {
                    for (_, is_command, is_last, data) in pdvs {
                        assert!(is_command, "gateway sent a dataset");
                        command.extend_from_slice(&data);
                        if is_last {
                            return Reply::Status(status_of(&command));
                        }
                    }
                }
            }
        }
    }

    /// A-RELEASE-RQ; true when A-RELEASE-RP came back.
    pub fn release(mut self) -> bool {
        self.stream.write_all(&encode(&Pdu::ReleaseRQ)).unwrap();
        matches!(
            read_any(&mut self.stream),
            Some(RawPdu::Other(Pdu::ReleaseRP))
        )
    }
}

fn status_of(command: &[u8]) -> u16 {
    command_u16(command, 0x0900).expect("response without status")
}

/// The US value of command element (0000,`element`) in an encoded command set.
pub fn command_u16(command: &[u8], element: u16) -> Option<u16> {
    let mut rest = command;
    while rest.len() >= 8 {
        let e = u16::from_le_bytes([rest[2], rest[3]]);
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        if e == element && len == 2 {
            return Some(u16::from_le_bytes([rest[8], rest[9]]));
        }
        rest = &rest[8 + len..];
    }
    None
}

/// Explicit VR little endian element.
pub fn el(tag: u32, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
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

/// A small synthetic CT dataset (explicit VR LE) with `pixels` bytes of pixel data.
pub fn ct_dataset(sop_instance: &str, study: &str, pixels: usize) -> Vec<u8> {
    let mut ds = Vec::new();
    ds.extend(el(0x0008_0005, b"CS", b"ISO_IR 192"));
    ds.extend(el(0x0008_0016, b"UI", CT_IMAGE_STORAGE.as_bytes()));
    ds.extend(el(0x0008_0018, b"UI", sop_instance.as_bytes()));
    ds.extend(el(0x0008_0060, b"CS", b"CT"));
    ds.extend(el(0x0010_0010, b"PN", "Test^Patient=测试^病人".as_bytes()));
    ds.extend(el(0x0010_0020, b"LO", b"TST001"));
    ds.extend(el(0x0020_000D, b"UI", study.as_bytes()));
    ds.extend(el(0x0020_000E, b"UI", format!("{study}.1").as_bytes()));
    let seed = sop_instance
        .bytes()
        .fold(0u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    let data: Vec<u8> = (0..pixels)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect();
    ds.extend(el(0x7FE0_0010, b"OW", &data));
    ds
}
