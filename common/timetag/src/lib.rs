//! Time-tag processing at the hardware boundary of Bob's receiver: live hardware, an emulator
//! and replayed files all feed raw detector time tags through this one library, which turns
//! them into the per-frame, per-pulse detections ([`qkd_core::quantum::Detection`]) that
//! sifting consumes.
//!
//! * [`tags`]: tags, stream records (tag, gap, marker) and the channel map.
//! * [`clock`]: clock recovery (sync-based, or from the data alone) and the per-tag map from
//!   tagger time to pulse coordinate.
//! * [`assign`]: acceptance windows from phase histograms, pulse and time-bin assignment,
//!   per-frame squashing into detections and counters.
//! * [`gap`]: frames touched by lost data are dropped whole.
//! * [`pipeline`]: the streaming processor that wires these together: records in, frame
//!   events (ready or dropped) out.
//! * [`ptu`]: streaming reader for PicoQuant PTU files (T2 and T3 record formats).
//! * [`text`]: plain-text tag files and `role = channel` channel-map files.
//! * [`synth`]: synthetic streams with known truth, for tests and the benchmark.

pub mod assign;
pub mod clock;
pub mod gap;
pub mod pipeline;
pub mod ptu;
pub mod synth;
pub mod tags;
pub mod text;
