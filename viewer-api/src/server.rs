//! The listener: TLS or loopback-only plaintext, the consortium services,
//! the standard health service and server reflection, clean stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use consortium_config::{Config, ViewerConfig};
use consortium_proto::v1::center_service_server::CenterServiceServer;
use consortium_proto::v1::identity_service_server::IdentityServiceServer;
use consortium_proto::v1::image_service_server::ImageServiceServer;
use consortium_proto::v1::study_service_server::StudyServiceServer;
use consortium_proto::v1::worklist_service_server::WorklistServiceServer;
use tokio::net::TcpListener;
use tonic::transport::{Identity as TlsIdentity, Server, ServerTlsConfig};

use crate::service::{App, Center, Identity, Imaging, Studies, Worklists};

/// Largest message accepted or sent (rendered frames of big images).
const MAX_MESSAGE: usize = 64 << 20;

/// How long a client has to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent gRPC calls on one connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 200;

/// The TLS settings, or `None` for plaintext, which only a loopback address may use.
pub fn transport(viewer: &ViewerConfig) -> Result<Option<ServerTlsConfig>, String> {
    match (&viewer.tls_cert, &viewer.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            let identity = TlsIdentity::from_pem(read(cert)?, read(key)?);
            // A connection that never finishes its handshake is closed.
            Ok(Some(
                ServerTlsConfig::new()
                    .identity(identity)
                    .timeout(TLS_HANDSHAKE_TIMEOUT),
            ))
        }
        (None, None) if viewer.listen.ip().is_loopback() => Ok(None),
        (None, None) => Err(format!(
            "refusing plaintext gRPC on non-loopback address {}: configure [viewer] tls_cert and tls_key",
            viewer.listen
        )),
        _ => Err("[viewer] needs both tls_cert and tls_key, or neither".into()),
    }
}

/// The service ready to serve: its transport checked, its index opened
/// (migrations run) and the blob store reached.
pub struct Prepared {
    app: Arc<App>,
    tls: Option<ServerTlsConfig>,
}

/// Everything that can fail before serving, so that a caller says
/// "listening" only once the service is ready.
pub async fn prepare(config: Config) -> Result<Prepared, String> {
    let viewer = config
        .viewer
        .clone()
        .ok_or("the configuration has no [viewer] section")?;
    let tls = transport(&viewer)?;
    if let Some(tls) = &tls {
        // Reads and checks the certificate and key now, not after binding.
        Server::builder()
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS certificate or key: {e}"))?;
    }
    let app = App::open(config).map_err(|e| e.to_string())?;
    // A bucket that is missing or refuses our keys stops the start here.
    app.images
        .blobs()
        .check_readable()
        .await
        .map_err(|e| format!("cannot read the blob store: {e}"))?;
    Ok(Prepared { app, tls })
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    prepared: Prepared,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    let Prepared { app, tls } = prepared;
    tokio::spawn(app.worklist.clone().run_poller());
    let flusher = app.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            flusher.flush_refusals().await;
        }
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<IdentityServiceServer<Identity>>()
        .await;
    health
        .set_serving::<WorklistServiceServer<Worklists>>()
        .await;
    health.set_serving::<StudyServiceServer<Studies>>().await;
    health.set_serving::<ImageServiceServer<Imaging>>().await;
    health.set_serving::<CenterServiceServer<Center>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(consortium_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| e.to_string())?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| e.to_string())?;

    // Limits a client cannot lift: streams per connection (hyper's own
    // default, which tonic otherwise replaces with none), and keepalives
    // that close connections whose peer has gone.
    let mut builder = Server::builder()
        .trace_fn(|req| tracing::info_span!("grpc", call = %req.uri().path()))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let a = |app: &Arc<App>| app.clone();
    builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(IdentityServiceServer::new(Identity(a(&app))))
        .add_service(
            WorklistServiceServer::new(Worklists(a(&app))).max_decoding_message_size(1 << 20),
        )
        .add_service(
            // GetStudyMetadata keeps to its own limit (`metadata_page`);
            // GetPriors answers are small.
            StudyServiceServer::new(Studies(a(&app)))
                .max_encoding_message_size(MAX_MESSAGE.max(app.metadata_answer_limit)),
        )
        .add_service(
            ImageServiceServer::new(Imaging(a(&app))).max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(CenterServiceServer::new(Center(a(&app))))
        .serve_with_incoming_shutdown(
            // (TCP keepalive is set here: the builder's applies only to
            // listeners it binds itself.)
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60))),
            shutdown,
        )
        .await
        .map_err(|e| e.to_string())
}
