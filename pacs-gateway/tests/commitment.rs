//! Storage commitment (push model) with pynetdicom as the SCU: committed
//! means indexed and re-verified against SHA-256; missing, foreign-clinic
//! and damaged instances are reported failed with a reason.

mod common;

use std::process::Command;

use common::scu::{self, CT_IMAGE_STORAGE, Reply};
use common::{Gateway, GatewaySpec};

fn commit_scu(port: u16, calling: &str, refs: &[(&str, &str)]) -> serde_like::Report {
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

#[test]
fn pynetdicom_commitment_reports_committed_and_failed_instances() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let mut sender = scu::associate_ct(gw.port);
    for uid in ["2.25.7001", "2.25.7002", "2.25.7003"] {
        let ds = scu::ct_dataset(uid, "2.25.70", 4096);
        assert_eq!(
            sender.store(1, CT_IMAGE_STORAGE, uid, &ds),
            Reply::Status(0)
        );
    }
    assert!(sender.release());

    // All stored: event type 1.
    let all = commit_scu(
        gw.port,
        "XINZHEN_CT",
        &[
            (CT_IMAGE_STORAGE, "2.25.7001"),
            (CT_IMAGE_STORAGE, "2.25.7002"),
        ],
    );
    assert_eq!(all.action_status, 0);
    assert_eq!(all.event_type, 1);
    assert!(all.transaction_uid_matches);
    assert_eq!(all.committed, vec!["2.25.7001", "2.25.7002"]);

    // Damage one blob on disk: re-verification must catch it.
    let (blob, _) = gw.blob_of("2.25.7003").unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(&blob, bytes).unwrap();

    let mixed = commit_scu(
        gw.port,
        "XINZHEN_CT",
        &[
            (CT_IMAGE_STORAGE, "2.25.7001"),
            (CT_IMAGE_STORAGE, "2.25.7003"),
            (CT_IMAGE_STORAGE, "2.25.7999"),
            ("1.2.840.10008.5.1.4.1.1.4", "2.25.7002"),
        ],
    );
    assert_eq!(mixed.event_type, 2);
    assert_eq!(mixed.committed, vec!["2.25.7001"]);
    assert_eq!(mixed.failed_reason("2.25.7003"), Some(0x0110), "damaged");
    assert_eq!(mixed.failed_reason("2.25.7999"), Some(0x0112), "never sent");
    assert_eq!(
        mixed.failed_reason("2.25.7002"),
        Some(0x0119),
        "wrong SOP class"
    );

    // Another township clinic cannot confirm xinzhen's instances.
    let foreign = commit_scu(gw.port, "BAISHUI_DR", &[(CT_IMAGE_STORAGE, "2.25.7001")]);
    assert_eq!(foreign.failed_reason("2.25.7001"), Some(0x0112));
    // The county's reading station sees every clinic.
    let county = commit_scu(gw.port, "COUNTYWS1", &[(CT_IMAGE_STORAGE, "2.25.7001")]);
    assert_eq!(county.committed, vec!["2.25.7001"]);
    assert!(gw.log().contains("storage commitment report acknowledged"));

    // Each request is in the audit trail: who asked, about how many, and
    // what the center confirmed.
    let rows: Vec<(String, String, String)> = {
        let index = gw.index();
        let mut stmt = index
            .prepare("SELECT calling_ae, detail, outcome FROM audit WHERE action = 'N-ACTION' ORDER BY pk")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let summary: Vec<(&str, &str)> = rows
        .iter()
        .map(|(ae, _, outcome)| (ae.as_str(), outcome.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("XINZHEN_CT", "committed 2, failed 0"),
            ("XINZHEN_CT", "committed 1, failed 3"),
            ("BAISHUI_DR", "committed 0, failed 1"),
            ("COUNTYWS1", "committed 1, failed 0"),
        ]
    );
    assert!(rows[1].1.ends_with("; 4 instances"), "{}", rows[1].1);
}

#[test]
fn report_goes_to_a_new_association_when_the_requester_left() {
    let dir = tempfile::tempdir().unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = GatewaySpec {
        clinics: format!(
            "{}\n[[destinations]]\nae_title = \"COUNTYWS1\"\nhost = \"127.0.0.1\"\nport = {listen}\n",
            GatewaySpec::default().clinics
        ),
        ..Default::default()
    };
    let gw = Gateway::start(dir.path(), &spec);
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE])];
    let scu::Association::Accepted(mut sender) =
        scu::associate(gw.port, "COUNTYWS1", common::AE, contexts)
    else {
        panic!()
    };
    let ds = scu::ct_dataset("2.25.7101", "2.25.71", 1024);
    assert_eq!(
        sender.store(1, CT_IMAGE_STORAGE, "2.25.7101", &ds),
        Reply::Status(0)
    );
    assert!(sender.release());

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/py/commit_scu_release.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(gw.port.to_string())
        .arg("COUNTYWS1")
        .arg(listen.to_string())
        .arg(format!("{CT_IMAGE_STORAGE}:2.25.7101"))
        .arg(format!("{CT_IMAGE_STORAGE}:2.25.7102"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_like::parse(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report.event_type, 2, "{report:?}\n{}", gw.log());
    assert_eq!(report.committed, vec!["2.25.7101"]);
    assert_eq!(report.failed_reason("2.25.7102"), Some(0x0112));
    assert!(
        gw.log()
            .contains("storage commitment report delivered on a new association")
    );
}

/// The tiny JSON the script prints, parsed without a JSON dependency.
mod serde_like {
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
