//! Association negotiation: who may associate, and which presentation
//! contexts are accepted (PS3.8 7.1, 9.3.2-9.3.4).

use std::collections::HashMap;

use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceProviderASCEReason,
    AssociationRJServiceProviderPresentationReason, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextResult, PresentationContextResultReason,
    UserVariableItem,
};

pub(crate) const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
pub(crate) const VERIFICATION: &str = "1.2.840.10008.1.1";
const IMPLEMENTATION_CLASS_UID: &str = storage::part10::IMPLEMENTATION_CLASS_UID;
const IMPLEMENTATION_VERSION_NAME: &str = storage::part10::IMPLEMENTATION_VERSION_NAME;

/// An accepted presentation context.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) abstract_syntax: String,
    pub(crate) transfer_syntax: String,
    /// The requestor may act as SCP on this context (C-GET sub-operations).
    pub(crate) requestor_scp: bool,
    /// C-FIND with combined date and time matching, which the requestor
    /// asked for and we granted (PS3.4 C.5.1.1, extended negotiation).
    pub(crate) combined_datetime: bool,
}

/// Why an association is refused, mapped once to an A-ASSOCIATE-RJ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    ProtocolVersion,
    ApplicationContext,
    CalledAeTitle,
    CallingAeTitle,
    /// The calling AE title is registered, but not from this address.
    AddressNotAllowed,
    /// Too many associations from this clinic (transient).
    ClinicLimit,
    /// Every association slot is busy (transient).
    TotalLimit,
    /// The requestor's maximum PDU length is below [`MIN_PEER_MAX_PDU`].
    TinyMaxPdu,
    /// A presentation context ID that is even, or proposed twice (PS3.8
    /// 9.3.2.2: odd and unique): an answer could not say which one it means.
    ContextIds,
}

/// Smallest maximum PDU length accepted from a requestor (DCMTK's own
/// minimum): below it, every megabyte sent back would cost thousands of
/// PDUs, which is how a peer could pin the center's CPU.
pub(crate) const MIN_PEER_MAX_PDU: u32 = 4096;

impl Refusal {
    pub(crate) fn to_rj(self) -> AssociationRJ {
        use AssociationRJResult::{Permanent, Transient};
        use AssociationRJServiceUserReason as User;
        let (result, source) = match self {
            Refusal::ProtocolVersion => (
                Permanent,
                AssociationRJSource::ServiceProviderASCE(
                    AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
                ),
            ),
            Refusal::ApplicationContext => (
                Permanent,
                AssociationRJSource::ServiceUser(User::ApplicationContextNameNotSupported),
            ),
            Refusal::CalledAeTitle => (
                Permanent,
                AssociationRJSource::ServiceUser(User::CalledAETitleNotRecognized),
            ),
            Refusal::CallingAeTitle | Refusal::AddressNotAllowed => (
                Permanent,
                AssociationRJSource::ServiceUser(User::CallingAETitleNotRecognized),
            ),
            Refusal::TinyMaxPdu | Refusal::ContextIds => (
                Permanent,
                AssociationRJSource::ServiceUser(User::NoReasonGiven),
            ),
            Refusal::ClinicLimit | Refusal::TotalLimit => (
                Transient,
                AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            ),
        };
        AssociationRJ { result, source }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Refusal::ProtocolVersion => "protocol version not supported",
            Refusal::ApplicationContext => "application context not supported",
            Refusal::CalledAeTitle => "called AE title is not this center",
            Refusal::CallingAeTitle => "calling AE title not registered",
            Refusal::AddressNotAllowed => "calling AE title not allowed from this address",
            Refusal::ClinicLimit => "clinic association limit reached",
            Refusal::TotalLimit => "association limit reached and no idle association to release",
            Refusal::TinyMaxPdu => "maximum PDU length below 4096 bytes",
            Refusal::ContextIds => "presentation context IDs must be odd and unique",
        }
    }
}

/// Checks the parts of an A-ASSOCIATE-RQ that do not depend on the registry.
pub(crate) fn check_request(rq: &AssociationRQ, our_ae: &str) -> Result<(), Refusal> {
    if rq.protocol_version & 1 == 0 {
        return Err(Refusal::ProtocolVersion);
    }
    if rq.application_context_name.trim_end_matches('\0') != APPLICATION_CONTEXT {
        return Err(Refusal::ApplicationContext);
    }
    if rq.called_ae_title != our_ae {
        return Err(Refusal::CalledAeTitle);
    }
    let max_pdu = peer_max_pdu(rq);
    if max_pdu != 0 && max_pdu < MIN_PEER_MAX_PDU {
        return Err(Refusal::TinyMaxPdu);
    }
    let mut ids = std::collections::HashSet::new();
    if rq
        .presentation_contexts
        .iter()
        .any(|pc| pc.id % 2 == 0 || !ids.insert(pc.id))
    {
        return Err(Refusal::ContextIds);
    }
    Ok(())
}

/// True for abstract syntaxes this gateway serves: verification and storage.
/// Storage is every standard class under the storage roots, plus private
/// (non-`1.2.840.10008`) classes, so vendor objects are kept too.
pub(crate) fn is_supported_abstract_syntax(uid: &str) -> bool {
    if is_service_class(uid) {
        return true;
    }
    const STORAGE_ROOTS: &[&str] = &[
        "1.2.840.10008.5.1.4.1.1.",
        "1.2.840.10008.5.1.4.34.",
        "1.2.840.10008.5.1.4.38.",
        "1.2.840.10008.5.1.4.39.",
        "1.2.840.10008.5.1.4.43.",
        "1.2.840.10008.5.1.4.44.",
        "1.2.840.10008.5.1.4.45.",
    ];
    uid == VERIFICATION
        || STORAGE_ROOTS.iter().any(|root| uid.starts_with(root))
        || (!uid.starts_with("1.2.840.10008.") && storage::part10::is_valid_uid(uid))
}

/// Storage SOP classes: the only contexts a C-STORE is accepted on.
pub(crate) fn is_storage_class(uid: &str) -> bool {
    uid != VERIFICATION && !is_service_class(uid) && is_supported_abstract_syntax(uid)
}

/// Non-storage services: their datasets are parsed, not stored, so they
/// are offered only in the uncompressed little endian syntaxes.
fn is_service_class(uid: &str) -> bool {
    uid == crate::commitment::SOP_CLASS
        || crate::find::is_find_class(uid)
        || crate::retrieve::is_get_class(uid)
        || crate::retrieve::is_move_class(uid)
}

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

fn is_service_transfer_syntax(uid: &str) -> bool {
    matches!(uid, "1.2.840.10008.1.2" | "1.2.840.10008.1.2.1")
}

/// True for transfer syntaxes whose dataset encoding we know, so the header
/// can be read: every standard syntax of PS3.6 Table A-1 (storing needs no
/// pixel codec) and any other the dicom-rs registry knows.
pub(crate) fn is_supported_transfer_syntax(uid: &str) -> bool {
    const STANDARD: &[&str] = &[
        "1.2.840.10008.1.2",       // Implicit VR Little Endian
        "1.2.840.10008.1.2.1",     // Explicit VR Little Endian
        "1.2.840.10008.1.2.1.98",  // Encapsulated Uncompressed Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  // Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",     // Explicit VR Big Endian (retired, still sent)
        "1.2.840.10008.1.2.4.50",  // JPEG Baseline
        "1.2.840.10008.1.2.4.51",  // JPEG Extended
        "1.2.840.10008.1.2.4.57",  // JPEG Lossless
        "1.2.840.10008.1.2.4.70",  // JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  // JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  // JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  // JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  // JPEG 2000
        "1.2.840.10008.1.2.4.92",  // JPEG 2000 Part 2 Lossless
        "1.2.840.10008.1.2.4.93",  // JPEG 2000 Part 2
        "1.2.840.10008.1.2.4.94",  // JPIP Referenced
        "1.2.840.10008.1.2.4.95",  // JPIP Referenced Deflate
        "1.2.840.10008.1.2.4.100", // MPEG2 MP@ML
        "1.2.840.10008.1.2.4.101", // MPEG2 MP@HL
        "1.2.840.10008.1.2.4.102", // MPEG-4 AVC/H.264 HP@4.1
        "1.2.840.10008.1.2.4.103", // MPEG-4 AVC/H.264 BD
        "1.2.840.10008.1.2.4.104", // MPEG-4 AVC/H.264 HP@4.2 2D
        "1.2.840.10008.1.2.4.105", // MPEG-4 AVC/H.264 HP@4.2 3D
        "1.2.840.10008.1.2.4.106", // MPEG-4 AVC/H.264 Stereo HP@4.2
        "1.2.840.10008.1.2.4.107", // HEVC/H.265 Main@5.1
        "1.2.840.10008.1.2.4.108", // HEVC/H.265 Main 10@5.1
        "1.2.840.10008.1.2.4.110", // JPEG XL Lossless
        "1.2.840.10008.1.2.4.111", // JPEG XL JPEG Recompression
        "1.2.840.10008.1.2.4.112", // JPEG XL
        "1.2.840.10008.1.2.4.201", // HTJ2K Lossless
        "1.2.840.10008.1.2.4.202", // HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203", // HTJ2K
        "1.2.840.10008.1.2.5",     // RLE Lossless
        "1.2.840.10008.1.2.8.1",   // Deflated Image Frame Compression
    ];
    STANDARD.contains(&uid) || TransferSyntaxRegistry.get(uid).is_some()
}

/// The A-ASSOCIATE-AC for an acceptable request, and the accepted contexts.
/// The first proposed transfer syntax we support is chosen: it is usually the
/// one the sender's file is already in, so it is stored as is. On storage
/// contexts where the requestor takes the SCP role (C-GET), an uncompressed
/// one is preferred (see below).
pub(crate) fn accept(
    rq: &AssociationRQ,
    max_pdu_length: u32,
) -> (AssociationAC, HashMap<u8, Context>) {
    let mut accepted = HashMap::new();
    // SCP/SCU role selection (PS3.7 D.3.3.4): a C-GET requestor asks to be
    // the storage SCP; granted for storage classes as proposed.
    let roles: Vec<(String, dicom_ul::pdu::RequestorRoles)> = rq
        .user_variables
        .iter()
        .filter_map(|v| match v {
            UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles) => {
                let uid = uid.trim_end_matches('\0').to_string();
                (is_supported_abstract_syntax(&uid) && !is_service_class(&uid))
                    .then_some((uid, *roles))
            }
            _ => None,
        })
        .collect();
    // C-FIND extended negotiation (PS3.4 C.5.1.1): of its flags we grant
    // combined date and time matching (byte 2) when asked; relational
    // queries (byte 1) and the rest are not offered.
    let combined: Vec<String> = rq
        .user_variables
        .iter()
        .filter_map(|v| match v {
            UserVariableItem::SopClassExtendedNegotiationSubItem(uid, info) => {
                let uid = uid.trim_end_matches('\0').to_string();
                (crate::find::is_find_class(&uid) && info.get(1) == Some(&1)).then_some(uid)
            }
            _ => None,
        })
        .collect();
    let results = rq
        .presentation_contexts
        .iter()
        .map(|pc| {
            let abstract_syntax = pc.abstract_syntax.trim_end_matches('\0').to_string();
            let requestor_scp = roles
                .iter()
                .any(|(uid, r)| *uid == abstract_syntax && r.scp);
            let proposed: Vec<&str> = pc
                .transfer_syntaxes
                .iter()
                .map(|t| t.trim_end_matches('\0'))
                .collect();
            let (reason, ts) = if !is_supported_abstract_syntax(&abstract_syntax) {
                (
                    PresentationContextResultReason::AbstractSyntaxNotSupported,
                    None,
                )
            } else {
                // On a context where we will send (a C-GET requestor as
                // storage SCP), a syntax we can produce from anything
                // decodable: explicit VR little endian (what most instances
                // are stored in, so sent as they are), else another
                // uncompressed one; a compressed first choice would fail
                // every instance stored otherwise.
                let first = proposed.iter().copied().find(|t| {
                    if is_service_class(&abstract_syntax) {
                        is_service_transfer_syntax(t)
                    } else {
                        is_supported_transfer_syntax(t)
                    }
                });
                // (A first choice we cannot decode, e.g. HTJ2K or video,
                // stays: instances stored in it can only go as stored.)
                let decodable_first =
                    first.is_some_and(|t| storage::transcode::can_convert(t, EXPLICIT_LE));
                let producible = (requestor_scp && decodable_first)
                    .then(|| {
                        proposed.iter().find(|t| **t == EXPLICIT_LE).or_else(|| {
                            proposed
                                .iter()
                                .find(|t| storage::transcode::is_conversion_target(t))
                        })
                    })
                    .flatten()
                    .copied();
                match producible.or(first) {
                    Some(ts) => (
                        PresentationContextResultReason::Acceptance,
                        Some(ts.to_string()),
                    ),
                    None => (
                        PresentationContextResultReason::TransferSyntaxesNotSupported,
                        None,
                    ),
                }
            };
            if let Some(ts) = &ts {
                accepted.insert(
                    pc.id,
                    Context {
                        combined_datetime: combined.contains(&abstract_syntax),
                        abstract_syntax,
                        transfer_syntax: ts.clone(),
                        requestor_scp,
                    },
                );
            }
            PresentationContextResult {
                id: pc.id,
                reason,
                transfer_syntax: ts.unwrap_or_else(|| "1.2.840.10008.1.2".to_string()),
            }
        })
        .collect();
    let ac = AssociationAC {
        protocol_version: 1,
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        application_context_name: APPLICATION_CONTEXT.to_string(),
        presentation_contexts: results,
        user_variables: [
            UserVariableItem::MaxLength(max_pdu_length),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
        ]
        .into_iter()
        .chain(
            roles
                .into_iter()
                .map(|(uid, r)| UserVariableItem::ScuScpRoleSelectionSubItem(uid, r)),
        )
        .chain(
            combined
                .into_iter()
                .filter(|uid| {
                    accepted
                        .values()
                        .any(|c: &Context| c.abstract_syntax == *uid)
                })
                .map(|uid| UserVariableItem::SopClassExtendedNegotiationSubItem(uid, vec![0, 1])),
        )
        .collect(),
    };
    (ac, accepted)
}

/// The requestor's maximum PDU length (0 = unlimited).
pub(crate) fn peer_max_pdu(rq: &AssociationRQ) -> u32 {
    rq.user_variables
        .iter()
        .find_map(|v| match v {
            UserVariableItem::MaxLength(n) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_and_private_classes_are_accepted_query_is_not() {
        assert!(is_supported_abstract_syntax("1.2.840.10008.5.1.4.1.1.2"));
        assert!(is_supported_abstract_syntax(
            "1.2.840.10008.5.1.4.1.1.9.1.1"
        ));
        assert!(is_supported_abstract_syntax("1.3.12.2.1107.5.9.1"));
        assert!(is_supported_abstract_syntax(VERIFICATION));
        assert!(is_supported_abstract_syntax("1.2.840.10008.5.1.4.1.2.2.1"));
        assert!(is_supported_abstract_syntax("1.2.840.10008.5.1.4.1.2.2.2"));
        assert!(is_supported_abstract_syntax("1.2.840.10008.1.20.1"));
        assert!(!is_supported_abstract_syntax("1.2.840.10008.5.1.4.31"));
    }

    /// A C-GET requestor's storage contexts: where it takes the SCP role we
    /// send, so an uncompressed syntax (explicit VR first) is chosen over a
    /// compressed first choice; elsewhere the first supported one.
    #[test]
    fn contexts_we_send_on_get_a_syntax_we_can_produce() {
        use dicom_ul::pdu::{PresentationContextProposed, RequestorRoles};
        const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
        const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
        const JPEG_LOSSLESS: &str = "1.2.840.10008.1.2.4.70";
        const JPEG_LS: &str = "1.2.840.10008.1.2.4.80";
        const ILE: &str = "1.2.840.10008.1.2";
        const HTJ2K: &str = "1.2.840.10008.1.2.4.201";
        let pc = |id: u8, class: &str, ts: &[&str]| PresentationContextProposed {
            id,
            abstract_syntax: class.to_string(),
            transfer_syntaxes: ts.iter().map(|t| t.to_string()).collect(),
        };
        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "COUNTYWS1".into(),
            called_ae_title: "COUNTYPACS".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: vec![
                pc(1, CT, &[JPEG_LOSSLESS, EXPLICIT_LE, ILE]),
                pc(3, CT, &[ILE, EXPLICIT_LE]),
                pc(5, CT, &[JPEG_LS]),
                pc(7, MR, &[JPEG_LOSSLESS, EXPLICIT_LE]),
                pc(9, CT, &[HTJ2K, EXPLICIT_LE]),
            ],
            user_variables: vec![UserVariableItem::ScuScpRoleSelectionSubItem(
                CT.to_string(),
                RequestorRoles {
                    scu: false,
                    scp: true,
                },
            )],
        };
        let (_, accepted) = accept(&rq, 16384);
        let ts = |id: u8| accepted[&id].transfer_syntax.as_str();
        assert_eq!(ts(1), EXPLICIT_LE);
        assert_eq!(ts(3), EXPLICIT_LE);
        assert_eq!(ts(5), JPEG_LS, "nothing producible proposed: as before");
        assert_eq!(ts(9), HTJ2K, "not decodable: only ever sent as stored");
        // No SCP role for MR: it is the requestor who would send, as stored.
        assert_eq!(ts(7), JPEG_LOSSLESS);
        assert!(accepted[&1].requestor_scp && !accepted[&7].requestor_scp);
    }

    #[test]
    fn transfer_syntaxes_from_the_registry() {
        for ts in [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.5",
        ] {
            assert!(is_supported_transfer_syntax(ts), "{ts}");
        }
        assert!(!is_supported_transfer_syntax("1.2.3.4.5.6"));
    }
}
