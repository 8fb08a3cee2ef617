//! The listener: accepts connections and runs one task per association until
//! shutdown, then lets associations finish their current message.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::admission::Admission;
use crate::association::{self, Shared};
use consortium_config::Config;
use storage::Storage;

/// Connections allowed beyond `max_associations` while they negotiate
/// (each is bounded by the ARTIM timeout).
const HANDSHAKE_SLACK: usize = 64;
/// How long associations get to finish their current message at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves DICOM on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    config: Arc<Config>,
    storage: Storage,
    shutdown: impl Future,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        admission: Admission::new(
            config.gateway.max_associations,
            config.gateway.max_associations_per_clinic,
        ),
        config: config.clone(),
        storage,
        shutdown: stop_rx,
        reports_due: tokio::sync::Notify::new(),
    });
    crate::report_delivery::all_due_at_start(&shared).await;
    tokio::spawn(crate::report_delivery::run(shared.clone()));
    let connections = Arc::new(Semaphore::new(
        config.gateway.max_associations + HANDSHAKE_SLACK,
    ));
    let mut tasks = JoinSet::new();
    let mut next_id = 0u64;
    let mut backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(ok) => {
                backoff = Duration::from_millis(10);
                ok
            }
            Err(e) => {
                // Out of file descriptors and similar: back off, keep serving.
                error!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            warn!(%peer, "too many open connections; closing new connection");
            drop(stream);
            continue;
        };
        next_id += 1;
        let shared = shared.clone();
        let id = next_id;
        tasks.spawn(async move {
            association::serve(shared, stream, peer, id).await;
            drop(permit);
        });
    }
    info!(
        active = shared.admission.active(),
        "shutting down: releasing associations"
    );
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("associations still busy after the grace period; aborting them");
        tasks.shutdown().await;
    }
}
