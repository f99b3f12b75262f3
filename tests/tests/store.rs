//! The key store under kill -9: a writer process is killed at arbitrary points of its block
//! writes; opened again, the store holds every block the writer reported stored, each whole,
//! and no unit of a block that never got its record.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use qkd_store::{BlockMeta, BlockState, KeyStore, KeyUnit, SledStore};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::*;

/// Units per block written by the writer: enough that a kill usually lands inside a write.
const UNITS_PER_BLOCK: u64 = 2000;

/// Environment variable that turns [`store_crash_writer`] on and names its store.
const WRITER_DIR: &str = "QKD_STORE_CRASH_DIR";

/// The writer, run as a child process by [`killed_writers_leave_whole_blocks`] (it does nothing
/// without `QKD_STORE_CRASH_DIR`): stores blocks for ever, alternating Alice's path (put_ready)
/// and Bob's (put_pending, then mark_ready), and prints each block's ID once its write returned.
#[test]
#[ignore = "child process of killed_writers_leave_whole_blocks"]
fn store_crash_writer() {
    let Ok(dir) = std::env::var(WRITER_DIR) else { return };
    let store = SledStore::open(Path::new(&dir)).expect("writer opens the store");
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let meta = BlockMeta {
            block_id: Uuid::new_v4(),
            created_unix_ms: i,
            n_sifted_bits: 10_000,
            qber_z: 0.03,
            qber_x: 0.03,
            phase_error_upper: 0.05,
            leak_bits: 3000,
            final_bits: 256 * UNITS_PER_BLOCK,
            simulated: false,
        };
        let keys: Vec<KeyUnit> = (0..UNITS_PER_BLOCK)
            .map(|u| KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![(i + u) as u8; 32]) })
            .collect();
        if i % 2 == 0 {
            store.put_ready(&meta, &keys).expect("put_ready");
        } else {
            store.put_pending(&meta, &keys).expect("put_pending");
            store.mark_ready(meta.block_id).expect("mark_ready");
        }
        writeln!(out, "stored {}", meta.block_id).expect("stdout");
        out.flush().expect("stdout");
    }
}

/// Eight times: a writer is killed with SIGKILL right after reporting its n-th block, while it
/// writes the next one; the store is then opened and checked.
#[test]
fn killed_writers_leave_whole_blocks() {
    let dir = TempDir::new("store-crash");
    let mut reported = Vec::new();
    for round in 0..8 {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "store::store_crash_writer", "--ignored", "--nocapture", "--test-threads=1"])
            .env(WRITER_DIR, &dir.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the writer");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut stored = 0;
        while stored < 2 + round {
            let line = lines.next().expect("the writer stopped early").expect("read the writer's output");
            if let Some(id) = line.strip_prefix("stored ") {
                reported.push(Uuid::parse_str(id).expect("block id"));
                stored += 1;
            }
        }
        child.kill().expect("kill -9 the writer");
        child.wait().expect("reap the writer");

        let store = SledStore::open(&dir.0).expect("reopen after kill -9");
        let blocks = store.blocks().expect("blocks");
        let units_of =
            |state| -> u64 { blocks.iter().filter(|(_, s)| *s == state).map(|(m, _)| m.final_bits / 256).sum() };
        let summary = store.summary().expect("summary");
        // Every ready block has all its units servable, and no unit is servable without one.
        assert_eq!(summary.n_keys, units_of(BlockState::Ready), "round {round}: {summary:?}");
        // Units not servable belong to pending blocks, all of them (none left over from a
        // block whose record was never written).
        assert_eq!(store.n_units().expect("n_units") - summary.n_keys, units_of(BlockState::Pending));
        for id in &reported {
            assert_eq!(store.block_state(*id).expect("state"), Some(BlockState::Ready), "round {round}: {id}");
        }
    }
}
