//! Storage commitment requests from pynetdicom (`tests/py/commit_scu.py`).

use std::process::Command;

/// Asks for commitment of `refs` (SOP class, SOP instance) as `calling` and
/// returns the report pynetdicom received.
pub fn commit_scu(port: u16, calling: &str, refs: &[(&str, &str)]) -> serde_like::Report {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/commit_scu.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .arg(calling)
        .args(refs.iter().map(|(c, i)| format!("{c}:{i}")))
        .output()
        .expect("run python3 (pynetdicom is installed by scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "commit_scu.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_like::parse(&String::from_utf8_lossy(&out.stdout))
}

/// The tiny JSON the script prints, parsed without a JSON dependency.
pub mod serde_like {
    #![allow(unreachable_pub)]
    #[derive(Debug)]
    pub struct Report {
        pub action_status: i64,
        pub event_type: i64,
        pub transaction_uid_matches: bool,
        pub committed: Vec<String>,
        pub failed: Vec<(String, u16)>,
    }

    impl Report {
        pub fn failed_reason(&self, uid: &str) -> Option<u16> {
            self.failed.iter().find(|(u, _)| u == uid).map(|(_, r)| *r)
        }
    }

    fn field<'a>(json: &'a str, name: &str) -> &'a str {
        let key = format!("\"{name}\": ");
        let start = json
            .find(&key)
            .unwrap_or_else(|| panic!("{name} missing in {json}"))
            + key.len();
        let rest = &json[start..];
        let end = match rest.as_bytes()[0] {
            b'[' => rest.find(']').unwrap() + 1,
            b'{' => rest.find('}').unwrap() + 1,
            _ => rest.find([',', '}']).unwrap(),
        };
        &rest[..end]
    }

    fn strings(list: &str) -> Vec<String> {
        list.trim_matches(['[', ']'])
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    pub fn parse(json: &str) -> Report {
        let failed = field(json, "failed")
            .trim_matches(['{', '}'])
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once(':').unwrap();
                (
                    k.trim().trim_matches('"').to_string(),
                    v.trim().parse().unwrap(),
                )
            })
            .collect();
        Report {
            action_status: field(json, "action_status").parse().unwrap(),
            event_type: field(json, "event_type").parse().unwrap(),
            transaction_uid_matches: json.contains("\"transaction_uid_matches\": true"),
            committed: strings(field(json, "committed")),
            failed,
        }
    }
}
