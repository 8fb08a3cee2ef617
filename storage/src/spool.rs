//! Spooling: a received instance streams to a temporary file as PDUs arrive,
//! hashed on the way, so memory stays bounded whatever the instance's size.
//! Nothing here is visible to readers until `Storage::commit` indexes it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// An instance being received.
#[derive(Debug)]
pub struct Spool {
    file: Option<File>,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
    dataset_offset: u64,
    limit: u64,
    transfer_syntax: String,
}

impl Spool {
    /// Creates a spool file in `dir` starting with the Part 10 `header`.
    pub(crate) fn create(
        dir: &Path,
        header: &[u8],
        transfer_syntax: &str,
        limit: u64,
    ) -> Result<Spool> {
        let name = format!(
            "{}-{}.part",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(Error::io("create spool file", &path))?;
        let mut spool = Spool {
            file: Some(file),
            path,
            hasher: Sha256::new(),
            size: 0,
            dataset_offset: header.len() as u64,
            limit: limit.saturating_add(header.len() as u64),
            transfer_syntax: transfer_syntax.to_string(),
        };
        spool.write(header)?;
        Ok(spool)
    }

    /// Appends received bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let new_size = self.size + data.len() as u64;
        if new_size > self.limit {
            return Err(Error::TooLarge {
                limit: self.dataset_limit(),
            });
        }
        let file = self.file.as_mut().ok_or(Error::ShuttingDown)?;
        file.write_all(data)
            .map_err(Error::io("write spool file", &self.path))?;
        self.hasher.update(data);
        self.size = new_size;
        Ok(())
    }

    pub fn transfer_syntax(&self) -> &str {
        &self.transfer_syntax
    }

    /// Largest dataset accepted, in bytes: also the most a deflated one may
    /// inflate to.
    pub fn dataset_limit(&self) -> u64 {
        self.limit - self.dataset_offset
    }

    /// Offset of the dataset in the file (after the Part 10 header).
    pub fn dataset_offset(&self) -> u64 {
        self.dataset_offset
    }

    /// Bytes of dataset received so far.
    pub fn dataset_len(&self) -> u64 {
        self.size - self.dataset_offset
    }

    /// Closes the file (not yet durable: see `Storage::commit`).
    pub fn finish(mut self) -> Result<Spooled> {
        let file = self.file.take().ok_or(Error::ShuttingDown)?;
        drop(file);
        let sha256: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        Ok(Spooled {
            path: std::mem::take(&mut self.path),
            sha256,
            size: self.size,
            dataset_offset: self.dataset_offset,
            transfer_syntax: std::mem::take(&mut self.transfer_syntax),
        })
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A completely received instance, not yet stored.
/// Dropping it deletes the temporary file.
#[derive(Debug)]
pub struct Spooled {
    pub(crate) path: PathBuf,
    pub sha256: [u8; 32],
    pub size: u64,
    pub dataset_offset: u64,
    pub transfer_syntax: String,
}

impl Spooled {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sha256_hex(&self) -> String {
        hex(&self.sha256)
    }

    /// Gives up ownership of the temporary file (it was moved or uploaded).
    pub(crate) fn disarm(&mut self) {
        self.path = PathBuf::new();
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}
