//! C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root information
//! models, PATIENT to IMAGE level, plus two private keys in a block
//! reserved for private creator "CONSORTIUM CENTER": the sending clinic's
//! id (STUDY level, `(0009,xx01)` LO) and the SHA-256 of an instance's
//! current bytes (IMAGE level, `(0009,xx10)` LO, 64 hex digits; the upload
//! tool's "already present" check). The identifier becomes a
//! `storage::query::Query`; each match goes back as a pending response with
//! only the requested keys, in the query's character set when it is GB18030
//! (or ISO_IR 100 and the values are Latin-1), else UTF-8 (ISO_IR 192),
//! plus Retrieve AE Title and Instance Availability when asked. A value the
//! query cannot apply (a key below its level, a computed key, a key we do not
//! hold) makes the pending status 0xFF01 (PS3.4 C.4.1.1.4).

use dicom_core::header::Header;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::text::SpecificCharacterSet;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use storage::query::{Key, Level, Matcher, Query};

pub(crate) const PATIENT_ROOT: &str = "1.2.840.10008.5.1.4.1.2.1.1";
pub(crate) const STUDY_ROOT: &str = "1.2.840.10008.5.1.4.1.2.2.1";
/// Largest identifier accepted.
pub(crate) const MAX_IDENTIFIER_BYTES: usize = 1 << 20;

pub(crate) fn is_find_class(uid: &str) -> bool {
    uid == PATIENT_ROOT || uid == STUDY_ROOT
}

/// Every key the index answers, with its tag and VR.
const KEYS: &[(Tag, VR, Key)] = &[
    (tags::PATIENT_NAME, VR::PN, Key::PatientName),
    (tags::PATIENT_ID, VR::LO, Key::PatientId),
    (tags::ISSUER_OF_PATIENT_ID, VR::LO, Key::IssuerOfPatientId),
    (tags::PATIENT_BIRTH_DATE, VR::DA, Key::PatientBirthDate),
    (tags::PATIENT_SEX, VR::CS, Key::PatientSex),
    (
        tags::NUMBER_OF_PATIENT_RELATED_STUDIES,
        VR::IS,
        Key::NumberOfPatientRelatedStudies,
    ),
    (
        tags::NUMBER_OF_PATIENT_RELATED_SERIES,
        VR::IS,
        Key::NumberOfPatientRelatedSeries,
    ),
    (
        tags::NUMBER_OF_PATIENT_RELATED_INSTANCES,
        VR::IS,
        Key::NumberOfPatientRelatedInstances,
    ),
    (tags::STUDY_INSTANCE_UID, VR::UI, Key::StudyInstanceUid),
    (tags::STUDY_DATE, VR::DA, Key::StudyDate),
    (tags::STUDY_TIME, VR::TM, Key::StudyTime),
    (tags::ACCESSION_NUMBER, VR::SH, Key::AccessionNumber),
    (tags::STUDY_ID, VR::SH, Key::StudyId),
    (tags::STUDY_DESCRIPTION, VR::LO, Key::StudyDescription),
    (
        tags::REFERRING_PHYSICIAN_NAME,
        VR::PN,
        Key::ReferringPhysicianName,
    ),
    (tags::INSTITUTION_NAME, VR::LO, Key::InstitutionName),
    (tags::MODALITIES_IN_STUDY, VR::CS, Key::ModalitiesInStudy),
    (tags::SOP_CLASSES_IN_STUDY, VR::UI, Key::SopClassesInStudy),
    (
        tags::NUMBER_OF_STUDY_RELATED_SERIES,
        VR::IS,
        Key::NumberOfStudyRelatedSeries,
    ),
    (
        tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
        VR::IS,
        Key::NumberOfStudyRelatedInstances,
    ),
    (tags::SERIES_INSTANCE_UID, VR::UI, Key::SeriesInstanceUid),
    (tags::MODALITY, VR::CS, Key::Modality),
    (tags::SERIES_NUMBER, VR::IS, Key::SeriesNumber),
    (tags::SERIES_DESCRIPTION, VR::LO, Key::SeriesDescription),
    (
        tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
        VR::IS,
        Key::NumberOfSeriesRelatedInstances,
    ),
    (tags::SOP_INSTANCE_UID, VR::UI, Key::SopInstanceUid),
    (tags::SOP_CLASS_UID, VR::UI, Key::SopClassUid),
    (tags::INSTANCE_NUMBER, VR::IS, Key::InstanceNumber),
    (tags::NUMBER_OF_FRAMES, VR::IS, Key::NumberOfFrames),
];

/// Private creator of the center's own query keys (group 0009).
pub(crate) const PRIVATE_CREATOR: &str = "CONSORTIUM CENTER";
/// Element offset, inside the private block, of the sending clinic's id
/// (LO): `(0009,xx01)` where `(0009,00xx)` holds [`PRIVATE_CREATOR`].
const SENDING_CLINIC_OFFSET: u16 = 0x01;
/// Element offset of the SHA-256 of an instance's current bytes (LO, 64
/// lower-case hex digits): `(0009,xx10)`.
pub(crate) const INSTANCE_SHA256_OFFSET: u16 = 0x10;

/// A parsed C-FIND identifier.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) query: Query,
    level_code: String,
    /// Tag and VR of each returned key, in `query.returns` order.
    returned: Vec<(Tag, VR)>,
    /// Requested keys we cannot answer: returned zero-length.
    unsupported: Vec<(Tag, VR)>,
    /// Keys whose value is the same for every match (where to retrieve
    /// from), returned as such.
    constant: Vec<(Tag, VR, Constant)>,
    /// True when an unsupported key carried a value to match (pending
    /// responses then say 0xFF01: optional keys not supported).
    pub(crate) unmatched_keys: bool,
    /// The private creator element of our block, echoed in responses.
    private_creator: Option<Tag>,
    /// The query's Specific Character Set, answered in when it can carry
    /// the response (see [`response_charset`]).
    charset: String,
}

impl Request {
    /// A short description for the audit trail (keys with values).
    pub(crate) fn describe(&self) -> String {
        let mut parts = vec![format!("level={}", self.level_code)];
        for (key, matcher) in &self.query.conditions {
            if *matcher != Matcher::Universal {
                parts.push(format!("{key:?}={matcher:?}"));
            }
        }
        parts.join("; ")
    }
}

/// A key answered the same for every match.
#[derive(Debug, Clone, Copy)]
enum Constant {
    /// Retrieve AE Title (0008,0054): this center's AE title.
    RetrieveAeTitle,
    /// Instance Availability (0008,0056): everything is ONLINE.
    InstanceAvailability,
}

/// The text of a query value. A private key from a requester without our
/// dictionary arrives as UN (implicit VR, or explicit VR UN): its bytes are
/// text, not numbers.
fn value_text(element: &dicom_core::DataElement<InMemDicomObject>) -> String {
    match element.value() {
        dicom_core::DicomValue::Primitive(PrimitiveValue::U8(bytes)) if element.vr() == VR::UN => {
            String::from_utf8_lossy(bytes).into_owned()
        }
        _ => element.to_str().map(|s| s.to_string()).unwrap_or_default(),
    }
}

/// Parses an identifier (already bounded in size) in `transfer_syntax`.
pub(crate) fn parse(
    identifier: &[u8],
    transfer_syntax: &str,
    model: &str,
    clinic: Option<String>,
) -> Result<Request, String> {
    // Text values decoded whole, in the identifier's character set (see
    // `top_level_text`); dicom-rs is used for the structure and the rest.
    let texts: std::collections::HashMap<u32, String> =
        storage::attrs::top_level_text(identifier, transfer_syntax)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax)
        .ok_or("unsupported transfer syntax")?;
    let obj = InMemDicomObject::read_dataset_with_ts(identifier, ts).map_err(|e| e.to_string())?;
    let charset = obj
        .element_opt(tags::SPECIFIC_CHARACTER_SET)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_str().ok().map(|v| v.to_vec()))
        .map(|v| v.join("\\").trim().to_string())
        .unwrap_or_default();
    let level_code = obj
        .element_opt(tags::QUERY_RETRIEVE_LEVEL)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_string())
        .ok_or("missing Query/Retrieve Level")?;
    let level = Level::from_code(&level_code)
        .ok_or_else(|| format!("invalid Query/Retrieve Level {level_code:?}"))?;
    if model == STUDY_ROOT && level == Level::Patient {
        return Err("PATIENT level is not part of the Study Root model".into());
    }
    let mut query = Query {
        level,
        conditions: Vec::new(),
        returns: Vec::new(),
        clinic,
        combined_datetime: false,
    };
    let mut returned = Vec::new();
    let mut unsupported = Vec::new();
    let mut constant = Vec::new();
    let mut unmatched_keys = false;
    // Our private block, if the requester reserved one for our creator.
    let private_creator = obj
        .iter()
        .find(|e| {
            let t = e.tag();
            t.group() == 0x0009
                && (0x0010..=0x00FF).contains(&t.element())
                && value_text(e).trim_end_matches(['\0', ' ']).trim() == PRIVATE_CREATOR
        })
        .map(|e| e.tag());
    let private_key =
        |offset: u16| private_creator.map(|c| Tag(0x0009, (c.element() << 8) | offset));
    let (sending_clinic, instance_sha256) = (
        private_key(SENDING_CLINIC_OFFSET),
        private_key(INSTANCE_SHA256_OFFSET),
    );
    for element in obj.iter() {
        let tag = element.tag();
        if tag == tags::QUERY_RETRIEVE_LEVEL
            || tag == tags::SPECIFIC_CHARACTER_SET
            || tag.group() == 0x0002
            || Some(tag) == private_creator
        {
            continue;
        }
        let decoded_whole = matches!(
            element.vr(),
            VR::PN | VR::LO | VR::SH | VR::LT | VR::ST | VR::UT | VR::UC
        );
        let mut value =
            match texts.get(&((u32::from(tag.group()) << 16) | u32::from(tag.element()))) {
                Some(text) if decoded_whole => text.clone(),
                _ => value_text(element),
            };
        let private = if Some(tag) == sending_clinic {
            Some(Key::SendingClinic)
        } else if Some(tag) == instance_sha256 {
            Some(Key::InstanceSha256)
        } else {
            None
        };
        let known = if let Some(key) = private {
            // Padded with NUL by requesters that send it as UN.
            value = value.trim_end_matches(['\0', ' ']).to_string();
            Some((tag, VR::LO, key))
        } else {
            KEYS.iter().find(|(t, _, _)| *t == tag).copied()
        };
        let is_private_creator = tag.group() % 2 == 1 && (0x0010..=0x00FF).contains(&tag.element());
        match known.as_ref() {
            Some((_, vr, key)) => {
                let matcher = Matcher::parse(&value, matches!(vr, VR::DA | VR::TM | VR::DT));
                // A value for a key below the query's level, or for a
                // computed one, narrows nothing (PS3.4 C.4.1.1.4: 0xFF01).
                unmatched_keys |= matcher != Matcher::Universal && !key.is_matched_at(level);
                query.conditions.push((*key, matcher));
                query.returns.push(*key);
                returned.push((tag, *vr));
            }
            None if tag == tags::RETRIEVE_AE_TITLE || tag == tags::INSTANCE_AVAILABILITY => {
                unmatched_keys |= !value.trim().is_empty();
                let (vr, which) = if tag == tags::RETRIEVE_AE_TITLE {
                    (VR::AE, Constant::RetrieveAeTitle)
                } else {
                    (VR::CS, Constant::InstanceAvailability)
                };
                constant.push((tag, vr, which));
            }
            // Sequence matching (PS3.4 C.2.2.2.6) is not supported: the
            // key is neither applied nor returned (0xFF01).
            None if element.vr() == VR::SQ => unmatched_keys = true,
            // Another vendor's private block is not echoed (its elements
            // would come back without their creator, PS3.5 7.8.1); a value
            // to match in it is one we do not apply.
            None if tag.group() % 2 == 1 => {
                unmatched_keys |= !is_private_creator && !value.trim().is_empty();
            }
            // Not supported for matching nor for existence: returned empty,
            // with 0xFF01 (PS3.4 C.4.1.1.4), not 0xFF00, which would say it
            // was answered like a required key.
            None => {
                unmatched_keys = true;
                unsupported.push((tag, element.vr()));
            }
        }
    }
    Ok(Request {
        query,
        level_code,
        returned,
        unsupported,
        constant,
        unmatched_keys,
        private_creator,
        charset,
    })
}

/// The character set of a response with non-ASCII `values`: the query's own
/// when it can carry them (GB18030 carries every character; ISO_IR 100 only
/// Latin-1), so a requester that asked in GB18030 or Latin-1 reads its
/// answers in it; UTF-8 otherwise (PS3.4 C.4.1.1.3.2 lets the SCP choose).
fn response_charset(query: &str, values: &[&str]) -> (&'static str, SpecificCharacterSet) {
    let latin1 = |v: &&str| v.chars().all(|c| (c as u32) < 0x100);
    match query {
        "GB18030" => (
            "GB18030",
            SpecificCharacterSet::from_code("GB18030").expect("dicom-rs knows GB18030"),
        ),
        "ISO_IR 100" if values.iter().all(latin1) => {
            ("ISO_IR 100", SpecificCharacterSet::ISO_IR_100)
        }
        _ => ("ISO_IR 192", SpecificCharacterSet::ISO_IR_192),
    }
}

/// Encodes one match as a response identifier in `transfer_syntax`;
/// `ae_title` is where it can be retrieved from.
pub(crate) fn encode_match(
    request: &Request,
    values: &[String],
    transfer_syntax: &str,
    ae_title: &str,
) -> Result<Vec<u8>, String> {
    let ts = TransferSyntaxRegistry
        .get(transfer_syntax)
        .ok_or("unsupported transfer syntax")?;
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from(request.level_code.as_str()),
    ));
    if let Some(creator) = request.private_creator {
        obj.put(DataElement::new(
            creator,
            VR::LO,
            PrimitiveValue::from(PRIVATE_CREATOR),
        ));
    }
    // Values of the default repertoire's VRs (CS, DA, TM, UI...) cannot
    // carry other characters whatever the character set (PS3.5 6.1.2.3);
    // an invalid stored one (a GB18030 PatientSex) is returned empty rather
    // than making the response unencodable.
    let values: Vec<&str> = request
        .returned
        .iter()
        .zip(values)
        .map(|((_, vr), v)| {
            let default_repertoire = matches!(
                vr,
                VR::AE | VR::AS | VR::CS | VR::DA | VR::DS | VR::DT | VR::IS | VR::TM | VR::UI
            );
            if default_repertoire && !v.is_ascii() {
                ""
            } else {
                v.as_str()
            }
        })
        .collect();
    let mut non_ascii = false;
    for ((tag, vr), value) in request.returned.iter().zip(values.iter().copied()) {
        non_ascii |= !value.is_ascii();
        let v = if *vr == VR::CS || *vr == VR::UI || *vr == VR::IS {
            PrimitiveValue::Strs(value.split('\\').map(str::to_string).collect())
        } else {
            PrimitiveValue::from(value)
        };
        obj.put(DataElement::new(
            *tag,
            *vr,
            if value.is_empty() {
                PrimitiveValue::Empty
            } else {
                v
            },
        ));
    }
    for (tag, vr) in &request.unsupported {
        obj.put(DataElement::new(*tag, *vr, PrimitiveValue::Empty));
    }
    for (tag, vr, which) in &request.constant {
        let value = match which {
            Constant::RetrieveAeTitle => ae_title,
            Constant::InstanceAvailability => "ONLINE",
        };
        obj.put(DataElement::new(*tag, *vr, PrimitiveValue::from(value)));
    }
    let mut out = Vec::new();
    if non_ascii {
        let (code, charset) = response_charset(&request.charset, &values);
        obj.put(DataElement::new(
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            PrimitiveValue::from(code),
        ));
        obj.write_dataset_with_ts_cs(&mut out, ts, charset)
    } else {
        obj.write_dataset_with_ts(&mut out, ts)
    }
    .map_err(|e| e.to_string())?;
    Ok(out)
}
