//! The daemons' status files: a JSON snapshot of their counters in the data directory,
//! rewritten every second, read by `qkdctl lab` for progress and by operators' scripts. Never
//! holds key material.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Writes the status file atomically (temporary file, then rename) every second.
pub async fn write_periodically<T: serde::Serialize>(
    path: std::path::PathBuf,
    status: Arc<Mutex<T>>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        let stop = tokio::select! {
            () = shutdown.cancelled() => true,
            _ = ticker.tick() => false,
        };
        let json = {
            let status = status.lock().expect("status lock poisoned");
            serde_json::to_vec_pretty(&*status)
        };
        if let Ok(json) = json {
            let tmp = path.with_extension("json.tmp");
            if std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &path)).is_err() {
                warn!(path = %path.display(), "cannot write the status file");
            }
        }
        if stop {
            break;
        }
    }
}
