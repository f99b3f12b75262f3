use std::collections::BTreeMap;

use super::*;
use crate::kme::{KeyReservation, UNIT_BYTES};
use crate::tests::meta;
use crate::{KeyStore, KeyUnit, SledStore, StoreError, fault_of, unit_slot};

struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("qkd-custody-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` units of recognisable random bytes.
fn units(n: usize) -> Vec<KeyUnit> {
    (0..n)
        .map(|_| {
            let mut key = Zeroizing::new(vec![0u8; UNIT_BYTES]);
            OsRng.fill_bytes(&mut key);
            KeyUnit { key_id: Uuid::new_v4(), key }
        })
        .collect()
}

/// Every file under `dir` and its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The files under `dir` that hold `needle`.
fn holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files(dir).into_iter().filter(|(_, bytes)| contains(bytes, needle)).map(|(path, _)| path).collect()
}

fn other_kek() -> Kek {
    Kek::from_bytes([0x99; KEK_BYTES], "file /etc/qkd/other.kek")
}

#[test]
fn a_sealed_unit_opens_only_in_its_own_record_and_slot() {
    let keys = test_kek().derive();
    let slots = Slots::memory();
    let mut allocated = slots.allocate(2).unwrap();
    let (b, a) = (allocated.pop().unwrap(), allocated.pop().unwrap());
    let (id, block) = (Uuid::new_v4(), Uuid::new_v4());
    let sealed = keys.seal(&a, Kind::Unit, id, Some(block), b"thirty-two bytes of secret key!!");
    assert_eq!(sealed.len(), 32 + SEAL_OVERHEAD);
    assert!(!contains(&sealed, b"thirty-two"), "the bytes are encrypted");
    assert_eq!(
        keys.open(&slots, Kind::Unit, id, Some(block), &sealed).unwrap().as_slice(),
        b"thirty-two bytes of secret key!!"
    );
    // Another key ID, another block, another kind: the associated data differs.
    for (kind, other_id, other_block) in [
        (Kind::Unit, Uuid::new_v4(), Some(block)),
        (Kind::Unit, id, Some(Uuid::new_v4())),
        (Kind::Reservation, id, None),
    ] {
        assert!(matches!(keys.open(&slots, kind, other_id, other_block, &sealed), Err(Unseal::Damaged(_))));
    }
    // A flipped bit of the ciphertext.
    let mut flipped = sealed.to_vec();
    flipped[SEAL_OVERHEAD] ^= 1;
    assert!(matches!(keys.open(&slots, Kind::Unit, id, Some(block), &flipped), Err(Unseal::Damaged(_))));
    // Pointed at the other slot: its tag differs, so it reads as erased (reused), never opens.
    let mut moved = sealed.to_vec();
    moved[..4].copy_from_slice(&b.index.to_le_bytes());
    assert_eq!(keys.open(&slots, Kind::Unit, id, Some(block), &moved), Err(Unseal::Erased));
    // Under another KEK: the data key differs.
    let other = other_kek().derive();
    assert!(matches!(other.open(&slots, Kind::Unit, id, Some(block), &sealed), Err(Unseal::Damaged(_))));
    // Erased: gone, even with the KEK.
    slots.erase([a.index]).unwrap();
    assert_eq!(keys.open(&slots, Kind::Unit, id, Some(block), &sealed), Err(Unseal::Erased));
}

#[test]
fn no_key_byte_is_stored_in_clear_and_a_delivered_unit_cannot_be_opened_again() {
    let dir = Dir::new();
    let store_dir = dir.0.join("store");
    let keys = units(6);
    let block = Uuid::new_v4();
    let store = SledStore::open(&store_dir, &test_kek()).unwrap();
    store.put_ready(&meta(block, keys.len()), &keys).unwrap();
    store.flush().unwrap();
    for key in &keys {
        assert!(holding(&store_dir, &key.key).is_empty(), "a ready unit in clear");
    }
    // The sealed records as they are now, as a thief of the disk might find them in sled's log
    // later.
    let records: Vec<Vec<u8>> =
        keys.iter().map(|k| store.trees().ready.get(k.key_id.as_bytes()).unwrap().unwrap().to_vec()).collect();
    let slot_of = |i: usize| unit_slot(&records[i]).unwrap();
    // Delivered to a master (units 0, 1), reserved and then fetched by the slave (2, 3),
    // discarded (4); unit 5 stays.
    store.take_ready_units(&[keys[0].key_id, keys[1].key_id]).unwrap();
    let reservation = KeyReservation {
        key_id: Uuid::new_v4(),
        unit_ids: vec![keys[2].key_id, keys[3].key_id],
        size_bits: 512,
        master: "m".into(),
        slaves: vec!["s".into()],
        created_unix_ms: 1,
    };
    store.reserve_keys(std::slice::from_ref(&reservation)).unwrap();
    let reserved = store.trees().reserved.get(reservation.key_id.as_bytes()).unwrap().unwrap().to_vec();
    let delivered = store.deliver_reserved_keys(&[reservation.key_id], "m", "s").unwrap();
    assert_eq!(delivered[0].key.as_slice(), [keys[2].key.as_slice(), keys[3].key.as_slice()].concat());
    assert_eq!(store.discard_ready_units(&[keys[4].key_id]).unwrap(), 1);
    store.flush().unwrap();
    drop(store);

    let slots_file = std::fs::read(store_dir.join(SLOTS_FILE)).unwrap();
    let tk = test_kek().derive();
    let slots = Slots::open(&store_dir, &tk, false).unwrap();
    for i in 0..5 {
        // The slot is zeros on disk, and the old record no longer opens with the KEK.
        let at = offset(slot_of(i)) as usize;
        assert_eq!(&slots_file[at..at + SLOT_BYTES], &[0u8; SLOT_BYTES], "unit {i}'s slot");
        let (block_id, sealed) = crate::decode_key(&records[i]).unwrap();
        assert_eq!(
            tk.open(&slots, Kind::Unit, keys[i].key_id, Some(block_id), sealed),
            Err(Unseal::Erased),
            "unit {i}"
        );
    }
    let sealed = crate::kme::reservation_sealed(&reserved).unwrap();
    assert_eq!(tk.open(&slots, Kind::Reservation, reservation.key_id, None, &sealed), Err(Unseal::Erased));
    // The unit still held opens.
    let (block_id, sealed) = crate::decode_key(&records[5]).unwrap();
    assert_eq!(
        tk.open(&slots, Kind::Unit, keys[5].key_id, Some(block_id), sealed).unwrap().as_slice(),
        keys[5].key.as_slice()
    );
    // And no file holds any key in clear: not the units, not the reserved key.
    for key in &keys {
        assert!(holding(&store_dir, &key.key).is_empty());
    }
    assert!(holding(&store_dir, &delivered[0].key).is_empty());
    let store = SledStore::open(&store_dir, &test_kek()).unwrap();
    assert_eq!(store.select_ready_units(10, |_| true).unwrap().len(), 1);
}

#[test]
fn a_wrong_kek_is_refused_before_anything_is_written() {
    let dir = Dir::new();
    let store_dir = dir.0.join("store");
    {
        let store = SledStore::open(&store_dir, &test_kek()).unwrap();
        store.put_ready(&meta(Uuid::new_v4(), 3), &units(3)).unwrap();
        store.put_pending(&meta(Uuid::new_v4(), 2), &units(2)).unwrap();
    }
    let before = files(&store_dir);
    let error = SledStore::open(&store_dir, &other_kek()).err().expect("a wrong KEK is refused");
    let message = error.to_string();
    assert!(message.contains("file /etc/qkd/other.kek"), "names the KEK's source: {message}");
    assert!(message.contains(&store_dir.display().to_string()), "names the store: {message}");
    assert!(message.contains("wrong KEK"), "{message}");
    let StoreError::Backend(source) = &error else { panic!("{error:?}") };
    assert!(matches!(source.downcast_ref::<KekFault>(), Some(KekFault::WrongKek { .. })));
    assert!(fault_of(&error).is_none());
    assert_eq!(files(&store_dir), before, "the store's files are byte for byte as they were");
    // `qkdctl store verify` refuses it the same way, without checking anything.
    let report = crate::verify_dir(&store_dir, &other_kek());
    assert!(!report.checked && report.problems[0].message.contains("wrong KEK"), "{report:?}");
    assert_eq!(files(&store_dir), before);
    // The right KEK still opens it, with every unit.
    let store = SledStore::open(&store_dir, &test_kek()).unwrap();
    assert_eq!(store.n_units().unwrap(), 5);
    assert!(store.verify().unwrap().is_healthy());
}

#[test]
fn a_store_of_an_earlier_version_is_refused_not_migrated() {
    let dir = Dir::new();
    {
        let store = SledStore::open(&dir.0, &test_kek()).unwrap();
        store.put_ready(&meta(Uuid::new_v4(), 1), &units(1)).unwrap();
    }
    // A store without a slot file: what an earlier version left.
    std::fs::remove_file(dir.0.join(SLOTS_FILE)).unwrap();
    let before = files(&dir.0);
    let message = SledStore::open(&dir.0, &test_kek()).err().expect("refused").to_string();
    assert!(message.contains("earlier version") && message.contains("unsealed"), "{message}");
    assert!(message.contains(&dir.0.display().to_string()), "{message}");
    assert_eq!(files(&dir.0), before);
}

#[test]
fn kek_files_are_checked() {
    let dir = Dir::new();
    let path = dir.0.join("node.kek");
    let kek = Kek::generate("new");
    kek.write_new(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(kek.write_new(&path).is_err(), "never overwrites a KEK");
    let read = Kek::from_file(&path).unwrap();
    assert_eq!(read.derive().check, kek.derive().check);
    assert!(format!("{read:?}").contains("node.kek"), "Debug shows the source only");
    // Readable by the group: refused.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let message = Kek::from_file(&path).unwrap_err().to_string();
    assert!(message.contains("mode 0640") && message.contains(&path.display().to_string()), "{message}");
    // Not 32 bytes.
    let short = dir.0.join("short.kek");
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&short).unwrap();
    std::fs::write(&short, [1u8; 16]).unwrap();
    assert!(Kek::from_file(&short).unwrap_err().to_string().contains("holds 16 bytes, not 32"));
    // Missing: named, and how to make one.
    let missing = dir.0.join("missing.kek");
    let message = Kek::from_file(&missing).unwrap_err().to_string();
    assert!(message.contains(&missing.display().to_string()) && message.contains("qkdctl store kek"), "{message}");
}

#[test]
fn a_lost_removal_of_an_erased_unit_is_finished_at_open() {
    // A unit taken (removal not yet durable) and its slot erased, then a crash that loses the
    // removal: the record is back, its slot zero. Another taken unit's slot was reused by a new
    // block before the crash: its record is back too, its slot holding another secret.
    let dir = Dir::new();
    let (first, second) = (units(2), units(1));
    let (block, later) = (Uuid::new_v4(), Uuid::new_v4());
    {
        let store = SledStore::open(&dir.0, &test_kek()).unwrap();
        store.put_ready(&meta(block, 2), &first).unwrap();
        let records: Vec<_> =
            first.iter().map(|k| store.trees().ready.get(k.key_id.as_bytes()).unwrap().unwrap()).collect();
        store.take_ready_units(&[first[0].key_id, first[1].key_id]).unwrap();
        // The new block takes one of the freed slots.
        store.put_ready(&meta(later, 1), &second).unwrap();
        let new_slot = unit_slot(&store.trees().ready.get(second[0].key_id.as_bytes()).unwrap().unwrap()).unwrap();
        assert!(records.iter().any(|r| unit_slot(r) == Some(new_slot)), "a freed slot is reused");
        // What the lost removals leave: both old records back in `ready`.
        for (key, record) in first.iter().zip(&records) {
            store.trees().ready.insert(key.key_id.as_bytes(), record.clone()).unwrap();
        }
        store.flush().unwrap();
        // Offline, before recovery: notes, not problems.
        let report = store.verify().unwrap();
        assert!(report.is_healthy(), "{:?}", report.problems);
        assert_eq!(report.notes.iter().filter(|n| n.contains("its slot was erased")).count(), 2, "{:?}", report.notes);
    }
    let store = SledStore::open(&dir.0, &test_kek()).unwrap();
    let left = store.select_ready_units(10, |_| true).unwrap();
    assert_eq!(left.len(), 1, "the erased units are gone for good");
    assert_eq!(left[0].key.as_slice(), second[0].key.as_slice());
    assert_eq!(store.n_units().unwrap(), 1);
}

#[test]
fn secrets_left_by_a_crash_before_their_records_are_zeroed_at_open() {
    let dir = Dir::new();
    let slot;
    {
        let store = SledStore::open(&dir.0, &test_kek()).unwrap();
        store.put_ready(&meta(Uuid::new_v4(), 1), &units(1)).unwrap();
        // A block write that allocated its slots and crashed before its first record.
        slot = store.trees().allocate_slots(1).unwrap().pop().unwrap().index;
        let report = store.verify().unwrap();
        assert!(
            report.notes.iter().any(|n| n.contains("1 slot(s)") && n.contains("no record names")),
            "{:?}",
            report.notes
        );
    }
    assert!(Slots::open(&dir.0, &test_kek().derive(), false).unwrap().read(slot).unwrap().is_some());
    let store = SledStore::open(&dir.0, &test_kek()).unwrap();
    assert!(store.trees().slots.read(slot).unwrap().is_none(), "scrubbed");
    assert!(store.verify().unwrap().notes.is_empty());
    // The freed slot is used again.
    store.put_ready(&meta(Uuid::new_v4(), 1), &units(1)).unwrap();
    assert!(store.trees().slots.read(slot).unwrap().is_some());
}

#[test]
fn a_damaged_sealed_unit_fails_verification() {
    let dir = Dir::new();
    let keys = units(2);
    {
        let store = SledStore::open(&dir.0, &test_kek()).unwrap();
        store.put_ready(&meta(Uuid::new_v4(), 2), &keys).unwrap();
        let mut record = store.trees().ready.get(keys[1].key_id.as_bytes()).unwrap().unwrap().to_vec();
        let last = record.len() - 1;
        record[last] ^= 0x40;
        store.trees().ready.insert(keys[1].key_id.as_bytes(), record).unwrap();
        store.flush().unwrap();
    }
    let message = SledStore::open(&dir.0, &test_kek()).err().expect("refused").to_string();
    assert!(message.contains(&keys[1].key_id.to_string()) && message.contains("does not authenticate"), "{message}");
}
