//! Seeded generator of realistic, fully synthetic DICOM Part 10 files for
//! tests, demos and benchmarks of the consortium imaging center.
//!
//! Every person is invented: names are drawn from syllable lists, resident
//! ID numbers use unassigned region codes (but a valid check character),
//! and all UIDs are `2.25.<uuid>` derived from the seed. The same seed and
//! profile always give byte-identical files on a given build (study dates
//! fall between 2022-01-01 and 2025-12-31, never read from the clock).
//!
//! # Profiles
//! - [`Profile::Small`]: 12 files, every object kind and transfer syntax once
//!   (CT with 3 slices), about 6 MB. For tests.
//! - [`Profile::Demo`]: three clinics (`xinzhen`, `baishui`, `county`), a few
//!   studies each, 190 files, about 75 MB; every kind and syntax, and
//!   patients seen at two clinics (same resident ID, different local IDs).
//! - [`Profile::Bench`]: about 2,500 instances, about 850 MB; mostly CT and
//!   MR, some US, CR and DX, all explicit VR little endian.
//!
//! # Object kinds
//! CT, MR, DX (for presentation, MONOCHROME2), CR (MONOCHROME1),
//! ultrasound multi-frame RGB, 12-lead ECG waveform, Encapsulated PDF, and
//! (via [`write_large_instance`]) a multi-frame grayscale word secondary
//! capture of any size.
//!
//! # Transfer syntaxes
//! Implicit VR LE, explicit VR LE, explicit VR BE, deflated explicit VR LE,
//! RLE Lossless (own encoder, PS3.5 Annex G) and JPEG Baseline.
//!
//! # Modules
//! - `rng`: SplitMix64 and UID generation.
//! - `people`: invented names, dates, resident IDs.
//! - `model`: clinics, devices (AE titles), patients, studies, series.
//! - `pixels`, `ecg`, `pdf`: synthetic content.
//! - `rle`: the RLE Lossless encoder.
//! - `ds`: data set helpers and the Part 10 writer.
//! - `iod`: one builder per object kind.
//! - `generate`: the profiles.
//! - `large`: the streamed large instance.

use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

mod ds;
mod ecg;
mod generate;
mod iod;
mod large;
mod model;
mod pdf;
mod people;
mod pixels;
mod rle;
mod rng;

/// Issuer of Patient ID used for resident ID numbers in Other Patient IDs
/// Sequence (0010,1002) items.
pub const RESIDENT_ID_ISSUER: &str = iod::RESIDENT_ID_ISSUER;

/// What to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Seed of every random choice; same seed, same bytes.
    pub seed: u64,
    pub profile: Profile,
}

impl Options {
    /// The demo profile with the given seed.
    pub fn demo(seed: u64) -> Options {
        Options {
            seed,
            profile: Profile::Demo,
        }
    }

    /// The small (test) profile with the given seed.
    pub fn small(seed: u64) -> Options {
        Options {
            seed,
            profile: Profile::Small,
        }
    }

    /// The bench profile with the given seed.
    pub fn bench(seed: u64) -> Options {
        Options {
            seed,
            profile: Profile::Bench,
        }
    }
}

/// Size and mix of the generated set (see the crate docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Demo,
    Bench,
    Small,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Demo => "demo",
            Profile::Bench => "bench",
            Profile::Small => "small",
        }
    }
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Profile, String> {
        match s {
            "demo" => Ok(Profile::Demo),
            "bench" => Ok(Profile::Bench),
            "small" => Ok(Profile::Small),
            other => Err(format!(
                "unknown profile `{other}` (expected demo, bench or small)"
            )),
        }
    }
}

/// One written file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampleFile {
    pub path: PathBuf,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub study_instance_uid: String,
    /// Transfer Syntax UID of the file.
    pub transfer_syntax: String,
    pub modality: String,
    /// AE title of the device that would send this file.
    pub clinic_ae: String,
    /// File size in bytes.
    pub size: u64,
    /// The clinic's local Patient ID (0010,0020).
    pub patient_id: String,
    /// Issuer of Patient ID (0010,0021): the clinic id.
    pub issuer_of_patient_id: String,
    /// The resident ID number in Other Patient IDs Sequence, issued by
    /// [`RESIDENT_ID_ISSUER`]; the same person has the same resident ID at
    /// every clinic.
    pub resident_id: String,
}

/// Generate the profile's files under `out_dir`, in
/// `<clinic>/study-NNNN/<MODALITY>-NNNN.dcm`.
pub fn generate(out_dir: &Path, options: &Options) -> io::Result<Vec<SampleFile>> {
    generate::run(out_dir, options)
}

/// Writes one large multi-frame instance of at least `min_bytes` (e.g. 512 MiB) streaming the pixel data in chunks (never holding it all in memory); explicit VR little endian; must still be a valid object.
///
/// The object is a Multi-frame Grayscale Word Secondary Capture image of
/// 512 x 512 frames (512 KiB each). `min_bytes` may be at most about 4 GiB
/// (the Pixel Data length is a 32-bit field); larger values are an
/// `InvalidInput` error.
pub fn write_large_instance(path: &Path, min_bytes: u64, seed: u64) -> io::Result<SampleFile> {
    large::write(path, min_bytes, seed)
}
