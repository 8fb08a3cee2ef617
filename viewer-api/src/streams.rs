//! A bound on the streams one user may hold open at once (series streams,
//! raw downloads, worklist watches). Each holds a render worker's output, a
//! blob being read or a watcher; without a bound, one user's client (or
//! stolen token) could hold them all and slow every other reader.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::auth::Caller;
use crate::error::{ApiError, Result};

pub struct StreamLimits {
    per_user: usize,
    open: Mutex<HashMap<i64, usize>>,
}

/// One open stream of a user; the count goes down when it is dropped (the
/// stream ended, failed, or its client went away).
pub struct StreamSlot {
    limits: Arc<StreamLimits>,
    user_pk: i64,
}

impl StreamLimits {
    pub fn new(per_user: usize) -> Arc<StreamLimits> {
        Arc::new(StreamLimits {
            per_user,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more stream of `caller`, unless they have all theirs open.
    pub fn acquire(self: &Arc<Self>, caller: &Caller) -> Result<StreamSlot> {
        let mut open = self.open.lock().expect("stream limits lock");
        let n = open.entry(caller.user_pk).or_insert(0);
        if *n >= self.per_user {
            return Err(ApiError::ResourceExhausted(format!(
                "{} streams are already open for this user; let one finish or cancel it first",
                self.per_user
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            limits: self.clone(),
            user_pk: caller.user_pk,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().expect("stream limits lock");
        if let Some(n) = open.get_mut(&self.user_pk) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user_pk);
            }
        }
    }
}
