//! Bad input never takes the gateway down and never leaves anything indexed:
//! each fault gets its DIMSE status or an A-ABORT, and the next association
//! is served normally.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::scu::{self, Association, CT_IMAGE_STORAGE, EXPLICIT_LE, MR_IMAGE_STORAGE, Reply};
use common::{Gateway, GatewaySpec};

/// After a fault: the gateway answers, stores a good instance, and holds
/// nothing from the fault (no index row, no spool file).
fn assert_healthy_and_clean(gw: &Gateway, expected_instances: i64) {
    gw.assert_serving();
    // Give an aborted association's task a moment to clean its spool.
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.spool_files() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(gw.spool_files(), 0, "partial spool file left behind");
    assert_eq!(
        gw.instance_count(),
        expected_instances,
        "fault left an index row"
    );
    let mut scu = scu::associate_ct(gw.port);
    let uid = format!("2.25.{}", 9_000_000 + expected_instances);
    let ds = scu::ct_dataset(&uid, "2.25.77", 2048);
    assert_eq!(
        scu.store(1, CT_IMAGE_STORAGE, &uid, &ds),
        Reply::Status(0x0000)
    );
    assert!(scu.release());
    assert_eq!(gw.instance_count(), expected_instances + 1);
}

fn start() -> (tempfile::TempDir, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path(), &GatewaySpec::default());
    (dir, gw)
}

#[test]
fn dataset_uids_that_differ_from_the_command_get_a900() {
    let (_dir, gw) = start();
    let mut scu = scu::associate_ct(gw.port);
    // SOP Instance UID differs.
    let ds = scu::ct_dataset("2.25.100", "2.25.1", 512);
    assert_eq!(
        scu.store(1, CT_IMAGE_STORAGE, "2.25.101", &ds),
        Reply::Status(0xA900)
    );
    // SOP Class UID differs (MR context and command, CT dataset).
    assert_eq!(
        scu.store(3, MR_IMAGE_STORAGE, "2.25.100", &ds),
        Reply::Status(0xA900)
    );
    // The association stays usable after a failed C-STORE.
    assert_eq!(
        scu.store(1, CT_IMAGE_STORAGE, "2.25.100", &ds),
        Reply::Status(0x0000)
    );
    assert!(scu.release());
    assert_healthy_and_clean(&gw, 1);
}

#[test]
fn command_sop_class_that_differs_from_its_context_is_refused() {
    let (_dir, gw) = start();
    let mut scu = scu::associate_ct(gw.port);
    let ds = scu::ct_dataset("2.25.200", "2.25.1", 512);
    // CT command on the MR context.
    let id = scu.next_id();
    scu.send_message(3, true, &scu::store_rq(id, CT_IMAGE_STORAGE, "2.25.200"));
    scu.send_message(3, false, &ds);
    assert_eq!(scu.reply(), Reply::Status(0x0122));
    // A query on a storage context: that SOP class offers no C-FIND.
    let id = scu.next_id();
    let find_rq = scu::query_rq("1.2.840.10008.5.1.4.1.2.2.1", 0x0020, id);
    scu.send_message(1, true, &find_rq);
    scu.send_message(1, false, &scu::el(0x0008_0052, b"CS", b"STUDY"));
    assert_eq!(scu.reply(), Reply::Status(0x0122));
    assert!(scu.release());
    assert_healthy_and_clean(&gw, 0);
    // The refused query is in the audit trail, like every query.
    assert_eq!(
        audit_rows(&gw, "C-FIND"),
        [(
            "not this presentation context's SOP class".to_string(),
            "refused: 0x0122".to_string()
        )]
    );
}

/// Each context carries the operations of its own SOP class: a C-STORE on
/// a service context or a C-ECHO on a storage one gets 0x0122 and stores
/// nothing; a response nobody asked for gets no answer; a request without
/// its Message ID ends the association.
#[test]
fn operations_outside_their_context_stray_responses_and_nameless_requests() {
    const COMMITMENT: &str = "1.2.840.10008.1.20.1";
    let (_dir, gw) = start();
    let contexts: &[(u8, &str, &[&str])] = &[
        (1, CT_IMAGE_STORAGE, &[EXPLICIT_LE]),
        (3, scu::VERIFICATION, &[EXPLICIT_LE]),
        (5, COMMITMENT, &[EXPLICIT_LE]),
    ];
    let Association::Accepted(mut scu) =
        scu::associate(gw.port, common::CT_AE, common::AE, contexts)
    else {
        panic!("association refused")
    };
    // A C-STORE whose class is the commitment context's (so its command and
    // context agree), with a dataset that names that class too.
    let mut ds = scu::ct_dataset("2.25.300", "2.25.1", 512);
    let ct_class = scu::el(0x0008_0016, b"UI", CT_IMAGE_STORAGE.as_bytes());
    let commitment_class = scu::el(0x0008_0016, b"UI", COMMITMENT.as_bytes());
    let at = ds
        .windows(ct_class.len())
        .position(|w| w == ct_class)
        .expect("SOP Class UID in the dataset");
    ds.splice(at..at + ct_class.len(), commitment_class);
    assert_eq!(
        scu.store(5, COMMITMENT, "2.25.300", &ds),
        Reply::Status(0x0122)
    );
    assert_eq!(
        scu.store(3, scu::VERIFICATION, "2.25.300", &ds),
        Reply::Status(0x0122)
    );
    assert_eq!(scu.echo(1), Reply::Status(0x0122));
    // A C-STORE-RSP out of the blue: the next answer is the C-ECHO's.
    let stray = scu::command(&[
        (0x0002, scu::uid_value(CT_IMAGE_STORAGE)),
        (0x0100, 0x8001u16.to_le_bytes().to_vec()),
        (0x0120, 7u16.to_le_bytes().to_vec()),
        (0x0800, 0x0101u16.to_le_bytes().to_vec()),
        (0x0900, 0u16.to_le_bytes().to_vec()),
        (0x1000, scu::uid_value("2.25.301")),
    ]);
    scu.send_message(1, true, &stray);
    assert_eq!(scu.echo(3), Reply::Status(0x0000));
    // A C-ECHO-RQ without a Message ID.
    let nameless = scu::command(&[
        (0x0002, scu::uid_value(scu::VERIFICATION)),
        (0x0100, 0x0030u16.to_le_bytes().to_vec()),
        (0x0800, 0x0101u16.to_le_bytes().to_vec()),
    ]);
    scu.send_message(3, true, &nameless);
    assert_eq!(scu.reply(), Reply::Aborted);
    assert!(gw.log().contains("unsolicited DIMSE response ignored"));
    assert_healthy_and_clean(&gw, 0);
}

/// Presentation context IDs are odd and unique (PS3.8 9.3.2.2): otherwise
/// an answer could name either of two contexts, and a dataset could be
/// kept under the other one's transfer syntax.
#[test]
fn even_or_repeated_presentation_context_ids_are_refused() {
    let (_dir, gw) = start();
    let repeated: &[(u8, &str, &[&str])] = &[
        (1, CT_IMAGE_STORAGE, &["1.2.840.10008.1.2.4.50"]),
        (1, CT_IMAGE_STORAGE, &[EXPLICIT_LE]),
    ];
    let even: &[(u8, &str, &[&str])] = &[(2, CT_IMAGE_STORAGE, &[EXPLICIT_LE])];
    for contexts in [repeated, even] {
        match scu::associate(gw.port, common::CT_AE, common::AE, contexts) {
            Association::Rejected(rj) => {
                assert_eq!(rj.result, dicom_ul::pdu::AssociationRJResult::Permanent)
            }
            _ => panic!("association with context IDs {contexts:?} not refused"),
        }
    }
    assert!(
        gw.log()
            .contains("presentation context IDs must be odd and unique")
    );
    assert_healthy_and_clean(&gw, 0);
}

/// An identifier over 1 MiB: read to its end, answered 0xA700, audited,
/// and the association goes on.
#[test]
fn an_oversized_query_identifier_is_refused_with_a700_and_audited() {
    let (_dir, gw) = start();
    const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
    let scu::Association::Accepted(mut scu) = scu::associate(
        gw.port,
        "XINZHEN_CT",
        common::AE,
        &[(1, STUDY_ROOT_FIND, &[scu::EXPLICIT_LE])],
    ) else {
        panic!("refused")
    };
    let mut identifier = scu::el(0x0008_0052, b"CS", b"STUDY");
    identifier.extend(scu::el(0x0008_1030, b"LO", &vec![b'A'; 60_000]));
    let big: Vec<u8> = identifier
        .iter()
        .copied()
        .cycle()
        .take(identifier.len() * 20)
        .collect();
    assert!(big.len() > 1 << 20);
    let id = scu.next_id();
    scu.send_message(1, true, &scu::query_rq(STUDY_ROOT_FIND, 0x0020, id));
    scu.send_message(1, false, &big);
    assert_eq!(scu.reply(), Reply::Status(0xA700));
    assert_eq!(
        audit_rows(&gw, "C-FIND"),
        [(
            "identifier or request too large".to_string(),
            "refused: 0xA700".to_string()
        )]
    );
    assert!(scu.release());
    assert_healthy_and_clean(&gw, 0);
}

/// (detail, outcome) of the audit rows for `action`, oldest first.
fn audit_rows(gw: &Gateway, action: &str) -> Vec<(String, String)> {
    let index = gw.index();
    let mut stmt = index
        .prepare("SELECT detail, outcome FROM audit WHERE action = ?1 ORDER BY pk")
        .unwrap();
    stmt.query_map([action], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn missing_sop_instance_uid_gets_a900() {
    let (_dir, gw) = start();
    let mut scu = scu::associate_ct(gw.port);
    let full = scu::ct_dataset("2.25.300", "2.25.1", 512);
    let without: Vec<u8> = {
        let marker = scu::el(0x0008_0018, b"UI", b"2.25.300");
        let at = full
            .windows(marker.len())
            .position(|w| w == marker)
            .unwrap();
        [&full[..at], &full[at + marker.len()..]].concat()
    };
    assert_eq!(
        scu.store(1, CT_IMAGE_STORAGE, "2.25.300", &without),
        Reply::Status(0xA900)
    );
    assert!(scu.release());
    assert_healthy_and_clean(&gw, 0);
}

#[test]
fn truncated_absurd_and_deeply_nested_datasets_get_c000() {
    let (_dir, gw) = start();
    let mut scu = scu::associate_ct(gw.port);
    let full = scu::ct_dataset("2.25.400", "2.25.1", 4096);
    // Truncated: the last fragment ends inside Pixel Data.
    assert_eq!(
        scu.store(1, CT_IMAGE_STORAGE, "2.25.400", &full[..full.len() - 100]),
        Reply::Status(0xC000)
    );
    // Absurd element length (4 GB) in a header element.
    let mut forged = scu::el(0x0008_1030, b"UT", b"x");
    forged[8..12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    // Inserted at an element boundary: after Specific Character Set and SOP Class UID.
    let boundary = scu::el(0x0008_0005, b"CS", b"ISO_IR 192").len()
        + scu::el(0x0008_0016, b"UI", CT_IMAGE_STORAGE.as_bytes()).len();
    let absurd = [&full[..boundary], &forged[..], &full[boundary..]].concat();
    assert_eq!(
        scu.store(1, CT_IMAGE_STORAGE, "2.25.400", &absurd),
        Reply::Status(0xC000)
    );
    // 10,000 nested undefined-length sequences.
    let mut nested = full[..full.len() - 4096 - 12].to_vec();
    for _ in 0..10_000 {
        nested.extend_from_slice(&[
            0x40, 0x00, 0x30, 0xA7, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        nested.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    assert_eq!(
        scu.store(1, CT_IMAGE_STORAGE, "2.25.400", &nested),
        Reply::Status(0xC000)
    );
    assert!(scu.release());
    assert!(
        gw.log().contains("C-STORE failed"),
        "failures are logged with the reason"
    );
    assert_healthy_and_clean(&gw, 0);
}

#[test]
fn oversized_pdu_is_aborted_before_allocation() {
    let (_dir, gw) = start();
    let mut scu = scu::associate_ct(gw.port);
    // A P-DATA-TF claiming 2 GB: far beyond the negotiated maximum.
    scu.send_raw(&[0x04, 0, 0x80, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    assert_eq!(scu.reply(), Reply::Aborted);
    assert!(gw.peak_rss() < 200 << 20);
    assert_healthy_and_clean(&gw, 0);
}

#[test]
fn unknown_pdu_type_and_malformed_pdv_are_aborted() {
    let (_dir, gw) = start();
    let mut scu = scu::associate_ct(gw.port);
    scu.send_raw(&[0x42, 0, 0, 0, 0, 2, 1, 2]).unwrap();
    assert_eq!(scu.reply(), Reply::Aborted);

    let mut scu = scu::associate_ct(gw.port);
    // PDV item length larger than its PDU.
    scu.send_raw(&[0x04, 0, 0, 0, 0, 6, 0, 0, 0x10, 0, 1, 3])
        .unwrap();
    assert_eq!(scu.reply(), Reply::Aborted);

    let mut scu = scu::associate_ct(gw.port);
    // Data on a presentation context that was never negotiated.
    scu.send_raw(&scu::pdata(99, true, true, &scu::echo_rq(1)))
        .unwrap();
    assert_eq!(scu.reply(), Reply::Aborted);

    let mut scu = scu::associate_ct(gw.port);
    // A dataset fragment with no command before it.
    scu.send_raw(&scu::pdata(1, false, true, &[0u8; 16]))
        .unwrap();
    assert_eq!(scu.reply(), Reply::Aborted);

    // Garbage instead of an A-ASSOCIATE-RQ.
    let mut raw = scu::connect(gw.port);
    raw.write_all(&[0x01, 0, 0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef])
        .unwrap();
    assert!(matches!(
        scu::read_any(&mut raw),
        Some(scu::RawPdu::Other(dicom_ul::pdu::Pdu::AbortRQ { .. })) | None
    ));
    assert_healthy_and_clean(&gw, 0);
}

#[test]
fn abrupt_disconnects_mid_dataset_leave_nothing() {
    let (_dir, gw) = start();
    let ds = scu::ct_dataset("2.25.500", "2.25.1", 300_000);
    // FIN in the middle of the dataset.
    let mut scu = scu::associate_ct(gw.port);
    let id = scu.next_id();
    scu.send_message(1, true, &scu::store_rq(id, CT_IMAGE_STORAGE, "2.25.500"));
    scu.send_raw(&scu::pdata(1, false, false, &ds[..100_000]))
        .unwrap();
    scu.stream.shutdown(std::net::Shutdown::Both).unwrap();
    drop(scu);
    // RST in the middle of the dataset (SO_LINGER 0 then close).
    let mut scu = scu::associate_ct(gw.port);
    let id = scu.next_id();
    scu.send_message(1, true, &scu::store_rq(id, CT_IMAGE_STORAGE, "2.25.500"));
    scu.send_raw(&scu::pdata(1, false, false, &ds[..100_000]))
        .unwrap();
    let sock = socket2_linger_zero(scu.stream);
    drop(sock);
    // Mid-PDU: a PDU header promising more than is sent.
    let mut scu = scu::associate_ct(gw.port);
    let id = scu.next_id();
    scu.send_message(1, true, &scu::store_rq(id, CT_IMAGE_STORAGE, "2.25.500"));
    let pdu = scu::pdata(1, false, true, &ds[..50_000]);
    scu.send_raw(&pdu[..20_000]).unwrap();
    drop(scu);
    assert_healthy_and_clean(&gw, 0);
    assert!(gw.log().contains("partial data discarded"));
}

/// Closes a socket with an RST instead of a FIN.
fn socket2_linger_zero(stream: std::net::TcpStream) -> std::net::TcpStream {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    stream
}

#[test]
fn silent_and_slow_peers_are_closed_by_artim_and_idle_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let spec = GatewaySpec {
        gateway_extra: "artim_timeout_s = 1\nidle_timeout_s = 1".into(),
        ..Default::default()
    };
    let gw = Gateway::start(dir.path(), &spec);
    // Silent connection: closed after ARTIM.
    let started = Instant::now();
    let mut silent = scu::connect(gw.port);
    assert!(scu::read_any(&mut silent).is_none());
    assert!(started.elapsed() < Duration::from_secs(5));
    // Slow A-ASSOCIATE-RQ: half of it, then nothing.
    let started = Instant::now();
    let mut slow = scu::connect(gw.port);
    let rq = scu::encode(&scu::request(
        common::CT_AE,
        common::AE,
        &[(1, CT_IMAGE_STORAGE, &[EXPLICIT_LE])],
    ));
    slow.write_all(&rq[..rq.len() / 2]).unwrap();
    assert!(scu::read_any(&mut slow).is_none());
    assert!(started.elapsed() < Duration::from_secs(5));
    // Idle association: the gateway asks to release it.
    let mut idle = scu::associate_ct(gw.port);
    assert_eq!(idle.reply(), Reply::ReleaseRequested);
    idle.send_raw(&scu::encode(&dicom_ul::pdu::Pdu::ReleaseRP))
        .unwrap();
    assert!(
        gw.log()
            .contains("no A-ASSOCIATE-RQ within the ARTIM timeout")
    );
    assert!(gw.log().contains("idle timeout"));
    gw.assert_serving();
}

/// A gateway admitting 2 associations (2 per clinic), and a first one
/// from XINZHEN_CT on a CT context, idle for a moment.
fn two_slots_one_taken() -> (tempfile::TempDir, Gateway, scu::Scu) {
    let dir = tempfile::tempdir().unwrap();
    let spec = GatewaySpec {
        gateway_extra: "max_associations = 2\nmax_associations_per_clinic = 2".into(),
        ..Default::default()
    };
    let gw = Gateway::start(dir.path(), &spec);
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[EXPLICIT_LE])];
    let Association::Accepted(first) = scu::associate(gw.port, "XINZHEN_CT", common::AE, contexts)
    else {
        panic!()
    };
    std::thread::sleep(Duration::from_millis(50));
    (dir, gw, first)
}

#[test]
fn limits_release_the_longest_idle_then_refuse_transiently() {
    let (_dir, gw, mut first) = two_slots_one_taken();
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[EXPLICIT_LE])];
    let Association::Accepted(mut second) =
        scu::associate(gw.port, "XINZHEN_US", common::AE, contexts)
    else {
        panic!()
    };
    // Per-clinic limit (2): a third xinzhen association is refused, transient.
    match scu::associate(gw.port, "XINZHEN_CT", common::AE, contexts) {
        Association::Rejected(rj) => {
            assert_eq!(rj.result, dicom_ul::pdu::AssociationRJResult::Transient);
            assert!(matches!(
                rj.source,
                dicom_ul::pdu::AssociationRJSource::ServiceProviderPresentation(
                    dicom_ul::pdu::AssociationRJServiceProviderPresentationReason::LocalLimitExceeded
                )
            ));
        }
        _ => panic!("expected a transient rejection"),
    }
    // Overall limit (2): another clinic's association makes the longest-idle one (`first`) go.
    let Association::Accepted(third) = scu::associate(gw.port, "BAISHUI_DR", common::AE, contexts)
    else {
        panic!("expected the longest-idle association to make room")
    };
    assert_eq!(first.reply(), Reply::ReleaseRequested);
    first
        .send_raw(&scu::encode(&dicom_ul::pdu::Pdu::ReleaseRP))
        .unwrap();
    // `second` was not evicted and still works.
    let ds = scu::ct_dataset("2.25.600", "2.25.1", 256);
    assert_eq!(
        second.store(1, CT_IMAGE_STORAGE, "2.25.600", &ds),
        Reply::Status(0)
    );
    drop(third);
    drop(second);
}

/// A release collision (PS3.8 9.2.1, Sta9/Sta10): the peer asks to release
/// just as the center asks it to (to make room). The center, the
/// association acceptor, answers with its A-RELEASE-RP only after the
/// requestor's, then closes.
#[test]
fn a_release_collision_is_answered_after_the_requestors_reply() {
    let (_dir, gw, mut first) = two_slots_one_taken();
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[EXPLICIT_LE])];
    let Association::Accepted(second) = scu::associate(gw.port, "XINZHEN_US", common::AE, contexts)
    else {
        panic!()
    };
    let Association::Accepted(third) = scu::associate(gw.port, "BAISHUI_DR", common::AE, contexts)
    else {
        panic!("expected the longest-idle association to make room")
    };
    assert_eq!(first.reply(), Reply::ReleaseRequested);
    // The requestor's own A-RELEASE-RQ crosses the center's.
    first
        .send_raw(&scu::encode(&dicom_ul::pdu::Pdu::ReleaseRQ))
        .unwrap();
    first
        .stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let early = scu::read_any(&mut first.stream);
    assert!(
        early.is_none(),
        "the acceptor answered before the requestor's A-RELEASE-RP"
    );
    first
        .send_raw(&scu::encode(&dicom_ul::pdu::Pdu::ReleaseRP))
        .unwrap();
    first
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(matches!(
        scu::read_any(&mut first.stream),
        Some(scu::RawPdu::Other(dicom_ul::pdu::Pdu::ReleaseRP))
    ));
    assert!(
        scu::read_any(&mut first.stream).is_none(),
        "then the connection ends"
    );
    drop((second, third));
}

/// Writes `bytes` a piece every `pause`, over about `total`.
fn dribble(scu: &mut scu::Scu, bytes: &[u8], total: Duration) {
    let pieces = 20;
    let pause = total / pieces as u32;
    for piece in bytes.chunks(bytes.len().div_ceil(pieces)) {
        scu.send_raw(piece).unwrap();
        std::thread::sleep(pause);
    }
}

/// The idle timeout is a timer of inactivity: a sender on a slow link whose
/// PDUs take longer than it to arrive, byte after byte, is served (a
/// deadline per PDU cut off every large C-STORE from a weak link).
#[test]
fn a_slow_but_steady_sender_outlasts_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let spec = GatewaySpec {
        gateway_extra: "idle_timeout_s = 1".into(),
        ..Default::default()
    };
    let gw = Gateway::start(dir.path(), &spec);
    let mut scu = scu::associate_ct(gw.port);
    let uid = "2.25.700";
    let ds = scu::ct_dataset(uid, "2.25.1", 16 * 1024);
    let id = scu.next_id();
    // The command over 1.5 s (between messages), the dataset over 2.5 s
    // (within one): each PDU takes longer than the idle timeout.
    dribble(
        &mut scu,
        &scu::pdata(1, true, true, &scu::store_rq(id, CT_IMAGE_STORAGE, uid)),
        Duration::from_millis(1500),
    );
    dribble(
        &mut scu,
        &scu::pdata(1, false, true, &ds),
        Duration::from_millis(2500),
    );
    assert_eq!(scu.reply(), Reply::Status(0x0000));
    assert!(scu.release());
    assert_eq!(gw.instance_count(), 1);
    // A peer that sends nothing is still released after the timeout.
    let mut idle = scu::associate_ct(gw.port);
    assert_eq!(idle.reply(), Reply::ReleaseRequested);
    // One that sends half a PDU and then nothing is aborted: it is not
    // between messages, and an A-RELEASE-RQ would be read as its rest.
    let mut stalled = scu::associate_ct(gw.port);
    let half = scu::pdata(1, true, true, &scu::echo_rq(1));
    stalled.send_raw(&half[..half.len() / 2]).unwrap();
    assert_eq!(stalled.reply(), Reply::Aborted);
}

/// An association chosen to make room while a message is arriving finishes
/// that message first, and is released after its answer.
#[test]
fn an_association_asked_to_make_room_mid_message_finishes_it_first() {
    let (_dir, gw, mut first) = two_slots_one_taken();
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[EXPLICIT_LE])];
    let Association::Accepted(second) = scu::associate(gw.port, "XINZHEN_US", common::AE, contexts)
    else {
        panic!()
    };
    // `first`, the longest idle, has half of a C-STORE's command PDU on
    // its way when a third association needs its slot.
    let uid = "2.25.701";
    let id = first.next_id();
    let command = scu::pdata(1, true, true, &scu::store_rq(id, CT_IMAGE_STORAGE, uid));
    first.send_raw(&command[..command.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let Association::Accepted(third) = scu::associate(gw.port, "BAISHUI_DR", common::AE, contexts)
    else {
        panic!("expected the longest-idle association to make room")
    };
    std::thread::sleep(Duration::from_millis(200));
    first.send_raw(&command[command.len() / 2..]).unwrap();
    let ds = scu::ct_dataset(uid, "2.25.1", 1024);
    first.send_message(1, false, &ds);
    assert_eq!(first.reply(), Reply::Status(0x0000));
    assert_eq!(first.reply(), Reply::ReleaseRequested);
    first
        .send_raw(&scu::encode(&dicom_ul::pdu::Pdu::ReleaseRP))
        .unwrap();
    assert_eq!(gw.instance_count(), 1);
    drop(third);
    drop(second);
}

#[test]
fn unknown_calling_wrong_called_and_disallowed_address_are_refused() {
    use dicom_ul::pdu::{
        AssociationRJResult, AssociationRJServiceUserReason as Reason, AssociationRJSource,
    };
    let (_dir, gw) = start();
    let contexts: &[(u8, &str, &[&str])] = &[(1, CT_IMAGE_STORAGE, &[EXPLICIT_LE])];
    let cases = [
        ("NOBODY", common::AE, Reason::CallingAETitleNotRecognized),
        (
            "XINZHEN_CT",
            "SOMEONEELSE",
            Reason::CalledAETitleNotRecognized,
        ),
        // Registered, but only from 10.20.30.40.
        (
            "FARAWAY_CT",
            common::AE,
            Reason::CallingAETitleNotRecognized,
        ),
    ];
    for (calling, called, reason) in cases {
        match scu::associate(gw.port, calling, called, contexts) {
            Association::Rejected(rj) => {
                assert_eq!(
                    rj.result,
                    AssociationRJResult::Permanent,
                    "{calling}->{called}"
                );
                assert_eq!(
                    rj.source,
                    AssociationRJSource::ServiceUser(reason),
                    "{calling}->{called}"
                );
            }
            _ => panic!("{calling}->{called} was not rejected"),
        }
    }
    // A requestor that would take only tiny PDUs back is refused; 0 (no
    // limit) and DCMTK's minimum, 4096, are fine.
    for (max_pdu, refused) in [(256u32, true), (4095, true), (4096, false), (0, false)] {
        let mut stream = scu::connect(gw.port);
        std::io::Write::write_all(
            &mut stream,
            &scu::encode(&scu::request_with_max_pdu(
                "XINZHEN_CT",
                common::AE,
                contexts,
                max_pdu,
            )),
        )
        .unwrap();
        match scu::read_any(&mut stream) {
            Some(scu::RawPdu::Other(dicom_ul::pdu::Pdu::AssociationRJ(rj))) => {
                assert!(refused, "max PDU {max_pdu} was refused");
                assert_eq!(rj.result, AssociationRJResult::Permanent);
                assert_eq!(
                    rj.source,
                    AssociationRJSource::ServiceUser(Reason::NoReasonGiven)
                );
            }
            Some(scu::RawPdu::Other(dicom_ul::pdu::Pdu::AssociationAC(_))) => {
                assert!(!refused, "max PDU {max_pdu} was accepted");
            }
            _ => panic!("no answer for max PDU {max_pdu}"),
        }
    }
    // DCMTK's echoscu sees the same.
    assert!(
        !common::echoscu(gw.port, "NOBODY", common::AE)
            .status
            .success()
    );
    assert!(
        !common::echoscu(gw.port, "FARAWAY_CT", common::AE)
            .status
            .success()
    );
    assert!(
        gw.log()
            .contains("calling AE title not allowed from this address")
    );
    assert_healthy_and_clean(&gw, 0);
}

/// An instance over `max_instance_bytes`, and a deflated one that is small
/// on the wire but inflates beyond that limit (a decompression bomb): both
/// are refused with 0xA700 (out of resources) after their last byte,
/// nothing is indexed, and the gateway goes on serving. The bomb is
/// refused without inflating it all.
#[test]
fn oversized_and_inflating_instances_get_a700() {
    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    let dir = tempfile::tempdir().unwrap();
    let spec = GatewaySpec {
        gateway_extra: "max_instance_bytes = 1048576".into(),
        ..Default::default()
    };
    let gw = Gateway::start(dir.path(), &spec);
    let contexts: &[(u8, &str, &[&str])] = &[
        (1, CT_IMAGE_STORAGE, &[EXPLICIT_LE]),
        (3, CT_IMAGE_STORAGE, &[DEFLATED]),
    ];
    let Association::Accepted(mut scu) =
        scu::associate(gw.port, common::CT_AE, common::AE, contexts)
    else {
        panic!("association refused")
    };
    let big = scu::ct_dataset("2.25.8801", "2.25.88", 2 << 20);
    assert_eq!(
        scu.store(1, CT_IMAGE_STORAGE, "2.25.8801", &big),
        Reply::Status(0xA700)
    );
    // 64 MiB once inflated, about 64 KiB on the wire.
    let bomb = scu::ct_dataset("2.25.8802", "2.25.88", 64 << 20);
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&bomb).unwrap();
    let deflated = enc.finish().unwrap();
    assert!(deflated.len() < 1 << 20, "{} bytes", deflated.len());
    assert_eq!(
        scu.store(3, CT_IMAGE_STORAGE, "2.25.8802", &deflated),
        Reply::Status(0xA700)
    );
    // A deflated instance within the limit is stored.
    let fits = scu::ct_dataset("2.25.8803", "2.25.88", 512 << 10);
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&fits).unwrap();
    assert_eq!(
        scu.store(3, CT_IMAGE_STORAGE, "2.25.8803", &enc.finish().unwrap()),
        Reply::Status(0x0000)
    );
    assert!(scu.release());
    assert!(
        gw.log()
            .contains("inflates beyond the limit of 1048576 bytes"),
        "{}",
        gw.log()
    );
    assert_healthy_and_clean(&gw, 1);
}
