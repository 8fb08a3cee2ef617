//! `viewer-api --config FILE`: the county radiologists' gRPC service.
//! `viewer-api --config FILE admin <command>`: users, clinics, tokens, audit log.

use std::path::PathBuf;
use std::process::ExitCode;

use consortium_config::Config;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config_path, rest) = match args.as_slice() {
        [flag, path, rest @ ..] if flag == "--config" => (PathBuf::from(path), rest),
        _ => {
            eprintln!("usage: viewer-api --config FILE [admin <command>]");
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
    if let [admin, command @ ..] = rest {
        if admin != "admin" {
            eprintln!("usage: viewer-api --config FILE [admin <command>]");
            return ExitCode::from(2);
        }
        return match viewer_api::admin::run(&config, command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("viewer-api admin: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("viewer-api: {msg}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), String> {
    let listen = config
        .viewer
        .as_ref()
        .ok_or("the configuration has no [viewer] section")?
        .listen;
    // A bad transport, index or blob store is refused before binding
    // anything, and "listening on" means ready.
    let prepared = viewer_api::server::prepare(config).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {addr}");
    viewer_api::server::serve(prepared, listener, shutdown_signal()).await?;
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
