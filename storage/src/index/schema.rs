//! Versioned schema migrations, applied in order at open (`PRAGMA user_version`).

use rusqlite::Connection;

use crate::error::{Error, Result};

/// Each entry moves the schema from version `i` to `i + 1`. Never edit a
/// released entry: append a new one.
const MIGRATIONS: &[&str] = &[
    // 1: clinics, the patient/study/series/instance hierarchy and versions.
    r#"
    CREATE TABLE clinics (
        id   TEXT PRIMARY KEY,
        name TEXT NOT NULL
    );

    CREATE TABLE patients (
        pk            INTEGER PRIMARY KEY,
        clinic_id     TEXT NOT NULL,
        patient_id    TEXT NOT NULL,
        issuer        TEXT NOT NULL DEFAULT '',
        name          TEXT NOT NULL DEFAULT '',   -- decoded to Unicode
        name_raw      BLOB,                       -- bytes as received
        name_charset  TEXT NOT NULL DEFAULT '',   -- Specific Character Set of name_raw
        name_search   TEXT NOT NULL DEFAULT '',   -- upper-cased, for matching
        birth_date    TEXT NOT NULL DEFAULT '',
        sex           TEXT NOT NULL DEFAULT '',
        UNIQUE (clinic_id, patient_id, issuer)
    );
    CREATE INDEX patients_by_id ON patients (patient_id);
    CREATE INDEX patients_by_name ON patients (name_search);

    -- Other Patient IDs (resident ID numbers): how one person is linked across clinics.
    CREATE TABLE patient_other_ids (
        patient_pk INTEGER NOT NULL REFERENCES patients (pk),
        other_id   TEXT NOT NULL,
        issuer     TEXT NOT NULL DEFAULT '',
        id_type    TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (patient_pk, other_id, issuer)
    );
    CREATE INDEX other_ids_by_id ON patient_other_ids (other_id, issuer);

    CREATE TABLE studies (
        pk                   INTEGER PRIMARY KEY,
        study_uid            TEXT NOT NULL UNIQUE,
        patient_pk           INTEGER NOT NULL REFERENCES patients (pk),
        clinic_id            TEXT NOT NULL,
        study_date           TEXT NOT NULL DEFAULT '',
        study_time           TEXT NOT NULL DEFAULT '',
        accession_number     TEXT NOT NULL DEFAULT '',
        study_id             TEXT NOT NULL DEFAULT '',
        description          TEXT NOT NULL DEFAULT '',
        referring_physician  TEXT NOT NULL DEFAULT '',
        institution          TEXT NOT NULL DEFAULT '',
        character_set        TEXT NOT NULL DEFAULT '',
        first_received_at    TEXT NOT NULL,
        last_received_at     TEXT NOT NULL
    );
    CREATE INDEX studies_by_patient ON studies (patient_pk);
    CREATE INDEX studies_by_date ON studies (study_date);
    CREATE INDEX studies_by_accession ON studies (accession_number);
    CREATE INDEX studies_by_clinic_received ON studies (clinic_id, last_received_at);

    CREATE TABLE series (
        pk            INTEGER PRIMARY KEY,
        series_uid    TEXT NOT NULL UNIQUE,
        study_pk      INTEGER NOT NULL REFERENCES studies (pk),
        modality      TEXT NOT NULL DEFAULT '',
        series_number INTEGER,
        description   TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX series_by_study ON series (study_pk);
    CREATE INDEX series_by_modality ON series (modality);

    -- The current version of each SOP instance.
    CREATE TABLE instances (
        pk               INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL UNIQUE,
        series_pk        INTEGER NOT NULL REFERENCES series (pk),
        sop_class_uid    TEXT NOT NULL,
        instance_number  INTEGER,
        number_of_frames INTEGER,
        transfer_syntax  TEXT NOT NULL,
        blob_key         TEXT NOT NULL,
        sha256           TEXT NOT NULL,
        size             INTEGER NOT NULL,
        dataset_offset   INTEGER NOT NULL,
        clinic_id        TEXT NOT NULL,
        calling_ae       TEXT NOT NULL,
        received_at      TEXT NOT NULL
    );
    CREATE INDEX instances_by_series ON instances (series_pk);

    -- Every version ever received, current included; nothing is dropped.
    CREATE TABLE instance_versions (
        pk               INTEGER PRIMARY KEY,
        sop_instance_uid TEXT NOT NULL,
        blob_key         TEXT NOT NULL,
        sha256           TEXT NOT NULL,
        size             INTEGER NOT NULL,
        transfer_syntax  TEXT NOT NULL,
        clinic_id        TEXT NOT NULL,
        calling_ae       TEXT NOT NULL,
        received_at      TEXT NOT NULL,
        superseded_at    TEXT,
        UNIQUE (sop_instance_uid, sha256)
    );
    "#,
    // 2: audit trail of queries and retrievals (who, what, when, outcome).
    r#"
    CREATE TABLE audit (
        pk          INTEGER PRIMARY KEY,
        at          TEXT NOT NULL,
        calling_ae  TEXT NOT NULL,
        clinic_id   TEXT NOT NULL,
        peer        TEXT NOT NULL,
        action      TEXT NOT NULL,   -- e.g. C-FIND
        detail      TEXT NOT NULL,   -- level and query keys
        outcome     TEXT NOT NULL,   -- success, cancelled, refused: ...
        matches     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX audit_by_time ON audit (at);
    "#,
    // 3: each person-name component group on its own, upper-cased, so a
    // prefix query on any group (alphabetic, ideographic, phonetic) is an
    // index range instead of a scan.
    r#"
    ALTER TABLE patients ADD COLUMN name_alpha TEXT NOT NULL DEFAULT '';
    ALTER TABLE patients ADD COLUMN name_ideo TEXT NOT NULL DEFAULT '';
    ALTER TABLE patients ADD COLUMN name_phon TEXT NOT NULL DEFAULT '';
    CREATE INDEX patients_by_name_alpha ON patients (name_alpha);
    CREATE INDEX patients_by_name_ideo ON patients (name_ideo);
    CREATE INDEX patients_by_name_phon ON patients (name_phon);
    "#,
    // 4: the reading service (viewer-api): users and their sessions, the
    // worklist's state per study, the study's own requested priority, and who
    // read which study in the audit trail, which becomes append-only.
    r#"
    CREATE TABLE users (
        pk            INTEGER PRIMARY KEY,
        username      TEXT NOT NULL UNIQUE,
        display_name  TEXT NOT NULL DEFAULT '',
        role          TEXT NOT NULL
                      CHECK (role IN ('technician', 'radiologist', 'clinic_staff', 'administrator')),
        clinic_id     TEXT NOT NULL,
        password_hash TEXT NOT NULL,      -- argon2id, PHC string format
        disabled      INTEGER NOT NULL DEFAULT 0,
        created_at    TEXT NOT NULL
    );

    -- Bearer tokens are never stored: only their SHA-256.
    CREATE TABLE sessions (
        token_hash  TEXT PRIMARY KEY,
        user_pk     INTEGER NOT NULL REFERENCES users (pk),
        issued_at   INTEGER NOT NULL,     -- Unix seconds
        expires_at  INTEGER NOT NULL,
        revoked     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX sessions_by_user ON sessions (user_pk);

    -- Reading state of a study; no row means unread with the study's own priority.
    CREATE TABLE worklist (
        study_pk         INTEGER PRIMARY KEY REFERENCES studies (pk),
        priority         INTEGER,         -- set by a user: 1 STAT, 2 urgent, 3 routine
        priority_set_by  TEXT NOT NULL DEFAULT '',
        claimed_by       TEXT NOT NULL DEFAULT '',
        lease_expires_at INTEGER NOT NULL DEFAULT 0,   -- Unix seconds
        reported_at      TEXT
    );

    -- Requested Procedure Priority (0040,1003) as the study said it.
    ALTER TABLE studies ADD COLUMN requested_priority TEXT NOT NULL DEFAULT '';

    ALTER TABLE audit ADD COLUMN username TEXT NOT NULL DEFAULT '';
    ALTER TABLE audit ADD COLUMN study_uid TEXT NOT NULL DEFAULT '';
    ALTER TABLE audit ADD COLUMN patient_ref TEXT NOT NULL DEFAULT '';
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    "#,
    // 5: every clinic that sent each version, not only the first: a clinic
    // sending bytes another clinic already sent gets them committed too.
    r#"
    CREATE TABLE instance_senders (
        sop_instance_uid  TEXT NOT NULL,
        sha256            TEXT NOT NULL,
        clinic_id         TEXT NOT NULL,
        calling_ae        TEXT NOT NULL,
        first_received_at TEXT NOT NULL,
        PRIMARY KEY (sop_instance_uid, sha256, clinic_id)
    );
    INSERT OR IGNORE INTO instance_senders
        SELECT sop_instance_uid, sha256, clinic_id, calling_ae, received_at FROM instance_versions;
    "#,
    // 6: each version's own SOP class: another clinic's bytes kept beside
    // the owner's may be of another class ('' for versions stored before).
    r#"
    ALTER TABLE instance_versions ADD COLUMN sop_class_uid TEXT NOT NULL DEFAULT '';
    "#,
    // 7: the clinic that created each series: only it relabels the series
    // or moves it between its own studies (another clinic may file a series
    // of its own under a study it does not own). Existing series: the first
    // sender of their earliest instance, else their study's clinic.
    r#"
    ALTER TABLE series ADD COLUMN clinic_id TEXT NOT NULL DEFAULT '';
    UPDATE series SET clinic_id = COALESCE(
        (SELECT i.clinic_id FROM instances i WHERE i.series_pk = series.pk
         ORDER BY i.received_at, i.pk LIMIT 1),
        (SELECT st.clinic_id FROM studies st WHERE st.pk = series.study_pk),
        '');
    "#,
    // 8: person names matched without insignificant trailing delimiters
    // (PS3.5 6.2): `WANG^XIAODONG^` and `Wang^XiaoDong=王^小东=` are found
    // by `WANG^XIAODONG` and `Wang^XiaoDong=王^小东`.
    r#"
    UPDATE patients SET name_alpha = rtrim(name_alpha, '^ '), name_ideo = rtrim(name_ideo, '^ '),
        name_phon = rtrim(name_phon, '^ ')
     WHERE name_alpha != '' OR name_ideo != '' OR name_phon != '';
    UPDATE patients SET name_search = rtrim(name_alpha || '=' || name_ideo || '=' || name_phon, '=')
     WHERE name_alpha != '' OR name_ideo != '' OR name_phon != '';
    "#,
    // 9: storage commitment reports owed to requesters: recorded before the
    // N-ACTION is answered, removed once a report is acknowledged, so that
    // neither a requester that left nor a restart of the gateway loses one.
    // `due_at` (Unix seconds) is NULL while an association still holds it.
    // Rows are changed by `id` (never reused), so a request repeating a
    // transaction UID replaces the older row without being changed by
    // whoever still holds that one.
    r#"
    CREATE TABLE owed_reports (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        requester_ae    TEXT NOT NULL,
        transaction_uid TEXT NOT NULL,
        clinic_scope    TEXT,
        refs            TEXT NOT NULL,
        created_at      INTEGER NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        due_at          INTEGER,
        UNIQUE (requester_ae, transaction_uid)
    );
    "#,
    // 10: the patient an instance's own dataset names (its sender's patient
    // record). Usually its study's patient; not for an instance another
    // clinic filed into that study, whose reads must be audited as reads
    // of the patient the image shows. NULL for rows from before: their
    // study's patient stands in.
    r#"
    ALTER TABLE instances ADD COLUMN patient_pk INTEGER REFERENCES patients (pk);
    "#,
];

/// Fills the name group columns of rows written without them (rows from
/// before migration 3, or bulk-loaded by a tool). Idempotent.
pub(crate) fn backfill_name_groups(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "UPDATE patients SET
            name_alpha = rtrim(CASE WHEN instr(name_search, '=') > 0
                THEN substr(name_search, 1, instr(name_search, '=') - 1) ELSE name_search END, '^ '),
            name_ideo = rtrim(CASE WHEN instr(name_search, '=') = 0 THEN ''
                WHEN instr(substr(name_search, instr(name_search, '=') + 1), '=') > 0
                THEN substr(substr(name_search, instr(name_search, '=') + 1), 1,
                            instr(substr(name_search, instr(name_search, '=') + 1), '=') - 1)
                ELSE substr(name_search, instr(name_search, '=') + 1) END, '^ '),
            name_phon = rtrim(CASE WHEN instr(name_search, '=') = 0 THEN ''
                WHEN instr(substr(name_search, instr(name_search, '=') + 1), '=') = 0 THEN ''
                ELSE substr(substr(name_search, instr(name_search, '=') + 1),
                            instr(substr(name_search, instr(name_search, '=') + 1), '=') + 1) END, '^ ')
         WHERE name_alpha = '' AND name_search != '';",
    )?;
    Ok(())
}

pub(crate) const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema to the current version.
pub(crate) fn migrate(conn: &mut Connection) -> Result<()> {
    // The gateway and the viewer-api may start together: each step reads the
    // version inside a write transaction, so only one of them applies it.
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > CURRENT_VERSION {
            return Err(Error::SchemaTooNew {
                found,
                supported: CURRENT_VERSION,
            });
        }
        let Some(sql) = MIGRATIONS.get(found as usize) else {
            return Ok(());
        };
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", found + 1)?;
        tx.commit()?;
        tracing::info!(version = found + 1, "index schema migrated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_8_drops_insignificant_name_delimiters() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..7] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 7).unwrap();
        conn.execute_batch(
            "INSERT INTO patients (clinic_id, patient_id, name, name_search, name_alpha, name_ideo, name_phon)
             VALUES ('a', '1', 'Wang^XiaoDong=王^小东=', 'WANG^XIAODONG=王^小东=', 'WANG^XIAODONG', '王^小东', ''),
                    ('a', '2', 'Li^Na^', 'LI^NA^', 'LI^NA^', '', ''),
                    ('a', '3', '=张^三^', '=张^三^', '', '张^三^', ''),
                    ('a', '4', 'Bulk^Loaded', 'BULK^LOADED', '', '', '');",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let rows: Vec<(String, String, String)> = conn
            .prepare("SELECT name_search, name_alpha, name_ideo FROM patients ORDER BY patient_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let row = |s: &str, a: &str, i: &str| (s.to_string(), a.to_string(), i.to_string());
        assert_eq!(
            rows,
            [
                row("WANG^XIAODONG=王^小东", "WANG^XIAODONG", "王^小东"),
                row("LI^NA", "LI^NA", ""),
                row("=张^三", "", "张^三"),
                // Rows without groups yet are left to backfill_name_groups.
                row("BULK^LOADED", "", ""),
            ]
        );
        // The writer's form is the same.
        assert_eq!(
            crate::query::pn_search_form("Wang^XiaoDong=王^小东="),
            "WANG^XIAODONG=王^小东"
        );
        assert_eq!(crate::query::pn_search_form("=张^三^"), "=张^三");
    }
}
