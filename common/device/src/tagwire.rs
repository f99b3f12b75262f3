//! The wire form of a time-tag stream (`TagBatch` in `proto/device.proto`): tags as parallel
//! columns, one byte of channel and one zigzag varint of time delta per tag (about 4 to 5 bytes
//! per tag at the rates of a QKD receiver, against 16 for a repeated message), gaps and markers
//! in place by the number of tags that precede them.

use prost::encoding::{decode_varint, encode_varint};
use proto::device as pb;
use qkd_timetag::tags::{Record, Tag};

use crate::DeviceError;

/// Most tags one batch carries: longer stretches are cut into several batches.
pub const MAX_TAGS_PER_BATCH: usize = 1 << 16;

#[inline]
fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

#[inline]
fn unzigzag(u: u64) -> i64 {
    ((u >> 1) as i64) ^ -((u & 1) as i64)
}

/// Packs `records` (in stream order) into one batch; gaps carry `gap_reason`.
pub fn encode_batch(records: &[Record], gap_reason: pb::LossReason) -> pb::TagBatch {
    let n_tags = records.iter().filter(|r| matches!(r, Record::Tag(_))).count();
    let base_ps = records
        .iter()
        .find_map(|r| match r {
            Record::Tag(t) => Some(t.time_ps),
            _ => None,
        })
        .unwrap_or(0);
    let mut batch = pb::TagBatch {
        base_ps,
        time_deltas: Vec::with_capacity(n_tags * 5),
        channels: Vec::with_capacity(n_tags),
        ..Default::default()
    };
    let mut prev = base_ps;
    for r in records {
        match *r {
            Record::Tag(t) => {
                encode_varint(zigzag(t.time_ps.wrapping_sub(prev) as i64), &mut batch.time_deltas);
                batch.channels.push(t.channel);
                prev = t.time_ps;
            }
            Record::Gap { from_ps, to_ps } => batch.gaps.push(pb::Gap {
                position: batch.channels.len() as u32,
                from_ps,
                to_ps,
                reason: gap_reason as i32,
            }),
            Record::Marker { marker, time_ps } => batch.markers.push(pb::Marker {
                position: batch.channels.len() as u32,
                marker: u32::from(marker),
                time_ps,
            }),
        }
    }
    batch
}

/// Unpacks a batch, appending its records in stream order to `out`; checks that every tag has a
/// time and a channel, that positions are in order and within the batch, gaps are intervals and
/// markers fit a byte. Returns the number of tags.
pub fn decode_batch(batch: &pb::TagBatch, out: &mut Vec<Record>) -> Result<usize, DeviceError> {
    let malformed = |m: String| DeviceError::Malformed(format!("tag batch: {m}"));
    let n = batch.channels.len();
    out.reserve(n + batch.gaps.len() + batch.markers.len());
    let mut deltas = batch.time_deltas.as_slice();
    let (mut gaps, mut markers) = (batch.gaps.iter().peekable(), batch.markers.iter().peekable());
    let (mut last_gap, mut last_marker) = (0u32, 0u32);
    let mut time = batch.base_ps;
    for i in 0..=n {
        // The gaps and markers that precede tag i.
        while let Some(g) = gaps.next_if(|g| g.position as usize <= i) {
            if g.position < last_gap || g.from_ps > g.to_ps {
                return Err(malformed(format!(
                    "gap {}..{} at position {} out of order",
                    g.from_ps, g.to_ps, g.position
                )));
            }
            last_gap = g.position;
            out.push(Record::Gap { from_ps: g.from_ps, to_ps: g.to_ps });
        }
        while let Some(m) = markers.next_if(|m| m.position as usize <= i) {
            let marker = u8::try_from(m.marker).map_err(|_| malformed(format!("marker {} above 255", m.marker)))?;
            if m.position < last_marker {
                return Err(malformed(format!("marker at position {} out of order", m.position)));
            }
            last_marker = m.position;
            out.push(Record::Marker { marker, time_ps: m.time_ps });
        }
        if i == n {
            break;
        }
        let d = decode_varint(&mut deltas)
            .map_err(|_| malformed(format!("time delta {i} of {n} is missing or malformed")))?;
        time = time
            .checked_add_signed(unzigzag(d))
            .ok_or_else(|| malformed(format!("time of tag {i} leaves the u64 range")))?;
        out.push(Record::Tag(Tag::new(batch.channels[i], time)));
    }
    if let Some(g) = gaps.next() {
        return Err(malformed(format!("gap at position {} beyond the batch's {n} tags", g.position)));
    }
    if let Some(m) = markers.next() {
        return Err(malformed(format!("marker at position {} beyond the batch's {n} tags", m.position)));
    }
    if !deltas.is_empty() {
        return Err(malformed(format!("{} bytes of time deltas left after {n} tags", deltas.len())));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_in_order() {
        let records = vec![
            Record::Marker { marker: 2, time_ps: 5 },
            Record::Tag(Tag::new(1, 1_000_000)),
            Record::Tag(Tag::new(2, 999_990)),
            Record::Gap { from_ps: 1_000_100, to_ps: 2_000_000 },
            Record::Tag(Tag::new(0, 1 << 62)),
            Record::Tag(Tag::new(3, 7)),
            Record::Gap { from_ps: 9, to_ps: 9 },
        ];
        let batch = encode_batch(&records, pb::LossReason::Injected);
        assert_eq!(batch.channels, vec![1, 2, 0, 3]);
        let mut out = Vec::new();
        assert_eq!(decode_batch(&batch, &mut out).unwrap(), 4);
        assert_eq!(out, records);
        let empty = encode_batch(&[], pb::LossReason::Overflow);
        out.clear();
        assert_eq!(decode_batch(&empty, &mut out).unwrap(), 0);
        assert!(out.is_empty());
    }

    #[test]
    fn malformed_batches_are_refused() {
        let records = vec![Record::Tag(Tag::new(1, 100)), Record::Tag(Tag::new(2, 200))];
        let good = encode_batch(&records, pb::LossReason::Overflow);
        let mut out = Vec::new();
        let mut b = good.clone();
        b.channels.push(3);
        assert!(decode_batch(&b, &mut out).unwrap_err().to_string().contains("missing"));
        let mut b = good.clone();
        b.time_deltas.push(1);
        assert!(decode_batch(&b, &mut out).unwrap_err().to_string().contains("left after"));
        let mut b = good.clone();
        b.gaps.push(pb::Gap { position: 3, from_ps: 1, to_ps: 2, reason: 0 });
        assert!(decode_batch(&b, &mut out).unwrap_err().to_string().contains("beyond"));
        let mut b = good.clone();
        b.gaps.push(pb::Gap { position: 1, from_ps: 5, to_ps: 2, reason: 0 });
        assert!(decode_batch(&b, &mut out).is_err());
        let mut b = good;
        b.base_ps = u64::MAX - 50;
        assert!(decode_batch(&b, &mut out).unwrap_err().to_string().contains("u64"));
    }
}
