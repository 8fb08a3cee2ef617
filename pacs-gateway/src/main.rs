//! `pacs-gateway --config FILE [--listen HOST:PORT] [--data-dir DIR]`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use consortium_config::Config;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: pacs-gateway --config FILE [--listen HOST:PORT] [--data-dir DIR]";

struct Args {
    config: PathBuf,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut config = None;
    let mut listen = None;
    let mut data_dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--config" => config = Some(PathBuf::from(value()?)),
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--data-dir" => data_dir = Some(PathBuf::from(value()?)),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(Args {
        config: config.ok_or_else(|| USAGE.to_string())?,
        listen,
        data_dir,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let mut config = match Config::from_file(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pacs-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(listen) = args.listen {
        config.gateway.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.storage.data_dir = dir;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pacs-gateway: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("pacs-gateway: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let storage = storage::Storage::open_configured(&config.storage).map_err(|e| e.to_string())?;
    storage
        .blobs()
        .check_writable()
        .await
        .map_err(|e| format!("the blob store cannot be written: {e}"))?;
    let clinics = config
        .clinics
        .iter()
        .map(|c| (c.id.clone(), c.name.clone()))
        .collect();
    storage
        .sync_clinics(clinics)
        .await
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.gateway.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.gateway.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    }
    tracing::info!(%addr, ae_title = %config.gateway.ae_title, "gateway ready");
    pacs_gateway::run(listener, Arc::new(config), storage, shutdown_signal()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
