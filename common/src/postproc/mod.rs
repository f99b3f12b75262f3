//! The post-processing stages of the protocol core ([`qkd_core::postproc`], re-exported whole),
//! and their benchmark.
//!
//! * [`bench`](mod@bench): the measurements behind `qkdctl bench-postproc` and `cargo bench`; the
//!   clock is an argument, like every time in the post-processing. It stays in `common` for
//!   now (step 1 of the crate split keeps it out of the core), although it uses only the core's
//!   types (the quantum states through `crate::sim`'s re-exports) and sifting.

pub use qkd_core::postproc::*;

pub mod bench;
