//! Physics of the simulated quantum channel: Alice's quantum-dot source, the fibre, Bob's
//! time-bin receiver with drift and phase stabilisation, eavesdroppers, and the analytic model the
//! Monte-Carlo is checked against.
//!
//! The link reproduced is the three-state time-bin QKD experiment of J. Wang et al., Light: Sci.
//! Appl. (2026), arXiv:2506.15520 ("seed" below: the experiment this model reproduces); the values
//! the paper does not publish are chosen and justified in the preset files (`presets/*.toml`).
//!
//! * [`params`]: [`LinkParams`], every physical parameter, with presets in `presets/*.toml`.
//! * [`source`]: the photons that survive the fibre ([`Source::emit_frame`]), carrying Alice's
//!   states ([`alice_state`], a pure function of a [`FrameSecret`] and the pulse index).
//! * [`receiver`]: Bob's detections ([`Receiver::detect_frame`]), phase drift and the
//!   phase-stabilisation loop ([`Receiver::feedback`]).
//!
//! The states, the frame secret and the detections are the protocol core's types
//! ([`qkd_core::quantum`]), re-exported here and in [`source`] and [`receiver`].
//! * [`eve`]: attacks on the photons in the fibre ([`InterceptResend`],
//!   [`PhotonNumberSplitting`]).
//! * [`analytic`]: closed-form expectations ([`expected`]).
//! * [`planner`]: the whole link (source, receiver, Alice's core and Bob's driver over the
//!   in-memory peer, [`qkd_core::store::MemoryStore`]s) in simulated time, as fast as the CPU
//!   allows: `qkdctl simulate`.
//! * [`bench`](mod@bench): the post-processing benchmark behind `qkdctl bench-postproc` and
//!   `cargo bench -p qkd-sim`.
//!
//! Work is proportional to photons and clicks, never to pulses: photons and dark counts are placed
//! by geometric skipping over pulse indices.
//!
//! # Equations referred to in this module
//! * T1 (timing, [`params::TimingModel`]): the arrival time after a bin's excitation is
//!   Exp(T1) + N(0, sigma^2), with distribution function
//!   F(t) = Phi(t/sigma) - exp(sigma^2/(2 T1^2) - t/T1) Phi(t/sigma - sigma/T1); windows of width
//!   w open at each bin's nominal time, tau apart; P(E -> E) = P(L -> L) = F(w) - F(0),
//!   P(E -> L) = F(tau + w) - F(tau), P(L -> E) = F(w - tau) - F(-tau). This makes precise the
//!   seed's "intrinsic error e_Z0 from the T1 tail and jitter, about exp(-tau/T1)".
//! * T2: e_Z0 = [P(E -> L) + P(L -> E)] / [2 P(E -> E) + P(E -> L) + P(L -> E)], which is
//!   x / (2 + x) with x = exp(-tau/T1) without jitter.
//! * A1, A2 (click probabilities): see [`analytic`].
//! * F1 (feedback): sin(phi - c) = (p- - p+) / (2 b sin delta), see [`receiver`].

pub mod analytic;
pub mod bench;
pub mod eve;
mod math;
pub mod params;
pub mod planner;
pub mod receiver;
pub mod source;
#[cfg(test)]
mod tests;

pub use analytic::{Expected, expected, expected_with_phase};
pub use eve::{InterceptResend, PhotonNumberSplitting, PnsFrame};
pub use math::binary_entropy;
pub use params::{LinkParams, ParamsError, SourceBounds, TimingModel};
pub use receiver::{Detection, Measurement, Receiver};
pub use source::{Basis, FrameSecret, FrameStates, Photon, Source, State, alice_state};
