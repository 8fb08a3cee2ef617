//! Storage commitment (push model) with pynetdicom as the SCU: committed
//! means indexed and re-verified against SHA-256; missing, foreign-clinic
//! and damaged instances are reported failed with a reason.

mod common;

use std::process::Command;

use common::commit::{commit_scu, serde_like};
use common::scu::{self, CT_IMAGE_STORAGE, Reply};
use common::{Gateway, GatewaySpec};

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
    // A request naming nothing is refused: its report would have no
    // Referenced SOP Sequence, which PS3.4 J.3.3 requires.
    // Invalid argument value: the request was read, and names nothing.
    let nothing = commit_scu(gw.port, "XINZHEN_CT", &[]);
    assert_eq!(nothing.action_status, 0x0115);

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
            ("XINZHEN_CT", "refused: empty Referenced SOP Sequence"),
            ("XINZHEN_CT", "committed 1, failed 3"),
            ("BAISHUI_DR", "committed 0, failed 1"),
            ("COUNTYWS1", "committed 1, failed 0"),
        ]
    );
    assert!(rows[2].1.ends_with("; 4 instances"), "{}", rows[2].1);
    // Every report was acknowledged: none is owed any more.
    eventually(10, "reports still owed", || owed(&gw) == 0);
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

/// A raw N-ACTION-RQ (Request Storage Commitment) with message ID `id`,
/// and its dataset in explicit VR LE: transaction `txn`, CT `instances`.
fn n_action(id: u16, txn: &str, instances: &[&str]) -> (Vec<u8>, Vec<u8>) {
    use common::scu::el;
    let command = scu::command(&[
        (0x0003, scu::uid_value(COMMITMENT)),
        (0x0100, 0x0130u16.to_le_bytes().to_vec()),
        (0x0110, id.to_le_bytes().to_vec()),
        (0x0800, 0x0000u16.to_le_bytes().to_vec()),
        (0x1001, scu::uid_value("1.2.840.10008.1.20.1.1")),
        (0x1008, 1u16.to_le_bytes().to_vec()),
    ]);
    let mut request = el(0x0008_1195, b"UI", txn.as_bytes());
    // Referenced SOP Sequence, undefined lengths.
    request.extend_from_slice(&[0x08, 0x00, 0x99, 0x11, b'S', b'Q', 0, 0]);
    request.extend_from_slice(&u32::MAX.to_le_bytes());
    for uid in instances {
        let item = [
            el(0x0008_1150, b"UI", CT_IMAGE_STORAGE.as_bytes()),
            el(0x0008_1155, b"UI", uid.as_bytes()),
        ]
        .concat();
        request.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        request.extend_from_slice(&(item.len() as u32).to_le_bytes());
        request.extend_from_slice(&item);
    }
    request.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
    (command, request)
}

const COMMITMENT: &str = "1.2.840.10008.1.20.1";

/// pynetdicom listening for one commitment report as `COUNTYWS1` on a port
/// of its choosing (`tests/py/commit_report_listener.py`); the process and
/// the port. `extra`: the script's options.
fn report_listener(timeout_s: u32, extra: &[&str]) -> (std::process::Child, u16) {
    use std::io::BufRead;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/py/commit_report_listener.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .args(["0", "COUNTYWS1", &timeout_s.to_string()])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("listener said {line:?}"))
        .parse()
        .unwrap();
    (child, port)
}

/// Storage commitment reports the gateway's ledger still owes.
fn owed(gw: &Gateway) -> i64 {
    gw.index()
        .query_row("SELECT count(*) FROM owed_reports", [], |r| r.get(0))
        .unwrap()
}

/// Waits up to `secs` for `done`; panics with `what` otherwise.
fn eventually(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// As `COUNTYWS1`: stores `uids` (a CT study), asks for their commitment
/// (transaction `txn`), reads the N-ACTION-RSP success and leaves at once
/// (A-ABORT), before any report can come on that association.
fn ask_and_leave(gw: &Gateway, uids: &[&str], txn: &str) {
    let contexts: &[(u8, &str, &[&str])] = &[
        (1, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE]),
        (3, COMMITMENT, &[scu::EXPLICIT_LE]),
    ];
    let scu::Association::Accepted(mut a) =
        scu::associate(gw.port, "COUNTYWS1", common::AE, contexts)
    else {
        panic!("association refused")
    };
    for uid in uids {
        let ds = scu::ct_dataset(uid, "2.25.73", 1024);
        assert_eq!(a.store(1, CT_IMAGE_STORAGE, uid, &ds), Reply::Status(0));
    }
    let (command, request) = n_action(7, txn, uids);
    a.send_message(3, true, &command);
    a.send_message(3, false, &request);
    let (rsp, _) = read_message(&mut a.stream);
    assert_eq!(element_u16(&rsp, 0x0900), Some(0), "N-ACTION-RSP success");
    let abort = scu::encode(&dicom_ul::pdu::Pdu::AbortRQ {
        source: dicom_ul::pdu::AbortRQSource::ServiceUser,
    });
    std::io::Write::write_all(&mut a.stream, &abort).unwrap();
}

/// A gateway whose `COUNTYWS1` destination is `port`.
fn with_destination(dir: &std::path::Path, port: u16) -> Gateway {
    let spec = GatewaySpec {
        clinics: format!(
            "{}\n[[destinations]]\nae_title = \"COUNTYWS1\"\nhost = \"127.0.0.1\"\nport = {port}\n",
            GatewaySpec::default().clinics
        ),
        ..Default::default()
    };
    Gateway::start(dir, &spec)
}

/// The report owed to a requester that left is in storage's ledger, not
/// only in memory: the gateway killed while the requester cannot be
/// reached delivers it after its restart, and then forgets it.
#[test]
fn an_owed_report_survives_a_gateway_restart() {
    let dir = tempfile::tempdir().unwrap();
    // Nobody listens at the requester's address at first (a port just
    // freed); the restarted gateway is told the listener's.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut gw = with_destination(dir.path(), closed);
    let uids = ["2.25.7301", "2.25.7302"];
    ask_and_leave(&gw, &uids, "2.25.7399");
    eventually(20, "no delivery attempt", || {
        gw.log().contains("commitment report delivery failed")
    });
    assert_eq!(owed(&gw), 1);

    gw.sigkill_in_place();
    // The requester is back before the gateway: the restarted gateway's
    // first attempt delivers.
    let (listener, port) = report_listener(30, &[]);
    let config = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        config.replace(&format!("port = {closed}"), &format!("port = {port}")),
    )
    .unwrap();
    let gw = gw.restart();
    let out = listener.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_like::parse(&stdout);
    assert_eq!(report.event_type, 1, "{stdout}\n{}", gw.log());
    assert_eq!(report.committed, uids);
    assert!(
        stdout.contains("\"transaction_uid\": \"2.25.7399\""),
        "{stdout}"
    );
    // The late report is audited like the request, before it goes out.
    let audited = || -> Option<String> {
        rusqlite::OptionalExtension::optional(gw.index().query_row(
            "SELECT outcome FROM audit WHERE action = 'N-EVENT-REPORT' AND detail LIKE '%2.25.7399%'",
            [],
            |r| r.get(0),
        ))
        .unwrap()
    };
    eventually(10, "no audit row", || audited().is_some());
    let outcome = audited().unwrap();
    assert!(outcome.contains("committed 2, failed 0"), "{outcome}");
    // Delivered: forgotten by the ledger.
    eventually(10, "still owed after delivery", || owed(&gw) == 0);
}

/// A requester that accepts the commitment context on the new association
/// but not the center's SCP role on it gets no N-EVENT-REPORT there (PS3.7
/// D.3.3.4: we would be its SCU); the report stays owed, to be tried
/// again within the day (hourly: the refusal is the requester's settings).
#[test]
fn no_report_where_our_scp_role_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (listener, port) = report_listener(6, &["--refuse-scp-role"]);
    let gw = with_destination(dir.path(), port);
    ask_and_leave(&gw, &["2.25.7401"], "2.25.7499");
    let out = listener.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(serde_like::parse(&stdout).event_type, -1, "{stdout}");
    eventually(10, "the refusal logged", || {
        gw.log().contains("or our SCP role on it") && gw.log().contains("tried again in an hour")
    });
    assert_eq!(owed(&gw), 1, "kept for another attempt");
}

/// One DIMSE message from the gateway: its command set, and whether a
/// dataset followed.
fn read_message(stream: &mut std::net::TcpStream) -> (Vec<u8>, bool) {
    let (mut command, mut has_dataset, mut in_dataset) = (Vec::new(), false, false);
    loop {
        let Some(scu::RawPdu::PData(pdvs)) = scu::read_any(stream) else {
            panic!("expected P-DATA-TF (the gateway aborted or closed)")
        };
        for (_, is_command, is_last, data) in pdvs {
            if is_command {
                command.extend_from_slice(&data);
                if is_last {
                    // (0000,0800) Command Data Set Type: 0x0101 means none.
                    has_dataset = element_u16(&command, 0x0800) != Some(0x0101);
                    if !has_dataset {
                        return (command, false);
                    }
                    in_dataset = true;
                }
            } else if in_dataset && is_last {
                return (command, has_dataset);
            }
        }
    }
}

/// The US value of command element (0000,`element`).
fn element_u16(command: &[u8], element: u16) -> Option<u16> {
    let mut rest = command;
    while rest.len() >= 8 {
        let e = u16::from_le_bytes([rest[2], rest[3]]);
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        if e == element && len == 2 {
            return Some(u16::from_le_bytes([rest[8], rest[9]]));
        }
        rest = &rest[8 + len..];
    }
    None
}

/// The requestor answers the commitment report while its next operation
/// (a C-FIND it had queued behind the N-ACTION) is being answered: PS3.7
/// lets a response to the gateway's request arrive at any time. It is
/// taken as the report's acknowledgement and the C-FIND goes on (it used
/// to abort the association, and the report was sent again later).
#[test]
fn a_report_answered_during_the_next_query_is_acknowledged() {
    report_answered_during_a_query(false);
}

/// The same with an Event Reply after the answer (PS3.7 10.1.1.1): it is
/// dropped while the matches stream.
#[test]
fn a_report_answered_with_an_event_reply_during_a_query_is_acknowledged() {
    report_answered_during_a_query(true);
}

fn report_answered_during_a_query(with_reply: bool) {
    use common::scu::el;
    const FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let contexts: &[(u8, &str, &[&str])] = &[
        (1, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE]),
        (3, COMMITMENT, &[scu::EXPLICIT_LE]),
        (5, FIND, &[scu::EXPLICIT_LE]),
        (7, "1.2.840.10008.1.1", &[scu::EXPLICIT_LE]),
    ];
    let scu::Association::Accepted(mut a) =
        scu::associate(gw.port, "XINZHEN_CT", common::AE, contexts)
    else {
        panic!("association refused")
    };
    let uids: Vec<String> = (0..200).map(|i| format!("2.25.81{i:03}")).collect();
    for uid in &uids {
        let ds = scu::ct_dataset(uid, "2.25.81", 64);
        assert_eq!(a.store(1, CT_IMAGE_STORAGE, uid, &ds), Reply::Status(0));
    }
    // N-ACTION for one instance.
    let (n_action, request) = n_action(900, "2.25.8199", &[&uids[0]]);
    a.send_message(3, true, &n_action);
    a.send_message(3, false, &request);
    let (rsp, _) = read_message(&mut a.stream);
    assert_eq!(element_u16(&rsp, 0x0100), Some(0x8130), "N-ACTION-RSP");
    assert_eq!(element_u16(&rsp, 0x0900), Some(0));
    // The C-FIND goes out at once, before the report is read.
    let identifier = [
        el(0x0008_0018, b"UI", b""),
        el(0x0008_0052, b"CS", b"IMAGE"),
    ]
    .concat();
    a.send_message(5, true, &scu::query_rq(FIND, 0x0020, 901));
    a.send_message(5, false, &identifier);
    // The report comes first; its answer goes behind the C-FIND.
    let (report, has_dataset) = read_message(&mut a.stream);
    assert_eq!(
        element_u16(&report, 0x0100),
        Some(0x0100),
        "N-EVENT-REPORT-RQ"
    );
    assert!(has_dataset);
    let report_id = element_u16(&report, 0x0110).unwrap();
    a.send_message(3, true, &report_answer(report_id, with_reply));
    if with_reply {
        let reply = el(0x0008_1195, b"UI", b"2.25.8199\0");
        a.send_raw(&scu::pdata(3, false, false, &reply[..6]))
            .unwrap();
        a.send_raw(&scu::pdata(3, false, true, &reply[6..]))
            .unwrap();
    }
    // Every match, then success: the association was not aborted.
    let mut matches = 0;
    loop {
        let (rsp, _) = read_message(&mut a.stream);
        match element_u16(&rsp, 0x0900) {
            Some(0xFF00) => matches += 1,
            Some(0) => break,
            other => panic!("C-FIND status {other:?}"),
        }
    }
    assert_eq!(matches, uids.len());
    assert_eq!(a.echo(7), Reply::Status(0));
    assert!(a.release());
    assert!(gw.log().contains("storage commitment report acknowledged"));
    eventually(10, "the report settled", || owed(&gw) == 0);
}

/// An N-EVENT-REPORT-RSP may carry an Event Reply (PS3.7 10.1.1.1): it
/// settles the report, its dataset is dropped, and the association goes on.
#[test]
fn a_report_answered_with_an_event_reply_is_acknowledged() {
    use common::scu::el;
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    let contexts: &[(u8, &str, &[&str])] = &[
        (1, CT_IMAGE_STORAGE, &[scu::EXPLICIT_LE]),
        (3, COMMITMENT, &[scu::EXPLICIT_LE]),
        (5, "1.2.840.10008.1.1", &[scu::EXPLICIT_LE]),
    ];
    let scu::Association::Accepted(mut a) =
        scu::associate(gw.port, "XINZHEN_CT", common::AE, contexts)
    else {
        panic!("association refused")
    };
    let ds = scu::ct_dataset("2.25.8301", "2.25.83", 64);
    assert_eq!(
        a.store(1, CT_IMAGE_STORAGE, "2.25.8301", &ds),
        Reply::Status(0)
    );
    let (n_action, request) = n_action(910, "2.25.8399", &["2.25.8301"]);
    a.send_message(3, true, &n_action);
    a.send_message(3, false, &request);
    let (rsp, _) = read_message(&mut a.stream);
    assert_eq!(element_u16(&rsp, 0x0900), Some(0), "N-ACTION-RSP");
    let (report, _) = read_message(&mut a.stream);
    assert_eq!(element_u16(&report, 0x0100), Some(0x0100));
    assert_eq!(owed(&gw), 1);
    let report_id = element_u16(&report, 0x0110).unwrap();
    a.send_message(3, true, &report_answer(report_id, true));
    // The Event Reply, in two fragments.
    let reply = el(0x0008_1195, b"UI", b"2.25.8399\0");
    a.send_raw(&scu::pdata(3, false, false, &reply[..6]))
        .unwrap();
    a.send_raw(&scu::pdata(3, false, true, &reply[6..]))
        .unwrap();
    assert_eq!(a.echo(5), Reply::Status(0));
    assert!(a.release());
    assert!(gw.log().contains("storage commitment report acknowledged"));
    // Acknowledged, so not owed any more (nor sent again elsewhere).
    eventually(10, "the report settled", || owed(&gw) == 0);
}

/// A successful N-EVENT-REPORT-RSP to the report `report_id`, announcing an
/// Event Reply dataset when `with_reply`.
fn report_answer(report_id: u16, with_reply: bool) -> Vec<u8> {
    let data_set_type: u16 = if with_reply { 0x0000 } else { 0x0101 };
    scu::command(&[
        (0x0002, scu::uid_value(COMMITMENT)),
        (0x0100, 0x8100u16.to_le_bytes().to_vec()),
        (0x0120, report_id.to_le_bytes().to_vec()),
        (0x0800, data_set_type.to_le_bytes().to_vec()),
        (0x0900, 0u16.to_le_bytes().to_vec()),
        (0x1000, scu::uid_value("1.2.840.10008.1.20.1.1")),
        (0x1002, 1u16.to_le_bytes().to_vec()),
    ])
}
