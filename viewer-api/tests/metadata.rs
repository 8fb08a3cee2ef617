//! GetStudyMetadata for a study larger than one answer may be: pages for a
//! client that asks for them, each within the limit and together the whole
//! study; a clear refusal, audited as one, for a client that does not.

mod common;

use common::{authed, center_with, demo_samples, with_clinic};
use consortium_proto::v1::{GetStudyMetadataRequest, GetStudyMetadataResponse};
use prost::Message;
use tonic::Code;

/// The demo study with the most instances, with its clinic.
fn largest_study() -> (Vec<(std::path::PathBuf, String)>, String) {
    let (_, files) = demo_samples();
    let count = |uid: &str| files.iter().filter(|f| f.study_instance_uid == uid).count();
    let uid = files
        .iter()
        .max_by_key(|f| count(&f.study_instance_uid))
        .unwrap()
        .study_instance_uid
        .clone();
    let chosen = files.iter().filter(|f| f.study_instance_uid == uid);
    (with_clinic(chosen), uid)
}

fn request(uid: &str, page_size: u32, page_token: &str) -> GetStudyMetadataRequest {
    GetStudyMetadataRequest {
        study_instance_uid: uid.to_string(),
        page_size,
        page_token: page_token.to_string(),
        ..Default::default()
    }
}

/// Every page of the study, following the tokens.
async fn pages(
    server: &common::Server,
    token: &str,
    uid: &str,
    page_size: u32,
) -> Vec<GetStudyMetadataResponse> {
    let mut c = server.clients().await;
    let mut pages: Vec<GetStudyMetadataResponse> = Vec::new();
    loop {
        let after = pages.last().map_or("", |p| p.next_page_token.as_str());
        let page = c
            .studies
            .get_study_metadata(authed(request(uid, page_size, after), token))
            .await
            .unwrap()
            .into_inner();
        let done = page.next_page_token.is_empty();
        pages.push(page);
        if done {
            return pages;
        }
        assert!(pages.len() < 1000, "the pages never end");
    }
}

/// The DICOM JSON objects of answers, in order.
fn objects(answers: &[GetStudyMetadataResponse]) -> Vec<serde_json::Value> {
    answers
        .iter()
        .flat_map(
            |a| match serde_json::from_str::<serde_json::Value>(&a.dicom_json).unwrap() {
                serde_json::Value::Array(items) => items,
                other => panic!("not an array: {other}"),
            },
        )
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_larger_than_one_answer_comes_in_pages_or_is_refused_clearly() {
    let (files, uid) = largest_study();
    const LIMIT_KIB: usize = 16;

    // The whole study in one answer, from a center with the default limit.
    let roomy = center_with(&files, "").await;
    let token = roomy.login("rad1").await;
    let whole = roomy
        .clients()
        .await
        .studies
        .get_study_metadata(authed(request(&uid, 0, ""), &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(whole.instances.len(), files.len());
    assert!(whole.next_page_token.is_empty(), "unpaged: no token");
    assert!(
        whole.encoded_len() > (2 * LIMIT_KIB) << 10,
        "the study must need several answers of {LIMIT_KIB} KiB: {} bytes",
        whole.encoded_len()
    );
    let expected = objects(std::slice::from_ref(&whole));
    assert_eq!(expected.len(), files.len());
    drop(roomy);

    let server = center_with(&files, &format!("max_metadata_answer_kib = {LIMIT_KIB}")).await;
    let token = server.login("rad1").await;
    let mut c = server.clients().await;

    // Unpaged: refused, saying how to get it, and audited as refused.
    let err = c
        .studies
        .get_study_metadata(authed(request(&uid, 0, ""), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("page_size"), "{}", err.message());
    let refused = server
        .audit()
        .into_iter()
        .filter(|(_, action, study, _)| action == "GetStudyMetadata" && *study == uid)
        .collect::<Vec<_>>();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].3.starts_with("refused:"), "{refused:?}");

    // Paged by size alone (a page size larger than the study): several
    // pages, each within the limit, together the whole study in order.
    let by_size = pages(&server, &token, &uid, 10_000).await;
    assert!(by_size.len() >= 2, "{} pages", by_size.len());
    for page in &by_size {
        assert!(
            page.encoded_len() <= LIMIT_KIB << 10,
            "a page of {} bytes",
            page.encoded_len()
        );
        assert!(!page.instances.is_empty());
    }
    let refs = |answers: &[GetStudyMetadataResponse]| {
        answers
            .iter()
            .flat_map(|a| a.instances.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(refs(&by_size), whole.instances);
    assert_eq!(objects(&by_size), expected);

    // Paged by count: at most that many per page, the same study.
    let by_count = pages(&server, &token, &uid, 3).await;
    assert!(by_count.iter().all(|p| p.instances.len() <= 3));
    assert!(by_count.len() >= files.len().div_ceil(3));
    assert_eq!(refs(&by_count), whole.instances);
    assert_eq!(objects(&by_count), expected);

    // Each page is a read of the patient's data: one audit row each.
    let rows = server
        .audit()
        .into_iter()
        .filter(|(_, action, study, outcome)| {
            action == "GetStudyMetadata" && *study == uid && outcome == "success"
        })
        .count();
    assert_eq!(rows, by_size.len() + by_count.len());

    // A token this center did not give, and one without a page size (the
    // rest of the study would pass for all of it).
    let err = c
        .studies
        .get_study_metadata(authed(request(&uid, 3, "1.2.3.4"), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .studies
        .get_study_metadata(authed(
            request(&uid, 0, &by_count[0].next_page_token),
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// A copy of `file` as the only instance of a study of its own, with a
/// 20,000-character Text Value (UT): text, so its metadata keeps it.
fn alone_with_long_text(
    file: &std::path::Path,
    dir: &std::path::Path,
) -> (std::path::PathBuf, String) {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let mut obj = dicom_object::open_file(file).unwrap();
    let uid = |suffix: &str| format!("2.25.777{suffix}");
    for (tag, value) in [
        (tags::SOP_INSTANCE_UID, uid("1")),
        (tags::SERIES_INSTANCE_UID, uid("2")),
        (tags::STUDY_INSTANCE_UID, uid("3")),
    ] {
        obj.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(value)));
    }
    obj.put(DataElement::new(
        tags::TEXT_VALUE,
        VR::UT,
        PrimitiveValue::from("x".repeat(20_000)),
    ));
    let meta = obj.meta_mut();
    meta.media_storage_sop_instance_uid = uid("1");
    meta.update_information_group_length();
    let path = dir.join("long-text.dcm");
    obj.write_to_file(&path).unwrap();
    (path, uid("3"))
}

/// An instance whose metadata alone is larger than an answer (20,000
/// characters of text against a 16 KiB limit) cannot come in any page:
/// the refusal says so and gives the token that goes on past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_larger_than_an_answer_is_refused_with_the_way_past_it() {
    let (_, samples) = demo_samples();
    let ct = samples.iter().find(|f| f.modality == "CT").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (long, study) = alone_with_long_text(&ct.path, dir.path());
    let files = vec![(long, ct.issuer_of_patient_id.clone())];
    let server = center_with(&files, "max_metadata_answer_kib = 16").await;
    let token = server.login("rad1").await;
    let mut c = server.clients().await;
    let err = c
        .studies
        .get_study_metadata(authed(request(&study, 1, ""), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let past = err
        .message()
        .split("page_token ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no token in {:?}", err.message()));
    let after = c
        .studies
        .get_study_metadata(authed(request(&study, 1, past), &token))
        .await
        .unwrap()
        .into_inner();
    assert!(after.instances.is_empty(), "nothing follows it");
    assert!(after.next_page_token.is_empty());
}

/// An ECG's waveform samples are bulk data: its metadata names where they
/// are (the instance, as GetRawInstance returns it) instead of inlining
/// them; its small values stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waveform_samples_are_left_out_of_metadata_like_pixel_data() {
    let (_, samples) = demo_samples();
    let ecg = samples.iter().find(|f| f.modality == "ECG").unwrap();
    let server = center_with(&with_clinic([ecg]), "").await;
    let token = server.login("rad1").await;
    let answer = server
        .clients()
        .await
        .studies
        .get_study_metadata(authed(request(&ecg.study_instance_uid, 0, ""), &token))
        .await
        .unwrap()
        .into_inner();
    let objects = objects(std::slice::from_ref(&answer));
    let waveform = &objects[0]["54000100"]["Value"][0];
    let samples_attr = &waveform["54001010"];
    assert_eq!(
        samples_attr["BulkDataURI"],
        format!("instances/{}", ecg.sop_instance_uid),
        "{samples_attr}"
    );
    assert!(samples_attr.get("InlineBinary").is_none());
    assert_eq!(
        waveform["003A0005"]["Value"][0], 12,
        "channels, inline: {waveform}"
    );
    assert!(
        answer.dicom_json.len() < 16 << 10,
        "{} bytes",
        answer.dicom_json.len()
    );
}

/// Study, series and instance metadata, ordered by series number then
/// instance number whatever order the instances arrived in (here the
/// reverse of the study's); another study's series or instance is not
/// found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_and_instance_metadata_in_series_and_instance_order() {
    let (mut files, uid) = largest_study();
    files.reverse();
    let (_, samples) = demo_samples();
    let other = samples
        .iter()
        .find(|f| f.study_instance_uid != uid)
        .unwrap();
    files.extend(with_clinic([other]));
    let server = center_with(&files, "").await;
    let token = server.login("rad1").await;
    let studies = server.clients().await.studies;
    let ask = |req: GetStudyMetadataRequest| {
        let (mut studies, token) = (studies.clone(), token.clone());
        async move { studies.get_study_metadata(authed(req, &token)).await }
    };

    let study = ask(request(&uid, 0, "")).await.unwrap().into_inner();
    assert_eq!(study.instances.len(), files.len() - 1);
    let order: Vec<(i32, i32)> = study
        .instances
        .iter()
        .map(|i| (i.series_number, i.instance_number))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "series number, then instance number");
    assert!(
        study
            .instances
            .iter()
            .map(|i| &i.series_instance_uid)
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 1,
        "a study of several series"
    );

    let chosen = study.instances.last().unwrap().clone();
    let series = ask(GetStudyMetadataRequest {
        series_instance_uid: chosen.series_instance_uid.clone(),
        ..request(&uid, 0, "")
    })
    .await
    .unwrap()
    .into_inner();
    let expected: Vec<_> = study
        .instances
        .iter()
        .filter(|i| i.series_instance_uid == chosen.series_instance_uid)
        .cloned()
        .collect();
    assert_eq!(series.instances, expected);
    assert_eq!(objects(std::slice::from_ref(&series)).len(), expected.len());

    let one = ask(GetStudyMetadataRequest {
        sop_instance_uid: chosen.sop_instance_uid.clone(),
        ..request(&uid, 0, "")
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(one.instances, vec![chosen.clone()]);
    let json = objects(std::slice::from_ref(&one));
    assert_eq!(
        json[0]["00080018"]["Value"][0],
        chosen.sop_instance_uid.as_str()
    );

    for req in [
        GetStudyMetadataRequest {
            series_instance_uid: common::series_of(&other.path),
            ..request(&uid, 0, "")
        },
        GetStudyMetadataRequest {
            sop_instance_uid: other.sop_instance_uid.clone(),
            ..request(&uid, 0, "")
        },
    ] {
        let err = ask(req).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
}
