//! Finding what to send: files, folders (recursively) and DICOMDIRs.
//! Every DICOM instance is read without trusting it (storage's header
//! walker), so unreadable, truncated or UID-less files are reported before
//! anything is sent; non-DICOM files are listed and skipped.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Most a deflated file may inflate to: the center's default instance size
/// limit (beyond it the center would refuse the file anyway), so a
/// decompression bomb on a stick costs the scan seconds, not hours.
const MAX_INFLATED: u64 = 4 << 30;

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
        self.size.saturating_sub(self.dataset_offset)
    }
}

/// A file that will not be sent, and why.
#[derive(Debug, Clone)]
pub(crate) struct Skipped {
    pub(crate) path: PathBuf,
    pub(crate) reason: String,
    pub(crate) kind: SkipKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SkipKind {
    /// Not a DICOM instance (or a DICOMDIR, or not a regular file).
    NotDicom,
    /// DICOM, but it cannot be sent as it is: a problem to fix.
    Unusable,
    /// Byte for byte the same instance as another file, which is sent.
    Copy,
}

/// Scans every input; files found twice are scanned once.
pub(crate) fn scan(inputs: &[PathBuf]) -> (Vec<Candidate>, Vec<Skipped>) {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for input in inputs {
        if input.is_dir() {
            walk(input, &mut files, &mut skipped, &mut HashSet::new());
        } else if is_dicomdir(input) {
            match dicomdir_files(input) {
                Ok((found, bad)) => {
                    files.extend(found);
                    skipped.extend(bad.into_iter().map(|why| Skipped {
                        path: input.clone(),
                        reason: format!("DICOMDIR record not followed: {why}"),
                        kind: SkipKind::Unusable,
                    }));
                }
                Err(reason) => skipped.push(Skipped {
                    path: input.clone(),
                    reason: format!("cannot read DICOMDIR: {reason}"),
                    kind: SkipKind::Unusable,
                }),
            }
        } else if std::fs::metadata(input).is_ok_and(|m| !m.is_file()) {
            // A FIFO or a device: opening it could wait forever.
            skipped.push(Skipped {
                path: input.clone(),
                reason: "not a regular file".into(),
                kind: SkipKind::NotDicom,
            });
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
            kind: SkipKind::NotDicom,
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
    let candidates = one_file_per_instance(candidates, &mut skipped);
    (candidates, skipped)
}

/// Files that carry the same SOP Instance UID: identical bytes are sent
/// once (the others are copies); different bytes are all held back, since
/// the center would keep whichever arrived last and the record could not
/// say which one it holds.
fn one_file_per_instance(candidates: Vec<Candidate>, skipped: &mut Vec<Skipped>) -> Vec<Candidate> {
    let mut by_uid: HashMap<String, Vec<Candidate>> = HashMap::new();
    let mut order = Vec::new();
    for c in candidates {
        let group = by_uid.entry(c.sop_instance_uid.clone()).or_default();
        if group.is_empty() {
            order.push(c.sop_instance_uid.clone());
        }
        group.push(c);
    }
    let mut kept = Vec::with_capacity(order.len());
    for uid in order {
        let mut group = by_uid.remove(&uid).unwrap_or_default();
        if group.len() == 1 {
            kept.extend(group);
            continue;
        }
        let unreadable = group
            .iter_mut()
            .find_map(|c| file_sha256(&c.path).map(|h| c.sha256 = h).err());
        if let Some(e) = unreadable {
            skipped.extend(group.iter().map(|c| Skipped {
                path: c.path.clone(),
                reason: format!("cannot read a copy of SOP Instance UID {uid}: {e}"),
                kind: SkipKind::Unusable,
            }));
            continue;
        }
        if group.iter().all(|c| c.sha256 == group[0].sha256) {
            let first = group.remove(0);
            skipped.extend(group.into_iter().map(|c| Skipped {
                reason: format!("the same bytes as {}, which is sent", first.path.display()),
                path: c.path,
                kind: SkipKind::Copy,
            }));
            kept.push(first);
        } else {
            let paths: Vec<String> = group.iter().map(|c| c.path.display().to_string()).collect();
            skipped.extend(group.iter().map(|c| Skipped {
                path: c.path.clone(),
                reason: format!(
                    "SOP Instance UID {uid} is in {} files with different bytes ({}): none is sent; keep the right one",
                    group.len(),
                    paths.join(", ")
                ),
                kind: SkipKind::Unusable,
            }));
        }
    }
    kept
}

fn is_dicomdir(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().eq_ignore_ascii_case("DICOMDIR"))
}

/// Every file under `dir`, following symbolic links; each folder (by
/// device and inode) is read once, so a link back up cannot loop.
fn walk(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    skipped: &mut Vec<Skipped>,
    seen: &mut HashSet<(u64, u64)>,
) {
    use std::os::unix::fs::MetadataExt;
    let unreadable = |path: &Path, e: std::io::Error| Skipped {
        path: path.to_owned(),
        reason: format!("cannot read folder: {e}"),
        kind: SkipKind::Unusable,
    };
    match std::fs::metadata(dir) {
        Ok(m) if !seen.insert((m.dev(), m.ino())) => return,
        Ok(_) => {}
        Err(e) => return skipped.push(unreadable(dir, e)),
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return skipped.push(unreadable(dir, e)),
    };
    for entry in entries {
        // An error part way through a listing (a scratched disc, a failing
        // stick): the folder's other files may be missing, so it is said.
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                skipped.push(unreadable(dir, e));
                continue;
            }
        };
        let path = entry.path();
        // `metadata` follows a symbolic link to what it names.
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => walk(&path, files, skipped, seen),
            Ok(m) if m.is_file() => files.push(path),
            Ok(_) => skipped.push(Skipped {
                path,
                reason: "not a regular file".into(),
                kind: SkipKind::NotDicom,
            }),
            // A link to nothing holds no image: listed, not an error (a
            // technician could not make a re-run succeed otherwise).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => skipped.push(Skipped {
                path,
                reason: "a link to nothing".into(),
                kind: SkipKind::NotDicom,
            }),
            Err(e) => skipped.push(Skipped {
                path,
                reason: format!("cannot follow: {e}"),
                kind: SkipKind::Unusable,
            }),
        }
    }
}

/// Files referenced by a DICOMDIR's directory records, and the records
/// whose Referenced File ID cannot be used (each named, the rest still
/// sent).
fn dicomdir_files(path: &Path) -> Result<(Vec<PathBuf>, Vec<String>), String> {
    use dicom_dictionary_std::tags;
    let obj = dicom_object::open_file(path).map_err(|e| e.to_string())?;
    // "DICOMDIR" given bare: its parent is "", which read_dir cannot list.
    let base = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let records = obj
        .element(tags::DIRECTORY_RECORD_SEQUENCE)
        .map_err(|e| e.to_string())?
        .items()
        .ok_or("Directory Record Sequence is not a sequence")?;
    // Once, not per record: a symbolic link's target is checked against it.
    let folder = base.canonicalize().ok();
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for record in records {
        let Ok(id) = record.element(tags::REFERENCED_FILE_ID) else {
            continue;
        };
        match referenced_file(base, folder.as_deref(), id) {
            Ok(p) => out.push(p),
            Err(why) => bad.push(why),
        }
    }
    Ok((out, bad))
}

/// The file a Referenced File ID names under `base`. PS3.10 allows only
/// uppercase letters, digits and underscores in a component; media often
/// add an extension (`IM0001.DCM`), which is accepted. Nothing that could
/// leave `base` (`..`, a separator, an empty component) is, nor a
/// symbolic link leading outside `folder` (`base` canonicalized).
fn referenced_file(
    base: &Path,
    folder: Option<&Path>,
    id: &dicom_core::DataElement<dicom_object::InMemDicomObject>,
) -> Result<PathBuf, String> {
    let parts = id.to_multi_str().map_err(|e| e.to_string())?;
    let mut p = base.to_path_buf();
    for part in parts.iter() {
        let part = part.trim();
        let usable = !part.is_empty()
            && part.chars().any(|c| c != '.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !usable {
            return Err(format!("invalid Referenced File ID {:?}", parts.join("\\")));
        }
        p = child_any_case(&p, part);
    }
    // A symbolic link on the media (Rock Ridge) may still lead elsewhere:
    // only files inside the DICOMDIR's folder are its instances.
    if let (Ok(file), Some(folder)) = (p.canonicalize(), folder)
        && !file.starts_with(folder)
    {
        return Err(format!(
            "Referenced File ID {:?} leads outside the DICOMDIR's folder (through a symbolic link)",
            parts.join("\\")
        ));
    }
    // A FIFO or a device there: opening it could wait forever.
    if std::fs::metadata(&p).is_ok_and(|m| !m.is_file()) {
        return Err(format!(
            "Referenced File ID {:?} is not a regular file",
            parts.join("\\")
        ));
    }
    Ok(p)
}

/// `dir/name`, or the entry of `dir` whose name differs from `name` only
/// in case: a CD mounted on Linux shows DICOMDIR's "IM0001" as "im0001".
fn child_any_case(dir: &Path, name: &str) -> PathBuf {
    let exact = dir.join(name);
    if exact.exists() {
        return exact;
    }
    std::fs::read_dir(dir)
        .ok()
        .and_then(|entries| {
            entries
                .flatten()
                .find(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(name))
        })
        .map_or(exact, |e| e.path())
}

fn inspect(path: &Path) -> Result<Candidate, Skipped> {
    let skip = |reason: String, kind: SkipKind| Skipped {
        path: path.to_owned(),
        reason,
        kind,
    };
    let mut file = std::fs::File::open(path)
        .map_err(|e| skip(format!("cannot open: {e}"), SkipKind::Unusable))?;
    let size = file
        .metadata()
        .map_err(|e| skip(format!("cannot read: {e}"), SkipKind::Unusable))?
        .len();
    // The File Meta Information: its group length says how long it is
    // (a few hundred bytes, usually), read up to 64 KiB.
    let mut head = Vec::with_capacity(4 * 1024);
    let mut read_up_to = |head: &mut Vec<u8>, len: usize| {
        let more = len.saturating_sub(head.len()) as u64;
        (&mut file).take(more).read_to_end(head)
    };
    read_up_to(&mut head, 4 * 1024)
        .and_then(|_| match head.get(140..144) {
            Some(group_len) if head.len() == 4 * 1024 => {
                let group_len = u32::from_le_bytes(group_len.try_into().expect("4 bytes"));
                let end = (group_len as usize).saturating_add(144).min(64 * 1024);
                read_up_to(&mut head, end)
            }
            _ => Ok(0),
        })
        .map_err(|e| skip(format!("cannot read: {e}"), SkipKind::Unusable))?;
    let Some((transfer_syntax, offset)) = storage::part10::parse_file_header(&head) else {
        // "DICM" after the preamble: a DICOM file whose header is damaged
        // (cut short, or not what its group length says), not some other file.
        return Err(if head.get(128..132) == Some(b"DICM".as_slice()) {
            skip(
                "unusable DICOM file: its File Meta Information is truncated or malformed".into(),
                SkipKind::Unusable,
            )
        } else {
            skip("not a DICOM Part 10 file".into(), SkipKind::NotDicom)
        });
    };
    let attrs = storage::attrs::read_file(path, offset as u64, &transfer_syntax, MAX_INFLATED)
        .map_err(|e| skip(format!("unusable DICOM file: {e}"), SkipKind::Unusable))?;
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
    storage::blobs::file_sha256(path).map(|(sha256, _)| sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `file` with (0002,0102) Private Information of `extra` bytes added
    /// to its File Meta Information, the group length raised to match.
    fn with_long_header(file: &[u8], extra: usize) -> Vec<u8> {
        let (_, offset) = storage::part10::parse_file_header(file).expect("a Part 10 file");
        let mut out = file[..offset].to_vec();
        out.extend_from_slice(&[0x02, 0x00, 0x02, 0x01, b'O', b'B', 0, 0]);
        out.extend_from_slice(&(extra as u32).to_le_bytes());
        out.extend(std::iter::repeat_n(0x55, extra));
        let group_len = u32::from_le_bytes(out[140..144].try_into().unwrap()) + 12 + extra as u32;
        out[140..144].copy_from_slice(&group_len.to_le_bytes());
        out.extend_from_slice(&file[offset..]);
        out
    }

    #[test]
    fn file_meta_information_longer_than_the_first_read_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let samples = dir.path().join("samples");
        let options = sample_dicom::Options::small(41);
        let sample = sample_dicom::generate(&samples, &options)
            .unwrap()
            .remove(0);
        let original = std::fs::read(&sample.path).unwrap();
        let (_, offset) = storage::part10::parse_file_header(&original).unwrap();
        for extra in [100, 5_000, 20_000] {
            let path = dir.path().join(format!("long-{extra}.dcm"));
            std::fs::write(&path, with_long_header(&original, extra)).unwrap();
            let c = inspect(&path).unwrap_or_else(|s| panic!("{extra}: {}", s.reason));
            assert_eq!(c.sop_instance_uid, sample.sop_instance_uid);
            assert_eq!(c.transfer_syntax, sample.transfer_syntax);
            assert_eq!(c.dataset_offset as usize, offset + 12 + extra);
        }
        // Beyond 64 KiB a header is not believed (nor read).
        let path = dir.path().join("too-long.dcm");
        std::fs::write(&path, with_long_header(&original, 70_000)).unwrap();
        let skipped = inspect(&path).expect_err("a 70 KB header");
        assert_eq!(skipped.kind, SkipKind::Unusable, "{}", skipped.reason);
        assert!(
            skipped.reason.contains("File Meta Information"),
            "{}",
            skipped.reason
        );
    }
}
