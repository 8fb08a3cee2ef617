//! The viewer-api reading blobs from an S3-compatible bucket
//! (`[storage.s3]`), against a real S3 server on loopback (moto's).

mod common;
// The gateway's tests own the S3 server helper; it depends on nothing else there.
#[path = "../../pacs-gateway/tests/common/s3.rs"]
mod s3_server;

use common::{Server, authed, center_with, demo_samples, ingest_configured, with_clinic};
use consortium_proto::v1::{
    GetRawInstanceRequest, GetStudyMetadataRequest, GetStudyMetadataResponse, RenderFrameRequest,
};
use sha2::{Digest, Sha256};

/// Puts `[storage.s3]` (the test server's bucket) into the config file.
fn blobs_in_bucket(config: &std::path::Path, port: u16, secret: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let data_line = text
        .lines()
        .find(|l| l.starts_with("data_dir = "))
        .unwrap()
        .to_owned();
    let text = text.replace(
        &data_line,
        &format!("{data_line}\n{}", s3_server::storage_section(port, secret)),
    );
    std::fs::write(config, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_instances_and_frames_come_from_the_bucket() {
    let (tmp, config) = Server::prepare("");
    let s3 = s3_server::S3Server::start(tmp.path());
    s3.create_bucket();
    blobs_in_bucket(&config, s3.port, "viewer-test-secret");

    let (_, samples) = demo_samples();
    let ct = samples.iter().find(|f| f.modality == "CT").unwrap();
    ingest_configured(&config, &with_clinic([ct])).await;
    let server = Server::start(tmp, config);
    server.user("rad1", "radiologist", "county");
    let token = server.login("rad1").await;
    let mut c = server.clients().await;

    let mut stream = c
        .images
        .get_raw_instance(authed(
            GetRawInstanceRequest {
                sop_instance_uid: ct.sop_instance_uid.clone(),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let (mut bytes, mut sha) = (Vec::new(), String::new());
    while let Some(chunk) = stream.message().await.unwrap() {
        if chunk.offset == 0 {
            sha = chunk.sha256.clone();
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let key = format!("instances/{}/{sha}.dcm", &sha[..2]);
    let object = s3.object(&key).expect("the instance is in the bucket");
    assert!(bytes == object, "GetRawInstance returns the bucket's bytes");
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(digest, sha);
    assert!(
        !server.data_dir().join("blobs").join(&key).exists(),
        "no local copy"
    );

    let frame = c
        .images
        .render_frame(authed(
            RenderFrameRequest {
                sop_instance_uid: ct.sop_instance_uid.clone(),
                frame_number: 1,
                options: None,
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let png = image::load_from_memory_with_format(&frame.data, image::ImageFormat::Png).unwrap();
    assert_eq!((png.width(), png.height()), (512, 512), "a CT slice");
    assert!(!server.log().contains("viewer-test-secret"));
}

/// The first bytes of a blob the viewer reads for its header (its
/// `HEADER_PREFIX`).
const HEADER_PREFIX: usize = 64 << 10;
/// A value after the long element, which a header cut short would lack.
const AFTER_THE_CUT: &str = "AFTER THE CUT";

/// `file` copied as a new instance whose header goes on past the first
/// [`HEADER_PREFIX`] bytes of its blob, and whose element there ends
/// exactly at that point: a private element of about 64 KiB, then
/// Requested Procedure Description. Read leniently, those first bytes would
/// parse as a whole (shorter) header.
fn with_header_cut_at_the_prefix(
    file: &std::path::Path,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
    let path = dir.join("long-header.dcm");
    let mut value_len = 60_000usize;
    for _ in 0..3 {
        let mut obj = dicom_object::open_file(file).unwrap();
        let uid = format!(
            "{}.99",
            obj.meta()
                .media_storage_sop_instance_uid()
                .trim_end_matches('\0')
        );
        let class = obj
            .meta()
            .media_storage_sop_class_uid()
            .trim_end_matches('\0')
            .to_string();
        let ts = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string();
        obj.put(DataElement::new(
            Tag(0x0029, 0x0010),
            VR::LO,
            PrimitiveValue::from("CONSORTIUM TEST"),
        ));
        obj.put(DataElement::new(
            Tag(0x0029, 0x1010),
            VR::OB,
            PrimitiveValue::from(vec![0x5Au8; value_len]),
        ));
        obj.put(DataElement::new(
            dicom_dictionary_std::tags::REQUESTED_PROCEDURE_DESCRIPTION,
            VR::LO,
            PrimitiveValue::from(AFTER_THE_CUT),
        ));
        obj.put(DataElement::new(
            dicom_dictionary_std::tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(uid.as_str()),
        ));
        let meta = obj.meta_mut();
        meta.media_storage_sop_instance_uid = uid.clone();
        meta.update_information_group_length();
        obj.write_to_file(&path).unwrap();
        // Where (0032,1060) starts in the blob: the center keeps its own
        // Part 10 header, then the dataset as sent.
        let bytes = std::fs::read(&path).unwrap();
        let (_, dataset_at) = storage::part10::parse_file_header(&bytes).unwrap();
        let tag = [0x32, 0x00, 0x60, 0x10];
        let in_file = bytes.windows(4).position(|w| w == tag).unwrap();
        let in_blob = storage::part10::file_header(&class, &uid, &ts).len() + in_file - dataset_at;
        if in_blob == HEADER_PREFIX {
            return path;
        }
        value_len = (value_len + HEADER_PREFIX) - in_blob;
    }
    panic!("cannot place the element at the cut");
}

/// A study's metadata, unpaged, as rad1 sees it at `center`.
async fn study_metadata(center: &Server, study: &str) -> GetStudyMetadataResponse {
    let token = center.login("rad1").await;
    let request = GetStudyMetadataRequest {
        study_instance_uid: study.to_string(),
        ..Default::default()
    };
    center
        .clients()
        .await
        .studies
        .get_study_metadata(authed(request, &token))
        .await
        .unwrap()
        .into_inner()
}

/// GetStudyMetadata from a bucket reads each blob's first bytes with a
/// ranged GET (a header is a few KiB, a CT slice half a MiB), the whole
/// blob only for a header longer than those, even one whose first bytes
/// end between two elements; the answer is the one a center on local disk
/// gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn study_metadata_from_the_bucket_reads_headers_not_whole_blobs() {
    let (_, samples) = demo_samples();
    let ct = samples.iter().find(|f| f.modality == "CT").unwrap();
    let (tmp, config) = Server::prepare("");
    let long = with_header_cut_at_the_prefix(&ct.path, tmp.path());
    let files = vec![
        (ct.path.clone(), ct.issuer_of_patient_id.clone()),
        (long, ct.issuer_of_patient_id.clone()),
    ];
    let s3 = s3_server::S3Server::start(tmp.path());
    s3.create_bucket();
    blobs_in_bucket(&config, s3.port, "viewer-test-secret");
    ingest_configured(&config, &files).await;
    let server = Server::start(tmp, config);
    server.user("rad1", "radiologist", "county");
    let from_bucket = study_metadata(&server, &ct.study_instance_uid).await;
    assert_eq!(from_bucket.instances.len(), 2);
    let local = center_with(&files, "").await;
    let from_disk = study_metadata(&local, &ct.study_instance_uid).await;
    assert!(
        from_bucket.dicom_json.contains(AFTER_THE_CUT),
        "the long header is there whole"
    );
    let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    assert!(
        json(&from_bucket.dicom_json) == json(&from_disk.dicom_json),
        "the bucket's answer is the disk's"
    );
    assert_eq!(from_bucket.instances, from_disk.instances);

    // What the bucket served, per blob.
    let index = rusqlite::Connection::open(server.data_dir().join("index.sqlite")).unwrap();
    let key_of = |uid: &str| -> String {
        index
            .query_row(
                "SELECT blob_key FROM instances WHERE sop_instance_uid = ?1",
                [uid],
                |r| r.get(0),
            )
            .unwrap()
    };
    let gets = |key: &str, status: u16| {
        let line = format!("\"GET /{}/{key} HTTP/1.1\" {status} ", s3_server::BUCKET);
        s3.requests().matches(&line).count()
    };
    let plain = key_of(&ct.sop_instance_uid);
    assert_eq!(gets(&plain, 206), 1, "{}", s3.requests());
    assert_eq!(gets(&plain, 200), 0, "no whole read: {}", s3.requests());
    let long_uid = from_bucket
        .instances
        .iter()
        .find(|i| i.sop_instance_uid != ct.sop_instance_uid)
        .unwrap()
        .sop_instance_uid
        .clone();
    let long = key_of(&long_uid);
    assert_eq!(gets(&long, 206), 1, "{}", s3.requests());
    assert_eq!(gets(&long, 200), 1, "then the whole: {}", s3.requests());
}

/// A bucket that does not exist stops the viewer-api at start, with the
/// reason and without its secret, before it says it is listening.
#[test]
fn a_missing_bucket_stops_the_viewer_at_start() {
    let (tmp, config) = Server::prepare("");
    let s3 = s3_server::S3Server::start(tmp.path()); // no bucket created
    let secret = "viewer-missing-bucket-secret";
    blobs_in_bucket(&config, s3.port, secret);
    let mut child = std::process::Command::new(common::BIN)
        .current_dir(tmp.path())
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It must end by itself; one that serves anyway is stopped and fails.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "never said it was listening");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read the blob store"), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
}
