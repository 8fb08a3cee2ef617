//! The shared worklist: settling, ordering by priority, claim races, leases,
//! release, and the watch stream.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{authed, center_with, demo_samples, ingest, with_clinic};
use consortium_proto::v1::{
    ClaimRequest, ItemStatus, ListWorklistRequest, Priority, ReleaseRequest, SetPriorityRequest,
    WatchWorklistRequest, WorklistFilter, worklist_event::Kind,
};
use tonic::Code;

/// The demo studies of `clinic`, up to `n`, as (files, study UIDs).
fn studies_of(clinic: &str, n: usize) -> (Vec<(std::path::PathBuf, String)>, Vec<String>) {
    let (_, files) = demo_samples();
    let mut uids: Vec<String> = Vec::new();
    for f in files.iter().filter(|f| f.issuer_of_patient_id == clinic) {
        if !uids.contains(&f.study_instance_uid) && uids.len() < n {
            uids.push(f.study_instance_uid.clone());
        }
    }
    let chosen = files
        .iter()
        .filter(|f| uids.contains(&f.study_instance_uid));
    (with_clinic(chosen), uids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_have_exactly_one_winner_and_leases_expire() {
    let (files, uids) = studies_of("xinzhen", 1);
    let server = center_with(&files, "").await;
    for i in 0..8 {
        server.user(&format!("r{i}"), "radiologist", "county");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut tokens = Vec::new();
    for i in 0..8 {
        tokens.push(server.login(&format!("r{i}")).await);
    }
    let study = uids[0].clone();
    let mut tasks = Vec::new();
    for token in &tokens {
        let mut c = server.clients().await;
        let (token, study) = (token.clone(), study.clone());
        tasks.push(tokio::spawn(async move {
            c.worklist
                .claim(authed(
                    ClaimRequest {
                        study_instance_uid: study,
                    },
                    &token,
                ))
                .await
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => winners.push(r.into_inner().item.unwrap()),
            Err(e) => losers.push(e),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one claim wins");
    let holder = winners[0].claimed_by.clone();
    assert_eq!(winners[0].status, ItemStatus::Claimed as i32);
    assert!(winners[0].lease_expires_at_unix > 0);
    for e in &losers {
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(
            e.message().contains(&format!("claimed by {holder} until")),
            "{}",
            e.message()
        );
    }

    // The holder may renew; another may not release it.
    let holder_token = tokens[holder[1..].parse::<usize>().unwrap()].clone();
    let other_token = tokens.iter().find(|t| **t != holder_token).unwrap().clone();
    let mut c = server.clients().await;
    c.worklist
        .claim(authed(
            ClaimRequest {
                study_instance_uid: study.clone(),
            },
            &holder_token,
        ))
        .await
        .unwrap();
    let err = c
        .worklist
        .release(authed(
            ReleaseRequest {
                study_instance_uid: study.clone(),
            },
            &other_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // After the lease (3 s in this configuration) another radiologist can claim.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let listed = c
        .worklist
        .list_worklist(authed(ListWorklistRequest::default(), &other_token))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(listed[0].status, ItemStatus::Unread as i32, "lease expired");
    let item = c
        .worklist
        .claim(authed(
            ClaimRequest {
                study_instance_uid: study.clone(),
            },
            &other_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_ne!(item.claimed_by, holder);
    c.worklist
        .release(authed(
            ReleaseRequest {
                study_instance_uid: study.clone(),
            },
            &other_token,
        ))
        .await
        .unwrap();
    let listed = c
        .worklist
        .list_worklist(authed(
            ListWorklistRequest {
                filter: Some(WorklistFilter {
                    statuses: vec![ItemStatus::Unread as i32],
                    ..Default::default()
                }),
                limit: 0,
            },
            &other_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].claimed_by.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studies_settle_then_sort_by_priority_then_waiting_time() {
    let (files, uids) = studies_of("xinzhen", 3);
    assert_eq!(uids.len(), 3);
    // Two studies arrive first, the third later.
    let first: Vec<_> = files
        .iter()
        .filter(|(p, _)| {
            let f = demo_samples().1.iter().find(|f| &f.path == p).unwrap();
            f.study_instance_uid != uids[2]
        })
        .cloned()
        .collect();
    let later: Vec<_> = files
        .iter()
        .filter(|f| !first.contains(f))
        .cloned()
        .collect();
    let server = center_with(&first, "").await;
    let mut c = server.clients().await;
    let rad = server.login("rad1").await;
    let tech = server.login("tech_x").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    ingest(&server.data_dir(), &later).await;

    // The newest study has not settled yet: not listed, and cannot be claimed.
    let lister = c.worklist.clone();
    let list = |token: String| {
        let mut c = lister.clone();
        async move {
            c.list_worklist(authed(ListWorklistRequest::default(), &token))
                .await
                .unwrap()
                .into_inner()
                .items
        }
    };
    let items = list(rad.clone()).await;
    assert_eq!(items.len(), 2, "{items:#?}");
    let err = c
        .worklist
        .claim(authed(
            ClaimRequest {
                study_instance_uid: uids[2].clone(),
            },
            &rad,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("still arriving"));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let items = list(rad.clone()).await;
    assert_eq!(items.len(), 3);
    // Same priority: longest waiting first.
    assert_eq!(items[2].study_instance_uid, uids[2]);
    assert!(items[0].waiting_seconds >= items[2].waiting_seconds);
    assert!(items.iter().all(|i| i.priority == Priority::Routine as i32));

    // The sending clinic's technician marks the newest STAT: it goes first.
    let item = c
        .worklist
        .set_priority(authed(
            SetPriorityRequest {
                study_instance_uid: uids[2].clone(),
                priority: Priority::Stat as i32,
            },
            &tech,
        ))
        .await
        .unwrap()
        .into_inner()
        .item
        .unwrap();
    assert_eq!(item.priority, Priority::Stat as i32);
    let items = list(rad.clone()).await;
    assert_eq!(items[0].study_instance_uid, uids[2]);
    // Filters: modality and clinic.
    let none = c
        .worklist
        .list_worklist(authed(
            ListWorklistRequest {
                filter: Some(WorklistFilter {
                    clinic_id: "baishui".into(),
                    ..Default::default()
                }),
                limit: 0,
            },
            &rad,
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(none.is_empty());
    let modality = items[0].modalities[0].clone();
    let by_modality = c
        .worklist
        .list_worklist(authed(
            ListWorklistRequest {
                filter: Some(WorklistFilter {
                    modality: modality.clone(),
                    ..Default::default()
                }),
                limit: 0,
            },
            &rad,
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(!by_modality.is_empty());
    assert!(by_modality.iter().all(|i| i.modalities.contains(&modality)));
    // Study date range, inclusive.
    let date = items[1].study_date.clone();
    let on_day = c
        .worklist
        .list_worklist(authed(
            ListWorklistRequest {
                filter: Some(WorklistFilter {
                    study_date_from: date.clone(),
                    study_date_to: date.clone(),
                    ..Default::default()
                }),
                limit: 0,
            },
            &rad,
        ))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(
        on_day
            .iter()
            .any(|i| i.study_instance_uid == items[1].study_instance_uid)
    );
    assert!(on_day.iter().all(|i| i.study_date == date));
    let err = c
        .worklist
        .list_worklist(authed(
            ListWorklistRequest {
                filter: Some(WorklistFilter {
                    study_date_from: "2024-01-01".into(),
                    ..Default::default()
                }),
                limit: 0,
            },
            &rad,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Another clinic's technician may not change its priority.
    server.user("tech_b", "technician", "baishui");
    let tech_b = server.login("tech_b").await;
    let err = c
        .worklist
        .set_priority(authed(
            SetPriorityRequest {
                study_instance_uid: uids[0].clone(),
                priority: Priority::Stat as i32,
            },
            &tech_b,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_current_items_new_studies_and_claims() {
    let (files, uids) = studies_of("baishui", 2);
    let first: Vec<_> = files
        .iter()
        .filter(|(p, _)| {
            demo_samples()
                .1
                .iter()
                .find(|f| &f.path == p)
                .unwrap()
                .study_instance_uid
                == uids[0]
        })
        .cloned()
        .collect();
    let later: Vec<_> = files
        .iter()
        .filter(|f| !first.contains(f))
        .cloned()
        .collect();
    let server = center_with(&first, "").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let rad = server.login("rad1").await;
    let rad2 = server.login("rad2").await;
    let mut c = server.clients().await;
    let mut stream = c
        .worklist
        .watch_worklist(authed(WatchWorklistRequest { filter: None }, &rad))
        .await
        .unwrap()
        .into_inner();
    let e = next_where(&mut stream, |_| true).await;
    assert_eq!(e.kind, Kind::Current as i32);
    assert_eq!(e.item.unwrap().study_instance_uid, uids[0]);

    // Another radiologist claims: the watcher sees it.
    c.worklist
        .claim(authed(
            ClaimRequest {
                study_instance_uid: uids[0].clone(),
            },
            &rad2,
        ))
        .await
        .unwrap();
    let e = next_where(&mut stream, |e| e.kind != Kind::Added as i32).await;
    assert_eq!(e.kind, Kind::Changed as i32);
    let item = e.item.unwrap();
    assert_eq!(item.status, ItemStatus::Claimed as i32);
    assert_eq!(item.claimed_by, "rad2");

    // A new study arrives: it appears once settled.
    ingest(&server.data_dir(), &later).await;
    let e = next_where(&mut stream, |e| {
        e.item.as_ref().unwrap().study_instance_uid == uids[1]
    })
    .await;
    assert_eq!(e.kind, Kind::Added as i32, "{e:?}");
    assert_eq!(e.item.unwrap().study_instance_uid, uids[1]);
    // Every pushed item was audited for the watcher, naming its study,
    // before it went out; so was the claim, for its claimer.
    let audit = server.audit();
    let row = |user: &str, action: &str, study: &str| {
        audit
            .iter()
            .any(|(u, a, s, o)| u == user && a == action && s == study && o == "success")
    };
    assert!(row("rad1", "WatchWorklist", &uids[0]), "{audit:?}");
    assert!(row("rad1", "WatchWorklist", &uids[1]), "{audit:?}");
    assert!(row("rad2", "Claim", &uids[0]), "{audit:?}");
    let conn = rusqlite::Connection::open(server.data_dir().join("index.sqlite")).unwrap();
    let refs: Vec<String> = conn
        .prepare("SELECT patient_ref FROM audit WHERE action IN ('Claim', 'WatchWorklist') AND study_uid != ''")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        !refs.is_empty()
            && refs
                .iter()
                .all(|r| r.starts_with("baishui:") && r.len() > 8),
        "each names its patient: {refs:?}"
    );

    // Logging out ends the watch: no more patient data on that stream.
    c.identity
        .logout(authed(consortium_proto::v1::LogoutRequest {}, &rad))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch ends within 6 s of logout");
    assert_eq!(ended.unwrap_err().code(), Code::Unauthenticated);

    // A xinzhen technician's watch never shows baishui studies.
    let tech = server.login("tech_x").await;
    let mut theirs = c
        .worklist
        .watch_worklist(authed(WatchWorklistRequest { filter: None }, &tech))
        .await
        .unwrap()
        .into_inner();
    let nothing = tokio::time::timeout(Duration::from_millis(1500), theirs.message()).await;
    assert!(nothing.is_err(), "no event for another clinic's studies");
}

/// A township watcher is shown its clinic's study as the clinic sent it:
/// another clinic's instance filed into it is counted, and announced, for
/// the county only; the clinic's own next instance is announced to both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_township_watcher_counts_only_what_its_clinic_sent() {
    let (files, uids) = studies_of("xinzhen", 1);
    let server = center_with(&files, "").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let tech = server.login("tech_x").await;
    let rad = server.login("rad1").await;
    let c = server.clients().await;
    let watch = |token: String| {
        let mut c = c.worklist.clone();
        async move {
            c.watch_worklist(authed(WatchWorklistRequest { filter: None }, &token))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut mine = watch(tech).await;
    let mut all = watch(rad).await;
    let ours = |e: &consortium_proto::v1::WorklistEvent| {
        e.item.as_ref().unwrap().study_instance_uid == uids[0]
    };
    let changed =
        |e: &consortium_proto::v1::WorklistEvent| e.kind == Kind::Changed as i32 && ours(e);
    let e = next_where(&mut mine, ours).await;
    assert_eq!(e.item.unwrap().instance_count as usize, files.len());
    let e = next_where(&mut all, ours).await;
    assert_eq!(e.item.unwrap().instance_count as usize, files.len());

    // Baishui sends one of its instances naming a series of that study.
    let dir = tempfile::tempdir().unwrap();
    let series = common::series_of(&files[0].0);
    let (forged, _) =
        common::baishui_instance_with(dir.path(), "forged.dcm", &[("SeriesInstanceUID", &series)]);
    ingest(&server.data_dir(), &[(forged, "baishui".to_string())]).await;
    let e = next_where(&mut all, changed).await;
    assert_eq!(e.item.unwrap().instance_count as usize, files.len() + 1);
    let quiet = tokio::time::timeout(Duration::from_millis(2500), mine.message()).await;
    assert!(quiet.is_err(), "nothing changed for xinzhen: {quiet:?}");

    // Xinzhen's own next instance: both are told (the study leaves the
    // worklist while it is arriving, and comes back settled).
    let more = common::edited_copy(
        &files[0].0,
        dir.path(),
        "more.dcm",
        &[("SOPInstanceUID", "2.25.5150001")],
    );
    ingest(&server.data_dir(), &[(more, "xinzhen".to_string())]).await;
    let back = |e: &consortium_proto::v1::WorklistEvent| e.kind == Kind::Added as i32 && ours(e);
    let e = next_where(&mut mine, back).await;
    assert_eq!(e.item.unwrap().instance_count as usize, files.len() + 1);
    let e = next_where(&mut all, back).await;
    assert_eq!(e.item.unwrap().instance_count as usize, files.len() + 2);
}

/// The next event that satisfies `pred` (others are skipped), within 5 s.
async fn next_where(
    stream: &mut tonic::Streaming<consortium_proto::v1::WorklistEvent>,
    pred: impl Fn(&consortium_proto::v1::WorklistEvent) -> bool,
) -> consortium_proto::v1::WorklistEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap();
        if pred(&e) {
            return e;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_that_says_stat_comes_first() {
    let (files, uids) = studies_of("xinzhen", 2);
    // The later study says Requested Procedure Priority STAT (set with DCMTK's dcmodify).
    let tmp = tempfile::tempdir().unwrap();
    let mut marked = Vec::new();
    for (path, clinic) in &files {
        let f = demo_samples().1.iter().find(|f| &f.path == path).unwrap();
        if f.study_instance_uid != uids[1] {
            marked.push((path.clone(), clinic.clone()));
            continue;
        }
        let copy = tmp.path().join(path.file_name().unwrap());
        std::fs::copy(path, &copy).unwrap();
        let out = Command::new("/usr/bin/dcmodify")
            .args(["-nb", "-i", "(0040,1003)=STAT"])
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        marked.push((copy, clinic.clone()));
    }
    let server = center_with(&marked, "").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let rad = server.login("rad1").await;
    let mut c = server.clients().await;
    let items = c
        .worklist
        .list_worklist(authed(ListWorklistRequest::default(), &rad))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].study_instance_uid, uids[1]);
    assert_eq!(items[0].priority, Priority::Stat as i32);
    assert_eq!(items[1].priority, Priority::Routine as i32);
}
