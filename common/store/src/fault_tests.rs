//! The store under faults, from the inside: iterations that stop, counts kept without
//! iterating, verification catching invariants broken behind the store's back, and the store
//! going out of service and coming back after a disk fault. (Damaged files, a full filesystem
//! and `qkdctl store verify` are tested end to end in `tests/tests/store.rs`.)

use std::path::{Path, PathBuf};

use super::tests::{Crash, fail_before_step, meta};
use super::*;

fn units(n: usize) -> Vec<KeyUnit> {
    (0..n).map(|i| KeyUnit { key_id: Uuid::new_v4(), key: Zeroizing::new(vec![i as u8; 32]) }).collect()
}

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("qkd-store-fault-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Units in `ready` and `pending`, read to the end.
fn units_in_trees(store: &SledStore) -> u64 {
    let trees = store.trees();
    count_entries(&trees.ready).unwrap() + count_entries(&trees.pending).unwrap()
}

#[test]
fn iterations_end_at_the_first_error() {
    // sled's iterators, once failing, fail for ever: a plain count() would never end.
    let failing = std::iter::once(Ok(1)).chain(std::iter::repeat_with(|| Err(sled::Error::ReportableBug("x".into()))));
    let items: Vec<_> = until_error(failing).collect();
    assert_eq!(items.len(), 2);
    assert!(items[0].is_ok() && items[1].is_err());
}

#[test]
fn the_unit_count_is_kept_with_every_write_and_counted_again_at_open() {
    let dir = Dir::new();
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    let check = |store: &SledStore, what: &str| {
        assert_eq!(store.n_units().unwrap(), units_in_trees(store), "after {what}");
    };
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let a_units = units(5);
    store.put_ready(&meta(a, 5), &a_units).unwrap();
    check(&store, "put_ready");
    store.put_pending(&meta(b, 3), &units(3)).unwrap();
    check(&store, "put_pending");
    store.put_pending(&meta(c, 2), &units(2)).unwrap();
    store.mark_ready(b).unwrap();
    check(&store, "mark_ready");
    store.drop_pending(c).unwrap();
    check(&store, "drop_pending");
    assert_eq!(store.n_units().unwrap(), 8);
    store.take_ready_units(&[a_units[0].key_id]).unwrap();
    check(&store, "take_ready_units");
    assert_eq!(store.discard_ready_units(&[a_units[1].key_id, Uuid::new_v4()]).unwrap(), 1);
    check(&store, "discard_ready_units");
    let reservation = kme::KeyReservation {
        key_id: Uuid::new_v4(),
        unit_ids: vec![a_units[2].key_id, a_units[3].key_id],
        size_bits: 512,
        master: "m".into(),
        slaves: vec!["s".into()],
        created_unix_ms: 1,
    };
    store.reserve_keys(&[reservation]).unwrap();
    check(&store, "reserve_keys");
    assert_eq!(store.n_units().unwrap(), 4);
    drop(store);
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    assert_eq!(store.n_units().unwrap(), 4, "counted again at open");
    store.reopen().unwrap();
    assert_eq!(store.n_units().unwrap(), 4, "counted again at a reopen");
}

/// A store with a ready block and a pending block, closed; returns their IDs and units.
fn store_with_two_blocks(dir: &Path) -> ((Uuid, Vec<KeyUnit>), (Uuid, Vec<KeyUnit>)) {
    let store = SledStore::open(dir, &crate::custody::test_kek()).unwrap();
    let (ready, pending) = ((Uuid::new_v4(), units(3)), (Uuid::new_v4(), units(2)));
    store.put_ready(&meta(ready.0, 3), &ready.1).unwrap();
    store.put_pending(&meta(pending.0, 2), &pending.1).unwrap();
    assert!(store.verify().unwrap().is_healthy());
    ((ready.0, ready.1), (pending.0, pending.1))
}

/// Breaks an invariant with sled directly, in a store closed again afterwards.
fn behind_the_stores_back(dir: &Path, damage: impl FnOnce(&Trees)) {
    let store = SledStore::open(dir, &crate::custody::test_kek()).unwrap();
    damage(&store.trees());
    store.trees().db.flush().unwrap();
}

#[test]
fn verification_catches_invariants_broken_behind_the_stores_back() {
    type Damage = Box<dyn Fn(&Trees, &(Uuid, Vec<KeyUnit>), &(Uuid, Vec<KeyUnit>)) -> String>;
    let stray = Uuid::new_v4();
    let cases: Vec<(&str, Damage)> = vec![
        (
            "a ready unit without a block record",
            Box::new(move |t, _, _| {
                t.ready.insert(stray.as_bytes(), t.sealed_unit(stray, Uuid::new_v4(), &[7; 32]).as_slice()).unwrap();
                format!("tree `ready`, key {stray}: the unit names block")
            }),
        ),
        (
            "a unit both pending and ready",
            Box::new(|t, _, (block, keys)| {
                t.ready
                    .insert(keys[0].key_id.as_bytes(), t.sealed_unit(keys[0].key_id, *block, &keys[0].key).as_slice())
                    .unwrap();
                format!("tree `pending`, key {}: the unit is both pending and ready", keys[0].key_id)
            }),
        ),
        (
            "a pending block's unit missing",
            Box::new(|t, _, (block, keys)| {
                t.pending.remove(keys[1].key_id.as_bytes()).unwrap();
                format!("tree `blocks`, key {block}: unit {} of this pending block is not in `pending`", keys[1].key_id)
            }),
        ),
        (
            "a unit of the wrong size",
            Box::new(|t, (block, keys), _| {
                t.ready
                    .insert(keys[2].key_id.as_bytes(), t.sealed_unit(keys[2].key_id, *block, &[1; 31]).as_slice())
                    .unwrap();
                format!("tree `ready`, key {}: the unit holds 31 bytes; block {block}'s units hold 32", keys[2].key_id)
            }),
        ),
        (
            "a block record that does not decode",
            Box::new(|t, (block, _), _| {
                t.blocks.insert(block.as_bytes(), &[1u8, 0xFF][..]).unwrap();
                format!("tree `blocks`, key {block}: the record does not decode")
            }),
        ),
        (
            "a unit its block does not list",
            Box::new(move |t, (block, _), _| {
                t.ready.insert(stray.as_bytes(), t.sealed_unit(stray, *block, &[9; 32]).as_slice()).unwrap();
                format!("tree `ready`, key {stray}: the unit names block {block}, whose record does not list it")
            }),
        ),
        (
            "a reservation that is also cancelled, and one of the wrong size",
            Box::new(move |t, _, _| {
                let reservation = kme::KeyReservation {
                    key_id: stray,
                    unit_ids: vec![],
                    size_bits: 256,
                    master: "m".into(),
                    slaves: vec!["s".into()],
                    created_unix_ms: 1,
                };
                t.reserved
                    .insert(
                        stray.as_bytes(),
                        kme::encode_reservation(&reservation, &t.sealed_reservation(stray, &[0; 32])).as_slice(),
                    )
                    .unwrap();
                t.cancelled.insert(stray.as_bytes(), &kme::encode_tombstone(false, 1)).unwrap();
                let other = Uuid::new_v4();
                t.reserved
                    .insert(
                        other.as_bytes(),
                        kme::encode_reservation(&reservation, &t.sealed_reservation(other, &[0; 5])).as_slice(),
                    )
                    .unwrap();
                format!("tree `kme_reservations`, key {stray}: the key is both reserved and cancelled")
            }),
        ),
    ];
    for (what, damage) in cases {
        let dir = Dir::new();
        let (ready, pending) = store_with_two_blocks(&dir.0);
        let mut expected = String::new();
        behind_the_stores_back(&dir.0, |t| expected = damage(t, &ready, &pending));
        // Offline, as `qkdctl store verify` does.
        let report = verify_dir(&dir.0, &crate::custody::test_kek());
        assert!(!report.is_healthy(), "{what}: not found");
        assert!(report.checked, "{what}");
        let listed: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        assert!(listed.iter().any(|p| p.starts_with(&expected)), "{what}: expected {expected:?} in {listed:#?}");
        // At start: refused, with the damage named.
        let message = match SledStore::open(&dir.0, &crate::custody::test_kek()) {
            Ok(_) => panic!("{what}: a damaged store was opened"),
            Err(e) => e.to_string(),
        };
        assert!(message.contains("failed verification"), "{what}: {message}");
        assert!(message.contains(&expected), "{what}: {message}");
        assert!(!message.contains("daemon still running"), "{what}: {message}");
        assert!(matches!(
            fault_of(&SledStore::open(&dir.0, &crate::custody::test_kek()).err().unwrap()),
            Some(StoreFault::Invalid { .. })
        ));
    }
}

#[test]
fn a_crash_leftover_is_a_note_before_recovery_and_gone_after_it() {
    let dir = Dir::new();
    let orphan = Uuid::new_v4();
    store_with_two_blocks(&dir.0);
    behind_the_stores_back(&dir.0, |t| {
        // Units written before a record that never came: an interrupted block write.
        for key in units(4) {
            t.pending.insert(key.key_id.as_bytes(), t.sealed_unit(key.key_id, orphan, &key.key).as_slice()).unwrap();
        }
    });
    let report = verify_dir(&dir.0, &crate::custody::test_kek());
    assert!(report.is_healthy(), "{:?}", report.problems);
    assert!(report.notes.iter().any(|n| n.contains(&format!("4 units name block {orphan}"))), "{:?}", report.notes);
    assert_eq!(report.counts.pending_units, 6);
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    assert_eq!(store.n_units().unwrap(), 5, "recovery removed the orphans");
    drop(store);
    let report = verify_dir(&dir.0, &crate::custody::test_kek());
    assert!(report.is_healthy() && report.notes.is_empty(), "{report:?}");
    assert_eq!(
        report.counts,
        StoreCounts {
            ready_blocks: 1,
            pending_blocks: 1,
            ready_units: 3,
            pending_units: 2,
            reservations: 0,
            tombstones: 0
        }
    );
}

#[test]
fn a_database_that_lost_its_contents_is_refused() {
    // sled opens a database whose files were emptied as a new, empty one; the marker says
    // otherwise.
    let dir = Dir::new();
    store_with_two_blocks(&dir.0);
    assert!(dir.0.join(verify::MARKER_FILE).is_file());
    for entry in std::fs::read_dir(&dir.0).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "db" || name.starts_with("snap.") {
            std::fs::remove_file(&path).unwrap();
        }
    }
    let message =
        SledStore::open(&dir.0, &crate::custody::test_kek()).err().expect("an emptied store is refused").to_string();
    assert!(message.contains("lost its contents"), "{message}");
}

#[test]
fn a_disk_fault_puts_the_store_out_of_service_and_the_next_call_reopens_it() {
    let dir = Dir::new();
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    assert!(store.is_healthy());
    let block = Uuid::new_v4();
    // The disk "fills" right after the block's record reached it, before its units were
    // published: the call fails, and the block is left as a crash there would leave it.
    fail_before_step(Some(0), Crash::DiskFull);
    let error = store.put_ready(&meta(block, 3), &units(3)).unwrap_err();
    fail_before_step(None, Crash::DiskFull);
    assert!(is_disk_full(&error), "{error}");
    assert_eq!(error.to_string(), format!("key store database error: no space left on device at {}", dir.0.display()));
    assert!(!store.is_healthy());
    assert!(store.failure().unwrap().contains("no space left on device"));
    assert!(!KeyStore::is_healthy(&store));
    // The next call reopens the store (recovery publishes the block whose record was durable).
    assert_eq!(store.block_state(block).unwrap(), Some(BlockState::Ready));
    assert!(store.is_healthy());
    assert_eq!(store.summary().unwrap().n_keys, 3);
    assert_eq!(store.n_units().unwrap(), 3);
    assert!(!store.reopen_if_failed().unwrap(), "in service: nothing to reopen");
}

#[test]
fn a_store_that_cannot_be_reopened_fails_at_once_until_it_can() {
    let dir = Dir::new();
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    store.put_ready(&meta(Uuid::new_v4(), 1), &units(1)).unwrap();
    fail_before_step(Some(0), Crash::DiskFull);
    assert!(store.put_ready(&meta(Uuid::new_v4(), 2), &units(2)).is_err());
    fail_before_step(None, Crash::DiskFull);
    // While the store is out of service its `conf` file gets damaged: the reopen of the next
    // call fails, and says why.
    let conf = dir.0.join("conf");
    let good = std::fs::read(&conf).unwrap();
    let mut bad = good.clone();
    bad[0] ^= 0x80;
    std::fs::write(&conf, &bad).unwrap();
    let error = store.n_units().unwrap_err();
    assert!(matches!(fault_of(&error), Some(StoreFault::ConfDamaged { .. })), "{error}");
    assert!(!error.to_string().contains("0.29"), "{error}");
    // Further calls do not try again before the back-off: they fail at once, naming the cause.
    let error = store.n_units().unwrap_err();
    assert!(matches!(fault_of(&error), Some(StoreFault::OutOfService { disk_full: false, .. })), "{error}");
    assert!(error.to_string().contains("is damaged or unreadable"), "{error}");
    assert!(store.reopen_if_failed().is_err(), "still damaged");
    std::fs::write(&conf, &good).unwrap();
    // An explicit reopen does not wait for the back-off.
    assert!(store.reopen_if_failed().unwrap());
    assert!(store.is_healthy());
    assert_eq!(store.n_units().unwrap(), 3, "the second block's record was durable: published by recovery");
}

#[test]
fn a_store_held_by_another_handle_is_reported_locked_and_only_then_asks_about_the_daemon() {
    let dir = Dir::new();
    let _held = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    let error = SledStore::open(&dir.0, &crate::custody::test_kek()).err().expect("the lock is held");
    assert!(matches!(fault_of(&error), Some(StoreFault::Locked { .. })), "{error}");
    assert!(error.to_string().contains("is the daemon still running?"), "{error}");
    let report = verify_dir(&dir.0, &crate::custody::test_kek());
    assert!(!report.checked && !report.is_healthy());
    assert!(report.problems[0].message.contains("is the daemon still running?"), "{report:?}");
}

#[test]
fn a_temporary_store_is_never_out_of_service() {
    let store = SledStore::temporary().unwrap();
    fail_before_step(Some(0), Crash::DiskFull);
    assert!(store.put_ready(&meta(Uuid::new_v4(), 1), &units(1)).is_err());
    fail_before_step(None, Crash::DiskFull);
    assert!(store.is_healthy(), "nothing to reopen: errors are only returned");
    assert!(!store.reopen_if_failed().unwrap());
    assert!(store.reopen().is_err());
}

/// The sled files of the closed store in `from` (its data file and snapshots, not the store's
/// own marker and counter files) copied over those of the store in `to`.
fn put_sled_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(to).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("snap.") {
            std::fs::remove_file(&path).unwrap();
        }
    }
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "db" || name == "conf" || name.starts_with("snap.") {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// The flush counter's record in the database of the closed store in `dir`, and its file.
fn flush_counts(dir: &Path) -> (u64, String) {
    let db = open_db(dir, &mut Vec::new()).unwrap();
    let record = db.get(verify::FLUSHES_KEY).unwrap().expect("a flush counter record");
    let file = std::fs::read_to_string(dir.join(verify::FLUSHES_FILE)).unwrap();
    (u64::from_le_bytes(record.as_ref().try_into().unwrap()), file)
}

#[test]
fn every_flush_is_counted_in_the_database_then_in_a_file() {
    let dir = Dir::new();
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    // A new store counts from its first flush.
    assert!(!dir.0.join(verify::FLUSHES_FILE).exists());
    store.put_ready(&meta(Uuid::new_v4(), 2), &units(2)).unwrap();
    store.put_pending(&meta(Uuid::new_v4(), 2), &units(2)).unwrap();
    drop(store);
    let (count, file) = flush_counts(&dir.0);
    // put_ready flushes three times, put_pending twice, and closing once.
    assert_eq!(count, 6);
    assert_eq!(file, "qkd key store flushes 6\n");
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    store.flush().unwrap();
    drop(store);
    assert_eq!(flush_counts(&dir.0).0, 8, "continued from the database's count");
    assert!(verify_dir(&dir.0, &crate::custody::test_kek()).is_healthy());
}

#[test]
fn a_database_that_lost_its_last_writes_is_refused() {
    // What sled does with a flipped byte after its last snapshot, or a truncated data file: it
    // replays its log up to the damage and drops the rest without an error. Here the data file
    // is set back to an earlier state of the same store, which is what that leaves.
    let (dir, earlier) = (Dir::new(), Dir::new());
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    store.put_ready(&meta(Uuid::new_v4(), 3), &units(3)).unwrap();
    drop(store);
    put_sled_files(&dir.0, &earlier.0);
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    store.put_ready(&meta(Uuid::new_v4(), 4), &units(4)).unwrap();
    drop(store);
    put_sled_files(&earlier.0, &dir.0);

    let expected = "database: the database is damaged: it lost writes that had reached the disk";
    let report = verify_dir(&dir.0, &crate::custody::test_kek());
    assert!(report.checked && !report.is_healthy());
    assert!(report.problems[0].to_string().starts_with(expected), "{:?}", report.problems);
    let error = SledStore::open(&dir.0, &crate::custody::test_kek()).err().expect("refused");
    assert!(matches!(fault_of(&error), Some(StoreFault::Invalid { .. })), "{error}");
    assert!(error.to_string().contains(expected), "{error}");
    // Refused before recovery or a flush changed anything: the same finding again.
    assert!(!verify_dir(&dir.0, &crate::custody::test_kek()).is_healthy());

    // The counter file is what tells: without it, the store opens with the first block only
    // (and writes the file again, from the database).
    std::fs::remove_file(dir.0.join(verify::FLUSHES_FILE)).unwrap();
    let report = verify_dir(&dir.0, &crate::custody::test_kek());
    assert!(report.is_healthy(), "{:?}", report.problems);
    assert!(report.notes.iter().any(|n| n.contains("qkd-store.flushes is missing")), "{:?}", report.notes);
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    assert_eq!(store.n_units().unwrap(), 3);
    drop(store);
    assert!(dir.0.join(verify::FLUSHES_FILE).is_file());
}

#[test]
fn a_damaged_flush_counter_file_is_a_note_and_written_again() {
    let dir = Dir::new();
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    store.put_ready(&meta(Uuid::new_v4(), 1), &units(1)).unwrap();
    drop(store);
    // A power cut can leave the file (written without an fsync) empty.
    std::fs::write(dir.0.join(verify::FLUSHES_FILE), "").unwrap();
    let report = verify_dir(&dir.0, &crate::custody::test_kek());
    assert!(report.is_healthy(), "{:?}", report.problems);
    assert!(report.notes.iter().any(|n| n.contains("qkd-store.flushes is damaged")), "{:?}", report.notes);
    drop(SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap());
    let (count, file) = flush_counts(&dir.0);
    assert_eq!(file, format!("qkd key store flushes {count}\n"));
    let report = verify_dir(&dir.0, &crate::custody::test_kek());
    assert!(report.is_healthy() && report.notes.is_empty(), "{report:?}");
}

/// What sled leaves when the disk fills while it writes a snapshot: an empty file under the
/// name it writes snapshots to before renaming them (its LSN above any real one).
fn unfinished_snapshot(dir: &Path) -> PathBuf {
    let path = dir.join("snap.00000000FFFFFFFF.generating");
    std::fs::write(&path, b"").unwrap();
    path
}

#[test]
fn an_unfinished_snapshot_file_is_removed_at_open_unless_the_store_is_held() {
    let dir = Dir::new();
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    store.put_ready(&meta(Uuid::new_v4(), 3), &units(3)).unwrap();
    let before = store.summary().unwrap();
    drop(store);

    // sled alone refuses the store because of it.
    let snap = unfinished_snapshot(&dir.0);
    assert!(matches!(sled::Config::new().path(&dir.0).open(), Err(sled::Error::Corruption { .. })));
    // Verification removes it, and says so.
    let report = verify_dir(&dir.0, &crate::custody::test_kek());
    assert!(report.is_healthy(), "{:?}", report.problems);
    assert!(report.notes.iter().any(|n| n.starts_with(&format!("removed {}", snap.display()))), "{:?}", report.notes);
    assert!(!snap.exists());
    // So does opening the store, which then holds what it held.
    let snap = unfinished_snapshot(&dir.0);
    let store = SledStore::open(&dir.0, &crate::custody::test_kek()).unwrap();
    assert!(!snap.exists());
    assert_eq!(store.summary().unwrap(), before);

    // While a process holds the store, sled may be writing that file: it is left alone.
    let snap = unfinished_snapshot(&dir.0);
    let error = SledStore::open(&dir.0, &crate::custody::test_kek()).err().expect("held");
    assert!(matches!(fault_of(&error), Some(StoreFault::Locked { .. })), "{error}");
    assert!(!verify_dir(&dir.0, &crate::custody::test_kek()).checked);
    assert!(snap.exists());
    std::fs::remove_file(&snap).unwrap();
    drop(store);
}
