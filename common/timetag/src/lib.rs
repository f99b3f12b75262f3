//! Time-tag processing at the hardware boundary of Bob's receiver: live hardware, an emulator
//! and replayed files all feed raw detector time tags through this one library, which turns
//! them into the per-frame, per-pulse detections ([`qkd_core::quantum::Detection`]) that
//! sifting consumes.
//!
//! * [`tags`]: tags, stream records (tag, gap, marker) and the channel map.

pub mod tags;
