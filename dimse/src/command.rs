//! DIMSE command sets (PS3.7 9.3, E.1): parse requests, encode responses.
//! Command sets are always Implicit VR Little Endian, group 0000 only.

use std::fmt;

pub mod tag {
    pub const AFFECTED_SOP_CLASS_UID: u32 = 0x0000_0002;
    pub const REQUESTED_SOP_CLASS_UID: u32 = 0x0000_0003;
    pub const MESSAGE_ID: u32 = 0x0000_0110;
    pub const EVENT_TYPE_ID: u32 = 0x0000_1002;
    pub const REQUESTED_SOP_INSTANCE_UID: u32 = 0x0000_1001;
    pub const ACTION_TYPE_ID: u32 = 0x0000_1008;
    pub const COMMAND_FIELD: u32 = 0x0000_0100;
    pub const PRIORITY: u32 = 0x0000_0700;
    pub const MOVE_DESTINATION: u32 = 0x0000_0600;
    pub const NUMBER_OF_REMAINING_SUBOPERATIONS: u32 = 0x0000_1020;
    pub const NUMBER_OF_COMPLETED_SUBOPERATIONS: u32 = 0x0000_1021;
    pub const NUMBER_OF_FAILED_SUBOPERATIONS: u32 = 0x0000_1022;
    pub const NUMBER_OF_WARNING_SUBOPERATIONS: u32 = 0x0000_1023;
    pub const MOVE_ORIGINATOR_AE_TITLE: u32 = 0x0000_1030;
    pub const MOVE_ORIGINATOR_MESSAGE_ID: u32 = 0x0000_1031;
    pub const MESSAGE_ID_BEING_RESPONDED_TO: u32 = 0x0000_0120;
    pub const COMMAND_DATA_SET_TYPE: u32 = 0x0000_0800;
    pub const STATUS: u32 = 0x0000_0900;
    pub const ERROR_COMMENT: u32 = 0x0000_0902;
    pub const AFFECTED_SOP_INSTANCE_UID: u32 = 0x0000_1000;
}

pub mod field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_ECHO_RSP: u16 = 0x8030;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
    pub const C_GET_RQ: u16 = 0x0010;
    pub const C_GET_RSP: u16 = 0x8010;
    pub const C_MOVE_RQ: u16 = 0x0021;
    pub const C_MOVE_RSP: u16 = 0x8021;
    pub const C_FIND_RQ: u16 = 0x0020;
    pub const C_FIND_RSP: u16 = 0x8020;
    pub const N_EVENT_REPORT_RQ: u16 = 0x0100;
    pub const N_EVENT_REPORT_RSP: u16 = 0x8100;
    pub const N_ACTION_RQ: u16 = 0x0130;
    pub const N_ACTION_RSP: u16 = 0x8130;
}

/// DIMSE status codes used by this gateway (PS3.4 B.2.3, PS3.7 C).
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: SOP Class not supported (command does not match its context).
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Pending: a match follows.
    pub const PENDING: u16 = 0xFF00;
    /// Pending, but optional keys were not supported for matching.
    pub const PENDING_OPTIONAL_KEYS_UNSUPPORTED: u16 = 0xFF01;
    /// Sub-operations complete, one or more failures or warnings.
    pub const SUBOPERATIONS_WITH_FAILURES: u16 = 0xB000;
    /// Refused: out of resources, unable to perform sub-operations.
    pub const UNABLE_TO_PERFORM_SUBOPERATIONS: u16 = 0xA702;
    /// Refused: move destination unknown.
    pub const MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
    /// Matching terminated by C-CANCEL.
    pub const CANCEL: u16 = 0xFE00;
    /// Processing failure (N- services).
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// No such SOP instance (N- services).
    pub const NO_SUCH_SOP_INSTANCE: u16 = 0x0112;
    /// Invalid argument value: an N-ACTION's action information out of
    /// range or otherwise inappropriate (PS3.7 10.1.4.1.10).
    pub const INVALID_ARGUMENT_VALUE: u16 = 0x0115;
    /// Resource limitation (N- services).
    pub const RESOURCE_LIMITATION: u16 = 0x0213;
    /// No such action type (N-ACTION).
    pub const NO_SUCH_ACTION: u16 = 0x0123;
    /// Unrecognized operation.
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Refused: out of resources (storage failure, size limit).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class (or the command's UIDs).
    pub const DATASET_MISMATCH: u16 = 0xA900;
    /// Error: cannot understand (malformed dataset or command).
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// Largest command set accepted (commands are a few hundred bytes).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("malformed command set: {0}")]
pub struct CommandError(pub &'static str);

/// A parsed command set.
pub struct Command {
    elements: Vec<(u32, Vec<u8>)>,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field(
                "field",
                &format_args!("0x{:04X}", self.command_field().unwrap_or(0)),
            )
            .field("message_id", &self.u16(tag::MESSAGE_ID))
            .finish()
    }
}

impl Command {
    pub fn parse(mut bytes: &[u8]) -> Result<Command, CommandError> {
        let mut elements = Vec::new();
        while !bytes.is_empty() {
            if bytes.len() < 8 {
                return Err(CommandError("element header truncated"));
            }
            let group = u16::from_le_bytes([bytes[0], bytes[1]]);
            let element = u16::from_le_bytes([bytes[2], bytes[3]]);
            let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
            if group != 0x0000 {
                return Err(CommandError("element outside group 0000"));
            }
            if len > bytes.len() - 8 {
                return Err(CommandError("element length exceeds the command"));
            }
            elements.push((u32::from(element), bytes[8..8 + len].to_vec()));
            bytes = &bytes[8 + len..];
        }
        let command = Command { elements };
        if command.command_field().is_none() {
            return Err(CommandError("no Command Field"));
        }
        Ok(command)
    }

    fn raw(&self, tag: u32) -> Option<&[u8]> {
        self.elements
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| v.as_slice())
    }

    pub fn u16(&self, tag: u32) -> Option<u16> {
        self.raw(tag)
            .filter(|v| v.len() == 2)
            .map(|v| u16::from_le_bytes([v[0], v[1]]))
    }

    pub fn uid(&self, tag: u32) -> Option<String> {
        let v = self.raw(tag)?;
        let s = std::str::from_utf8(v)
            .ok()?
            .trim_end_matches(['\0', ' '])
            .trim_start();
        Some(s.to_string())
    }

    pub fn command_field(&self) -> Option<u16> {
        self.u16(tag::COMMAND_FIELD)
    }

    pub fn message_id(&self) -> u16 {
        self.u16(tag::MESSAGE_ID).unwrap_or(0)
    }

    /// Whether a dataset follows (Command Data Set Type other than 0x0101).
    pub fn has_dataset(&self) -> bool {
        self.u16(tag::COMMAND_DATA_SET_TYPE)
            .is_some_and(|v| v != 0x0101)
    }
}

/// A response command set under construction.
pub struct Response {
    elements: Vec<(u32, Vec<u8>)>,
}

impl Response {
    /// A response with no dataset to the request `message_id`.
    pub fn new(command_field: u16, message_id: u16, status: u16) -> Response {
        let mut r = Response {
            elements: Vec::new(),
        };
        r.push(tag::COMMAND_FIELD, command_field.to_le_bytes().to_vec());
        r.push(
            tag::MESSAGE_ID_BEING_RESPONDED_TO,
            message_id.to_le_bytes().to_vec(),
        );
        r.push(tag::COMMAND_DATA_SET_TYPE, 0x0101u16.to_le_bytes().to_vec());
        r.push(tag::STATUS, status.to_le_bytes().to_vec());
        r
    }

    /// A request command set (we send N-EVENT-REPORT-RQ as the SCP).
    pub fn request(command_field: u16, message_id: u16, has_dataset: bool) -> Response {
        let mut r = Response {
            elements: Vec::new(),
        };
        r.push(tag::COMMAND_FIELD, command_field.to_le_bytes().to_vec());
        r.push(tag::MESSAGE_ID, message_id.to_le_bytes().to_vec());
        let data_set_type: u16 = if has_dataset { 0x0000 } else { 0x0101 };
        r.push(
            tag::COMMAND_DATA_SET_TYPE,
            data_set_type.to_le_bytes().to_vec(),
        );
        r
    }

    pub fn u16(mut self, tag: u32, value: u16) -> Response {
        self.push(tag, value.to_le_bytes().to_vec());
        self
    }

    /// Marks the response as followed by a dataset.
    pub fn with_dataset(mut self) -> Response {
        for (t, v) in &mut self.elements {
            if *t == tag::COMMAND_DATA_SET_TYPE {
                *v = 0x0000u16.to_le_bytes().to_vec();
            }
        }
        self
    }

    pub fn uid(mut self, tag: u32, uid: &str) -> Response {
        let mut v = uid.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        self.push(tag, v);
        self
    }

    /// A text element (AE, CS, ...), space-padded.
    pub fn text(mut self, tag: u32, text: &str) -> Response {
        let mut v = text.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        self.push(tag, v);
        self
    }

    /// Error Comment (LO, at most 64 characters, no backslash).
    pub fn error_comment(mut self, comment: &str) -> Response {
        let mut v: Vec<u8> = comment
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '\\')
            .take(64)
            .map(|c| c as u8)
            .collect();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        self.push(tag::ERROR_COMMENT, v);
        self
    }

    fn push(&mut self, tag: u32, value: Vec<u8>) {
        self.elements.push((tag, value));
    }

    pub fn encode(mut self) -> Vec<u8> {
        self.elements.sort_by_key(|(t, _)| *t);
        let body_len: usize = self.elements.iter().map(|(_, v)| 8 + v.len()).sum();
        let mut out = Vec::with_capacity(12 + body_len);
        let mut element = |tag: u32, value: &[u8]| {
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&(tag as u16).to_le_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        };
        element(0x0000_0000, &(body_len as u32).to_le_bytes());
        for (tag, value) in &self.elements {
            element(*tag, value);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_round_trips_through_the_parser() {
        let bytes = Response::new(field::C_STORE_RSP, 7, status::DATASET_MISMATCH)
            .uid(tag::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.5.1.4.1.1.2")
            .uid(tag::AFFECTED_SOP_INSTANCE_UID, "2.25.1")
            .error_comment("SOP Instance UID differs\\x")
            .encode();
        let parsed = Command::parse(&bytes).unwrap();
        assert_eq!(parsed.command_field(), Some(field::C_STORE_RSP));
        assert_eq!(parsed.u16(tag::MESSAGE_ID_BEING_RESPONDED_TO), Some(7));
        assert_eq!(parsed.u16(tag::STATUS), Some(0xA900));
        assert_eq!(
            parsed.uid(tag::AFFECTED_SOP_INSTANCE_UID).as_deref(),
            Some("2.25.1")
        );
        assert_eq!(
            parsed.uid(tag::ERROR_COMMENT).as_deref(),
            Some("SOP Instance UID differsx")
        );
        assert!(!parsed.has_dataset());
        // Group length counts everything after itself.
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            bytes.len() - 12
        );
    }

    #[test]
    fn rejects_forged_lengths() {
        let mut bytes = Response::new(field::C_ECHO_RSP, 1, 0).encode();
        bytes[4..8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert!(Command::parse(&bytes).is_err());
    }
}
