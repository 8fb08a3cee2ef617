//! The viewer-api reading blobs from an S3-compatible bucket
//! (`[storage.s3]`), against a real S3 server on loopback (moto's).

mod common;
// The gateway's tests own the S3 server helper; it depends on nothing else there.
#[path = "../../pacs-gateway/tests/common/s3.rs"]
mod s3_server;

use common::{Server, authed, demo_samples, ingest_configured, with_clinic};
use consortium_proto::v1::{GetRawInstanceRequest, RenderFrameRequest};
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
