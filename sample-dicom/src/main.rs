//! `sample-dicom --out DIR [--seed N] [--profile demo|bench|small] [--large-mib N]`
//!
//! Writes synthetic DICOM files into DIR (one folder per clinic and study)
//! and prints a one-line summary.

use std::path::PathBuf;
use std::process::ExitCode;

use sample_dicom::{Options, Profile, generate, write_large_instance};

const USAGE: &str = "usage: sample-dicom --out DIR [--seed N] [--profile demo|bench|small] \
                     [--large-mib N]\n\
                     \n  --out DIR        output folder (created if missing)\
                     \n  --seed N         seed of every random choice (default 1)\
                     \n  --profile P      demo (default), bench or small\
                     \n  --large-mib N    also write DIR/large/large-N-MiB.dcm, one multi-frame\
                     \n                   instance of at least N MiB, streamed";

struct Args {
    out: PathBuf,
    options: Options,
    large_mib: Option<u64>,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut out = None;
    let mut seed = 1u64;
    let mut profile = Profile::Demo;
    let mut large_mib = None;
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--seed" => {
                seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?;
            }
            "--profile" => profile = value("--profile")?.parse()?,
            "--large-mib" => {
                large_mib = Some(
                    value("--large-mib")?
                        .parse()
                        .map_err(|e| format!("--large-mib: {e}"))?,
                );
            }
            other => return Err(format!("unexpected argument `{other}`")),
        }
    }
    let out = out.ok_or("--out DIR is required")?;
    Ok(Some(Args {
        out,
        options: Options { seed, profile },
        large_mib,
    }))
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("sample-dicom: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut files = match generate(&args.out, &args.options) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("sample-dicom: writing into {}: {e}", args.out.display());
            return ExitCode::FAILURE;
        }
    };
    if let Some(mib) = args.large_mib {
        let dir = args.out.join("large");
        let path = dir.join(format!("large-{mib}-MiB.dcm"));
        let res = std::fs::create_dir_all(&dir)
            .and_then(|_| write_large_instance(&path, mib << 20, args.options.seed));
        match res {
            Ok(f) => files.push(f),
            Err(e) => {
                eprintln!("sample-dicom: writing {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    println!(
        "sample-dicom: wrote {} files, {} bytes ({:.1} MB) to {} (profile {}, seed {})",
        files.len(),
        bytes,
        bytes as f64 / 1e6,
        args.out.display(),
        args.options.profile.name(),
        args.options.seed
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> impl Iterator<Item = String> {
        s.split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn parses_all_flags() {
        let a = parse(args("--out d --seed 9 --profile small --large-mib 4"))
            .unwrap()
            .unwrap();
        assert_eq!(a.out, PathBuf::from("d"));
        assert_eq!(a.options, Options::small(9));
        assert_eq!(a.large_mib, Some(4));
        let a = parse(args("--out d")).unwrap().unwrap();
        assert_eq!(a.options, Options::demo(1));
        assert!(parse(args("--help")).unwrap().is_none());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse(args("")).is_err());
        assert!(parse(args("--out")).is_err());
        assert!(parse(args("--out d --profile huge")).is_err());
        assert!(parse(args("--out d --seed x")).is_err());
        assert!(parse(args("--out d extra")).is_err());
    }
}
