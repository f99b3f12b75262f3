//! The delivery audit log: one JSON line per key delivery (time, role, SAE IDs, key IDs and
//! sizes; never key bytes), appended before the keys leave the KME. A KME whose log cannot be
//! written refuses to deliver (fails closed): no key is handed out without its record.
//!
//! The file is opened in append mode (`O_APPEND`: each record is one `write(2)` at the end of
//! the file, never over an earlier one) with mode 0600. Records are written unbuffered, so a
//! full disk or an unwritable file is seen by the delivery that needs the record.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use uuid::Uuid;

/// An append-only delivery log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
#[error("delivery audit log {path}: {source}")]
pub struct AuditError {
    /// The log.
    pub path: PathBuf,
    /// The failure.
    pub source: std::io::Error,
}

/// One delivery.
#[derive(Debug, serde::Serialize)]
pub struct Delivery<'a> {
    /// `master` (Get key) or `slave` (Get key with key IDs).
    pub role: &'static str,
    /// The master SAE.
    pub master: &'a str,
    /// The slave SAEs.
    pub slaves: Vec<&'a str>,
    /// The SAE the keys go to.
    pub caller: &'a str,
    /// Key size, bits (0 when the slave's request does not say).
    pub size_bits: u32,
    /// The keys' IDs.
    pub key_ids: &'a [Uuid],
}

impl AuditLog {
    /// Opens (or creates, mode 0600) the log at `path` for appending.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| AuditError { path: path.to_owned(), source })?;
        Ok(Self { path: path.to_owned(), file: Mutex::new(file) })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends the record of `delivery` (with the time), in one write.
    pub fn record(&self, event: &str, delivery: &Delivery<'_>) -> Result<(), AuditError> {
        let unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut line = serde_json::to_vec(&serde_json::json!({
            "unix_ms": unix_ms,
            "event": event,
            "delivery": delivery,
        }))
        .expect("a delivery record serialises");
        line.push(b'\n');
        // Invariant: no code panics while holding this lock, so it is never poisoned.
        let mut file = self.file.lock().expect("audit log lock poisoned");
        file.write_all(&line).map_err(|source| AuditError { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_append_as_json_lines_without_key_bytes_and_a_full_disk_is_an_error() {
        let dir = std::env::temp_dir().join(format!("qkd-audit-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        let ids = [Uuid::new_v4(), Uuid::new_v4()];
        let d = Delivery { role: "master", master: "a", slaves: vec!["b"], caller: "a", size_bits: 256, key_ids: &ids };
        for _ in 0..2 {
            // Reopened: records append, never overwrite.
            AuditLog::open(&path).unwrap().record("delivered", &d).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["delivery"]["key_ids"][1], serde_json::json!(ids[1].to_string()));
        assert_eq!(lines[1]["event"], "delivered");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // /dev/full: every write fails with ENOSPC.
        let full = AuditLog::open(Path::new("/dev/full")).unwrap();
        let e = full.record("delivered", &d).unwrap_err();
        assert!(e.to_string().contains("/dev/full"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
