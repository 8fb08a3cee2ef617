//! The single index writer, as a two-stage pipeline. Stage one fsyncs,
//! concurrently, a batch's blob files and the directories they were renamed
//! into; stage two (the one thread owning the write connection) commits the
//! batch's rows. A batch costs about one journal commit plus one WAL fsync
//! however many instances it holds (group commit), and stage one syncs the
//! next batch while stage two commits this one. Rows are committed only
//! after their blobs are durable. Each job runs in its own SAVEPOINT: one
//! bad row never fails its neighbours.

use std::path::PathBuf;
use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::oneshot;

use crate::attrs::InstanceAttrs;
use crate::blobs::{SyncItem, SyncPool, SyncedFiles};
use crate::error::{Error, Result};

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 512;
/// Threads fsyncing a batch's blobs besides the writer itself.
const SYNC_THREADS: usize = 7;

/// An instance whose blob is in place, to be indexed.
#[derive(Debug)]
pub(crate) struct NewInstance {
    pub(crate) attrs: InstanceAttrs,
    pub(crate) clinic_id: String,
    pub(crate) calling_ae: String,
    pub(crate) blob_key: String,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    pub(crate) dataset_offset: u64,
    pub(crate) transfer_syntax: String,
    pub(crate) received_at: String,
}

/// What indexing an instance did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// A new SOP instance.
    Stored,
    /// The same bytes were already stored; nothing new was written.
    AlreadyStored,
    /// Same SOP Instance UID, different bytes: this is now the current
    /// version; the previous one is kept in `instance_versions`.
    NewVersion { previous_sha256: String },
    /// Another clinic (`owner`) holds this SOP Instance UID with other
    /// bytes: these are kept and recorded in `instance_versions`, but the
    /// owner's stay current (see `insert`).
    KeptBesideOwner { owner: String },
}

pub(crate) enum Job {
    Insert {
        instance: Box<NewInstance>,
        to_sync: Vec<SyncItem>,
        reply: oneshot::Sender<Result<StoreOutcome>>,
    },
    Clinics {
        clinics: Vec<(String, String)>,
        reply: oneshot::Sender<Result<()>>,
    },
    Audit {
        entry: crate::AuditEntry,
        reply: oneshot::Sender<Result<()>>,
    },
    Owed {
        change: crate::owed::Change,
        /// The row's id (of the row added, for `Change::Add`).
        reply: oneshot::Sender<Result<i64>>,
    },
}

pub(crate) fn spawn(conn: Connection) -> std::io::Result<mpsc::Sender<Job>> {
    let (tx, rx) = mpsc::channel();
    let (synced_tx, synced_rx) = mpsc::channel();
    let pool = SyncPool::new(SYNC_THREADS)?;
    std::thread::Builder::new()
        .name("blob-sync".into())
        .spawn(move || sync_stage(rx, pool, synced_tx))?;
    std::thread::Builder::new()
        .name("index-writer".into())
        .spawn(move || index_stage(conn, synced_rx))?;
    Ok(tx)
}

/// A batch whose blobs went through their fsyncs.
struct Synced {
    jobs: Vec<Job>,
    synced: Result<()>,
    /// Which file each synced blob path named.
    files: SyncedFiles,
    fsyncs: usize,
    sync_time: std::time::Duration,
}

/// Stage one of the pipeline: fsync each batch's blobs, then hand the batch
/// to the index stage. While the index stage commits batch N, this stage
/// already syncs batch N+1.
fn sync_stage(rx: mpsc::Receiver<Job>, pool: SyncPool, next: mpsc::Sender<Synced>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let mut to_sync: Vec<SyncItem> = jobs
            .iter()
            .flat_map(|j| match j {
                Job::Insert { to_sync, .. } => to_sync.clone(),
                Job::Clinics { .. } | Job::Audit { .. } | Job::Owed { .. } => Vec::new(),
            })
            .collect();
        to_sync.sort();
        to_sync.dedup();
        let started = std::time::Instant::now();
        let (synced, files) = match pool.sync_all(&to_sync) {
            Ok(files) => (Ok(()), files),
            Err(e) => (Err(e), SyncedFiles::new()),
        };
        let batch = Synced {
            jobs,
            synced,
            files,
            fsyncs: to_sync.len(),
            sync_time: started.elapsed(),
        };
        if next.send(batch).is_err() {
            return;
        }
    }
}

/// Stage two: commit synced batches (several at once when they queue up).
fn index_stage(mut conn: Connection, rx: mpsc::Receiver<Synced>) {
    while let Ok(first) = rx.recv() {
        let mut batches = vec![first];
        while let Ok(more) = rx.try_recv() {
            batches.push(more);
        }
        commit_batches(&mut conn, batches);
    }
}

fn commit_batches(conn: &mut Connection, batches: Vec<Synced>) {
    let started = std::time::Instant::now();
    let fsyncs: usize = batches.iter().map(|b| b.fsyncs).sum();
    let sync_us: u128 = batches.iter().map(|b| b.sync_time.as_micros()).sum();
    // Jobs whose blobs failed to sync fail alone; the others are committed.
    // A failed fsync may have dropped the file's dirty pages while leaving
    // the file in place, and a later fsync of it can report success: so the
    // unreferenced files of a failed batch are removed, and a job whose blob
    // is gone (another sender's identical bytes, removed here) fails too
    // instead of indexing a row without a blob.
    //
    // Each job is checked against the files its own batch synced: the path
    // must still name that very file. After a failed fsync removed a blob,
    // an identical send may have linked a new, unsynced file there.
    let mut batch = Vec::new();
    for b in batches {
        match b.synced {
            Ok(()) => {
                let (kept, vanished): (Vec<Job>, Vec<Job>) = b.jobs.into_iter().partition(|job| {
                    blob_files(job).all(|p| match crate::blobs::file_id(p) {
                        None => false,
                        Some(now) => b.files.get(p).is_none_or(|synced| *synced == now),
                    })
                });
                batch.extend(kept);
                for job in vanished {
                    job.answer(Err(Error::Io {
                        op: "find blob after a failed fsync of the same bytes",
                        path: PathBuf::new(),
                        source: std::io::Error::other("send the instance again"),
                    }));
                }
            }
            Err(e) => {
                discard_unsynced(conn, &b.jobs);
                fail_all(b.jobs, &e);
            }
        }
    }
    let mut results = Vec::with_capacity(batch.len());
    // A batch of audit rows alone is committed to the WAL without an fsync
    // (the next instance batch's fsync, or a checkpoint, covers it): the row
    // is written before the answer goes out and survives a crash of the
    // process, as the viewer's audit rows do, and a query does not wait for
    // the disk. Instance rows are always committed with synchronous=FULL.
    let audit_only = !batch.is_empty() && batch.iter().all(|job| matches!(job, Job::Audit { .. }));
    if audit_only && let Err(e) = conn.pragma_update(None, "synchronous", "NORMAL") {
        tracing::warn!(error = %e, "cannot relax synchronous for an audit batch");
    }
    let outcome = (|| -> Result<()> {
        // Every job straight in the transaction first. Should one fail, the
        // batch is rolled back and run again with a savepoint per job, so
        // that job fails alone: a savepoint journals every page it touches
        // (about 5% of the gateway's CPU when taken for every instance).
        {
            let tx = conn.transaction()?;
            let all: Result<Vec<_>> = batch.iter().map(|job| run_job(&tx, job)).collect();
            match all {
                Ok(all) => {
                    tx.commit()?;
                    results = all.into_iter().map(Ok).collect();
                    return Ok(());
                }
                // The index is locked by another process (past the busy
                // timeout): every job would wait that long again. The
                // whole batch fails at once; senders retry (0xA7xx).
                Err(e) if is_busy(&e) => return Err(e),
                Err(_) => {}
            }
        } // a failed job's batch is rolled back here
        let mut tx = conn.transaction()?;
        for job in &batch {
            results.push(with_savepoint(&mut tx, |sp| run_job(sp, job)));
        }
        tx.commit()?;
        Ok(())
    })();
    if audit_only && let Err(e) = conn.pragma_update(None, "synchronous", "FULL") {
        // Instances must never be acknowledged on a relaxed connection:
        // stop the writer, so every later store fails instead.
        panic!("cannot restore synchronous=FULL on the index writer: {e}");
    }

    let batch_len = batch.len();
    let mut results = results.into_iter();
    for job in batch {
        let res = match &outcome {
            Ok(()) => results.next().unwrap_or(Err(Error::ShuttingDown)),
            Err(e) => Err(batch_error("commit index batch", e)),
        };
        job.answer(res);
    }
    tracing::debug!(
        batch_len,
        fsyncs,
        blob_sync_us = sync_us as u64,
        commit_us = started.elapsed().as_micros() as u64,
        "index batch committed"
    );
}

/// True for SQLite's "database is locked / busy".
fn is_busy(e: &Error) -> bool {
    matches!(
        e,
        Error::Index(rusqlite::Error::SqliteFailure(f, _))
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// The blob files an insert job placed (none for remote object stores).
fn blob_files(job: &Job) -> impl Iterator<Item = &PathBuf> {
    let items: &[SyncItem] = match job {
        Job::Insert { to_sync, .. } => to_sync,
        Job::Clinics { .. } | Job::Audit { .. } | Job::Owed { .. } => &[],
    };
    items.iter().filter_map(|i| match i {
        SyncItem::File(p) => Some(p),
        SyncItem::Dir(_) => None,
    })
}

/// Removes the blob files of a batch whose fsync failed, unless a committed
/// row references them (then they were durable before this batch).
fn discard_unsynced(conn: &Connection, jobs: &[Job]) {
    for job in jobs {
        let Job::Insert { instance, .. } = job else {
            continue;
        };
        let referenced = conn
            .query_row(
                "SELECT 1 FROM instance_versions WHERE blob_key = ?1 LIMIT 1",
                [&instance.blob_key],
                |_| Ok(()),
            )
            .optional()
            .map_or(true, |r| r.is_some());
        if referenced {
            continue;
        }
        for path in blob_files(job) {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    tracing::warn!(key = %instance.blob_key, "removed a blob whose fsync failed")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(key = %instance.blob_key, error = %e, "cannot remove a blob whose fsync failed")
                }
            }
        }
    }
}

fn fail_all(jobs: Vec<Job>, e: &Error) {
    for job in jobs {
        job.answer(Err(batch_error("sync blobs", e)));
    }
}

/// The error every job of a failed batch gets.
fn batch_error(op: &'static str, e: &Error) -> Error {
    Error::Io {
        op,
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl Job {
    /// Sends the job's result to its waiter (`Some` only for inserts).
    fn answer(self, res: Result<Option<StoreOutcome>>) {
        match self {
            Job::Insert { reply, .. } => {
                let _ = reply.send(res.map(|o| o.unwrap_or(StoreOutcome::Stored)));
            }
            Job::Clinics { reply, .. } | Job::Audit { reply, .. } => {
                let _ = reply.send(res.map(drop));
            }
            Job::Owed { change, reply } => {
                let _ = reply.send(res.map(|_| change.row_id()));
            }
        }
    }
}

/// One job's statements.
fn run_job(c: &Connection, job: &Job) -> Result<Option<StoreOutcome>> {
    match job {
        Job::Insert { instance, .. } => insert(c, instance).map(Some),
        Job::Clinics { clinics, .. } => upsert_clinics(c, clinics).map(|_| None),
        Job::Audit { entry, .. } => insert_audit(c, entry).map(|_| None),
        Job::Owed { change, .. } => change.apply(c).map(|_| None),
    }
}

fn with_savepoint<T>(
    tx: &mut Transaction<'_>,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    let sp = tx.savepoint()?;
    let v = f(&sp)?; // on error, dropping the savepoint rolls it back
    sp.commit()?;
    Ok(v)
}

fn insert_audit(tx: &Connection, e: &crate::AuditEntry) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit (at, calling_ae, clinic_id, peer, action, detail, outcome, matches)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        crate::utc_timestamp(std::time::SystemTime::now()),
        e.calling_ae,
        e.clinic_id,
        e.peer,
        e.action,
        e.detail,
        e.outcome,
        e.matches as i64
    ])?;
    Ok(())
}

fn upsert_clinics(tx: &Connection, clinics: &[(String, String)]) -> Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO clinics (id, name) VALUES (?1, ?2)
         ON CONFLICT (id) DO UPDATE SET name = excluded.name",
    )?;
    for (id, name) in clinics {
        stmt.execute(params![id, name])?;
    }
    Ok(())
}

fn insert(tx: &Connection, new: &NewInstance) -> Result<StoreOutcome> {
    let a = &new.attrs;
    tx.prepare_cached(
        "INSERT OR IGNORE INTO instance_senders
            (sop_instance_uid, sha256, clinic_id, calling_ae, first_received_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        a.sop_instance_uid,
        new.sha256,
        new.clinic_id,
        new.calling_ae,
        new.received_at
    ])?;
    let current: Option<(String, String)> = tx
        .prepare_cached("SELECT sha256, clinic_id FROM instances WHERE sop_instance_uid = ?1")?
        .query_row([&a.sop_instance_uid], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let current = match current {
        Some((sha256, _)) if sha256 == new.sha256 => return Ok(StoreOutcome::AlreadyStored),
        Some((_, owner)) if owner != new.clinic_id => {
            // Another clinic's different bytes under a SOP Instance UID
            // its first sender holds: a UID collision, or a copy whose
            // demographics that clinic rewrote. Kept and recorded, never
            // current: whoever reads the owner's study must not be shown
            // another patient's image. `superseded_at = received_at` marks
            // a version that never was current.
            record_version(
                tx,
                "INSERT INTO instance_versions (sop_instance_uid, blob_key, sha256, size,
                    transfer_syntax, clinic_id, calling_ae, received_at, sop_class_uid, superseded_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?8)
                 ON CONFLICT (sop_instance_uid, sha256) DO NOTHING",
                new,
            )?;
            return Ok(StoreOutcome::KeptBesideOwner { owner });
        }
        other => other.map(|(sha256, _)| sha256),
    };

    // Record the version (an old version coming back becomes current again).
    tx.prepare_cached(
        "UPDATE instance_versions SET superseded_at = ?2
         WHERE sop_instance_uid = ?1 AND superseded_at IS NULL",
    )?
    .execute(params![a.sop_instance_uid, new.received_at])?;
    record_version(
        tx,
        "INSERT INTO instance_versions
            (sop_instance_uid, blob_key, sha256, size, transfer_syntax, clinic_id, calling_ae, received_at,
             sop_class_uid)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (sop_instance_uid, sha256) DO UPDATE SET superseded_at = NULL,
            received_at = excluded.received_at, clinic_id = excluded.clinic_id,
            calling_ae = excluded.calling_ae",
        new,
    )?;

    let patient_pk = upsert_patient(tx, new)?;
    let study_pk = upsert_study(tx, new, patient_pk)?;
    let series_pk = upsert_series(tx, a, study_pk, &new.clinic_id)?;
    // An instance filed into another clinic's series (which stays in its
    // own study) leaves the study row of its own Study UID empty: no empty
    // study is kept to show up in worklists and queries.
    tx.prepare_cached(
        "DELETE FROM studies WHERE pk = ?1
           AND NOT EXISTS (SELECT 1 FROM series WHERE study_pk = ?1)
           AND NOT EXISTS (SELECT 1 FROM worklist WHERE study_pk = ?1)",
    )?
    .execute([study_pk])?;
    tx.prepare_cached(
        "INSERT INTO instances (sop_instance_uid, series_pk, sop_class_uid, instance_number, number_of_frames,
            transfer_syntax, blob_key, sha256, size, dataset_offset, clinic_id, calling_ae, received_at,
            patient_pk)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (sop_instance_uid) DO UPDATE SET
            series_pk = excluded.series_pk, patient_pk = excluded.patient_pk,
            sop_class_uid = excluded.sop_class_uid,
            instance_number = excluded.instance_number, number_of_frames = excluded.number_of_frames,
            transfer_syntax = excluded.transfer_syntax, blob_key = excluded.blob_key,
            sha256 = excluded.sha256, size = excluded.size, dataset_offset = excluded.dataset_offset,
            received_at = excluded.received_at"
    )?
    .execute(params![
            a.sop_instance_uid,
            series_pk,
            a.sop_class_uid,
            a.instance_number,
            a.number_of_frames,
            new.transfer_syntax,
            new.blob_key,
            new.sha256,
            new.size as i64,
            new.dataset_offset as i64,
            new.clinic_id,
            new.calling_ae,
            new.received_at,
            patient_pk
        ],
    )?;
    Ok(match current {
        None => StoreOutcome::Stored,
        Some(previous_sha256) => StoreOutcome::NewVersion { previous_sha256 },
    })
}

/// Runs `sql`, an insert into `instance_versions`, with `new`'s values as
/// ?1..?9: UID, blob key, SHA-256, size, transfer syntax, clinic, AE, time,
/// SOP class.
fn record_version(tx: &Connection, sql: &str, new: &NewInstance) -> Result<()> {
    tx.prepare_cached(sql)?.execute(params![
        new.attrs.sop_instance_uid,
        new.blob_key,
        new.sha256,
        new.size as i64,
        new.transfer_syntax,
        new.clinic_id,
        new.calling_ae,
        new.received_at,
        new.attrs.sop_class_uid
    ])?;
    Ok(())
}

fn upsert_patient(tx: &Connection, new: &NewInstance) -> Result<i64> {
    let a = &new.attrs;
    // Upper-cased for case-insensitive matching, whole and per component
    // group, without insignificant trailing delimiters.
    let search = crate::query::pn_search_form(&a.patient_name.text);
    let mut groups = search.split('=').map(str::to_string);
    // Unchanged rows are not rewritten (the DO UPDATE's WHERE): an update
    // rewrites every index on an assigned column, and a study's instances
    // arrive one commit at a time, each repeating the same attributes.
    let pk: Option<i64> = tx
        .prepare_cached(
            "INSERT INTO patients (clinic_id, patient_id, issuer, name, name_raw, name_charset, name_search,
                birth_date, sex, name_alpha, name_ideo, name_phon)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
             ON CONFLICT (clinic_id, patient_id, issuer) DO UPDATE SET
                name = excluded.name, name_raw = excluded.name_raw, name_charset = excluded.name_charset,
                name_search = excluded.name_search, birth_date = excluded.birth_date, sex = excluded.sex,
                name_alpha = excluded.name_alpha, name_ideo = excluded.name_ideo, name_phon = excluded.name_phon
             WHERE (name, name_raw, name_charset, name_search, birth_date, sex, name_alpha, name_ideo, name_phon)
                IS NOT (excluded.name, excluded.name_raw, excluded.name_charset, excluded.name_search,
                        excluded.birth_date, excluded.sex, excluded.name_alpha, excluded.name_ideo,
                        excluded.name_phon)
             RETURNING pk",
        )?
        .query_row(
            params![
                new.clinic_id,
                a.patient_id,
                a.issuer_of_patient_id,
                a.patient_name.text,
                a.patient_name.raw,
                a.specific_character_set,
                search,
                a.patient_birth_date,
                a.patient_sex,
                groups.next().unwrap_or_default(),
                groups.next().unwrap_or_default(),
                groups.next().unwrap_or_default()
            ],
            |r| r.get(0),
        )
        .optional()?;
    let pk = match pk {
        Some(pk) => pk,
        None => tx
            .prepare_cached(
                "SELECT pk FROM patients WHERE clinic_id = ?1 AND patient_id = ?2 AND issuer = ?3",
            )?
            .query_row(
                params![new.clinic_id, a.patient_id, a.issuer_of_patient_id],
                |r| r.get(0),
            )?,
    };
    let mut stmt = tx.prepare_cached(
        "INSERT OR IGNORE INTO patient_other_ids (patient_pk, other_id, issuer, id_type) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for other in &a.other_patient_ids {
        stmt.execute(params![pk, other.id, other.issuer, other.type_of_id])?;
    }
    Ok(pk)
}

fn upsert_study(tx: &Connection, new: &NewInstance, patient_pk: i64) -> Result<i64> {
    let a = &new.attrs;
    let updated: Option<i64> = tx.prepare_cached(
        "INSERT INTO studies (study_uid, patient_pk, clinic_id, study_date, study_time, accession_number, study_id,
            description, referring_physician, institution, character_set, first_received_at, last_received_at,
            requested_priority)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13)
         ON CONFLICT (study_uid) DO UPDATE SET
            -- Another clinic sending the same Study Instance UID (a referral, a
            -- reused UID root) adds to the study but never takes it over.
            patient_pk = CASE WHEN clinic_id = excluded.clinic_id THEN excluded.patient_pk ELSE patient_pk END,
            study_date = CASE WHEN clinic_id = excluded.clinic_id THEN excluded.study_date ELSE study_date END,
            study_time = CASE WHEN clinic_id = excluded.clinic_id THEN excluded.study_time ELSE study_time END,
            accession_number = CASE WHEN clinic_id = excluded.clinic_id
                THEN excluded.accession_number ELSE accession_number END,
            study_id = CASE WHEN clinic_id = excluded.clinic_id THEN excluded.study_id ELSE study_id END,
            description = CASE WHEN clinic_id = excluded.clinic_id THEN excluded.description ELSE description END,
            referring_physician = CASE WHEN clinic_id = excluded.clinic_id
                THEN excluded.referring_physician ELSE referring_physician END,
            institution = CASE WHEN clinic_id = excluded.clinic_id THEN excluded.institution ELSE institution END,
            character_set = CASE WHEN clinic_id = excluded.clinic_id THEN excluded.character_set ELSE character_set END,
            requested_priority = CASE WHEN excluded.requested_priority != '' AND clinic_id = excluded.clinic_id
                THEN excluded.requested_priority ELSE requested_priority END,
            last_received_at = max(last_received_at, excluded.last_received_at)
         -- Only when something other than the arrival time changes (see upsert_patient).
         WHERE (clinic_id = excluded.clinic_id
                AND ((patient_pk, study_date, study_time, accession_number, study_id, description,
                      referring_physician, institution, character_set)
                     IS NOT (excluded.patient_pk, excluded.study_date, excluded.study_time,
                             excluded.accession_number, excluded.study_id, excluded.description,
                             excluded.referring_physician, excluded.institution, excluded.character_set)
                     OR (excluded.requested_priority != ''
                         AND requested_priority IS NOT excluded.requested_priority)))
         RETURNING pk"
    )?
    .query_row(        params![
            a.study_instance_uid,
            patient_pk,
            new.clinic_id,
            a.study_date,
            a.study_time,
            a.accession_number,
            a.study_id,
            a.study_description,
            a.referring_physician_name,
            a.institution_name,
            a.specific_character_set,
            new.received_at,
            a.requested_priority
        ],
        |r| r.get(0),
    )
    .optional()?;
    if let Some(pk) = updated {
        return Ok(pk);
    }
    // The arrival time alone: the row and its one index on it.
    Ok(tx
        .prepare_cached(
            "UPDATE studies SET last_received_at = max(last_received_at, ?2)
             WHERE study_uid = ?1 RETURNING pk",
        )?
        .query_row(params![a.study_instance_uid, new.received_at], |r| r.get(0))?)
}

/// The series row for `a` under `study_pk`, sent by `clinic_id`. Only the
/// clinic that created a series changes it: its attributes, or which of
/// that clinic's own studies it is in. Another clinic naming the same
/// Series Instance UID adds instances to it but neither moves nor relabels
/// it.
fn upsert_series(
    tx: &Connection,
    a: &InstanceAttrs,
    study_pk: i64,
    clinic_id: &str,
) -> Result<i64> {
    let updated: Option<i64> = tx
        .prepare_cached(
            "INSERT INTO series (series_uid, study_pk, modality, series_number, description, clinic_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (series_uid) DO UPDATE SET
            study_pk = CASE WHEN (SELECT clinic_id FROM studies WHERE pk = excluded.study_pk) = ?6
                THEN excluded.study_pk ELSE series.study_pk END,
            modality = excluded.modality,
            series_number = excluded.series_number, description = excluded.description
         -- Only its creator, and only when something changes (see upsert_patient).
         WHERE series.clinic_id = ?6
           AND (CASE WHEN (SELECT clinic_id FROM studies WHERE pk = excluded.study_pk) = ?6
                     THEN excluded.study_pk ELSE series.study_pk END,
                excluded.modality, excluded.series_number, excluded.description)
            IS NOT (series.study_pk, series.modality, series.series_number, series.description)
         RETURNING pk",
        )?
        .query_row(
            params![
                a.series_instance_uid,
                study_pk,
                a.modality,
                a.series_number,
                a.series_description,
                clinic_id
            ],
            |r| r.get(0),
        )
        .optional()?;
    match updated {
        Some(pk) => Ok(pk),
        None => Ok(tx
            .prepare_cached("SELECT pk FROM series WHERE series_uid = ?1")?
            .query_row([&a.series_instance_uid], |r| r.get(0))?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert_job(
        blob: &std::path::Path,
        key: &str,
    ) -> (Job, oneshot::Receiver<Result<StoreOutcome>>) {
        let (reply, rx) = oneshot::channel();
        let attrs = InstanceAttrs {
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: "2.25.1".into(),
            study_instance_uid: "2.25.2".into(),
            series_instance_uid: "2.25.3".into(),
            patient_id: "P1".into(),
            ..InstanceAttrs::default()
        };
        let job = Job::Insert {
            instance: Box::new(NewInstance {
                attrs,
                clinic_id: "c".into(),
                calling_ae: "AE".into(),
                blob_key: key.into(),
                sha256: "ab".into(),
                size: 4,
                dataset_offset: 0,
                transfer_syntax: "1.2.840.10008.1.2.1".into(),
                received_at: "2026-01-01T00:00:00.000000Z".into(),
            }),
            to_sync: vec![SyncItem::File(blob.to_owned())],
            reply,
        };
        (job, rx)
    }

    /// Instance `uid` of `clinic` in study `study`, series `series`.
    fn sent(
        clinic: &str,
        uid: &str,
        study: &str,
        series: &str,
        modality: &str,
        description: &str,
    ) -> NewInstance {
        NewInstance {
            attrs: InstanceAttrs {
                sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance_uid: uid.into(),
                study_instance_uid: study.into(),
                series_instance_uid: series.into(),
                patient_id: format!("P-{clinic}"),
                modality: modality.into(),
                series_description: description.into(),
                ..InstanceAttrs::default()
            },
            clinic_id: clinic.into(),
            calling_ae: "AE".into(),
            blob_key: format!("instances/{uid}.dcm"),
            sha256: format!("sha-{uid}"),
            size: 4,
            dataset_offset: 0,
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            received_at: "2026-01-01T00:00:00.000000Z".into(),
        }
    }

    #[test]
    fn only_the_clinic_that_created_a_series_relabels_or_moves_it() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::index::open_writer(&dir.path().join("index.sqlite")).unwrap();
        let series = |uid: &str| -> (String, String, String) {
            conn.query_row(
                "SELECT st.study_uid, se.modality, se.description FROM series se
                 JOIN studies st ON st.pk = se.study_pk WHERE se.series_uid = ?1",
                [uid],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
        };
        let store = |new: NewInstance| insert(&conn, &new).unwrap();
        let owned = |s: &str, m: &str, d: &str| (s.to_string(), m.to_string(), d.to_string());

        // A's series; A corrects it, then moves it to another study of its own.
        store(sent("a", "2.25.11", "2.25.1", "2.25.1.1", "CT", "first"));
        store(sent(
            "a",
            "2.25.12",
            "2.25.1",
            "2.25.1.1",
            "CT",
            "corrected",
        ));
        assert_eq!(series("2.25.1.1"), owned("2.25.1", "CT", "corrected"));
        store(sent(
            "a",
            "2.25.13",
            "2.25.2",
            "2.25.1.1",
            "CT",
            "corrected",
        ));
        assert_eq!(series("2.25.1.1"), owned("2.25.2", "CT", "corrected"));

        // B names A's series: neither relabelled nor moved to B's study,
        // and B's Study UID is left with no empty study row.
        store(sent("b", "2.25.21", "2.25.9", "2.25.1.1", "DX", "theirs"));
        assert_eq!(series("2.25.1.1"), owned("2.25.2", "CT", "corrected"));
        let studies: i64 = conn
            .query_row(
                "SELECT count(*) FROM studies WHERE study_uid = '2.25.9'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(studies, 0);

        // B's own series filed under A's study: B corrects it, A cannot.
        store(sent("b", "2.25.22", "2.25.2", "2.25.2.7", "DX", "x"));
        store(sent("b", "2.25.23", "2.25.2", "2.25.2.7", "DX", "y"));
        assert_eq!(series("2.25.2.7"), owned("2.25.2", "DX", "y"));
        store(sent("a", "2.25.14", "2.25.2", "2.25.2.7", "CT", "z"));
        assert_eq!(series("2.25.2.7"), owned("2.25.2", "DX", "y"));
    }

    #[test]
    fn a_failed_fsync_removes_the_blob_and_its_twin_is_not_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::index::open_writer(&dir.path().join("index.sqlite")).unwrap();
        let blob = dir.path().join("blob.dcm");
        std::fs::write(&blob, b"DICM").unwrap();
        let (failed, failed_rx) = insert_job(&blob, "instances/ab/ab.dcm");
        // A second sender's identical bytes found the file in place and
        // synced it "successfully" after the first fsync had failed.
        let (twin, twin_rx) = insert_job(&blob, "instances/ab/ab.dcm");
        let synced = |jobs, synced| Synced {
            jobs,
            synced,
            files: SyncedFiles::new(),
            fsyncs: 1,
            sync_time: std::time::Duration::ZERO,
        };
        let eio = Error::Io {
            op: "fsync blob",
            path: blob.clone(),
            source: std::io::Error::other("EIO"),
        };
        commit_batches(
            &mut conn,
            vec![synced(vec![failed], Err(eio)), synced(vec![twin], Ok(()))],
        );
        assert!(failed_rx.blocking_recv().unwrap().is_err());
        assert!(twin_rx.blocking_recv().unwrap().is_err());
        assert!(!blob.exists(), "the unsynced blob is removed");
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM instances", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0, "no row points at a blob that may not be durable");

        // A blob an indexed row references is kept even if a re-sync fails.
        std::fs::write(&blob, b"DICM").unwrap();
        let (ok, ok_rx) = insert_job(&blob, "instances/ab/ab.dcm");
        commit_batches(&mut conn, vec![synced(vec![ok], Ok(()))]);
        assert!(ok_rx.blocking_recv().unwrap().is_ok());
        let (again, again_rx) = insert_job(&blob, "instances/ab/ab.dcm");
        let eio = Error::Io {
            op: "fsync blob",
            path: blob.clone(),
            source: std::io::Error::other("EIO"),
        };
        commit_batches(&mut conn, vec![synced(vec![again], Err(eio))]);
        assert!(again_rx.blocking_recv().unwrap().is_err());
        assert!(blob.exists(), "a referenced blob is never removed");
    }

    #[test]
    fn a_blob_replaced_after_its_sync_is_not_indexed() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::index::open_writer(&dir.path().join("index.sqlite")).unwrap();
        let blob = dir.path().join("blob.dcm");
        std::fs::write(&blob, b"DICM").unwrap();
        let synced_file = crate::blobs::file_id(&blob).unwrap();
        let (job, rx) = insert_job(&blob, "instances/ab/ab.dcm");
        // After this job's sync, another (unsynced) file took the path.
        let newer = dir.path().join("newer.dcm");
        std::fs::write(&newer, b"DICM").unwrap();
        std::fs::rename(&newer, &blob).unwrap();
        assert_ne!(crate::blobs::file_id(&blob), Some(synced_file));
        let mut files = SyncedFiles::new();
        files.insert(blob.clone(), synced_file);
        commit_batches(
            &mut conn,
            vec![Synced {
                jobs: vec![job],
                synced: Ok(()),
                files,
                fsyncs: 1,
                sync_time: std::time::Duration::ZERO,
            }],
        );
        assert!(rx.blocking_recv().unwrap().is_err());
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM instances", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn a_failing_job_fails_alone_and_the_rest_of_its_batch_commits() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::index::open_writer(&dir.path().join("index.sqlite")).unwrap();
        conn.execute_batch(
            "CREATE TEMP TRIGGER refuse_bad BEFORE INSERT ON main.instances
             WHEN NEW.sop_instance_uid = '2.25.99'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        .unwrap();
        let job = |uid: &str| {
            let blob = dir.path().join(format!("{uid}.dcm"));
            std::fs::write(&blob, b"DICM").unwrap();
            let (mut job, rx) = insert_job(&blob, &format!("instances/{uid}.dcm"));
            if let Job::Insert { instance, .. } = &mut job {
                instance.attrs.sop_instance_uid = uid.into();
            }
            (job, rx)
        };
        let ((a, a_rx), (bad, bad_rx), (b, b_rx)) = (job("2.25.7"), job("2.25.99"), job("2.25.8"));
        commit_batches(
            &mut conn,
            vec![Synced {
                jobs: vec![a, bad, b],
                synced: Ok(()),
                files: SyncedFiles::new(),
                fsyncs: 3,
                sync_time: std::time::Duration::ZERO,
            }],
        );
        assert!(a_rx.blocking_recv().unwrap().is_ok());
        assert!(bad_rx.blocking_recv().unwrap().is_err());
        assert!(b_rx.blocking_recv().unwrap().is_ok());
        let uids: Vec<String> = conn
            .prepare("SELECT sop_instance_uid FROM instances ORDER BY sop_instance_uid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(uids, ["2.25.7", "2.25.8"]);
        let senders: i64 = conn
            .query_row("SELECT count(*) FROM instance_senders", [], |r| r.get(0))
            .unwrap();
        assert_eq!(senders, 2, "nothing of the failed job remains");
    }

    #[test]
    fn audit_batches_skip_the_fsync_and_instance_batches_keep_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::index::open_writer(&dir.path().join("index.sqlite")).unwrap();
        let synchronous = |c: &Connection| -> i64 {
            c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap()
        };
        let synced = |jobs| Synced {
            jobs,
            synced: Ok(()),
            files: SyncedFiles::new(),
            fsyncs: 0,
            sync_time: std::time::Duration::ZERO,
        };
        let audit = || {
            let (reply, rx) = oneshot::channel();
            let entry = crate::AuditEntry {
                calling_ae: "AE".into(),
                action: "C-FIND".into(),
                ..crate::AuditEntry::default()
            };
            (Job::Audit { entry, reply }, rx)
        };
        let ((a1, a1_rx), (a2, a2_rx)) = (audit(), audit());
        commit_batches(&mut conn, vec![synced(vec![a1, a2])]);
        assert!(a1_rx.blocking_recv().unwrap().is_ok());
        assert!(a2_rx.blocking_recv().unwrap().is_ok());
        assert_eq!(synchronous(&conn), 2, "FULL again after an audit batch");
        let rows: i64 = conn
            .query_row(
                "SELECT count(*) FROM audit WHERE action = 'C-FIND'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 2);
        // A batch mixing audit rows and an instance is committed with FULL
        // throughout (and stays so).
        let blob = dir.path().join("blob.dcm");
        std::fs::write(&blob, b"DICM").unwrap();
        let (insert, insert_rx) = insert_job(&blob, "instances/ab/ab.dcm");
        let (a3, a3_rx) = audit();
        commit_batches(&mut conn, vec![synced(vec![a3, insert])]);
        assert!(insert_rx.blocking_recv().unwrap().is_ok());
        assert!(a3_rx.blocking_recv().unwrap().is_ok());
        assert_eq!(synchronous(&conn), 2);
    }
}
