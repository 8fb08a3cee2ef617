//! Studies and instances as the index knows them, with the caller's access
//! checked: study lookup, ordered instances, DICOM JSON metadata, priors.

use std::path::PathBuf;

use consortium_proto::v1::{InstanceRef, PriorStudy};
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use rusqlite::{Connection, OptionalExtension};

use crate::auth::Caller;
use crate::error::{ApiError, Result};

/// Whose instances a caller's counts and modalities cover: every clinic's
/// (`""`) for those who see them all, else only its own clinic's.
pub fn counted_clinic(caller: &Caller) -> &str {
    if caller.sees_all_clinics() {
        ""
    } else {
        &caller.clinic_id
    }
}

/// A study and whose patient it is.
#[derive(Debug, Clone)]
pub struct StudyRow {
    pub pk: i64,
    pub study_uid: String,
    pub clinic_id: String,
    pub patient_pk: i64,
    /// `clinic:patient-id`, for the audit log.
    pub patient_ref: String,
}

/// Where an instance is stored and whose it is.
#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub sop_instance_uid: String,
    pub blob_key: String,
    pub sha256: String,
    pub size: u64,
    pub transfer_syntax: String,
    pub study_uid: String,
    pub clinic_id: String,
    pub patient_ref: String,
    pub number_of_frames: u32,
}

/// A study's modalities, as the index joins them with `\`, as a list.
pub fn split_modalities(joined: Option<String>) -> Vec<String> {
    joined
        .unwrap_or_default()
        .split('\\')
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect()
}

/// Checks that `uid` looks like a UID before it reaches SQL or a log.
pub fn check_uid(uid: &str, what: &str) -> Result<()> {
    if storage::part10::is_valid_uid(uid) {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "{what} is not a valid UID"
        )))
    }
}

/// Whether the caller may see an instance: radiologists see all; clinic
/// roles see the instances their clinic sent (these exact bytes), whatever
/// study or series another sender may have put them in.
pub fn may_see_instance(
    conn: &Connection,
    caller: &Caller,
    sop_uid: &str,
    sha256: &str,
) -> Result<bool> {
    if caller.sees_all_clinics() {
        return Ok(true);
    }
    if caller.require_patient_access().is_err() {
        return Ok(false);
    }
    Ok(storage::index::sent_by(
        conn,
        sop_uid,
        sha256,
        &caller.clinic_id,
    )?)
}

/// The study, if it exists and the caller may see it (otherwise not found,
/// so that other clinics' studies do not reveal themselves): its own
/// clinic's, or one holding an instance the caller's clinic sent.
pub fn find_study(conn: &Connection, caller: &Caller, study_uid: &str) -> Result<StudyRow> {
    let row = conn
        .prepare_cached(
            "SELECT st.pk, st.study_uid, st.clinic_id, st.patient_pk, p.clinic_id || ':' || p.patient_id
             FROM studies st JOIN patients p ON p.pk = st.patient_pk WHERE st.study_uid = ?1",
        )?
        .query_row(
            [study_uid],
            |r| {
                Ok(StudyRow {
                    pk: r.get(0)?,
                    study_uid: r.get(1)?,
                    clinic_id: r.get(2)?,
                    patient_pk: r.get(3)?,
                    patient_ref: r.get(4)?,
                })
            },
        )
        .optional()?;
    let Some(study) = row else {
        return Err(ApiError::NotFound("study"));
    };
    if caller.may_see_clinic(&study.clinic_id) {
        return Ok(study);
    }
    caller.require_patient_access()?;
    let sent_some: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM instances i JOIN series se ON se.pk = i.series_pk
                JOIN instance_senders s ON s.sop_instance_uid = i.sop_instance_uid AND s.sha256 = i.sha256
             WHERE se.study_pk = ?1 AND s.clinic_id = ?2)",
        )?
        .query_row(rusqlite::params![study.pk, caller.clinic_id], |r| r.get(0))?;
    if sent_some {
        Ok(study)
    } else {
        Err(ApiError::NotFound("study"))
    }
}

const INSTANCE_SELECT: &str = "SELECT i.sop_instance_uid, i.blob_key, i.sha256, i.size, i.transfer_syntax,
        st.study_uid, st.clinic_id, p.clinic_id || ':' || p.patient_id, COALESCE(i.number_of_frames, 1)
     FROM instances i JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = se.study_pk
          JOIN patients p ON p.pk = COALESCE(i.patient_pk, st.patient_pk)";

fn instance_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceRow> {
    Ok(InstanceRow {
        sop_instance_uid: r.get(0)?,
        blob_key: r.get(1)?,
        sha256: r.get(2)?,
        size: r.get::<_, i64>(3)? as u64,
        transfer_syntax: r.get(4)?,
        study_uid: r.get(5)?,
        clinic_id: r.get(6)?,
        patient_ref: r.get(7)?,
        number_of_frames: r.get::<_, i64>(8)?.clamp(1, u32::MAX as i64) as u32,
    })
}

/// The instance, if it exists and the caller may see it.
pub fn find_instance(conn: &Connection, caller: &Caller, sop_uid: &str) -> Result<InstanceRow> {
    let row = conn
        .prepare_cached(&format!("{INSTANCE_SELECT} WHERE i.sop_instance_uid = ?1"))?
        .query_row([sop_uid], instance_row)
        .optional()?;
    match row {
        Some(i) if may_see_instance(conn, caller, &i.sop_instance_uid, &i.sha256)? => Ok(i),
        _ => Err(ApiError::NotFound("instance")),
    }
}

/// A series' instances in instance-number order, if the caller may see it.
pub fn series_instances(
    conn: &Connection,
    caller: &Caller,
    series_uid: &str,
) -> Result<Vec<InstanceRow>> {
    let mut stmt = conn.prepare(&format!(
        "{INSTANCE_SELECT} WHERE se.series_uid = ?1
         ORDER BY i.instance_number IS NULL, i.instance_number, i.sop_instance_uid"
    ))?;
    let rows: Vec<InstanceRow> = stmt
        .query_map([series_uid], instance_row)?
        .collect::<Result<_, _>>()?;
    let mut visible = Vec::with_capacity(rows.len());
    for row in rows {
        if may_see_instance(conn, caller, &row.sop_instance_uid, &row.sha256)? {
            visible.push(row);
        }
    }
    if visible.is_empty() {
        return Err(ApiError::NotFound("series"));
    }
    Ok(visible)
}

/// Where an instance sorts in its study, as [`study_instances`] orders
/// them: series without a number last, by series number, series UID;
/// within a series, instances without a number last, by instance number,
/// SOP Instance UID. Ordered the way SQLite's ORDER BY orders the same
/// columns (integers, then text compared byte by byte).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SortKey {
    series_number_missing: bool,
    series_number: i64,
    series_uid: String,
    instance_number_missing: bool,
    instance_number: i64,
    sop_instance_uid: String,
}

impl SortKey {
    /// As a paging token: `k1:` then the fields, `:`-separated.
    pub fn token(&self) -> String {
        format!(
            "k1:{}:{}:{}:{}:{}:{}",
            self.series_number_missing as u8,
            self.series_number,
            self.series_uid,
            self.instance_number_missing as u8,
            self.instance_number,
            self.sop_instance_uid
        )
    }

    /// Reads [`SortKey::token`]'s form back; a series UID may hold a `:`
    /// (the SOP Instance UID, checked at C-STORE, may not).
    pub fn from_token(token: &str) -> Option<SortKey> {
        let flag = |f: &str| match f {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        };
        let mut head = token.strip_prefix("k1:")?.splitn(3, ':');
        let (series_number_missing, series_number) =
            (flag(head.next()?)?, head.next()?.parse().ok()?);
        let mut tail = head.next()?.rsplitn(4, ':');
        let sop_instance_uid = tail.next()?.to_string();
        let instance_number = tail.next()?.parse().ok()?;
        let instance_number_missing = flag(tail.next()?)?;
        let series_uid = tail.next()?.to_string();
        Some(SortKey {
            series_number_missing,
            series_number,
            series_uid,
            instance_number_missing,
            instance_number,
            sop_instance_uid,
        })
    }
}

/// One instance of a study as GetStudyMetadata lists it.
pub struct StudyInstance {
    pub reference: InstanceRef,
    pub sort_key: SortKey,
    pub blob_key: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// `clinic:patient ID` of the patient the instance shows.
    pub patient_ref: String,
}

/// The study's instances the caller may see, ordered by series number, then
/// instance number, with where each is stored.
pub fn study_instances(
    conn: &Connection,
    caller: &Caller,
    study_pk: i64,
) -> Result<Vec<StudyInstance>> {
    let mut stmt = conn.prepare_cached(
        "SELECT se.series_uid, i.sop_instance_uid, i.sop_class_uid, se.modality,
                COALESCE(se.series_number, 0), COALESCE(i.instance_number, 0),
                COALESCE(i.number_of_frames, 1), i.blob_key, i.sha256,
                p.clinic_id || ':' || p.patient_id, i.size,
                se.series_number IS NULL, i.instance_number IS NULL
         FROM instances i JOIN series se ON se.pk = i.series_pk
              JOIN studies st ON st.pk = se.study_pk
              JOIN patients p ON p.pk = COALESCE(i.patient_pk, st.patient_pk)
         WHERE se.study_pk = ?1
         ORDER BY se.series_number IS NULL, se.series_number, se.series_uid,
                  i.instance_number IS NULL, i.instance_number, i.sop_instance_uid",
    )?;
    let rows = stmt.query_map([study_pk], |r| {
        let sort_key = SortKey {
            series_number_missing: r.get(11)?,
            series_number: r.get(4)?,
            series_uid: r.get(0)?,
            instance_number_missing: r.get(12)?,
            instance_number: r.get(5)?,
            sop_instance_uid: r.get(1)?,
        };
        Ok((
            StudyInstance {
                sort_key,
                reference: InstanceRef {
                    series_instance_uid: r.get(0)?,
                    sop_instance_uid: r.get(1)?,
                    sop_class_uid: r.get(2)?,
                    modality: r.get(3)?,
                    series_number: r.get::<_, i64>(4)? as i32,
                    instance_number: r.get::<_, i64>(5)? as i32,
                    number_of_frames: r.get::<_, i64>(6)?.max(1) as u32,
                },
                blob_key: r.get(7)?,
                patient_ref: r.get(9)?,
                size: r.get::<_, i64>(10)?.max(0) as u64,
            },
            r.get::<_, String>(8)?,
        ))
    })?;
    let mut visible = Vec::new();
    for row in rows {
        let (instance, sha) = row?;
        if may_see_instance(conn, caller, &instance.reference.sop_instance_uid, &sha)? {
            visible.push(instance);
        }
    }
    Ok(visible)
}

/// Reads a stored Part 10 object, up to (not including) Pixel Data when
/// `header_only`.
pub fn open_object(
    local: Option<PathBuf>,
    bytes: Option<bytes::Bytes>,
    header_only: bool,
) -> Result<DefaultDicomObject> {
    let mut options = OpenFileOptions::new();
    if header_only {
        options = options.read_until(dicom_dictionary_std::tags::PIXEL_DATA);
    }
    let parsed = match (local, bytes) {
        (Some(path), _) => options.open_file(path),
        (None, Some(bytes)) => options
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .from_reader(&bytes[..]),
        (None, None) => return Err(ApiError::Internal("no blob to open".into())),
    };
    parsed.map_err(unparsable)
}

/// Reads the header (up to Pixel Data) of a stored Part 10 object from its
/// first bytes only. `None` when the header goes on past them (or they do
/// not parse): the caller reads the whole object instead. Their end is an
/// error, never a clean end of the dataset, so a header cut off between
/// two elements is not taken for a whole one.
pub fn open_header_prefix(prefix: &[u8]) -> Option<DefaultDicomObject> {
    /// Reads `0` and then fails instead of reporting the end of data.
    struct Prefix<'a>(&'a [u8]);
    impl std::io::Read for Prefix<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() && !buf.is_empty() {
                return Err(std::io::Error::other(
                    "the header goes on past the bytes read",
                ));
            }
            self.0.read(buf)
        }
    }
    OpenFileOptions::new()
        .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(Prefix(prefix))
        .ok()
}

fn unparsable(e: dicom_object::ReadError) -> ApiError {
    // The parser's message may name the blob's path: log it, do not send it.
    tracing::warn!(error = %e, "stored instance cannot be parsed");
    ApiError::FailedPrecondition("the stored instance cannot be parsed".into())
}

/// DICOM JSON (PS3.18 F.2) of one dataset, without its file meta group.
///
/// Binary values longer than [`MAX_INLINE_BINARY`] bytes of base64
/// (waveform samples, an encapsulated document, overlays) are bulk data,
/// left out like pixel data: the attribute carries a `BulkDataURI`,
/// `instances/<SOP Instance UID>`, the instance GetRawInstance returns.
pub fn dataset_json(obj: &DefaultDicomObject) -> Result<String> {
    let failed = |e: serde_json::Error| ApiError::Internal(format!("DICOM JSON: {e}"));
    let dataset: &dicom_object::InMemDicomObject = obj;
    let mut json = dicom_json::to_value(dataset).map_err(failed)?;
    let uid = obj.meta().media_storage_sop_instance_uid();
    leave_out_bulk_data(
        &mut json,
        &format!("instances/{}", uid.trim_end_matches('\0')),
    );
    serde_json::to_string(&json).map_err(failed)
}

/// Base64 characters of a binary value inlined in metadata (768 bytes).
const MAX_INLINE_BINARY: usize = 1024;

/// Replaces long `InlineBinary` values, at any depth, by `BulkDataURI`.
fn leave_out_bulk_data(json: &mut serde_json::Value, uri: &str) {
    match json {
        serde_json::Value::Object(attribute) => {
            let long = matches!(
                attribute.get("InlineBinary"),
                Some(serde_json::Value::String(b)) if b.len() > MAX_INLINE_BINARY
            );
            if long {
                attribute.remove("InlineBinary");
                attribute.insert("BulkDataURI".into(), uri.into());
            }
            attribute
                .values_mut()
                .for_each(|v| leave_out_bulk_data(v, uri));
        }
        serde_json::Value::Array(items) => {
            items.iter_mut().for_each(|v| leave_out_bulk_data(v, uri))
        }
        _ => {}
    }
}

/// Studies of the same person: linked through identifiers that carry an
/// issuer (Other Patient IDs, or Patient ID with Issuer of Patient ID), or
/// the same patient record. Never through names. Newest first, limited to
/// what the caller may see.
pub fn priors(conn: &Connection, caller: &Caller, study: &StudyRow) -> Result<Vec<PriorStudy>> {
    // A township caller is shown the modalities of what its clinic sent.
    let modalities = storage::query::modalities_in_study_where(&format!(
        "(?3 = '' OR {})",
        storage::query::series_sent_by_clinic("x", "?3")
    ));
    let mut stmt = conn.prepare_cached(&format!(
        "WITH keys (id, issuer) AS (
             SELECT other_id, issuer FROM patient_other_ids WHERE patient_pk = ?1 AND issuer != ''
             UNION SELECT patient_id, issuer FROM patients WHERE pk = ?1 AND issuer != ''),
         ids (patient_pk, id, issuer) AS (
             SELECT patient_pk, other_id, issuer FROM patient_other_ids
             UNION ALL SELECT pk, patient_id, issuer FROM patients),
         linked (patient_pk, how) AS (
             SELECT ?1, 'same patient record'
             UNION SELECT ids.patient_pk, 'ID ' || keys.id || ' (issuer ' || keys.issuer || ')'
             FROM keys JOIN ids ON ids.id = keys.id AND ids.issuer = keys.issuer)
         SELECT st.study_uid, st.clinic_id, st.study_date, st.description,
                substr(min(CASE WHEN l.how = 'same patient record' THEN '0' ELSE '1' END || l.how), 2),
                {modalities}
         FROM linked l JOIN studies st ON st.patient_pk = l.patient_pk
         WHERE st.pk != ?2
         GROUP BY st.pk
         ORDER BY st.study_date DESC, st.study_time DESC, st.study_uid"
    ))?;
    let rows = stmt.query_map(
        rusqlite::params![study.patient_pk, study.pk, counted_clinic(caller)],
        |r| {
            let modalities = r.get(5)?;
            Ok(PriorStudy {
                study_instance_uid: r.get(0)?,
                clinic_id: r.get(1)?,
                study_date: r.get(2)?,
                study_description: r.get(3)?,
                matched_on: r.get(4)?,
                modalities: split_modalities(modalities),
            })
        },
    )?;
    let all: Vec<PriorStudy> = rows.collect::<Result<_, _>>()?;
    Ok(all
        .into_iter()
        .filter(|p| caller.may_see_clinic(&p.clinic_id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token reads back as the key it came from (a series UID with a
    /// `:`, negative and missing numbers included), and keys order as
    /// the SQL does: numbered series first, by number, then UID.
    #[test]
    fn sort_keys_survive_their_tokens_and_order_like_the_query() {
        let key = |sm, sn, series: &str, im, inum, sop: &str| SortKey {
            series_number_missing: sm,
            series_number: sn,
            series_uid: series.into(),
            instance_number_missing: im,
            instance_number: inum,
            sop_instance_uid: sop.into(),
        };
        let keys = [
            key(false, -2, "1.2.9", false, 3, "1.2.9.3"),
            key(false, 1, "1.2.10", false, 1, "1.2.10.1"),
            key(false, 1, "1.2.10", true, 0, "1.2.10.0"),
            key(false, 1, "1.2.9", false, 1, "1.2.9.1"),
            key(true, 0, "odd:uid", false, 7, "1.2.11.7"),
        ];
        for k in &keys {
            assert_eq!(SortKey::from_token(&k.token()).as_ref(), Some(k));
        }
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        for bad in [
            "",
            "1.2.3.4",
            "k1:2:1:s:0:1:i",
            "k1:0:x:s:0:1:i",
            "k2:0:1:s:0:1:i",
        ] {
            assert_eq!(SortKey::from_token(bad), None, "{bad}");
        }
    }
}
