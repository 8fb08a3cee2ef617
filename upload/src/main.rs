//! `consortium-upload`: send files, folders or a DICOMDIR to the county
//! center and end with a certain answer: every instance is committed, or
//! exactly these are not and here is why.
//!
//! Steps: scan (non-DICOM files listed and skipped), skip sending what the
//! local record says this center already committed and what the center
//! says it already holds byte for byte (`present`), send over parallel
//! associations with retries, request storage commitment for everything
//! stored (recording each confirmation as it arrives) and again for what
//! was skipped, print a summary. Exit status 0 only when the center
//! confirmed, in this run, every DICOM instance found.

mod commit;
mod present;
mod progress;
mod record;
mod scan;
mod send;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;

const USAGE: &str = "usage: consortium-upload [options] FILE|FOLDER|DICOMDIR...
  --host HOST            center address (default 127.0.0.1)
  --port PORT            center DICOM port (default 11112)
  --calling-ae AE        this workstation's AE title (registered at the center)
  --called-ae AE         the center's AE title (default COUNTYPACS)
  --associations N       parallel associations (default 4)
  --retries N            retries of transient failures (default 5)
  --report-wait SECONDS  how long the center may take to send its storage
                         commitment report on the association (default 600)
  --record FILE          local record of committed instances
                         (default ~/.local/share/consortium-upload/record.sqlite)
  --config FILE          TOML file with the same keys (host, port, calling_ae, ...)
  --dry-run              list what would be sent, send nothing
  --report FILE          write every file's outcome (tab-separated) to FILE";

/// Connection and behaviour settings (flags override the config file).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) calling_ae: String,
    pub(crate) called_ae: String,
    pub(crate) associations: usize,
    pub(crate) retries: u32,
    pub(crate) max_pdu: u32,
    pub(crate) timeout: Duration,
    /// How long the center may take to report on a commitment request.
    pub(crate) report_wait: Duration,
}

impl Settings {
    /// Requests an association with the center proposing `contexts`.
    pub(crate) async fn associate(
        &self,
        contexts: &[consortium_dimse::client::Proposed],
    ) -> Result<consortium_dimse::client::Association, consortium_dimse::client::ClientError> {
        consortium_dimse::client::associate(
            (&self.host, self.port),
            &self.calling_ae,
            &self.called_ae,
            contexts,
            self.max_pdu,
            self.timeout,
        )
        .await
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host: Option<String>,
    port: Option<u16>,
    calling_ae: Option<String>,
    called_ae: Option<String>,
    associations: Option<usize>,
    retries: Option<u32>,
    record: Option<PathBuf>,
    report_wait: Option<u64>,
}

struct Args {
    settings: Settings,
    record: PathBuf,
    dry_run: bool,
    report: Option<PathBuf>,
    inputs: Vec<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut file = FileConfig::default();
    let mut flags = FileConfig::default();
    let mut dry_run = false;
    let mut report = None;
    let mut inputs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--host" => flags.host = Some(value()?),
            "--port" => flags.port = Some(value()?.parse().map_err(|e| format!("--port: {e}"))?),
            "--calling-ae" => flags.calling_ae = Some(value()?),
            "--called-ae" => flags.called_ae = Some(value()?),
            "--associations" => {
                flags.associations = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--associations: {e}"))?,
                )
            }
            "--retries" => {
                flags.retries = Some(value()?.parse().map_err(|e| format!("--retries: {e}"))?)
            }
            "--record" => flags.record = Some(PathBuf::from(value()?)),
            "--report-wait" => {
                flags.report_wait = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--report-wait: {e}"))?,
                )
            }
            "--config" => {
                let path = value()?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {path}: {e}"))?;
                file = toml::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
            }
            "--dry-run" => dry_run = true,
            "--report" => report = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(String::new()),
            other if other.starts_with("--") => return Err(format!("unknown option {other}")),
            other => inputs.push(PathBuf::from(other)),
        }
    }
    if inputs.is_empty() {
        return Err("no files or folders given".into());
    }
    let calling_ae = flags
        .calling_ae
        .or(file.calling_ae)
        .ok_or("--calling-ae is required (this workstation's registered AE title)")?;
    let record = flags.record.or(file.record).unwrap_or_else(default_record);
    let settings = Settings {
        host: flags
            .host
            .or(file.host)
            .unwrap_or_else(|| "127.0.0.1".into()),
        port: flags.port.or(file.port).unwrap_or(11112),
        calling_ae,
        called_ae: flags
            .called_ae
            .or(file.called_ae)
            .unwrap_or_else(|| "COUNTYPACS".into()),
        associations: flags
            .associations
            .or(file.associations)
            .unwrap_or(4)
            .clamp(1, 32),
        retries: flags.retries.or(file.retries).unwrap_or(5),
        max_pdu: 262_144,
        timeout: Duration::from_secs(60),
        report_wait: Duration::from_secs(
            flags.report_wait.or(file.report_wait).unwrap_or(600).max(1),
        ),
    };
    for ae in [&settings.calling_ae, &settings.called_ae] {
        if ae.is_empty()
            || ae.len() > 16
            || !ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
        {
            return Err(format!(
                "AE title {ae:?} is not 1-16 printable ASCII characters"
            ));
        }
    }
    Ok(Args {
        settings,
        record,
        dry_run,
        report,
        inputs,
    })
}

/// Said (and the run fails) when no input holds a DICOM instance: an
/// empty mount point, a folder of reports.
const NOTHING_FOUND: &str = "no DICOM instances found in what was given";

/// Failure Reason 0x0213: the center is short of resources now.
const RESOURCE_LIMITATION: u16 = 0x0213;

fn default_record() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| ".".into());
    home.join(".local/share/consortium-upload/record.sqlite")
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("consortium-upload: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let s = &args.settings;
    let center = format!("{}:{}/{}", s.host, s.port, s.called_ae);
    let started = std::time::Instant::now();
    let inputs = args.inputs.clone();
    let (candidates, skipped) = tokio::task::spawn_blocking(move || scan::scan(&inputs))
        .await
        .expect("scan task");
    let scanned_in = started.elapsed();
    let record_key = format!("{}@{center}", s.calling_ae);
    // Records from before the calling AE was part of the key are taken
    // over: what they skip is confirmed by the center again anyway.
    let open = match args.dry_run {
        true => record::Record::open_existing,
        false => record::Record::open,
    };
    let record = match open(&args.record, &record_key, &center) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "consortium-upload: cannot open record {}: {e}",
                args.record.display()
            );
            return ExitCode::from(2);
        }
    };
    let mut to_send = Vec::new();
    let mut already = Vec::new();
    for mut c in candidates {
        // Only instances this center committed before need hashing now.
        if record.has_uid(&c.sop_instance_uid).unwrap_or(false) {
            if c.sha256.is_empty()
                && let Ok(sha) = scan::file_sha256(&c.path)
            {
                c.sha256 = sha;
            }
            if record
                .is_committed(&c.sop_instance_uid, &c.sha256)
                .unwrap_or(false)
            {
                already.push(c);
                continue;
            }
        }
        to_send.push(c);
    }
    for s in &skipped {
        let kind = if s.kind == scan::SkipKind::Unusable {
            "ERROR  "
        } else {
            "skipped"
        };
        println!("{kind} {}: {}", s.path.display(), s.reason);
    }
    if args.dry_run {
        for c in &already {
            println!("already committed {}", c.path.display());
        }
        for c in &to_send {
            println!(
                "would send {} ({} bytes, SOP class {}, transfer syntax {})",
                c.path.display(),
                c.size,
                c.sop_class_uid,
                c.transfer_syntax
            );
        }
        println!(
            "dry run: {} to send, {} already committed, {} skipped (files the center already holds are found when sending, and then not sent)",
            to_send.len(),
            already.len(),
            skipped.len()
        );
        // Like the real run: unusable DICOM files, or none at all, make it fail.
        let unusable = skipped.iter().any(|s| s.kind == scan::SkipKind::Unusable);
        if to_send.is_empty() && already.is_empty() && !unusable {
            eprintln!("consortium-upload: {NOTHING_FOUND}");
            return ExitCode::FAILURE;
        }
        return if unusable {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }

    // Files the center already holds, byte for byte, and confirms: not sent again.
    let mut record = record;
    let (present, to_send, present_answers) = already_present(s, to_send, &mut record).await;

    let total_bytes = to_send.iter().map(|c| c.size).sum();
    let progress = progress::Progress::new(to_send.len() as u64, total_bytes);
    let send_started = std::time::Instant::now();
    let commit_started = send_started;
    let committer = commit::Committer::start(s, record);
    let results = send::send_all(s, to_send, &progress, &committer).await;
    progress.finish();
    let sent_in = send_started.elapsed();
    let (mut answers, mut record) = committer.finish().await;
    answers.extend(present_answers);

    let stored: Vec<(&scan::Candidate, &str)> = results
        .iter()
        .filter_map(|(c, o)| match o {
            send::Outcome::Stored { sha256, .. } => Some((c, sha256.as_str())),
            _ => None,
        })
        .collect();
    // Ask again about whatever the committer could not get confirmed (no
    // answer, or "could not check it now"), and about every file the
    // record says was committed before: "committed" is only ever said on
    // the center's word of this run.
    let ask_again: Vec<(String, String)> = stored
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| match answers.get(&c.sop_instance_uid) {
            None => true,
            Some(Some(reason)) => commit::may_pass(*reason),
            Some(None) => false,
        })
        .chain(already.iter())
        .map(|c| (c.sop_class_uid.clone(), c.sop_instance_uid.clone()))
        .collect();
    if !ask_again.is_empty() {
        let (more, failed) = commit::commit(s, &ask_again).await;
        answers.extend(more);
        if let Some(e) = failed {
            eprintln!("consortium-upload: storage commitment failed: {e}");
        }
    }
    let committed_in = commit_started.elapsed();
    eprintln!(
        "timing: scan {:.2} s, send and commit {:.2} s (last lane done at {:.2} s)",
        scanned_in.as_secs_f64(),
        committed_in.as_secs_f64(),
        sent_in.as_secs_f64()
    );
    let committed: Vec<&(&scan::Candidate, &str)> = stored
        .iter()
        .filter(|(c, _)| answers.get(&c.sop_instance_uid) == Some(&None))
        .collect();
    if let Err(e) = record.mark_committed(
        committed
            .iter()
            .map(|(c, sha)| (c.sop_instance_uid.as_str(), *sha)),
    ) {
        eprintln!("consortium-upload: cannot update the record: {e}");
    }
    // Recorded before, not confirmed now. Those the center answered with a
    // failure about the instance (not held, damaged: 0x0110 too) are
    // forgotten, so the next run sends them again (re-sending is harmless,
    // and repairs a damaged copy); without any answer (the center
    // unreachable), or short of resources now (0x0213), the record stays.
    let (already, lapsed): (Vec<_>, Vec<_>) = already
        .into_iter()
        .partition(|c| answers.get(&c.sop_instance_uid) == Some(&None));
    let gone = lapsed.iter().filter(
        |c| matches!(answers.get(&c.sop_instance_uid), Some(Some(r)) if *r != RESOURCE_LIMITATION),
    );
    if let Err(e) = record.forget(gone.map(|c| c.sop_instance_uid.as_str())) {
        eprintln!("consortium-upload: cannot update the record: {e}");
    }
    for c in &lapsed {
        let why = match answers.get(&c.sop_instance_uid) {
            Some(Some(reason)) => format!("0x{reason:04X} {}", commit::describe_failure(*reason)),
            _ => "the center did not confirm it".to_string(),
        };
        println!(
            "NOT COMMITTED {}: committed in an earlier run, but not confirmed now ({why}); run again",
            c.path.display()
        );
    }

    // Per-file results that need attention.
    let mut refused = 0;
    let mut failed = 0;
    for (c, outcome) in &results {
        if let send::Outcome::Stored {
            converted_to: Some(ts),
            ..
        } = outcome
        {
            println!(
                "converted {}: sent as {ts} (the center did not accept its own {})",
                c.path.display(),
                c.transfer_syntax
            );
        }
        match outcome {
            send::Outcome::Stored { .. } => match answers.get(&c.sop_instance_uid) {
                Some(None) => {}
                Some(Some(reason)) => println!(
                    "NOT COMMITTED {}: 0x{reason:04X} {}",
                    c.path.display(),
                    commit::describe_failure(*reason)
                ),
                None => println!(
                    "NOT COMMITTED {}: the center did not confirm it",
                    c.path.display()
                ),
            },
            send::Outcome::Refused { status, comment } => {
                refused += 1;
                println!(
                    "REFUSED {}: status 0x{status:04X} {comment}",
                    c.path.display()
                );
            }
            send::Outcome::Failed { reason } => {
                failed += 1;
                println!("FAILED {}: {reason}", c.path.display());
            }
        }
    }
    if let Some(path) = &args.report {
        let mut lines = vec!["file\toutcome\tdetail".to_string()];
        for c in &already {
            lines.push(format!("{}\talready committed\t", c.path.display()));
        }
        for c in &present {
            lines.push(format!(
                "{}\talready present\tthe center held these bytes; committed",
                c.path.display()
            ));
        }
        for c in &lapsed {
            lines.push(format!(
                "{}\tnot committed\tcommitted in an earlier run, not confirmed now",
                c.path.display()
            ));
        }
        for (c, outcome) in &results {
            let (what, detail) = match outcome {
                send::Outcome::Stored { converted_to, .. } => {
                    match answers.get(&c.sop_instance_uid) {
                        Some(None) => (
                            "committed".to_string(),
                            converted_to
                                .as_ref()
                                .map(|ts| format!("sent as {ts}"))
                                .unwrap_or_default(),
                        ),
                        Some(Some(r)) => (
                            "not committed".to_string(),
                            format!("0x{r:04X} {}", commit::describe_failure(*r)),
                        ),
                        None => ("not committed".to_string(), "not confirmed".to_string()),
                    }
                }
                send::Outcome::Refused { status, comment } => {
                    ("refused".to_string(), format!("0x{status:04X} {comment}"))
                }
                send::Outcome::Failed { reason } => ("failed".to_string(), reason.clone()),
            };
            lines.push(format!("{}\t{what}\t{detail}", c.path.display()));
        }
        for sk in &skipped {
            let what = match sk.kind {
                scan::SkipKind::Unusable => "unusable",
                scan::SkipKind::Copy => "copy",
                scan::SkipKind::NotDicom => "skipped",
            };
            lines.push(format!("{}\t{what}\t{}", sk.path.display(), sk.reason));
        }
        if let Err(e) = std::fs::write(path, lines.join("\n") + "\n") {
            eprintln!(
                "consortium-upload: cannot write report {}: {e}",
                path.display()
            );
        }
    }
    let count = |kind| skipped.iter().filter(|s| s.kind == kind).count();
    let (not_dicom, unusable, copies) = (
        count(scan::SkipKind::NotDicom),
        count(scan::SkipKind::Unusable),
        count(scan::SkipKind::Copy),
    );
    let not_committed = stored.len() - committed.len() + lapsed.len();
    println!(
        "summary: {} stored, {} committed, {} already committed before, {} already present at the center, {} refused, {} failed, {} not committed, {} unusable DICOM files, {} non-DICOM files skipped, {} identical copies skipped",
        stored.len(),
        committed.len(),
        already.len(),
        present.len(),
        refused,
        failed,
        not_committed,
        unusable,
        not_dicom,
        copies
    );
    // A refused association fails every file the same way: say it once, plainly.
    if let Some(reason) = results.iter().find_map(|(_, o)| match o {
        send::Outcome::Failed { reason }
            if reason.starts_with("the center refused the association") =>
        {
            Some(reason.clone())
        }
        _ => None,
    }) {
        eprintln!("consortium-upload: {reason}");
    }
    let found = committed.len() + already.len() + present.len() + refused + failed;
    if found + not_committed + unusable == 0 {
        // An empty mount point, a folder of reports: the technician meant
        // another one, and "all 0 instances are committed" would hide it.
        eprintln!("consortium-upload: {NOTHING_FOUND}");
        ExitCode::FAILURE
    } else if refused + failed + not_committed + unusable == 0 {
        println!(
            "all {} instances are committed at {center}",
            committed.len() + already.len() + present.len()
        );
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Splits `to_send` into the files the center already holds with the same
/// bytes and confirms by storage commitment now (hashed here only when the
/// center knows their UID), and the rest, which are sent; also the center's
/// answers about the first. A file the center holds but does not confirm
/// (a damaged copy) is sent again, which repairs it. When the center cannot
/// be asked, everything is sent.
async fn already_present(
    s: &Settings,
    to_send: Vec<scan::Candidate>,
    record: &mut record::Record,
) -> (Vec<scan::Candidate>, Vec<scan::Candidate>, commit::Answers) {
    let uids: Vec<&str> = to_send
        .iter()
        .map(|c| c.sop_instance_uid.as_str())
        .collect();
    let (held, failed) = present::held_by_center(s, &uids).await;
    if let Some(e) = failed {
        // A refused association is reported once, by the sending lanes.
        if !matches!(e, consortium_dimse::client::ClientError::Rejected(_)) {
            eprintln!(
                "consortium-upload: cannot ask the center which files it already holds ({e}); sending the rest"
            );
        }
    }
    if held.is_empty() {
        return (Vec::new(), to_send, commit::Answers::new());
    }
    let (held_here, mut rest) = tokio::task::spawn_blocking(move || {
        let (mut present, mut rest) = (Vec::new(), Vec::new());
        for mut c in to_send {
            if let Some(held_sha) = held.get(&c.sop_instance_uid)
                && let Ok((file_sha, as_kept)) = present::hashes(&c)
                && &as_kept == held_sha
            {
                c.sha256 = file_sha;
                present.push(c);
                continue;
            }
            rest.push(c);
        }
        (present, rest)
    })
    .await
    .expect("hashing task");
    if held_here.is_empty() {
        return (Vec::new(), rest, commit::Answers::new());
    }
    let refs: Vec<(String, String)> = held_here
        .iter()
        .map(|c| (c.sop_class_uid.clone(), c.sop_instance_uid.clone()))
        .collect();
    let (answers, failed) = commit::commit(s, &refs).await;
    if let Some(e) = failed {
        eprintln!(
            "consortium-upload: the center could not confirm the files it holds ({e}); sending them"
        );
    }
    let (present, unconfirmed): (Vec<_>, Vec<_>) = held_here
        .into_iter()
        .partition(|c| answers.get(&c.sop_instance_uid) == Some(&None));
    rest.extend(unconfirmed);
    // Recorded at once, like every other confirmation.
    if let Err(e) = record.mark_committed(
        present
            .iter()
            .map(|c| (c.sop_instance_uid.as_str(), c.sha256.as_str())),
    ) {
        eprintln!("consortium-upload: cannot update the record: {e}");
    }
    let answers = answers.into_iter().filter(|(_, a)| a.is_none()).collect();
    (present, rest, answers)
}
