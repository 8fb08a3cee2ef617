//! Association limits: overall and per clinic. When the overall limit is
//! reached, the association idle the longest is asked to release to make
//! room; only when every association is busy is a new peer refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use crate::negotiate::Refusal;

#[derive(Debug)]
pub(crate) struct Admission {
    max_total: usize,
    max_per_clinic: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    entries: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    clinic: String,
    idle_since: Option<Instant>,
    evict: Arc<Notify>,
}

/// A held association slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct Ticket {
    id: u64,
    admission: Arc<Admission>,
    evict: Arc<Notify>,
}

impl Admission {
    pub(crate) fn new(max_total: usize, max_per_clinic: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_clinic,
            state: Mutex::new(State::default()),
        })
    }

    pub(crate) fn admit(self: &Arc<Self>, clinic: &str) -> Result<Ticket, Refusal> {
        let mut state = self.state.lock().expect("admission lock");
        let from_clinic = state
            .entries
            .values()
            .filter(|e| e.clinic == clinic)
            .count();
        if from_clinic >= self.max_per_clinic {
            return Err(Refusal::ClinicLimit);
        }
        if state.entries.len() >= self.max_total {
            let victim = state
                .entries
                .iter()
                .filter_map(|(id, e)| e.idle_since.map(|t| (t, *id)))
                .min()
                .map(|(_, id)| id)
                .ok_or(Refusal::TotalLimit)?;
            if let Some(entry) = state.entries.remove(&victim) {
                tracing::info!(
                    victim,
                    "releasing the longest-idle association to admit a new one"
                );
                entry.evict.notify_one();
            }
        }
        state.next_id += 1;
        let id = state.next_id;
        let evict = Arc::new(Notify::new());
        state.entries.insert(
            id,
            Entry {
                clinic: clinic.to_string(),
                idle_since: Some(Instant::now()),
                evict: evict.clone(),
            },
        );
        Ok(Ticket {
            id,
            admission: self.clone(),
            evict,
        })
    }

    pub(crate) fn active(&self) -> usize {
        self.state.lock().expect("admission lock").entries.len()
    }
}

impl Ticket {
    /// Marks the association busy (in a DIMSE message) or idle.
    pub(crate) fn set_busy(&self, busy: bool) {
        let mut state = self.admission.state.lock().expect("admission lock");
        if let Some(e) = state.entries.get_mut(&self.id) {
            match (busy, e.idle_since) {
                (true, _) => e.idle_since = None,
                (false, None) => e.idle_since = Some(Instant::now()),
                (false, Some(_)) => {}
            }
        }
    }

    /// Completes when this association was chosen to make room.
    pub(crate) async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut state) = self.admission.state.lock() {
            state.entries.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn evicts_longest_idle_then_refuses_when_all_busy() {
        let adm = Admission::new(2, 2);
        let a = adm.admit("x").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = adm.admit("y").unwrap();
        b.set_busy(true);
        // Full: `a` is the only idle one, so it is asked to go.
        let c = adm.admit("z").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), a.evicted())
            .await
            .expect("a evicted");
        assert_eq!(adm.active(), 2);
        c.set_busy(true);
        assert_eq!(adm.admit("w").unwrap_err(), Refusal::TotalLimit);
        drop(b);
        assert!(adm.admit("w").is_ok());
    }

    #[test]
    fn per_clinic_limit() {
        let adm = Admission::new(10, 1);
        let _a = adm.admit("x").unwrap();
        assert_eq!(adm.admit("x").unwrap_err(), Refusal::ClinicLimit);
        assert!(adm.admit("y").is_ok());
    }
}
