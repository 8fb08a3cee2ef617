//! Finding what to send: files, folders (recursively) and DICOMDIRs.
//! Every DICOM instance is read without trusting it (storage's header
//! walker), so unreadable, truncated or UID-less files are reported before
//! anything is sent; non-DICOM files are listed and skipped.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A DICOM instance to send.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub(crate) path: PathBuf,
    pub(crate) sop_class_uid: String,
    pub(crate) sop_instance_uid: String,
    pub(crate) transfer_syntax: String,
    pub(crate) dataset_offset: u64,
    pub(crate) size: u64,
    /// SHA-256 of the whole file, with the SOP Instance UID the key of the
    /// local record; computed when needed (a re-run's record check, or while
    /// the file is read for sending), empty until then.
    pub(crate) sha256: String,
}

impl Candidate {
    pub(crate) fn dataset_len(&self) -> u64 {
        self.size - self.dataset_offset
    }
}

/// A file that will not be sent, and why.
#[derive(Debug, Clone)]
pub(crate) struct Skipped {
    pub(crate) path: PathBuf,
    pub(crate) reason: String,
    /// True for files that are DICOM but cannot be sent (a problem to fix);
    /// false for files that are simply not DICOM instances.
    pub(crate) is_error: bool,
}

/// Scans every input; files found twice are scanned once.
pub(crate) fn scan(inputs: &[PathBuf]) -> (Vec<Candidate>, Vec<Skipped>) {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for input in inputs {
        if input.is_dir() {
            walk(input, &mut files, &mut skipped);
        } else if is_dicomdir(input) {
            match dicomdir_files(input) {
                Ok(found) => files.extend(found),
                Err(reason) => skipped.push(Skipped {
                    path: input.clone(),
                    reason: format!("cannot read DICOMDIR: {reason}"),
                    is_error: true,
                }),
            }
        } else {
            files.push(input.clone());
        }
    }
    files.sort();
    files.dedup();
    let (dirs, files): (Vec<PathBuf>, Vec<PathBuf>) =
        files.into_iter().partition(|p| is_dicomdir(p));
    for path in dirs {
        skipped.push(Skipped {
            path,
            reason: "DICOMDIR (a media directory, not an instance)".into(),
            is_error: false,
        });
    }
    // Reading every header is the scan's cost: spread it over the cores.
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    let chunk = files.len().div_ceil(threads).max(1);
    let inspected: Vec<Result<Candidate, Skipped>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|p| inspect(p)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("scan thread panicked"))
            .collect()
    });
    let mut candidates = Vec::new();
    for res in inspected {
        match res {
            Ok(c) => candidates.push(c),
            Err(s) => skipped.push(s),
        }
    }
    (candidates, skipped)
}

fn is_dicomdir(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().eq_ignore_ascii_case("DICOMDIR"))
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, skipped: &mut Vec<Skipped>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            skipped.push(Skipped {
                path: dir.to_owned(),
                reason: format!("cannot read folder: {e}"),
                is_error: true,
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => walk(&path, files, skipped),
            Ok(t) if t.is_file() => files.push(path),
            _ => {}
        }
    }
}

/// Files referenced by a DICOMDIR's directory records.
fn dicomdir_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    use dicom_dictionary_std::tags;
    let obj = dicom_object::open_file(path).map_err(|e| e.to_string())?;
    let base = path.parent().unwrap_or(Path::new("."));
    let records = obj
        .element(tags::DIRECTORY_RECORD_SEQUENCE)
        .map_err(|e| e.to_string())?
        .items()
        .ok_or("Directory Record Sequence is not a sequence")?;
    let mut out = Vec::new();
    for record in records {
        if let Ok(id) = record.element(tags::REFERENCED_FILE_ID) {
            let parts = id.to_multi_str().map_err(|e| e.to_string())?;
            let mut p = base.to_path_buf();
            for part in parts.iter() {
                let part = part.trim();
                // File IDs are uppercase letters, digits and underscores: never "..".
                if part.is_empty() || !part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("invalid Referenced File ID component {part:?}"));
                }
                p.push(part);
            }
            out.push(p);
        }
    }
    Ok(out)
}

fn inspect(path: &Path) -> Result<Candidate, Skipped> {
    let skip = |reason: String, is_error: bool| Skipped {
        path: path.to_owned(),
        reason,
        is_error,
    };
    let mut file =
        std::fs::File::open(path).map_err(|e| skip(format!("cannot open: {e}"), true))?;
    let size = file
        .metadata()
        .map_err(|e| skip(format!("cannot read: {e}"), true))?
        .len();
    let mut head = Vec::with_capacity(64 * 1024);
    (&mut file)
        .take(64 * 1024)
        .read_to_end(&mut head)
        .map_err(|e| skip(format!("cannot read: {e}"), true))?;
    let Some((transfer_syntax, offset)) = storage::part10::parse_file_header(&head) else {
        return Err(skip("not a DICOM Part 10 file".into(), false));
    };
    let attrs = storage::attrs::read_file(path, offset as u64, &transfer_syntax)
        .map_err(|e| skip(format!("unusable DICOM file: {e}"), true))?;
    Ok(Candidate {
        path: path.to_owned(),
        sop_class_uid: attrs.sop_class_uid,
        sop_instance_uid: attrs.sop_instance_uid,
        transfer_syntax,
        dataset_offset: offset as u64,
        size,
        sha256: String::new(),
    })
}

/// SHA-256 of a whole file.
pub(crate) fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut HashWriter(&mut hasher))?;
    Ok(storage::spool::hex(&hasher.finalize()))
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
