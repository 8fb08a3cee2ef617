//! Storage Commitment Push Model, SCP side (PS3.4 Annex J).
//!
//! An N-ACTION lists SOP instances; each is re-verified (indexed, blob
//! present, SHA-256 recomputed) and the result goes back in an
//! N-EVENT-REPORT: event 1 when all are committed, event 2 with a Failed SOP
//! Sequence and a reason per instance otherwise.

use consortium_dimse::{Response, field, status, tag};
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use storage::{CommitCheck, Storage};

pub(crate) const SOP_CLASS: &str = "1.2.840.10008.1.20.1";
pub(crate) const WELL_KNOWN_INSTANCE: &str = "1.2.840.10008.1.20.1.1";
/// Action Type ID of "Request Storage Commitment".
pub(crate) const ACTION_REQUEST: u16 = 1;
/// Largest number of instances in one request.
pub(crate) const MAX_REFERENCES: usize = 50_000;

/// Failure Reason (0008,1197) values, PS3.3 C.14.1.1.
mod reason {
    pub(super) const PROCESSING_FAILURE: u16 = 0x0110;
    pub(super) const NO_SUCH_OBJECT_INSTANCE: u16 = 0x0112;
    pub(super) const CLASS_INSTANCE_CONFLICT: u16 = 0x0119;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reference {
    pub(crate) sop_class_uid: String,
    pub(crate) sop_instance_uid: String,
}

#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) transaction_uid: String,
    pub(crate) references: Vec<Reference>,
}

#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) transaction_uid: String,
    pub(crate) committed: Vec<Reference>,
    pub(crate) failed: Vec<(Reference, u16)>,
}

impl Outcome {
    /// Event Type ID of the N-EVENT-REPORT: 1 all committed, 2 some failed.
    pub(crate) fn event_type(&self) -> u16 {
        if self.failed.is_empty() { 1 } else { 2 }
    }
}

/// An N-ACTION-RSP of the commitment push model's well-known instance.
pub(crate) fn action_rsp(message_id: u16, status: u16) -> Response {
    Response::new(field::N_ACTION_RSP, message_id, status)
        .uid(tag::AFFECTED_SOP_CLASS_UID, SOP_CLASS)
        .uid(tag::AFFECTED_SOP_INSTANCE_UID, WELL_KNOWN_INSTANCE)
}

/// A request refused: the N-ACTION-RSP status, and why in words.
pub(crate) struct Refused {
    pub(crate) status: u16,
    pub(crate) why: String,
}

impl Refused {
    /// The dataset cannot be read at all.
    fn unreadable(why: impl ToString) -> Self {
        Refused {
            status: status::PROCESSING_FAILURE,
            why: why.to_string(),
        }
    }

    /// Read, but its Transaction UID or references are not a request.
    fn invalid(why: impl ToString) -> Self {
        Refused {
            status: status::INVALID_ARGUMENT_VALUE,
            why: why.to_string(),
        }
    }
}

/// Parses an N-ACTION dataset (already checked structurally).
pub(crate) fn parse_request(dataset: &[u8], transfer_syntax: &str) -> Result<Request, Refused> {
    storage::attrs::validate(dataset, transfer_syntax).map_err(Refused::unreadable)?;
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax)
        .ok_or_else(|| Refused::unreadable("unsupported transfer syntax"))?;
    let obj = InMemDicomObject::read_dataset_with_ts(dataset, ts).map_err(Refused::unreadable)?;
    let text = |o: &InMemDicomObject, tag| -> Option<String> {
        o.element_opt(tag)
            .ok()
            .flatten()
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
    };
    let transaction_uid = text(&obj, tags::TRANSACTION_UID)
        .filter(|u| storage::part10::is_valid_uid(u))
        .ok_or_else(|| Refused::invalid("missing or invalid Transaction UID"))?;
    let items = obj
        .element_opt(tags::REFERENCED_SOP_SEQUENCE)
        .ok()
        .flatten()
        .and_then(|e| e.items())
        .ok_or_else(|| Refused::invalid("missing Referenced SOP Sequence"))?;
    // The report must name what was asked (PS3.4 J.3.3): nothing asked is
    // no request.
    if items.is_empty() {
        return Err(Refused::invalid("empty Referenced SOP Sequence"));
    }
    if items.len() > MAX_REFERENCES {
        return Err(Refused::invalid(format!(
            "more than {MAX_REFERENCES} instances in one request"
        )));
    }
    let references = items
        .iter()
        .map(|item| Reference {
            sop_class_uid: text(item, tags::REFERENCED_SOP_CLASS_UID).unwrap_or_default(),
            sop_instance_uid: text(item, tags::REFERENCED_SOP_INSTANCE_UID).unwrap_or_default(),
        })
        .collect();
    Ok(Request {
        transaction_uid,
        references,
    })
}

/// Re-verifies every referenced instance. `clinic` limits what a township
/// clinic may confirm to its own instances.
pub(crate) async fn verify(storage: &Storage, clinic: Option<&str>, request: Request) -> Outcome {
    let mut outcome = Outcome {
        transaction_uid: request.transaction_uid,
        committed: Vec::new(),
        failed: Vec::new(),
    };
    let (valid, invalid): (Vec<Reference>, Vec<Reference>) = request
        .references
        .into_iter()
        .partition(|r| storage::part10::is_valid_uid(&r.sop_instance_uid));
    for r in invalid {
        outcome.failed.push((r, reason::NO_SUCH_OBJECT_INSTANCE));
    }
    let refs: Vec<(String, String)> = valid
        .iter()
        .map(|r| (r.sop_class_uid.clone(), r.sop_instance_uid.clone()))
        .collect();
    let checks = match storage.check_committed(clinic, &refs).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "commitment check failed");
            vec![CommitCheck::Damaged(e.to_string()); valid.len()]
        }
    };
    for (r, check) in valid.into_iter().zip(checks) {
        match check {
            CommitCheck::Committed => outcome.committed.push(r),
            CommitCheck::NoSuchInstance => {
                outcome.failed.push((r, reason::NO_SUCH_OBJECT_INSTANCE))
            }
            CommitCheck::ClassMismatch { .. } => {
                outcome.failed.push((r, reason::CLASS_INSTANCE_CONFLICT))
            }
            CommitCheck::Damaged(why) => {
                tracing::error!(sop_instance_uid = %r.sop_instance_uid, %why, "commitment check found a damaged instance");
                outcome.failed.push((r, reason::PROCESSING_FAILURE));
            }
        }
    }
    outcome
}

/// The N-EVENT-REPORT dataset, encoded in `transfer_syntax`.
pub(crate) fn event_report_dataset(
    outcome: &Outcome,
    transfer_syntax: &str,
) -> Result<Vec<u8>, String> {
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax)
        .ok_or("unsupported transfer syntax")?;
    let item = |r: &Reference, failure: Option<u16>| {
        let mut o = InMemDicomObject::new_empty();
        o.put(DataElement::new(
            tags::REFERENCED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(r.sop_class_uid.as_str()),
        ));
        o.put(DataElement::new(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(r.sop_instance_uid.as_str()),
        ));
        if let Some(reason) = failure {
            o.put(DataElement::new(
                tags::FAILURE_REASON,
                VR::US,
                PrimitiveValue::from(reason),
            ));
        }
        o
    };
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::TRANSACTION_UID,
        VR::UI,
        PrimitiveValue::from(outcome.transaction_uid.as_str()),
    ));
    if !outcome.committed.is_empty() {
        let items: Vec<_> = outcome.committed.iter().map(|r| item(r, None)).collect();
        obj.put(DataElement::new(
            tags::REFERENCED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(items),
        ));
    }
    if !outcome.failed.is_empty() {
        let items: Vec<_> = outcome
            .failed
            .iter()
            .map(|(r, why)| item(r, Some(*why)))
            .collect();
        obj.put(DataElement::new(
            tags::FAILED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(items),
        ));
    }
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

    fn encoded(obj: &InMemDicomObject) -> Vec<u8> {
        let ts = TransferSyntaxRegistry.get(EXPLICIT_LE).unwrap();
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, ts).unwrap();
        out
    }

    fn request(transaction_uid: &str, references: usize) -> InMemDicomObject {
        let items: Vec<InMemDicomObject> = (0..references)
            .map(|i| {
                InMemDicomObject::from_element_iter([
                    DataElement::new(
                        tags::REFERENCED_SOP_CLASS_UID,
                        VR::UI,
                        PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
                    ),
                    DataElement::new(
                        tags::REFERENCED_SOP_INSTANCE_UID,
                        VR::UI,
                        PrimitiveValue::from(format!("2.25.{}", i + 1)),
                    ),
                ])
            })
            .collect();
        InMemDicomObject::from_element_iter([
            DataElement::new(
                tags::TRANSACTION_UID,
                VR::UI,
                PrimitiveValue::from(transaction_uid),
            ),
            DataElement::new(
                tags::REFERENCED_SOP_SEQUENCE,
                VR::SQ,
                DataSetSequence::from(items),
            ),
        ])
    }

    fn refusal(dataset: &[u8]) -> (u16, String) {
        match parse_request(dataset, EXPLICIT_LE) {
            Ok(_) => panic!("accepted"),
            Err(Refused { status, why }) => (status, why),
        }
    }

    #[test]
    fn requests_that_name_nothing_are_invalid_arguments_and_unreadable_ones_failures() {
        let good = parse_request(&encoded(&request("2.25.99", 2)), EXPLICIT_LE)
            .unwrap_or_else(|r| panic!("{}", r.why));
        assert_eq!(good.transaction_uid, "2.25.99");
        assert_eq!(good.references.len(), 2);
        assert_eq!(
            refusal(&encoded(&request("2.25.99", 0))),
            (0x0115, "empty Referenced SOP Sequence".to_string())
        );
        assert_eq!(refusal(&encoded(&request("not a UID", 1))).0, 0x0115);
        let mut no_sequence = request("2.25.99", 1);
        no_sequence.remove_element(tags::REFERENCED_SOP_SEQUENCE);
        assert_eq!(refusal(&encoded(&no_sequence)).0, 0x0115);
        // Cut inside an element: not a request that can be read at all.
        let cut = encoded(&request("2.25.99", 1));
        assert_eq!(refusal(&cut[..cut.len() - 3]).0, 0x0110);
    }
}
