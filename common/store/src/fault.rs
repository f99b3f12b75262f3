//! What went wrong with a store, in the operator's terms: [`StoreFault`].
//!
//! sled reports a full disk, a damaged file and a store held by another process with the same
//! few error variants, and some of its messages mislead (a damaged `conf` file is "created using
//! a sled version earlier than 0.29"). The store turns every sled error into a [`StoreFault`]
//! that names the store's directory and says which of these it is, and hands it out as the
//! source of a [`StoreError::Backend`]; [`fault_of`] finds it again, [`is_disk_full`] asks the one
//! question a daemon acts on.

use std::path::{Path, PathBuf};

use crate::StoreError;
use crate::verify::Problem;

/// A failure of the key store's files or of its database, with where it happened. It is the
/// source of a [`StoreError::Backend`] (see [`fault_of`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreFault {
    /// The filesystem holding the store is full (ENOSPC). The call that failed committed
    /// nothing that a crash at the same point would not have left (see "Disk faults" in the
    /// crate documentation); the store is out of service until it is reopened, which it does by
    /// itself once space is free.
    #[error("no space left on device at {}", .path.display())]
    DiskFull {
        /// The store's directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the store's lock: a daemon (or a `qkdctl store` command) has it
    /// open.
    #[error("the key store at {} is locked by another process (is the daemon still running? stop it first)", .path.display())]
    Locked {
        /// The store's directory.
        path: PathBuf,
        /// sled's message.
        detail: String,
    },
    /// sled's configuration file `conf` is damaged (its checksum does not match, or it does not
    /// parse) or cannot be read. The keys are not in this file: see docs/store.md for how to
    /// rewrite it.
    #[error("the key store's configuration file {} is damaged or unreadable: {detail}", .path.display())]
    ConfDamaged {
        /// The `conf` file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The store's data is damaged: sled found a checksum mismatch or malformed data in its files
    /// (a flipped bit, a truncated file), or it could not read a tree to its end.
    #[error("the key store at {} is damaged: {detail}", .path.display())]
    Damaged {
        /// The store's directory.
        path: PathBuf,
        /// What was found where (tree, key, sled's finding).
        detail: String,
    },
    /// Verifying the store found records that break its invariants (see
    /// [`crate::verify`]); the first few are listed, `qkdctl store verify` lists them all.
    #[error(
        "the key store at {} failed verification, {} problem(s): {}{} (`qkdctl store verify` lists them all)",
        .path.display(),
        .problems.len(),
        .problems.iter().take(5).map(ToString::to_string).collect::<Vec<_>>().join("; "),
        if .problems.len() > 5 { "; ..." } else { "" }
    )]
    Invalid {
        /// The store's directory.
        path: PathBuf,
        /// What verification found.
        problems: Vec<Problem>,
    },
    /// Another I/O error (permissions, a failing disk).
    #[error("I/O error on the key store at {}: {source}", .path.display())]
    Io {
        /// The store's directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A call failed earlier with a disk or I/O error and the store could not be reopened yet:
    /// calls fail at once with this error until it is (see [`crate::SledStore::reopen_if_failed`]).
    #[error("the key store at {} is out of service after an earlier failure: {cause}", .path.display())]
    OutOfService {
        /// The store's directory.
        path: PathBuf,
        /// The failure (or the last failed reopen).
        cause: String,
        /// Whether that failure was a full disk.
        disk_full: bool,
    },
    /// Any other sled failure (a bug sled reports, an unsupported use).
    #[error("the key store at {}: {source}", .path.display())]
    Sled {
        /// The store's directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
}

impl StoreFault {
    /// Whether the disk holding the store is full (directly, or as the cause of
    /// [`StoreFault::OutOfService`]).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreFault::DiskFull { .. } | StoreFault::OutOfService { disk_full: true, .. })
    }

    /// The store's directory (or `conf` file) the fault is about.
    pub fn path(&self) -> &Path {
        match self {
            StoreFault::DiskFull { path, .. }
            | StoreFault::Locked { path, .. }
            | StoreFault::ConfDamaged { path, .. }
            | StoreFault::Damaged { path, .. }
            | StoreFault::Invalid { path, .. }
            | StoreFault::Io { path, .. }
            | StoreFault::OutOfService { path, .. }
            | StoreFault::Sled { path, .. } => path,
        }
    }

    /// Whether the database must be dropped and opened again before it can work (sled keeps the
    /// first I/O error of its log for ever: a full disk stays "full" after space is freed).
    pub(crate) fn needs_reopen(&self) -> bool {
        matches!(self, StoreFault::DiskFull { .. } | StoreFault::Io { .. })
    }
}

/// The [`StoreFault`] behind a store error, if it is one (the source of
/// [`StoreError::Backend`]).
pub fn fault_of(error: &StoreError) -> Option<&StoreFault> {
    match error {
        StoreError::Backend(source) => source.downcast_ref::<StoreFault>(),
        _ => None,
    }
}

/// Whether `error` says that the disk is full: a [`StoreFault`] saying so, or any I/O error of
/// kind [`std::io::ErrorKind::StorageFull`] among its sources (other stores, and
/// [`crate::faulty::FaultyStore`], report it that way).
pub fn is_disk_full(error: &StoreError) -> bool {
    if fault_of(error).is_some_and(StoreFault::is_disk_full) {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull) {
            return true;
        }
        source = e.source();
    }
    false
}

/// `error` and its sources as one line, each source that says something new after a colon:
/// what a log line or a command's error should show. (A [`StoreError::Backend`] displays its
/// source already, so printing the whole chain, as `anyhow`'s `{:#}` does, repeats it.)
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = e.source();
    }
    message
}

/// A sled error with what the store was doing (a tree and a key), before the store's path is
/// attached by [`locate`].
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub(crate) struct SledAt {
    /// Where: "tree `ready`, after key ...".
    pub context: String,
    /// sled's error.
    #[source]
    pub source: sled::Error,
}

/// A sled error met while doing `context`, as a store error (classified by [`locate`] later).
pub(crate) fn sled_at(context: impl Into<String>, source: sled::Error) -> StoreError {
    StoreError::backend(SledAt { context: context.into(), source })
}

/// The store error with any raw sled error inside turned into the [`StoreFault`] it means for the
/// store in `path`; other errors unchanged.
pub(crate) fn locate(error: StoreError, path: &Path) -> StoreError {
    let StoreError::Backend(source) = error else {
        return error;
    };
    let source = match source.downcast::<sled::Error>() {
        Ok(sled) => return StoreError::backend(classify(*sled, path, None)),
        Err(other) => other,
    };
    match source.downcast::<SledAt>() {
        Ok(at) => StoreError::backend(classify(at.source, path, Some(at.context))),
        Err(other) => StoreError::Backend(other),
    }
}

/// What a sled error means for the store in `path`; `context` says what the store was doing.
pub(crate) fn classify(error: sled::Error, path: &Path, context: Option<String>) -> StoreFault {
    let path = path.to_owned();
    let within = |detail: String| match &context {
        Some(context) => format!("{context}: {detail}"),
        None => detail,
    };
    match error {
        // sled copies its I/O errors (keeping the kind, not the OS code) when it hands them out.
        sled::Error::Io(source) if source.kind() == std::io::ErrorKind::StorageFull => {
            StoreFault::DiskFull { path, source }
        }
        sled::Error::Io(source) if source.to_string().contains("could not acquire lock") => {
            StoreFault::Locked { path, detail: source.to_string() }
        }
        sled::Error::Io(source) => StoreFault::Io { path, source },
        sled::Error::Corruption { at, .. } => {
            let at = at.map(|at| format!(" at {at:?}")).unwrap_or_default();
            StoreFault::Damaged {
                path,
                detail: within(format!(
                    "sled found corrupted data{at} (a checksum mismatch, malformed data or a truncated file)"
                )),
            }
        }
        // sled's only reading of its `conf` file that fails this way (see `verify::check_conf`,
        // which normally finds the damage first, with a better message).
        sled::Error::Unsupported(message) if message.contains("0.29") => StoreFault::ConfDamaged {
            path: path.join(crate::verify::CONF_FILE),
            detail: "it is not valid UTF-8".into(),
        },
        other => match context {
            Some(context) => StoreFault::Damaged { path, detail: format!("{context}: {other}") },
            None => StoreFault::Sled { path, source: other },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_errors_are_classified_by_what_they_mean() {
        let path = Path::new("/data/store");
        let full = sled::Error::Io(std::io::Error::from(std::io::ErrorKind::StorageFull));
        let fault = classify(full.clone(), path, None);
        assert!(fault.is_disk_full());
        assert_eq!(fault.to_string(), "no space left on device at /data/store");
        // sled's copy of an I/O error keeps the kind.
        assert!(classify(full.clone(), path, None).is_disk_full());

        let lock = sled::Error::Io(std::io::Error::other("could not acquire lock on \"/data/store/db\": WouldBlock"));
        let fault = classify(lock, path, None);
        assert!(matches!(fault, StoreFault::Locked { .. }));
        assert!(fault.to_string().contains("is the daemon still running?"));

        let corrupt = sled::Error::Corruption { at: None, bt: () };
        let fault = classify(corrupt, path, Some("tree `ready`".into()));
        assert!(fault.to_string().starts_with("the key store at /data/store is damaged: tree `ready`: sled found"));
        assert!(!fault.to_string().contains("daemon still running"));

        let conf = sled::Error::Unsupported(
            "failed to open database that may have been created using a sled version earlier than 0.29".into(),
        );
        let fault = classify(conf, path, None);
        assert_eq!(
            fault.to_string(),
            "the key store's configuration file /data/store/conf is damaged or unreadable: it is not valid UTF-8"
        );

        let other_io = sled::Error::Io(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(!classify(other_io, path, None).is_disk_full());
    }

    #[test]
    fn located_errors_keep_their_fault_as_the_source() {
        let raw = crate::db_error(sled::Error::Io(std::io::Error::from(std::io::ErrorKind::StorageFull)));
        let located = locate(raw, Path::new("/s"));
        assert!(is_disk_full(&located));
        assert_eq!(located.to_string(), "key store database error: no space left on device at /s");
        assert!(matches!(fault_of(&located), Some(StoreFault::DiskFull { .. })));
        // Any StorageFull I/O error among the sources counts, whatever the store.
        let foreign = StoreError::backend(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(is_disk_full(&foreign));
        assert!(!is_disk_full(&StoreError::Corrupt("x".into())));
        // Described once, not once per source.
        let described = describe(&located);
        assert!(described.starts_with("key store database error: no space left on device at /s: "), "{described}");
        assert_eq!(described.matches("no space left on device at /s").count(), 1, "{described}");
    }
}
