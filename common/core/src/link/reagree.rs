//! Re-agreement of the two key stores at `Hello`, unit by unit.
//!
//! A store can fall out of step with its peer's: it was lost (deleted, a new disk), restored from
//! an older backup, or a removal it made without waiting for the disk (Get key at the master's
//! KME) was lost in a crash. Keys are delivered per unit (a key ID of 256 bits) and delivery erases
//! the unit at that end, so the two ends compare *which units of which blocks* they still hold,
//! not only block IDs. At every `Hello`:
//!
//! 1. Bob sends the units his store holds ([`UnitMap`], ready and pending blocks);
//! 2. Alice keeps, of her units, those Bob holds too, and drops (erases, durably) the others
//!    before she answers with the intersection;
//! 3. Bob settles his pending blocks (as before), then drops his units outside the intersection.
//!
//! Afterwards both stores hold the same units and no unit exists at one end only. A unit that was
//! delivered at one end is gone there, so it is dropped at the other too: it is never served
//! again. Dropping is the only effect, at either end: the re-agreement never adds a unit.
//!
//! **Reservations** (keys of the KME whose master already received them from the peer KME, held
//! until their slaves fetch them) are not units of a block any more: the peer, which erased its
//! copy when it delivered the master's, holds nothing to compare them with. A store restored from
//! an older copy may hold reservations that were fetched after the copy was made, and fetching
//! them again would deliver a key twice; which end is the older one cannot always be told from
//! the units (a unit held at one end only was delivered at the other since the copy, or belongs
//! to a block the copy lacks). So whenever the two stores differ, *both* ends erase their
//! reservations: a slave then cannot fetch a key its master already has (it asks for new keys),
//! but no key is ever delivered twice. Alice, who sees both stores' units, decides and says so
//! ([`proto::link::HelloResponse::stores_differed`]). Stores that agree keep their reservations:
//! a restart or reconnection costs nothing. Until its first re-agreement a daemon's store serves
//! no reservation at all ([`crate::store::KeyStore::reagreed`] releases them), so that a restored
//! copy cannot hand one out before `Hello`. A copy that differs from the current store only by
//! reservations fetched since it was made (no block committed and no unit delivered in between)
//! cannot be told from an up-to-date store: docs/store.md says what the operator does then.
//!
//! **Authentication.** `Hello` carries no Wegman-Carter tag (no pad is taken before StartBlock),
//! like its other fields; it travels over the classical channel's mutual TLS, and both ends absorb
//! it into the transcript of the session's first block, whose tags then cover it: an altered
//! `Hello` fails that block's authentication at both ends. What an altered `Hello` can do before
//! that is limited to dropping units (a denial of service, which an attacker on the channel has
//! anyway): a unit kept at one end only is never delivered, because every delivery needs the peer
//! KME's durable reservation of the same unit.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::LinkError;
use crate::store::{BlockState, UnitHoldings};
use crate::wire::put_varint;

/// Most bytes a packed [`UnitMap`] may take. A store of the default `max_stored_units` (200 000
/// units) packs into about 4 MB in the worst shape of blocks of the default size (each unit the
/// only one left of its block: 20 bytes a unit), 3.4 MB as blocks of one unit, much less as
/// whole blocks; the classical channel carries messages of up to [`MAX_LINK_MESSAGE_BYTES`]. A
/// store that does not fit is refused with an error that says so.
pub const MAX_UNIT_MAP_BYTES: usize = 32 << 20;

/// Largest message of the classical channel, each way (both daemons set it on their gRPC
/// server and client): a `Hello` with a [`UnitMap`] of [`MAX_UNIT_MAP_BYTES`] fits.
pub const MAX_LINK_MESSAGE_BYTES: usize = 40 << 20;

/// Most units (held or not) a packed [`UnitMap`] may describe, so that decoding one allocates
/// at most this many flags.
pub const MAX_UNIT_MAP_UNITS: u64 = 1 << 26;

/// Block IDs named in one log line of the re-agreement; the others are counted.
const LOGGED_BLOCKS: usize = 32;

/// Which units of which blocks an end holds: per block, one flag per unit of the block's record
/// (in the record's order, the same at both ends). Blocks of which no unit is held are absent.
///
/// Packed (the `held_units` fields of `Hello`): per block, in ascending block-ID order, the
/// 16-byte block ID, then a varint `n_units << 2 | mode`, then by mode: 0, every unit held (no
/// more bytes); 1, a bitmap of `n_units` bits (LSB first); 2, a varint count of held units and
/// the varint gaps between their ascending indices (the first from 0). The encoder takes the
/// shortest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitMap {
    blocks: BTreeMap<Uuid, Vec<bool>>,
}

impl UnitMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The units a store's holdings hold.
    pub fn from_holdings(holdings: &UnitHoldings) -> Self {
        let mut map = Self::new();
        for block in &holdings.blocks {
            map.insert(block.block_id, block.held.clone());
        }
        map
    }

    /// Sets a block's flags (a block of which no unit is held is removed).
    pub fn insert(&mut self, block_id: Uuid, held: Vec<bool>) {
        if held.contains(&true) {
            self.blocks.insert(block_id, held);
        } else {
            self.blocks.remove(&block_id);
        }
    }

    /// A block's flags, if any of its units is held.
    pub fn get(&self, block_id: &Uuid) -> Option<&[bool]> {
        self.blocks.get(block_id).map(Vec::as_slice)
    }

    /// The blocks and their flags, in block-ID order.
    pub fn iter(&self) -> impl Iterator<Item = (&Uuid, &[bool])> {
        self.blocks.iter().map(|(id, held)| (id, held.as_slice()))
    }

    /// Number of blocks of which a unit is held.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Number of units held.
    pub fn n_held(&self) -> u64 {
        self.blocks.values().map(|held| held.iter().filter(|&&h| h).count() as u64).sum()
    }

    /// The packed form (see the type's documentation); an error names the size when it would
    /// exceed [`MAX_UNIT_MAP_BYTES`].
    pub fn encode(&self) -> Result<Vec<u8>, LinkError> {
        self.encode_within(MAX_UNIT_MAP_BYTES)
    }

    /// [`UnitMap::encode`] with a limit of `limit` bytes.
    fn encode_within(&self, limit: usize) -> Result<Vec<u8>, LinkError> {
        let mut out = Vec::new();
        for (block_id, held) in &self.blocks {
            out.extend_from_slice(block_id.as_bytes());
            let n = held.len() as u64;
            let held_indices: Vec<u64> = (0..n).filter(|&i| held[i as usize]).collect();
            if held_indices.len() == held.len() {
                put_varint(&mut out, n << 2);
                continue;
            }
            let mut list = Vec::new();
            put_varint(&mut list, held_indices.len() as u64);
            let mut previous = 0;
            for &i in &held_indices {
                put_varint(&mut list, i - previous);
                previous = i;
            }
            let bitmap_len = held.len().div_ceil(8);
            if list.len() < bitmap_len {
                put_varint(&mut out, n << 2 | 2);
                out.extend_from_slice(&list);
            } else {
                put_varint(&mut out, n << 2 | 1);
                let mut bitmap = vec![0u8; bitmap_len];
                for &i in &held_indices {
                    bitmap[i as usize / 8] |= 1 << (i % 8);
                }
                out.extend_from_slice(&bitmap);
            }
            if out.len() > limit {
                break;
            }
        }
        if out.len() > limit {
            return Err(LinkError::State(format!(
                "the key store's {} units in {} blocks do not fit in a Hello (more than {limit} bytes packed): lower \
                 max_stored_units so that the store holds fewer units",
                self.n_held(),
                self.n_blocks()
            )));
        }
        Ok(out)
    }

    /// Decodes the packed form, refusing a malformed one (blocks out of order or repeated, a
    /// block without a held unit, trailing or missing bytes, more than [`MAX_UNIT_MAP_BYTES`] or
    /// [`MAX_UNIT_MAP_UNITS`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, LinkError> {
        let malformed = |what: &str| LinkError::Malformed(format!("held units: {what}"));
        if bytes.len() > MAX_UNIT_MAP_BYTES {
            return Err(malformed("too long"));
        }
        let mut map = Self::new();
        let mut at = 0;
        let mut total_units = 0u64;
        let mut previous: Option<Uuid> = None;
        while at < bytes.len() {
            let id = bytes.get(at..at + 16).ok_or_else(|| malformed("truncated block ID"))?;
            let block_id = Uuid::from_slice(id).map_err(|_| malformed("bad block ID"))?;
            at += 16;
            if previous.is_some_and(|p| p >= block_id) {
                return Err(malformed("blocks out of order or repeated"));
            }
            previous = Some(block_id);
            let header = get_varint(bytes, &mut at).ok_or_else(|| malformed("truncated header"))?;
            let (n, mode) = (header >> 2, header & 3);
            total_units = total_units.saturating_add(n);
            if n == 0 || total_units > MAX_UNIT_MAP_UNITS {
                return Err(malformed("a block of no units, or too many units"));
            }
            let n = n as usize;
            let held = match mode {
                0 => vec![true; n],
                1 => {
                    let bitmap = bytes.get(at..at + n.div_ceil(8)).ok_or_else(|| malformed("truncated bitmap"))?;
                    at += n.div_ceil(8);
                    (0..n).map(|i| bitmap[i / 8] >> (i % 8) & 1 == 1).collect()
                }
                2 => {
                    let count = get_varint(bytes, &mut at).ok_or_else(|| malformed("truncated count"))?;
                    if count > n as u64 {
                        return Err(malformed("more held units than units"));
                    }
                    let mut held = vec![false; n];
                    let mut index = 0u64;
                    for k in 0..count {
                        let gap = get_varint(bytes, &mut at).ok_or_else(|| malformed("truncated index"))?;
                        if k > 0 && gap == 0 {
                            return Err(malformed("repeated index"));
                        }
                        index = index.checked_add(gap).filter(|&i| i < n as u64).ok_or_else(|| malformed("index"))?;
                        held[index as usize] = true;
                    }
                    held
                }
                _ => return Err(malformed("unknown mode")),
            };
            if !held.contains(&true) {
                return Err(malformed("a block with no held unit"));
            }
            map.blocks.insert(block_id, held);
        }
        Ok(map)
    }
}

/// Reads a varint at `*at`, moving past it; `None` when truncated or longer than 64 bits.
fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// What the re-agreement at `Hello` did at one end (no key material: counts and block IDs).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reagreement {
    /// Units this end held and the peer did not, now dropped.
    pub units_dropped: u64,
    /// The blocks those units belonged to, with how many units of each were dropped.
    pub blocks: Vec<(Uuid, u64)>,
    /// The two stores differed (one was lost, restored from an older copy, or lost a removal in
    /// a crash): both ends erase their KME reservations.
    pub stores_differed: bool,
    /// KME reservations erased here because the stores differed.
    pub reservations_dropped: u64,
}

impl Reagreement {
    /// Logs what was dropped, at info (nothing when nothing was), for the end `role` (`alice` or
    /// `bob`).
    pub fn log(&self, role: &str) {
        if self.units_dropped > 0 {
            let mut named: Vec<String> =
                self.blocks.iter().take(LOGGED_BLOCKS).map(|(id, n)| format!("{id} ({n})")).collect();
            if self.blocks.len() > LOGGED_BLOCKS {
                named.push(format!("and {} more blocks", self.blocks.len() - LOGGED_BLOCKS));
            }
            tracing::info!(
                end = role,
                units_dropped = self.units_dropped,
                n_blocks = self.blocks.len(),
                blocks = %named.join(", "),
                "stores re-agreed at Hello: dropped the units the peer does not hold (units per block in brackets)"
            );
        }
        if self.stores_differed {
            tracing::info!(
                end = role,
                reservations_dropped = self.reservations_dropped,
                "the two key stores differed (one lost, or restored from an older copy): this end's KME \
                 reservations, which may have been fetched since the older copy was made, are erased"
            );
        }
    }
}

/// Alice's holdings against Bob's map: the intersection, the units Alice drops, and whether the
/// stores differ.
pub(crate) struct AliceSide {
    /// The units both hold.
    pub agreed: UnitMap,
    /// Alice's units outside it, by block.
    pub discard: Vec<(Uuid, Vec<Uuid>)>,
    /// A unit is held at one end only (Bob's units of his pending blocks that Alice never
    /// committed excepted: those are the two-ended commit's, settled as always).
    pub differ: bool,
}

/// Compares Alice's holdings `own` with Bob's map `bob` (`bob_pending`: his pending blocks;
/// `alice_state(block)`: the state of Alice's record of the block, if she keeps one).
pub(crate) fn alice_side(
    own: &UnitHoldings,
    bob: &UnitMap,
    bob_pending: &[Uuid],
    mut alice_state: impl FnMut(Uuid) -> Result<Option<BlockState>, LinkError>,
) -> Result<AliceSide, LinkError> {
    let mut side = AliceSide { agreed: UnitMap::new(), discard: Vec::new(), differ: false };
    let mut mine: BTreeMap<Uuid, &[bool]> = BTreeMap::new();
    for block in &own.blocks {
        mine.insert(block.block_id, &block.held);
        let theirs = bob.get(&block.block_id).filter(|t| t.len() == block.held.len());
        let mut agreed = vec![false; block.held.len()];
        let mut dropped = Vec::new();
        for (i, &held) in block.held.iter().enumerate() {
            if !held {
                continue;
            }
            if theirs.is_some_and(|t| t[i]) {
                agreed[i] = true;
            } else {
                dropped.push(block.key_ids[i]);
            }
        }
        if !dropped.is_empty() {
            side.discard.push((block.block_id, dropped));
        }
        side.agreed.insert(block.block_id, agreed);
    }
    for (block_id, theirs) in bob.iter() {
        let ours = mine.get(block_id);
        let lacking = theirs.iter().enumerate().any(|(i, &h)| h && ours.is_none_or(|o| o.get(i) != Some(&true)));
        if lacking && (alice_state(*block_id)?.is_some() || !bob_pending.contains(block_id)) {
            side.differ = true;
        }
    }
    side.differ |= !side.discard.is_empty();
    Ok(side)
}

/// Bob's side: the units of his holdings outside Alice's answer `agreed`, by block. Refuses an
/// answer that names a unit Bob did not claim (Alice answers with a subset of Bob's map).
pub(crate) fn bob_side(
    own: &UnitHoldings,
    claimed: &UnitMap,
    agreed: &UnitMap,
) -> Result<Vec<(Uuid, Vec<Uuid>)>, LinkError> {
    for (block_id, flags) in agreed.iter() {
        let ok = claimed
            .get(block_id)
            .is_some_and(|c| c.len() == flags.len() && flags.iter().zip(c).all(|(&a, &c)| !a || c));
        if !ok {
            return Err(LinkError::Malformed(format!(
                "Hello answer: Alice agreed on units of block {block_id} that Bob did not say he holds"
            )));
        }
    }
    let mut discard = Vec::new();
    for block in &own.blocks {
        let agreed = agreed.get(&block.block_id);
        let dropped: Vec<Uuid> = block
            .held
            .iter()
            .enumerate()
            .filter(|&(i, &held)| held && agreed.is_none_or(|a| a.get(i) != Some(&true)))
            .map(|(i, _)| block.key_ids[i])
            .collect();
        if !dropped.is_empty() {
            discard.push((block.block_id, dropped));
        }
    }
    Ok(discard)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(u128, Vec<bool>)]) -> UnitMap {
        let mut map = UnitMap::new();
        for (id, held) in entries {
            map.insert(Uuid::from_u128(*id), held.clone());
        }
        map
    }

    #[test]
    fn every_mode_round_trips_and_the_shortest_is_chosen() {
        let mut sparse = vec![false; 1000];
        sparse[3] = true;
        sparse[999] = true;
        let dense: Vec<bool> = (0..64).map(|i| i % 3 != 0).collect();
        let m = map(&[(1, vec![true; 20]), (2, sparse), (3, dense), (4, vec![false, true])]);
        let bytes = m.encode().unwrap();
        assert_eq!(UnitMap::decode(&bytes).unwrap(), m);
        // Full: 16 + 1 bytes; sparse: 16 + 2 (header) + 1 (count) + 1 + 2 (gaps); dense: 16 + 2 + 8.
        assert_eq!(bytes.len(), 17 + 22 + 26 + 18);
        // A block of no held unit is not listed.
        assert_eq!(map(&[(5, vec![false; 3])]).encode().unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn malformed_maps_are_refused() {
        let one = map(&[(1, vec![true])]).encode().unwrap();
        let two = map(&[(2, vec![true])]).encode().unwrap();
        // Out of order, repeated, truncated, trailing bytes, no held unit, too many units.
        assert!(UnitMap::decode(&[two.clone(), one.clone()].concat()).is_err());
        assert!(UnitMap::decode(&[one.clone(), one.clone()].concat()).is_err());
        assert!(UnitMap::decode(&one[..10]).is_err());
        assert!(UnitMap::decode(&[one.clone(), vec![7]].concat()).is_err());
        let mut empty_bitmap = Uuid::from_u128(1).as_bytes().to_vec();
        put_varint(&mut empty_bitmap, 8 << 2 | 1);
        empty_bitmap.push(0);
        assert!(UnitMap::decode(&empty_bitmap).is_err());
        let mut huge = Uuid::from_u128(1).as_bytes().to_vec();
        put_varint(&mut huge, (MAX_UNIT_MAP_UNITS + 1) << 2);
        assert!(UnitMap::decode(&huge).is_err());
    }

    /// The largest store the default configuration allows (`max_stored_units` = 200 000, plus
    /// one block), in the worst shape for the packing with blocks of the default size (about 100
    /// units from 10^5 sifted bits; 128 here): every unit the only one left of its block. It
    /// fits, with room, in the classical channel's messages.
    #[test]
    fn the_largest_default_store_fits_in_a_hello() {
        let mut m = UnitMap::new();
        for b in 0..200_001u128 {
            let mut held = vec![false; 128];
            held[(b as usize * 79) % 128] = true;
            m.insert(Uuid::from_u128(b * 0x1_0000_0001), held);
        }
        let bytes = m.encode().unwrap();
        assert!(bytes.len() <= 20 * 200_001, "{} bytes", bytes.len());
        assert!(bytes.len() <= MAX_UNIT_MAP_BYTES && MAX_UNIT_MAP_BYTES + (1 << 20) < MAX_LINK_MESSAGE_BYTES);
        assert_eq!(UnitMap::decode(&bytes).unwrap().n_held(), 200_001);
    }

    #[test]
    fn a_map_too_large_for_a_hello_is_refused_with_its_size() {
        let m = map(&[(1, vec![true; 4]), (2, vec![true, false]), (3, vec![true])]);
        assert_eq!(m.encode_within(3 * 17 + 1).unwrap().len(), 3 * 17 + 1);
        let err = m.encode_within(3 * 17).unwrap_err().to_string();
        assert!(err.contains("do not fit in a Hello") && err.contains("max_stored_units"), "{err}");
    }
}
