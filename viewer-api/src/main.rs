//! `viewer-api --config FILE`: the county radiologists' gRPC service.
//!
//! Skeleton: serves `consortium.v1.CenterService` (no patient data) on the
//! `[viewer] listen` address. Plaintext is refused on non-loopback addresses
//! until TLS arrives with the viewer-api issue.

use std::path::PathBuf;
use std::process::ExitCode;

use consortium_config::Config;
use consortium_proto::v1::center_service_server::{CenterService, CenterServiceServer};
use consortium_proto::v1::{Clinic, GetCenterInfoRequest, GetCenterInfoResponse};
use tonic::{Request, Response, Status};

struct Center {
    config: Config,
}

#[tonic::async_trait]
impl CenterService for Center {
    async fn get_center_info(
        &self,
        _request: Request<GetCenterInfoRequest>,
    ) -> Result<Response<GetCenterInfoResponse>, Status> {
        let instance_count = storage::IndexReader::open_in(&self.config.storage.data_dir)
            .and_then(|r| r.instance_count())
            .map_err(|e| {
                tracing::error!(error = %e, "index unavailable");
                Status::unavailable("index unavailable")
            })?;
        Ok(Response::new(GetCenterInfoResponse {
            ae_title: self.config.gateway.ae_title.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            clinics: self
                .config
                .clinics
                .iter()
                .map(|c| Clinic {
                    id: c.id.clone(),
                    name: c.name.clone(),
                })
                .collect(),
            instance_count,
        }))
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut args = std::env::args().skip(1);
    let config_path = match (args.next().as_deref(), args.next()) {
        (Some("--config"), Some(path)) => PathBuf::from(path),
        _ => {
            eprintln!("usage: viewer-api --config FILE");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_file(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("viewer-api: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("viewer-api: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let viewer = config
        .viewer
        .clone()
        .ok_or("the configuration has no [viewer] section")?;
    if viewer.tls_cert.is_some() || viewer.tls_key.is_some() {
        return Err("TLS is not implemented yet in this skeleton".into());
    }
    if !viewer.listen.ip().is_loopback() {
        return Err(format!(
            "refusing plaintext gRPC on non-loopback address {}",
            viewer.listen
        ));
    }
    let listener = tokio::net::TcpListener::bind(viewer.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", viewer.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {addr}");
    let service = CenterServiceServer::new(Center { config });
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown_signal(),
        )
        .await
        .map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
