//! C-STORE (PS3.4 B.2, PS3.7 9.1.1): stream the dataset to a spool, then
//! validate, make durable and index it before answering success.

use storage::{DatasetError, Source, Spool, Storage, StoreOutcome};

use crate::negotiate::Context;
use consortium_dimse::{Command, status, tag};

/// Datasets up to this size are validated on the association's own task.
const INLINE_VALIDATION_BYTES: u64 = 8 << 20;

/// Why a C-STORE failed, mapped once to a DIMSE status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("command SOP class {command} differs from its presentation context ({context})")]
    ContextMismatch { command: String, context: String },
    #[error("command has no valid Affected SOP Class/Instance UID")]
    BadCommandUid,
    #[error("C-STORE request without a dataset")]
    NoDataset,
    #[error(transparent)]
    Storage(#[from] storage::Error),
}

impl StoreError {
    pub(crate) fn status(&self) -> u16 {
        match self {
            StoreError::ContextMismatch { .. } => status::SOP_CLASS_NOT_SUPPORTED,
            StoreError::BadCommandUid | StoreError::NoDataset => status::CANNOT_UNDERSTAND,
            StoreError::Storage(storage::Error::Dataset(e)) if e.is_mismatch() => {
                status::DATASET_MISMATCH
            }
            // Like an instance over the size limit.
            StoreError::Storage(storage::Error::Dataset(DatasetError::InflatesBeyond {
                ..
            })) => status::OUT_OF_RESOURCES,
            StoreError::Storage(e) if e.is_resource_failure() => status::OUT_OF_RESOURCES,
            StoreError::Storage(storage::Error::Dataset(_)) => status::CANNOT_UNDERSTAND,
            StoreError::Storage(_) => status::OUT_OF_RESOURCES,
        }
    }

    /// The Error Comment for the sender: what was wrong with what it sent,
    /// or that the center could not keep it now. The center's own failures
    /// (disk, index, object store: paths, endpoints, buckets) stay in the log.
    pub(crate) fn comment(&self) -> String {
        match self {
            StoreError::Storage(e @ storage::Error::Dataset(_)) if e.is_resource_failure() => {
                "the center cannot keep the instance now; send it again later".into()
            }
            StoreError::Storage(storage::Error::Dataset(_))
            | StoreError::Storage(storage::Error::TooLarge { .. }) => self.to_string(),
            StoreError::Storage(storage::Error::StorageFull { .. }) => {
                "the center's storage is full; send it again later".into()
            }
            StoreError::Storage(_) => {
                "the center cannot keep the instance now; send it again later".into()
            }
            other => other.to_string(),
        }
    }
}

/// A C-STORE whose dataset is arriving.
#[derive(Debug)]
pub(crate) struct StoreInProgress {
    pub(crate) sop_class_uid: String,
    pub(crate) sop_instance_uid: String,
    spool: Option<Spool>,
    failure: Option<StoreError>,
}

impl StoreInProgress {
    /// Starts a C-STORE. Failures are remembered: the dataset is still read
    /// (and discarded) so the association stays in step.
    pub(crate) fn start(
        storage: &Storage,
        command: &Command,
        context: &Context,
        limit: u64,
    ) -> StoreInProgress {
        let sop_class_uid = command.uid(tag::AFFECTED_SOP_CLASS_UID).unwrap_or_default();
        let sop_instance_uid = command
            .uid(tag::AFFECTED_SOP_INSTANCE_UID)
            .unwrap_or_default();
        let mut op = StoreInProgress {
            sop_class_uid,
            sop_instance_uid,
            spool: None,
            failure: None,
        };
        let valid = storage::part10::is_valid_uid(&op.sop_class_uid)
            && storage::part10::is_valid_uid(&op.sop_instance_uid);
        op.failure = if !valid {
            Some(StoreError::BadCommandUid)
        } else if op.sop_class_uid != context.abstract_syntax {
            Some(StoreError::ContextMismatch {
                command: op.sop_class_uid.clone(),
                context: context.abstract_syntax.clone(),
            })
        } else {
            match storage.spool(
                &op.sop_class_uid,
                &op.sop_instance_uid,
                &context.transfer_syntax,
                limit,
            ) {
                Ok(spool) => {
                    op.spool = Some(spool);
                    None
                }
                Err(e) => Some(e.into()),
            }
        };
        op
    }

    /// Appends one received fragment.
    pub(crate) fn write(&mut self, data: &[u8]) {
        if let Some(spool) = self.spool.as_mut()
            && let Err(e) = spool.write(data)
        {
            self.spool = None; // deletes the partial file
            self.failure = Some(e.into());
        }
    }

    /// The dataset is complete: validate, store, index.
    pub(crate) async fn finish(
        self,
        storage: &Storage,
        source: &Source,
    ) -> Result<StoreOutcome, StoreError> {
        if let Some(failure) = self.failure {
            return Err(failure);
        }
        let spool = self.spool.ok_or(StoreError::NoDataset)?;
        // Reading back a typical header costs a few page-cache reads: cheaper
        // inline than a hand-off to the blocking pool. Large or deflated
        // datasets (deflated ones are inflated to be validated) go to the pool.
        let inline = spool.dataset_len() <= INLINE_VALIDATION_BYTES
            && !storage::attrs::DatasetEncoding::for_transfer_syntax(spool.transfer_syntax())
                .deflated;
        let (class, instance) = (self.sop_class_uid, self.sop_instance_uid);
        let st = storage.clone();
        let validate = move || -> Result<_, storage::Error> {
            let ts = spool.transfer_syntax().to_string();
            let (offset, limit) = (spool.dataset_offset(), spool.dataset_limit());
            let spooled = st.finish_spool(spool)?;
            let attrs = storage::attrs::read_file(spooled.path(), offset, &ts, limit)?;
            check_matches(&attrs, &class, &instance)?;
            Ok((spooled, attrs))
        };
        let (spooled, attrs) = if inline {
            validate()?
        } else {
            tokio::task::spawn_blocking(validate)
                .await
                .map_err(|e| storage::Error::Io {
                    op: "validate spooled dataset",
                    path: Default::default(),
                    source: std::io::Error::other(e),
                })??
        };
        Ok(storage.commit(spooled, attrs, source).await?)
    }
}

fn check_matches(
    attrs: &storage::InstanceAttrs,
    class: &str,
    instance: &str,
) -> Result<(), DatasetError> {
    if attrs.sop_class_uid != class {
        return Err(DatasetError::Mismatch {
            attribute: "SOP Class UID",
            dataset: attrs.sop_class_uid.clone(),
            command: class.to_string(),
        });
    }
    if attrs.sop_instance_uid != instance {
        return Err(DatasetError::Mismatch {
            attribute: "SOP Instance UID",
            dataset: attrs.sop_instance_uid.clone(),
            command: instance.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The center failing to read its own spool file (out of descriptors,
    /// a disk error) is its failure: 0xA700, which senders retry, with the
    /// OS's words kept in the log; a dataset that is wrong stays 0xC000.
    #[test]
    fn a_spool_the_center_cannot_read_is_a700_not_c000() {
        let local = StoreError::Storage(storage::Error::Dataset(DatasetError::Io(
            "Too many open files (os error 24)".into(),
        )));
        assert_eq!(local.status(), status::OUT_OF_RESOURCES);
        assert!(
            !local.comment().contains("open files"),
            "{}",
            local.comment()
        );
        let theirs = StoreError::Storage(storage::Error::Dataset(DatasetError::Truncated));
        assert_eq!(theirs.status(), status::CANNOT_UNDERSTAND);
        assert!(theirs.comment().contains("truncated"));
    }
}
