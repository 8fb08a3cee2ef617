//! C-FIND matching over the index (PS3.4 C.2.2.2): single value,
//! universal, wildcard, range and UID list matching, person names matched
//! on the whole value and per component group, case-insensitively.
//!
//! Queries are SQL with bound parameters only; rows stream to a callback so
//! no result set is held in memory.

use rusqlite::types::Value;

use crate::error::Result;
use crate::index::IndexReader;

/// Query/Retrieve level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Patient,
    Study,
    Series,
    Image,
}

impl Level {
    pub fn from_code(code: &str) -> Option<Level> {
        match code.trim() {
            "PATIENT" => Some(Level::Patient),
            "STUDY" => Some(Level::Study),
            "SERIES" => Some(Level::Series),
            "IMAGE" => Some(Level::Image),
            _ => None,
        }
    }

    fn depth(self) -> u8 {
        match self {
            Level::Patient => 0,
            Level::Study => 1,
            Level::Series => 2,
            Level::Image => 3,
        }
    }
}

/// SQL giving a study's distinct modalities (study row alias `st`) as one
/// `\`-separated value, in order.
pub const MODALITIES_IN_STUDY: &str = "(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT x.modality AS m \
     FROM series x WHERE x.study_pk = st.pk AND x.modality != '' ORDER BY 1))";

/// [`MODALITIES_IN_STUDY`] over only the series (alias `x`) for which
/// `series_condition` holds.
pub fn modalities_in_study_where(series_condition: &str) -> String {
    format!(
        "(SELECT group_concat(m, '\\') FROM (SELECT DISTINCT x.modality AS m \
         FROM series x WHERE x.study_pk = st.pk AND x.modality != '' AND {series_condition} ORDER BY 1))"
    )
}

/// Attributes the index can match and return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    PatientName,
    PatientId,
    IssuerOfPatientId,
    PatientBirthDate,
    PatientSex,
    NumberOfPatientRelatedStudies,
    NumberOfPatientRelatedSeries,
    NumberOfPatientRelatedInstances,
    StudyInstanceUid,
    StudyDate,
    StudyTime,
    AccessionNumber,
    StudyId,
    StudyDescription,
    ReferringPhysicianName,
    InstitutionName,
    ModalitiesInStudy,
    SopClassesInStudy,
    NumberOfStudyRelatedSeries,
    NumberOfStudyRelatedInstances,
    SendingClinic,
    SeriesInstanceUid,
    Modality,
    SeriesNumber,
    SeriesDescription,
    NumberOfSeriesRelatedInstances,
    SopInstanceUid,
    SopClassUid,
    InstanceNumber,
    NumberOfFrames,
    /// SHA-256 (lower-case hex) of the instance's current bytes: lets the
    /// upload tool tell a file the center already holds from one it does not.
    InstanceSha256,
}

/// How a key matches (PS3.4 C.2.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// Zero-length value: everything matches; the key is returned.
    Universal,
    Single(String),
    /// `*` and `?` wildcards.
    Wildcard(String),
    /// `from-to`, either side open.
    Range(Option<String>, Option<String>),
    /// Backslash-separated list (UIDs, or code strings such as modalities).
    List(Vec<String>),
}

impl Matcher {
    /// Interprets a query value for a key of the given kind.
    pub fn parse(value: &str, range_allowed: bool) -> Matcher {
        let v = value.trim();
        if v.is_empty() || v == "*" {
            return Matcher::Universal;
        }
        if v.contains('\\') {
            return Matcher::List(
                v.split('\\')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            );
        }
        if range_allowed && let Some((from, to)) = v.split_once('-') {
            let side = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
            return Matcher::Range(side(from), side(to));
        }
        if v.contains(['*', '?']) {
            return Matcher::Wildcard(v.to_string());
        }
        Matcher::Single(v.to_string())
    }
}

/// A C-FIND request against the index.
#[derive(Debug, Clone)]
pub struct Query {
    pub level: Level,
    pub conditions: Vec<(Key, Matcher)>,
    /// Keys to return, in order.
    pub returns: Vec<Key>,
    /// When set, only this clinic's patients (a township clinic's view).
    pub clinic: Option<String>,
    /// Combined date and time matching (PS3.4 C.2.2.2.5, negotiated by
    /// the requestor): ranges on both Study Date and Study Time are one
    /// range of moments, not a range of days crossed with a range of
    /// times of day.
    pub combined_datetime: bool,
}

impl Key {
    fn level(self) -> Level {
        use Key::*;
        match self {
            PatientName
            | PatientId
            | IssuerOfPatientId
            | PatientBirthDate
            | PatientSex
            | NumberOfPatientRelatedStudies
            | NumberOfPatientRelatedSeries
            | NumberOfPatientRelatedInstances => Level::Patient,
            StudyInstanceUid
            | StudyDate
            | StudyTime
            | AccessionNumber
            | StudyId
            | StudyDescription
            | ReferringPhysicianName
            | InstitutionName
            | ModalitiesInStudy
            | SopClassesInStudy
            | NumberOfStudyRelatedSeries
            | NumberOfStudyRelatedInstances
            | SendingClinic => Level::Study,
            SeriesInstanceUid
            | Modality
            | SeriesNumber
            | SeriesDescription
            | NumberOfSeriesRelatedInstances => Level::Series,
            SopInstanceUid | SopClassUid | InstanceNumber | NumberOfFrames | InstanceSha256 => {
                Level::Image
            }
        }
    }

    /// SQL for the returned value.
    fn select(self) -> &'static str {
        use Key::*;
        match self {
            PatientName => "p.name",
            PatientId => "p.patient_id",
            IssuerOfPatientId => "p.issuer",
            PatientBirthDate => "p.birth_date",
            PatientSex => "p.sex",
            NumberOfPatientRelatedStudies => {
                "(SELECT count(*) FROM studies x WHERE x.patient_pk = p.pk)"
            }
            NumberOfPatientRelatedSeries => {
                "(SELECT count(*) FROM series x JOIN studies y ON y.pk = x.study_pk WHERE y.patient_pk = p.pk)"
            }
            NumberOfPatientRelatedInstances => {
                "(SELECT count(*) FROM instances x JOIN series y ON y.pk = x.series_pk \
                 JOIN studies z ON z.pk = y.study_pk WHERE z.patient_pk = p.pk)"
            }
            StudyInstanceUid => "st.study_uid",
            StudyDate => "st.study_date",
            StudyTime => "st.study_time",
            AccessionNumber => "st.accession_number",
            StudyId => "st.study_id",
            StudyDescription => "st.description",
            ReferringPhysicianName => "st.referring_physician",
            InstitutionName => "st.institution",
            ModalitiesInStudy => MODALITIES_IN_STUDY,
            SopClassesInStudy => {
                "(SELECT group_concat(c, '\\') FROM (SELECT DISTINCT x.sop_class_uid AS c FROM instances x \
                 JOIN series y ON y.pk = x.series_pk WHERE y.study_pk = st.pk ORDER BY 1))"
            }
            NumberOfStudyRelatedSeries => {
                "(SELECT count(*) FROM series x WHERE x.study_pk = st.pk)"
            }
            NumberOfStudyRelatedInstances => {
                "(SELECT count(*) FROM instances x JOIN series y ON y.pk = x.series_pk WHERE y.study_pk = st.pk)"
            }
            SendingClinic => "st.clinic_id",
            SeriesInstanceUid => "se.series_uid",
            Modality => "se.modality",
            SeriesNumber => "se.series_number",
            SeriesDescription => "se.description",
            NumberOfSeriesRelatedInstances => {
                "(SELECT count(*) FROM instances x WHERE x.series_pk = se.pk)"
            }
            SopInstanceUid => "i.sop_instance_uid",
            SopClassUid => "i.sop_class_uid",
            InstanceNumber => "i.instance_number",
            NumberOfFrames => "i.number_of_frames",
            InstanceSha256 => "i.sha256",
        }
    }

    /// SQL for a computed value as clinic `c` (a bound parameter) sees it:
    /// only instances whose current bytes that clinic sent, and the series,
    /// studies and modalities holding one. `None` for plain columns.
    fn select_scoped(self, c: &str) -> Option<String> {
        use Key::*;
        let sent = |i: &str| sent_by_clinic(i, c);
        let series_sent = |x: &str| series_sent_by_clinic(x, c);
        Some(match self {
            NumberOfPatientRelatedStudies => format!(
                "(SELECT count(*) FROM studies x WHERE x.patient_pk = p.pk AND EXISTS (SELECT 1 FROM series y \
                 JOIN instances z ON z.series_pk = y.pk WHERE y.study_pk = x.pk AND {}))",
                sent("z")
            ),
            NumberOfPatientRelatedSeries => format!(
                "(SELECT count(*) FROM series x JOIN studies y ON y.pk = x.study_pk WHERE y.patient_pk = p.pk AND {})",
                series_sent("x")
            ),
            NumberOfPatientRelatedInstances => format!(
                "(SELECT count(*) FROM instances x JOIN series y ON y.pk = x.series_pk \
                 JOIN studies z ON z.pk = y.study_pk WHERE z.patient_pk = p.pk AND {})",
                sent("x")
            ),
            ModalitiesInStudy => modalities_in_study_where(&series_sent("x")),
            SopClassesInStudy => format!(
                "(SELECT group_concat(c, '\\') FROM (SELECT DISTINCT x.sop_class_uid AS c FROM instances x \
                 JOIN series y ON y.pk = x.series_pk WHERE y.study_pk = st.pk AND {} ORDER BY 1))",
                sent("x")
            ),
            NumberOfStudyRelatedSeries => format!(
                "(SELECT count(*) FROM series x WHERE x.study_pk = st.pk AND {})",
                series_sent("x")
            ),
            NumberOfStudyRelatedInstances => format!(
                "(SELECT count(*) FROM instances x JOIN series y ON y.pk = x.series_pk \
                 WHERE y.study_pk = st.pk AND {})",
                sent("x")
            ),
            NumberOfSeriesRelatedInstances => format!(
                "(SELECT count(*) FROM instances x WHERE x.series_pk = se.pk AND {})",
                sent("x")
            ),
            _ => return None,
        })
    }

    /// True when a query at `level` matches on this key: keys of levels
    /// below the query's, and computed keys, are returned but never matched
    /// (a value given for them is not applied: C-FIND warns 0xFF01).
    pub fn is_matched_at(self, level: Level) -> bool {
        self.level().depth() <= level.depth() && !self.is_return_only()
    }

    /// True when the key is computed (returned, never matched).
    fn is_return_only(self) -> bool {
        use Key::*;
        matches!(
            self,
            NumberOfPatientRelatedStudies
                | NumberOfPatientRelatedSeries
                | NumberOfPatientRelatedInstances
                | NumberOfStudyRelatedSeries
                | NumberOfStudyRelatedInstances
                | NumberOfSeriesRelatedInstances
                | SopClassesInStudy
        )
    }
}

/// SQL true when clinic `c` (a bound parameter) sent the current bytes of
/// instance row `i`: the rule retrieval and the viewer apply too, so a
/// clinic neither sees nor counts another clinic's series filed under the
/// same Study Instance UID.
pub fn sent_by_clinic(i: &str, c: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM instance_senders s WHERE s.sop_instance_uid = {i}.sop_instance_uid \
         AND s.sha256 = {i}.sha256 AND s.clinic_id = {c})"
    )
}

/// SQL true when series row `x` holds an instance whose current bytes
/// clinic `c` (a bound parameter) sent.
pub fn series_sent_by_clinic(x: &str, c: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM instances z WHERE z.series_pk = {x}.pk AND {})",
        sent_by_clinic("z", c)
    )
}

/// How a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryEnd {
    Completed(u64),
    /// The callback asked to stop (C-CANCEL).
    Stopped(u64),
}

/// A person name as the index matches it: upper-cased, each component
/// group without trailing empty components, no trailing empty groups
/// (PS3.5 6.2: those delimiters are insignificant).
pub fn pn_search_form(name: &str) -> String {
    let upper = name.to_uppercase();
    let groups: Vec<&str> = upper
        .split('=')
        .map(|g| g.trim_end_matches(['^', ' ']))
        .collect();
    groups.join("=").trim_end_matches('=').to_string()
}

/// A TM value as `HHMMSS.FFFFFF`, missing digits filled with `pad`
/// (legacy `HH:MM:SS` accepted).
fn tm_normalized(value: &str, pad: char) -> String {
    let v = value.trim().replace(':', "");
    let (whole, fraction) = v.split_once('.').unwrap_or((&v, ""));
    let fill =
        |s: &str, n: usize| -> String { s.chars().chain(std::iter::repeat(pad)).take(n).collect() };
    format!("{}.{}", fill(whole, 6), fill(fraction, 6))
}

/// SQL for [`tm_normalized`] of column `col`, padded with zeros.
fn tm_normalized_sql(col: &str) -> String {
    let v = format!("replace({col}, ':', '')");
    format!(
        "(substr(CASE WHEN instr({v}, '.') > 0 THEN substr({v}, 1, instr({v}, '.') - 1) ELSE {v} END \
         || '000000', 1, 6) || '.' || substr(CASE WHEN instr({v}, '.') > 0 \
         THEN substr({v}, instr({v}, '.') + 1) ELSE '' END || '000000', 1, 6))"
    )
}

/// Study Date and Study Time ranges as one range of moments (combined
/// date and time matching): `20260105-20260107` with `1000-1800` is from
/// 5 January 10:00 to 7 January 18:00:59.999999. A bound without its date
/// is open; one without its time starts or ends the day. A study without a
/// time matches when its date alone is within the dates.
fn combined_datetime_sql(
    (date_from, date_to): (&Option<String>, &Option<String>),
    (time_from, time_to): (&Option<String>, &Option<String>),
    params: &mut Vec<Value>,
) -> String {
    let mut bind = |v: String| {
        params.push(Value::Text(v));
        format!("?{}", params.len())
    };
    let (date, time) = (Key::StudyDate.select(), Key::StudyTime.select());
    let moment = format!("({date} || {})", tm_normalized_sql(time));
    let mut timed = vec![format!("{time} != ''")];
    let mut untimed = vec![format!("{time} = ''")];
    if let Some(d) = date_from {
        let t = tm_normalized(time_from.as_deref().unwrap_or(""), '0');
        timed.push(format!("{moment} >= {}", bind(format!("{d}{t}"))));
        untimed.push(format!("{date} >= {}", bind(d.clone())));
    }
    if let Some(d) = date_to {
        let t = tm_normalized(time_to.as_deref().unwrap_or(""), '9');
        timed.push(format!("{moment} <= {}", bind(format!("{d}{t}"))));
        untimed.push(format!("{date} <= {}", bind(d.clone())));
    }
    format!(
        "({date} != '' AND (({}) OR ({})))",
        timed.join(" AND "),
        untimed.join(" AND ")
    )
}

/// Converts DICOM wildcards to a GLOB pattern (`[` and `]` escaped).
fn glob(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        match c {
            '[' => out.push_str("[[]"),
            ']' => out.push_str("[]]"),
            c => out.push(c),
        }
    }
    out
}

/// The SQL condition for one key, its values appended to `params`.
/// `narrowed`: another condition already picks out few studies through an
/// index, so ModalitiesInStudy filters them instead of driving the search.
fn condition_sql(
    key: Key,
    matcher: &Matcher,
    params: &mut Vec<Value>,
    narrowed: bool,
    scope: Option<&str>,
) -> Option<String> {
    let col = key.select();
    let mut bind = |v: String| {
        params.push(Value::Text(v));
        format!("?{}", params.len())
    };
    // Person names: upper-cased, without insignificant trailing
    // components and groups (PS3.5 6.2), whole and per component group.
    // The patient's as the index keeps them; the referring physician's
    // through the same function, registered on every reader connection.
    let person_name: Option<[String; 4]> = match key {
        Key::PatientName => Some(
            [
                "p.name_search",
                "p.name_alpha",
                "p.name_ideo",
                "p.name_phon",
            ]
            .map(String::from),
        ),
        Key::ReferringPhysicianName => {
            let c = "st.referring_physician";
            Some([
                format!("pn_search({c})"),
                format!("pn_group({c}, 0)"),
                format!("pn_group({c}, 1)"),
                format!("pn_group({c}, 2)"),
            ])
        }
        _ => None,
    };
    if let Some([whole_col, alpha, ideo, phon]) = person_name {
        let value = match matcher {
            Matcher::Universal => return None,
            Matcher::Single(v) | Matcher::Wildcard(v) => pn_search_form(v),
            Matcher::List(vs) => pn_search_form(&vs.join("\\")),
            Matcher::Range(..) => return Some("0".into()),
        };
        // Only delimiters: no condition.
        if value.is_empty() {
            return None;
        }
        // `WANG^*` (or `WANG^*^*`) also finds `WANG`, stored without its
        // empty components: through the index by the prefix `WANG*`, then
        // either form.
        let mut any_of = |cols: &[&str], pattern: &str| -> String {
            // Without its trailing "any" and empty components: WANG^*^*
            // and WANG^^* are WANG.
            let mut base = pattern;
            loop {
                let trimmed = base.trim_end_matches('^');
                let shorter = trimmed.strip_suffix("^*").unwrap_or(trimmed);
                if shorter == base {
                    break;
                }
                base = shorter;
            }
            let tests: Vec<String> = if base != pattern && !base.is_empty() {
                let prefix = bind(glob(&format!("{base}*")));
                let (whole, given) = (bind(glob(base)), bind(glob(&format!("{base}^*"))));
                cols.iter()
                    .map(|c| {
                        format!("({c} GLOB {prefix} AND ({c} GLOB {whole} OR {c} GLOB {given}))")
                    })
                    .collect()
            } else {
                let p = bind(glob(pattern));
                cols.iter().map(|c| format!("{c} GLOB {p}")).collect()
            };
            format!("({})", tests.join(" OR "))
        };
        if !value.contains('=') {
            // One group: the whole name or any of its groups.
            return Some(any_of(&[&whole_col, &alpha, &ideo, &phon], &value));
        }
        // Several groups: each one given matches its own group; an empty
        // one (`=王^小东`) matches any.
        let mut parts = Vec::new();
        for (group, col) in value.split('=').zip([&alpha, &ideo, &phon]) {
            if !group.is_empty() && group != "*" {
                parts.push(any_of(&[col.as_str()], group));
            }
        }
        return Some(if parts.is_empty() {
            "1".into()
        } else {
            format!("({})", parts.join(" AND "))
        });
    }
    if key == Key::StudyTime
        && let Matcher::Range(from, to) = matcher
    {
        // Times of any precision compare as HHMMSS.FFFFFF: a lower bound
        // padded with zeros, an upper one with nines (`1030` ends at
        // 10:30:59.999999), the stored value with zeros.
        let mut parts = vec![format!("{col} != ''")];
        let stored = tm_normalized_sql(col);
        if let Some(f) = from {
            parts.push(format!("{stored} >= {}", bind(tm_normalized(f, '0'))));
        }
        if let Some(t) = to {
            parts.push(format!("{stored} <= {}", bind(tm_normalized(t, '9'))));
        }
        return Some(format!("({})", parts.join(" AND ")));
    }
    if key == Key::ModalitiesInStudy {
        let values = match matcher {
            Matcher::Universal => return None,
            Matcher::List(vs) => vs.clone(),
            Matcher::Single(v) => vec![v.clone()],
            Matcher::Wildcard(v) => {
                let p = bind(glob(v));
                return Some(modality_in_study(&format!("GLOB {p}"), narrowed, scope));
            }
            Matcher::Range(..) => return Some("0".into()),
        };
        let list: Vec<String> = values.into_iter().map(&mut bind).collect();
        return Some(modality_in_study(
            &format!("IN ({})", list.join(", ")),
            narrowed,
            scope,
        ));
    }
    Some(match matcher {
        Matcher::Universal => return None,
        Matcher::Single(v) => format!("{col} = {}", bind(v.clone())),
        Matcher::Wildcard(v) => format!("{col} GLOB {}", bind(glob(v))),
        Matcher::List(vs) => {
            let list: Vec<String> = vs.iter().cloned().map(&mut bind).collect();
            format!("{col} IN ({})", list.join(", "))
        }
        Matcher::Range(from, to) => {
            // Empty values never match a range.
            let mut parts = vec![format!("{col} != ''")];
            if let Some(f) = from {
                parts.push(format!("{col} >= {}", bind(f.clone())));
            }
            if let Some(t) = to {
                // "20260301" as an upper bound includes the whole day or time prefix.
                parts.push(format!("{col} <= {}", bind(format!("{t}\u{10FFFF}"))));
            }
            format!("({})", parts.join(" AND "))
        }
    })
}

/// "A series of the study has a modality `test`". Alone, an IN subquery
/// starts from the series' modality index (a correlated EXISTS would scan
/// every study); after a narrower condition, EXISTS checks just the few
/// studies found (an IN subquery there would make SQLite, without
/// statistics, start from every CT series instead of one week's studies).
/// With a clinic's `scope`, only series holding its instances count; the
/// series' clinic (two primary-key lookups) is checked first, so other
/// clinics' series of that modality never get their instances searched.
fn modality_in_study(test: &str, narrowed: bool, scope: Option<&str>) -> String {
    let test = match scope {
        Some(c) => format!(
            "x.modality {test} AND (SELECT q.clinic_id FROM studies y JOIN patients q ON q.pk = y.patient_pk \
             WHERE y.pk = x.study_pk) = {c} AND {}",
            series_sent_by_clinic("x", c)
        ),
        None => format!("x.modality {test}"),
    };
    if narrowed {
        format!("EXISTS (SELECT 1 FROM series x WHERE x.study_pk = st.pk AND {test})")
    } else {
        format!("st.pk IN (SELECT x.study_pk FROM series x WHERE {test})")
    }
}

/// Whether this condition finds few studies through an index.
fn narrows(key: Key, matcher: &Matcher) -> bool {
    let leading_wildcard = |v: &str| v.starts_with(['*', '?']);
    match (key, matcher) {
        (_, Matcher::Universal) => false,
        (Key::PatientId | Key::PatientName | Key::AccessionNumber, Matcher::Wildcard(v)) => {
            !leading_wildcard(v)
        }
        (
            Key::PatientId
            | Key::PatientName
            | Key::AccessionNumber
            | Key::StudyInstanceUid
            | Key::StudyDate,
            _,
        ) => true,
        _ => false,
    }
}

/// The SQL of `query` and its parameters.
fn query_sql(query: &Query) -> (String, Vec<Value>) {
    let from = match query.level {
        Level::Patient => "patients p",
        Level::Study => "studies st JOIN patients p ON p.pk = st.patient_pk",
        Level::Series => {
            "series se JOIN studies st ON st.pk = se.study_pk JOIN patients p ON p.pk = st.patient_pk"
        }
        Level::Image => {
            "instances i JOIN series se ON se.pk = i.series_pk JOIN studies st ON st.pk = se.study_pk \
             JOIN patients p ON p.pk = st.patient_pk"
        }
    };
    let mut params = Vec::new();
    let mut wheres = Vec::new();
    // A clinic's scope: its own patients, and below the patient level only
    // what holds an instance whose current bytes it sent.
    let scope = query.clinic.as_ref().map(|clinic| {
        params.push(Value::Text(clinic.clone()));
        let c = format!("?{}", params.len());
        // Most of the index may be this clinic's: its patients must never
        // be the planner's way in ahead of a date range or a name prefix
        // (100,000 studies: 88 ms instead of 2 for a week's CT studies, and
        // each branch of the name match's OR would take it): `+` keeps the
        // clinic a filter, never an index lookup.
        wheres.push(format!("+p.clinic_id = {c}"));
        match query.level {
            Level::Patient => {}
            Level::Study => wheres.push(format!(
                "EXISTS (SELECT 1 FROM series y JOIN instances z ON z.series_pk = y.pk \
                 WHERE y.study_pk = st.pk AND {})",
                sent_by_clinic("z", &c)
            )),
            Level::Series => wheres.push(format!(
                "EXISTS (SELECT 1 FROM instances z WHERE z.series_pk = se.pk AND {})",
                sent_by_clinic("z", &c)
            )),
            Level::Image => wheres.push(sent_by_clinic("i", &c)),
        }
        c
    });
    let applies = |key: Key| key.is_matched_at(query.level);
    let narrowed = query
        .conditions
        .iter()
        .any(|(k, m)| applies(*k) && narrows(*k, m));
    let range_of = |wanted: Key| {
        query.conditions.iter().find_map(|(k, m)| match m {
            Matcher::Range(from, to) if *k == wanted && applies(wanted) => Some((from, to)),
            _ => None,
        })
    };
    let combined = match (range_of(Key::StudyDate), range_of(Key::StudyTime)) {
        (Some(dates), Some(times)) if query.combined_datetime => Some((dates, times)),
        _ => None,
    };
    if let Some((dates, times)) = combined {
        wheres.push(combined_datetime_sql(dates, times, &mut params));
    }
    for (key, matcher) in &query.conditions {
        if !applies(*key) || (combined.is_some() && matches!(key, Key::StudyDate | Key::StudyTime))
        {
            continue;
        }
        if let Some(sql) = condition_sql(*key, matcher, &mut params, narrowed, scope.as_deref()) {
            wheres.push(sql);
        }
    }
    let columns: Vec<String> = query
        .returns
        .iter()
        .map(|k| {
            if k.level().depth() > query.level.depth() {
                "NULL".to_string()
            } else {
                scope
                    .as_deref()
                    .and_then(|c| k.select_scoped(c))
                    .unwrap_or_else(|| k.select().to_string())
            }
        })
        .collect();
    let sql = format!(
        "SELECT {} FROM {from}{}{}",
        if columns.is_empty() {
            "1".to_string()
        } else {
            columns.join(", ")
        },
        if wheres.is_empty() { "" } else { " WHERE " },
        wheres.join(" AND ")
    );
    (sql, params)
}

impl IndexReader {
    /// Runs `query`, calling `emit` with each match's returned values (in
    /// `query.returns` order, empty text for absent values); `emit` returns
    /// false to stop.
    pub fn find(
        &self,
        query: &Query,
        mut emit: impl FnMut(Vec<String>) -> bool,
    ) -> Result<QueryEnd> {
        let (sql, params) = query_sql(query);
        // Queries of the same shape share one prepared statement.
        let mut stmt = self.connection().prepare_cached(&sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
        let mut n = 0u64;
        while let Some(row) = rows.next()? {
            let values = (0..query.returns.len())
                .map(|i| match row.get_ref(i) {
                    Ok(rusqlite::types::ValueRef::Text(t)) => {
                        String::from_utf8_lossy(t).into_owned()
                    }
                    Ok(rusqlite::types::ValueRef::Integer(v)) => v.to_string(),
                    _ => String::new(),
                })
                .collect();
            n += 1;
            if !emit(values) {
                return Ok(QueryEnd::Stopped(n));
            }
        }
        Ok(QueryEnd::Completed(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_matchers() {
        assert_eq!(Matcher::parse("", true), Matcher::Universal);
        assert_eq!(
            Matcher::parse("WANG*", false),
            Matcher::Wildcard("WANG*".into())
        );
        assert_eq!(
            Matcher::parse("20260101-", true),
            Matcher::Range(Some("20260101".into()), None)
        );
        assert_eq!(
            Matcher::parse("-20260101", true),
            Matcher::Range(None, Some("20260101".into()))
        );
        assert_eq!(
            Matcher::parse("CT\\MR", false),
            Matcher::List(vec!["CT".into(), "MR".into()])
        );
        assert_eq!(
            Matcher::parse("1.2-3", false),
            Matcher::Single("1.2-3".into())
        );
        assert_eq!(glob("a[b]*"), "a[[]b[]]*");
    }

    /// The query plan's steps (EXPLAIN QUERY PLAN), with `query`'s values bound.
    fn plan(conn: &rusqlite::Connection, query: &Query) -> Vec<String> {
        let (sql, params) = query_sql(query);
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        stmt.query_map(rusqlite::params_from_iter(params), |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
    }

    #[test]
    fn common_keys_never_scan_a_whole_table() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::index::open_writer(&dir.path().join("index.sqlite")).unwrap();
        let returns = vec![
            Key::StudyInstanceUid,
            Key::PatientName,
            Key::PatientId,
            Key::StudyDate,
            Key::ModalitiesInStudy,
            Key::NumberOfStudyRelatedInstances,
            Key::SendingClinic,
        ];
        let study = |conditions: Vec<(Key, Matcher)>, clinic: Option<&str>| Query {
            level: Level::Study,
            conditions,
            returns: returns.clone(),
            clinic: clinic.map(str::to_owned),
            combined_datetime: false,
        };
        let single = |v: &str| Matcher::Single(v.into());
        let cases = [
            (
                "patient ID",
                study(vec![(Key::PatientId, single("P1"))], None),
            ),
            (
                "name prefix",
                study(
                    vec![(Key::PatientName, Matcher::Wildcard("WANG^*".into()))],
                    None,
                ),
            ),
            (
                "date range",
                study(
                    vec![(
                        Key::StudyDate,
                        Matcher::Range(Some("20260101".into()), Some("20260107".into())),
                    )],
                    None,
                ),
            ),
            (
                "date range and modality",
                study(
                    vec![
                        (
                            Key::StudyDate,
                            Matcher::Range(Some("20260101".into()), Some("20260107".into())),
                        ),
                        (Key::ModalitiesInStudy, single("CT")),
                    ],
                    None,
                ),
            ),
            (
                "modality",
                study(vec![(Key::ModalitiesInStudy, single("CT"))], None),
            ),
            (
                "accession",
                study(vec![(Key::AccessionNumber, single("A1"))], None),
            ),
            (
                "study UIDs",
                study(
                    vec![(
                        Key::StudyInstanceUid,
                        Matcher::List(vec!["1.2.3".into(), "1.2.4".into()]),
                    )],
                    None,
                ),
            ),
            (
                "a clinic's patient ID",
                study(vec![(Key::PatientId, single("P1"))], Some("xinzhen")),
            ),
            (
                "a clinic's name prefix and modality",
                study(
                    vec![
                        (Key::PatientName, Matcher::Wildcard("WANG^*".into())),
                        (Key::ModalitiesInStudy, single("CT")),
                    ],
                    Some("xinzhen"),
                ),
            ),
            (
                "a clinic's date range and modality",
                study(
                    vec![
                        (
                            Key::StudyDate,
                            Matcher::Range(Some("20260101".into()), Some("20260107".into())),
                        ),
                        (Key::ModalitiesInStudy, single("CT")),
                    ],
                    Some("xinzhen"),
                ),
            ),
            (
                "a clinic's modality",
                study(
                    vec![(Key::ModalitiesInStudy, single("CT"))],
                    Some("xinzhen"),
                ),
            ),
            (
                "a clinic's series of a study",
                Query {
                    level: Level::Series,
                    conditions: vec![(Key::StudyInstanceUid, single("1.2.3"))],
                    returns: vec![Key::SeriesInstanceUid, Key::NumberOfSeriesRelatedInstances],
                    clinic: Some("xinzhen".into()),
                    combined_datetime: false,
                },
            ),
            (
                "a clinic's images of a study",
                Query {
                    level: Level::Image,
                    conditions: vec![(Key::StudyInstanceUid, single("1.2.3"))],
                    returns: vec![Key::SopInstanceUid],
                    clinic: Some("xinzhen".into()),
                    combined_datetime: false,
                },
            ),
            (
                "series of a study",
                Query {
                    level: Level::Series,
                    conditions: vec![(Key::StudyInstanceUid, single("1.2.3"))],
                    returns: vec![Key::SeriesInstanceUid, Key::Modality],
                    clinic: None,
                    combined_datetime: false,
                },
            ),
            (
                "images of a series",
                Query {
                    level: Level::Image,
                    conditions: vec![
                        (Key::StudyInstanceUid, single("1.2.3")),
                        (Key::SeriesInstanceUid, single("1.2.3.4")),
                    ],
                    returns: vec![Key::SopInstanceUid, Key::InstanceNumber],
                    clinic: None,
                    combined_datetime: false,
                },
            ),
            (
                "one image",
                Query {
                    level: Level::Image,
                    conditions: vec![(Key::SopInstanceUid, single("1.2.3.4.5"))],
                    returns: vec![Key::SopInstanceUid],
                    clinic: None,
                    combined_datetime: false,
                },
            ),
        ];
        for (name, query) in cases {
            let steps = plan(&conn, &query);
            if name.ends_with("date range and modality") {
                assert!(
                    steps[0].contains("studies_by_date"),
                    "one week's studies first: {steps:#?}"
                );
            }
            // A scan of a table; scanning a subquery's few rows is fine.
            let table_scan = |s: &&String| {
                s.starts_with("SCAN ") && !s.starts_with("SCAN (") && !s.contains("CONSTANT ROW")
            };
            assert!(!steps.iter().any(|s| table_scan(&s)), "{name}: {steps:#?}");
            // A clinic's own patients are most of its index: a filter only.
            assert!(
                !steps.iter().any(|s| s.contains("(clinic_id=?)")),
                "{name}: {steps:#?}"
            );
        }
    }
}
