//! Identity and access: each role's allowed and denied calls and the audit
//! rows they leave; missing, forged, expired and revoked tokens; failed-login
//! limits.

mod common;

use common::{authed, center_with, demo_samples, with_clinic};
use consortium_proto::v1::center_service_client::CenterServiceClient;
use consortium_proto::v1::{
    GetCenterInfoRequest, GetPriorsRequest, GetRawInstanceRequest, GetStudyMetadataRequest,
    ListWorklistRequest, LoginRequest, LogoutRequest, Role, WhoAmIRequest, WorklistFilter,
};
use tonic::Code;

/// One CT study from each township clinic.
fn two_clinics() -> (Vec<(std::path::PathBuf, String)>, String, String) {
    let (_, files) = demo_samples();
    let pick = |clinic: &str| {
        let first = files
            .iter()
            .find(|f| f.issuer_of_patient_id == clinic && f.modality == "CT")
            .unwrap_or_else(|| {
                files
                    .iter()
                    .find(|f| f.issuer_of_patient_id == clinic)
                    .unwrap()
            });
        first.study_instance_uid.clone()
    };
    let (x, b) = (pick("xinzhen"), pick("baishui"));
    let chosen = files
        .iter()
        .filter(|f| f.study_instance_uid == x || f.study_instance_uid == b);
    (with_clinic(chosen), x, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_see_what_they_may_and_every_read_is_audited() {
    let (files, xinzhen_study, baishui_study) = two_clinics();
    let server = center_with(&files, "").await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await; // settle
    let mut c = server.clients().await;

    // A radiologist sees both clinics' studies.
    let rad = server.login("rad1").await;
    let items = c
        .worklist
        .list_worklist(authed(ListWorklistRequest::default(), &rad))
        .await
        .unwrap()
        .into_inner()
        .items;
    let uids: Vec<&str> = items
        .iter()
        .map(|i| i.study_instance_uid.as_str())
        .collect();
    assert!(uids.contains(&xinzhen_study.as_str()) && uids.contains(&baishui_study.as_str()));
    c.studies
        .get_study_metadata(authed(
            GetStudyMetadataRequest {
                study_instance_uid: baishui_study.clone(),
                ..Default::default()
            },
            &rad,
        ))
        .await
        .unwrap();

    // The center's instance count: everything for the county, only what
    // its clinic sent for a township clinic's user.
    let count_for = |token: String| {
        let channel = server.channel();
        async move {
            CenterServiceClient::new(channel.await)
                .get_center_info(authed(GetCenterInfoRequest {}, &token))
                .await
                .unwrap()
                .into_inner()
                .instance_count as usize
        }
    };
    let sent_by = |clinic: &str| files.iter().filter(|(_, c)| c == clinic).count();
    assert_eq!(count_for(rad.clone()).await, files.len());
    assert_eq!(
        count_for(server.login("staff_b").await).await,
        sent_by("baishui")
    );
    assert!(sent_by("baishui") > 0 && sent_by("baishui") < files.len());

    // A xinzhen technician sees only xinzhen; asking for baishui is refused.
    let tech = server.login("tech_x").await;
    let items = c
        .worklist
        .list_worklist(authed(ListWorklistRequest::default(), &tech))
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(!items.is_empty());
    assert!(items.iter().all(|i| i.clinic_id == "xinzhen"));
    let err = c
        .worklist
        .list_worklist(authed(
            ListWorklistRequest {
                filter: Some(WorklistFilter {
                    clinic_id: "baishui".into(),
                    ..Default::default()
                }),
                limit: 0,
            },
            &tech,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Baishui's clinic staff cannot see a xinzhen study: not found, not "forbidden".
    let staff = server.login("staff_b").await;
    let err = c
        .studies
        .get_study_metadata(authed(
            GetStudyMetadataRequest {
                study_instance_uid: xinzhen_study.clone(),
                ..Default::default()
            },
            &staff,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        !err.message().contains('/'),
        "no paths in errors: {}",
        err.message()
    );
    c.studies
        .get_priors(authed(
            GetPriorsRequest {
                study_instance_uid: baishui_study.clone(),
            },
            &staff,
        ))
        .await
        .unwrap();

    // Clinic staff cannot claim; administrators see no patient data.
    let err = c
        .worklist
        .claim(authed(
            consortium_proto::v1::ClaimRequest {
                study_instance_uid: baishui_study.clone(),
            },
            &staff,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let admin = server.login("admin").await;
    let err = c
        .worklist
        .list_worklist(authed(ListWorklistRequest::default(), &admin))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let sop = demo_samples()
        .1
        .iter()
        .find(|f| f.study_instance_uid == xinzhen_study)
        .unwrap()
        .sop_instance_uid
        .clone();
    let err = c
        .images
        .get_raw_instance(authed(
            GetRawInstanceRequest {
                sop_instance_uid: sop.clone(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // WhoAmI names the user and role.
    let me = c
        .identity
        .who_am_i(authed(WhoAmIRequest {}, &tech))
        .await
        .unwrap()
        .into_inner();
    let user = me.user.unwrap();
    assert_eq!(user.username, "tech_x");
    assert_eq!(user.role, Role::Technician as i32);
    assert_eq!(user.clinic_id, "xinzhen");

    // The audit log holds each of these, allowed and denied, with who and which study.
    let audit = server.audit();
    let has = |user: &str, action: &str, study: &str, outcome: &str| {
        audit.iter().any(|(u, a, s, o)| {
            u == user && a == action && (study.is_empty() || s == study) && o.starts_with(outcome)
        })
    };
    assert!(has("rad1", "ListWorklist", "", "success"), "{audit:#?}");
    assert!(has("rad1", "GetStudyMetadata", &baishui_study, "success"));
    // ... from where, and when (UTC, to the second, just now), with the patient.
    let index = rusqlite::Connection::open(server.data_dir().join("index.sqlite")).unwrap();
    let (peer, at, patient): (String, String, String) = index
        .query_row(
            "SELECT peer, at, patient_ref FROM audit
             WHERE username = 'rad1' AND action = 'GetStudyMetadata' AND study_uid = ?1",
            [&baishui_study],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(peer, "127.0.0.1");
    let now = storage::utc_timestamp(std::time::SystemTime::now());
    let a_minute_ago =
        storage::utc_timestamp(std::time::SystemTime::now() - std::time::Duration::from_secs(60));
    assert!(
        at.len() == now.len() && (a_minute_ago..=now).contains(&at),
        "{at}"
    );
    assert!(patient.starts_with("baishui:"), "{patient}");
    assert!(has("tech_x", "ListWorklist", "", "denied"));
    assert!(has(
        "staff_b",
        "GetStudyMetadata",
        &xinzhen_study,
        "not found"
    ));
    assert!(has("staff_b", "GetPriors", &baishui_study, "success"));
    assert!(has("staff_b", "Claim", &baishui_study, "denied"));
    assert!(has("admin", "ListWorklist", "", "denied"));
    assert!(has("admin", "GetRawInstance", "", "denied"));
    assert!(has("rad1", "Login", "", "success"));

    // The audit log is append-only, even for someone with the database file.
    let conn = rusqlite::Connection::open(server.data_dir().join("index.sqlite")).unwrap();
    assert!(conn.execute("DELETE FROM audit", []).is_err());
    assert!(conn.execute("UPDATE audit SET outcome = 'x'", []).is_err());

    // Patient demographics never reach the log.
    let log = server.log();
    let conn_names: Vec<String> = {
        let mut stmt = conn
            .prepare("SELECT name, patient_id FROM patients")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .unwrap()
            .flat_map(|r| {
                let (n, id) = r.unwrap();
                [n, id]
            })
            .filter(|s| s.len() > 3)
            .collect()
    };
    assert!(!conn_names.is_empty());
    for secret in conn_names
        .iter()
        .chain([&rad, &"password-rad1".to_string()])
    {
        assert!(!log.contains(secret.as_str()), "log leaks {secret}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_forged_expired_and_revoked_tokens_are_refused() {
    let (files, xinzhen_study, _) = two_clinics();
    let server = center_with(&files[..1], "").await;
    let mut c = server.clients().await;
    let request = || GetStudyMetadataRequest {
        study_instance_uid: xinzhen_study.clone(),
        ..Default::default()
    };

    let err = c
        .studies
        .get_study_metadata(tonic::Request::new(request()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Even the center's aggregate facts need a signed-in user.
    let mut center = CenterServiceClient::new(server.channel().await);
    let err = center
        .get_center_info(tonic::Request::new(GetCenterInfoRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let staff = server.login("staff_b").await;
    let info = center
        .get_center_info(authed(GetCenterInfoRequest {}, &staff))
        .await
        .unwrap()
        .into_inner();
    // The one instance held is xinzhen's: none of it is counted for baishui.
    assert_eq!(info.instance_count, 0);
    assert!(info.clinics.iter().any(|c| c.id == "xinzhen"));

    let forged = "ab".repeat(32);
    let err = c
        .studies
        .get_study_metadata(authed(request(), &forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("unknown token"));

    let err = c
        .studies
        .get_study_metadata(authed(request(), "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // A token issued by the admin command with no lifetime left.
    let out = server.admin(&["issue-token", "rad1", "--ttl", "0"], "");
    assert!(out.status.success());
    let expired = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let err = c
        .studies
        .get_study_metadata(authed(request(), &expired))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());

    // An admin-issued token with a lifetime works; after logout it does not.
    let out = server.admin(&["issue-token", "rad1", "--ttl", "600"], "");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    c.studies
        .get_study_metadata(authed(request(), &token))
        .await
        .unwrap();
    c.identity
        .logout(authed(LogoutRequest {}, &token))
        .await
        .unwrap();
    let err = c
        .studies
        .get_study_metadata(authed(request(), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"));

    // A disabled user's tokens stop working.
    let token = server.login("rad2").await;
    assert!(server.admin(&["disable-user", "rad2"], "").status.success());
    let err = c
        .studies
        .get_study_metadata(authed(request(), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Refusals are audited with the peer address.
    let audit = server.audit();
    let denied = audit
        .iter()
        .filter(|(_, a, _, o)| a == "GetStudyMetadata" && o.starts_with("denied"))
        .count();
    assert!(denied >= 5, "{audit:#?}");
    // A flood of refused calls from one address is counted, not listed:
    // at most 60 rows a minute.
    for _ in 0..80 {
        let _ = c
            .studies
            .get_study_metadata(authed(request(), &forged))
            .await;
    }
    let refused_rows = server
        .audit()
        .iter()
        .filter(|(u, _, _, o)| u.is_empty() && o.starts_with("denied"))
        .count();
    assert_eq!(refused_rows, 60, "refusals audited in the first minute");

    // Only hashes of tokens are stored.
    let conn = rusqlite::Connection::open(server.data_dir().join("index.sqlite")).unwrap();
    let stored: i64 = conn
        .query_row(
            "SELECT count(*) FROM sessions WHERE token_hash = ?1",
            [&token],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_limited() {
    let server = center_with(&[], "").await;
    let mut c = server.clients().await;
    let login = |password: &str| LoginRequest {
        username: "rad1".into(),
        password: password.into(),
    };
    let err = c.identity.login(login("wrong")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = c
        .identity
        .login(LoginRequest {
            username: "nobody".into(),
            password: "whatever".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // The same message for an unknown user as for a wrong password.
    assert_eq!(err.message(), "wrong user name or password");
    for _ in 0..4 {
        let err = c.identity.login(login("wrong")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // Locked out now, even with the right password.
    let err = c.identity.login(login("password-rad1")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("try again"));
    // Another user is not affected.
    let ok = c
        .identity
        .login(LoginRequest {
            username: "rad2".into(),
            password: "password-rad2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.token.len(), 64);
    assert!(ok.expires_at_unix > 0);
    let audit = server.audit();
    assert!(
        audit
            .iter()
            .filter(|(u, a, _, o)| u == "rad1" && a == "Login" && o.starts_with("denied"))
            .count()
            >= 5
    );
    // A flood of failed logins needs no account: an address gets at most
    // 60 rows a minute (then a count), and a typed user name cannot forge
    // audit lines.
    for _ in 0..80 {
        let _ = c
            .identity
            .login(LoginRequest {
                username: "evil\nforged\u{1b}[2K".into(),
                password: "whatever".into(),
            })
            .await;
    }
    let audit = server.audit();
    let denied_logins = audit
        .iter()
        .filter(|(_, a, _, o)| a == "Login" && o.starts_with("denied"))
        .count();
    assert!(denied_logins <= 60, "{denied_logins} rows");
    assert!(
        audit.iter().any(|(u, _, _, _)| u == "evilforged[2K"),
        "{audit:#?}"
    );
    assert!(
        audit
            .iter()
            .all(|(u, _, _, _)| !u.contains(['\n', '\u{1b}']))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_command_manages_users_and_lists_the_audit_log() {
    let server = center_with(&[], "").await;
    let out = server.admin(
        &[
            "create-user",
            "x",
            "--role",
            "technician",
            "--clinic",
            "nowhere",
        ],
        "password-x\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown clinic"));
    let out = server.admin(
        &[
            "create-user",
            "short",
            "--role",
            "radiologist",
            "--clinic",
            "county",
        ],
        "abc\n",
    );
    assert!(!out.status.success());
    // Radiologists read every clinic: only the county's staff may be one.
    let out = server.admin(
        &[
            "create-user",
            "rad_x",
            "--role",
            "radiologist",
            "--clinic",
            "xinzhen",
        ],
        "password-rad_x\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("role \"county\""));
    // A new password is held to the same minimum as a first one.
    for weak in ["", "\n", "short\n"] {
        let out = server.admin(&["set-password", "rad1"], weak);
        assert!(!out.status.success(), "{weak:?} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("at least 8 characters"));
    }
    assert!(
        server
            .admin(&["create-clinic", "hilltop", "Hilltop clinic"], "")
            .status
            .success()
    );
    server.user("hill_staff", "clinic_staff", "hilltop");
    let out = server.admin(&["list-users"], "");
    let users = String::from_utf8(out.stdout).unwrap();
    assert!(
        users.contains("hill_staff\tclinic_staff\thilltop"),
        "{users}"
    );
    // The password hash is argon2id, never the password.
    let conn = rusqlite::Connection::open(server.data_dir().join("index.sqlite")).unwrap();
    let hash: String = conn
        .query_row(
            "SELECT password_hash FROM users WHERE username = 'hill_staff'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(hash.starts_with("$argon2id$"));
    assert!(!hash.contains("password-hill_staff"));
    let old_token = server.login("hill_staff").await;
    // A new password revokes the tokens the user had.
    let out = server.admin(&["set-password", "hill_staff"], "a new long password\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = server.clients().await;
    let err = c
        .identity
        .who_am_i(authed(WhoAmIRequest {}, &old_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    c.identity
        .login(LoginRequest {
            username: "hill_staff".into(),
            password: "a new long password".into(),
        })
        .await
        .unwrap();
    assert!(
        !server
            .admin(&["set-password", "nobody"], "whatever long\n")
            .status
            .success()
    );
    let out = server.admin(&["audit", "--user", "hill_staff"], "");
    let audit = String::from_utf8(out.stdout).unwrap();
    assert!(audit.lines().nth(1).unwrap().contains("Login"), "{audit}");
    // Tokens an administrator mints are bounded and on record, as are the
    // other administrative changes and reads of the audit log, with the
    // local account that ran them.
    let out = server.admin(&["issue-token", "rad1", "--ttl", "31536000"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most"));
    assert!(
        server
            .admin(&["issue-token", "rad1", "--ttl", "60"], "")
            .status
            .success()
    );
    let rows = server.audit();
    for action in [
        "Admin create-clinic",
        "Admin create-user",
        "Admin set-password",
        "Admin issue-token",
        "Admin audit",
    ] {
        assert!(
            rows.iter().any(|(who, a, _, o)| a == action
                && who.starts_with("admin-cli:")
                && o == "success"),
            "{action}: {rows:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clinic_cannot_pull_a_series_into_its_own_study() {
    let (_, samples) = demo_samples();
    let a = samples
        .iter()
        .find(|f| f.issuer_of_patient_id == "xinzhen" && f.modality == "CT")
        .unwrap();
    let a_series = common::series_of(&a.path);
    // Clinic B sends one of its own instances naming A's series (and B's own study).
    let dir = tempfile::tempdir().unwrap();
    let (forged, b) = common::baishui_instance_with(
        dir.path(),
        "forged.dcm",
        &[("SeriesInstanceUID", &a_series)],
    );
    // ... and a series of its own, of its own modality, under A's study.
    let (own_series, _) = common::baishui_instance_with(
        dir.path(),
        "own-series.dcm",
        &[
            ("StudyInstanceUID", &a.study_instance_uid),
            ("SeriesInstanceUID", "2.25.424242"),
            ("SOPInstanceUID", "2.25.424243"),
        ],
    );
    let a_study: Vec<_> = samples
        .iter()
        .filter(|f| f.study_instance_uid == a.study_instance_uid)
        .collect();
    let mut files = with_clinic(a_study.iter().copied());
    files.push((forged, "baishui".to_string()));
    files.push((own_series, "baishui".to_string()));
    let server = center_with(&files, "").await;
    let mut c = server.clients().await;
    let staff = server.login("staff_b").await;

    // A's instances stay out of reach of B's staff, by UID, series or study.
    let err = c
        .images
        .get_raw_instance(authed(
            GetRawInstanceRequest {
                sop_instance_uid: a.sop_instance_uid.clone(),
            },
            &staff,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let meta = c
        .studies
        .get_study_metadata(authed(
            GetStudyMetadataRequest {
                study_instance_uid: a.study_instance_uid.clone(),
                ..Default::default()
            },
            &staff,
        ))
        .await;
    {
        // B's staff reach A's study through the instances B filed there.
        let meta = meta.unwrap().into_inner();
        assert!(
            meta.instances
                .iter()
                .all(|i| i.sop_instance_uid == b.sop_instance_uid
                    || i.sop_instance_uid == "2.25.424243"),
            "B's staff see only what B sent: {:?}",
            meta.instances
        );
        assert!(!meta.dicom_json.contains(&a.sop_instance_uid));
    }
    // The series was not moved under B's study.
    let conn = rusqlite::Connection::open(server.data_dir().join("index.sqlite")).unwrap();
    let owner: String = conn
        .query_row(
            "SELECT st.study_uid FROM series se JOIN studies st ON st.pk = se.study_pk
             WHERE se.series_uid = ?1",
            [&a_series],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(owner, a.study_instance_uid);
    // ... nor relabelled: it keeps A's modality.
    let modality: String = conn
        .query_row(
            "SELECT modality FROM series WHERE series_uid = ?1",
            [&a_series],
            |r| r.get(0),
        )
        .unwrap();
    assert_ne!(b.modality, a.modality);
    assert_eq!(modality, a.modality);
    // A's own worklist counts and lists only what A sent; the county's, all.
    let item_for = |items: Vec<consortium_proto::v1::WorklistItem>| {
        items
            .into_iter()
            .find(|i| i.study_instance_uid == a.study_instance_uid)
            .expect("A's study in the worklist")
    };
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await; // settle
    let tech = server.login("tech_x").await;
    let own = item_for(
        c.worklist
            .list_worklist(authed(ListWorklistRequest::default(), &tech))
            .await
            .unwrap()
            .into_inner()
            .items,
    );
    assert_eq!(own.instance_count as usize, a_study.len());
    assert_eq!(own.modalities, vec![a.modality.clone()]);
    // A radiologist still sees all of A's study.
    let rad = server.login("rad1").await;
    let meta = c
        .studies
        .get_study_metadata(authed(
            GetStudyMetadataRequest {
                study_instance_uid: a.study_instance_uid.clone(),
                ..Default::default()
            },
            &rad,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        meta.instances
            .iter()
            .any(|i| i.sop_instance_uid == a.sop_instance_uid)
    );
    let all = item_for(
        c.worklist
            .list_worklist(authed(ListWorklistRequest::default(), &rad))
            .await
            .unwrap()
            .into_inner()
            .items,
    );
    assert_eq!(all.instance_count as usize, a_study.len() + 2);
    assert!(all.modalities.contains(&b.modality), "{:?}", all.modalities);

    // Reads of B's instance filed into A's study are audited as reads of
    // B's patient, whose image it is, not of A's.
    let (a_patient, b_patient) = (
        format!("xinzhen:{}", a.patient_id),
        format!("baishui:{}", b.patient_id),
    );
    assert_ne!(a_patient, b_patient);
    c.images
        .get_raw_instance(authed(
            GetRawInstanceRequest {
                sop_instance_uid: "2.25.424243".into(),
            },
            &rad,
        ))
        .await
        .unwrap();
    let patients_read = |user: &str, action: &str| -> Vec<String> {
        let conn = rusqlite::Connection::open(server.data_dir().join("index.sqlite")).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT patient_ref FROM audit WHERE username = ?1 AND action = ?2
                 AND outcome = 'success' ORDER BY pk",
            )
            .unwrap();
        stmt.query_map([user, action], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(
        patients_read("rad1", "GetRawInstance"),
        vec![b_patient.clone()]
    );
    // The radiologist's study metadata carried both patients: a row each.
    let mut both = patients_read("rad1", "GetStudyMetadata");
    both.sort();
    let mut expected = vec![a_patient.clone(), b_patient.clone()];
    expected.sort();
    assert_eq!(both, expected);
    // B's staff reached A's study only through B's instances: their read
    // names B's patient alone, and the study's priors (A's patient's
    // links) are not theirs to see.
    assert_eq!(
        patients_read("staff_b", "GetStudyMetadata"),
        vec![b_patient.clone()]
    );
    let err = c
        .studies
        .get_priors(authed(
            consortium_proto::v1::GetPriorsRequest {
                study_instance_uid: a.study_instance_uid.clone(),
            },
            &staff,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// One user may hold only `max_streams_per_user` streams open at once
/// (watches, series streams, raw downloads): the next is refused with
/// resource_exhausted and audited; another user is not affected; a stream
/// that ends gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_limited_per_user() {
    use consortium_proto::v1::WatchWorklistRequest;
    let (files, x_study, _) = two_clinics();
    let server = center_with(&files, "max_streams_per_user = 2").await;
    let c = server.clients().await;
    let rad1 = server.login("rad1").await;
    let rad2 = server.login("rad2").await;
    let watch = |token: &str| {
        let mut w = c.worklist.clone();
        let req = authed(WatchWorklistRequest { filter: None }, token);
        async move { w.watch_worklist(req).await }
    };
    let first = watch(&rad1).await.unwrap().into_inner();
    let _second = watch(&rad1).await.unwrap().into_inner();
    let err = watch(&rad1).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("2 streams"), "{}", err.message());
    // A raw download counts too.
    let (_, samples) = demo_samples();
    let sop = samples
        .iter()
        .find(|f| f.study_instance_uid == x_study)
        .unwrap()
        .sop_instance_uid
        .clone();
    let raw = |token: &str| {
        let mut images = c.images.clone();
        let req = authed(
            GetRawInstanceRequest {
                sop_instance_uid: sop.clone(),
            },
            token,
        );
        async move { images.get_raw_instance(req).await }
    };
    assert_eq!(
        raw(&rad1).await.unwrap_err().code(),
        Code::ResourceExhausted
    );
    // Another user has places of their own.
    let mut theirs = raw(&rad2).await.unwrap().into_inner();
    while theirs.message().await.unwrap().is_some() {}
    // The client dropping a watch gives its place back.
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut again = loop {
        match raw(&rad1).await {
            Ok(stream) => break stream.into_inner(),
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(
                    std::time::Instant::now() < deadline,
                    "the place never came back"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    while again.message().await.unwrap().is_some() {}
    let refused = server
        .audit()
        .into_iter()
        .filter(|(user, action, _, outcome)| {
            user == "rad1"
                && action == "WatchWorklist"
                && outcome.contains("streams are already open")
        })
        .count();
    assert_eq!(refused, 1, "{:?}", server.audit());
}

/// A login token lasts `token_lifetime_s` (here 1 s), then is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_token_expires_after_the_configured_lifetime() {
    let server = center_with(&[], "token_lifetime_s = 1").await;
    let token = server.login("rad1").await;
    let mut c = server.clients().await;
    let me = c
        .identity
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.user.unwrap().username, "rad1");
    // Past the lifetime, and past the 2 s a checked token is trusted.
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
    let err = c
        .identity
        .who_am_i(authed(WhoAmIRequest {}, &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}
