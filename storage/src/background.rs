//! Threads for hashing that no one is waiting on at once (re-verifying
//! stored blobs for storage commitment and `verify`; in the upload tool,
//! hashing what was sent for its record), below the rest of the process in
//! CPU priority (SCHED_IDLE). Ingest's threads wait on fsync often;
//! these use the CPU it leaves idle instead of competing with it, so a
//! sender's C-STORE-RSP does not wait behind another sender's commitment.
//! SCHED_IDLE rather than nice 19: a woken ingest thread takes the CPU from
//! an idle-policy thread at once, where under nice 19 it could wait for the
//! hash's slice to end, on every fsync's wake-up (4-association uploads of
//! the bench corpus 2-4% faster, same binaries A/B). The work still never
//! starves: the scheduler gives SCHED_IDLE a small weight, so on a machine
//! kept busy by ingest it runs perhaps a hundred times slower, which suits
//! storage commitment (its reports are asynchronous; senders wait minutes
//! for them).

use std::sync::{Arc, Mutex, OnceLock, mpsc};

type Job = Box<dyn FnOnce() + Send>;

/// Runs `f` on a background thread; the error is a job that panicked.
pub async fn run<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, &'static str> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(out.map_err(|_| "a background hashing job panicked"));
    });
    queue()
        .send(job)
        .map_err(|_| "the background hashing threads are gone")?;
    rx.await
        .map_err(|_| "the background hashing threads are gone")?
}

fn queue() -> &'static mpsc::Sender<Job> {
    static QUEUE: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("verify-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        // The lock is held only to take the next job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a background hashing thread");
            }
        }
        tx
    })
}

/// SCHED_IDLE for the calling thread, else nice 19: on Linux both are
/// per-thread attributes. Elsewhere nice would lower the whole process, so
/// these threads keep normal priority there.
#[cfg(target_os = "linux")]
fn lower_priority() {
    use thread_priority::unix::{
        NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
        thread_native_id, thread_schedule_policy,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    let set = set_thread_priority_and_policy(
        thread_native_id(),
        thread_priority::ThreadPriority::Min,
        idle,
    );
    // The crate sets the policy, then nice 0, which a process niced below
    // that may not do: SCHED_IDLE is then in effect all the same.
    if set.is_ok() || thread_schedule_policy().is_ok_and(|p| p == idle) {
        return;
    }
    tracing::warn!(error = ?set.err(), "background hashing cannot use SCHED_IDLE; nice 19 instead");
    if let Err(e) = rustix::process::setpriority_process(None, 19) {
        tracing::warn!(error = %e, "background hashing runs at normal priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn jobs_run_at_idle_policy_and_a_panic_is_an_error_not_a_lost_thread() {
        use thread_priority::unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, thread_schedule_policy,
        };
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        let own = thread_schedule_policy().unwrap();
        assert_ne!(own, idle);
        let theirs = super::run(|| thread_schedule_policy().unwrap())
            .await
            .unwrap();
        assert_eq!(theirs, idle);
        // Only those threads: the caller's policy is unchanged.
        assert_eq!(thread_schedule_policy().unwrap(), own);
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 0..threads + 1 {
            assert!(super::run(|| panic!("boom")).await.is_err());
        }
        assert_eq!(super::run(|| 6 * 7).await, Ok(42));
    }
}
