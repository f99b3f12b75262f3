//! TEMPORARY STUB (replaced by the simulation work): the API the rest of the crate uses.
#![allow(missing_docs, unused_variables, dead_code)]
use zeroize::{Zeroize, ZeroizeOnDrop};
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkParams { pub clock_hz: f64, pub mu: f64, pub g2: f64, pub p_z: f64, pub distance_km: f64 }
#[derive(Debug, thiserror::Error)] #[error("x")] pub struct ParamsError;
impl LinkParams {
    pub fn preset(name: &str) -> Result<Self, ParamsError> { todo!() }
    pub fn from_toml_str(s: &str) -> Result<Self, ParamsError> { todo!() }
    pub fn validate(&self) -> Result<(), ParamsError> { todo!() }
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)] #[repr(u8)] pub enum State { Early = 0, Late = 1, Plus = 2, Minus = 3 }
impl State { pub fn from_code(c: u8) -> Option<State> { todo!() } }
#[derive(Zeroize, ZeroizeOnDrop)] pub struct FrameSecret([u8; 32]);
impl FrameSecret { pub fn random(rng: &mut impl rand::Rng) -> Self { todo!() } pub fn from_bytes(b: [u8; 32]) -> Self { Self(b) } }
pub fn alice_state(secret: &FrameSecret, pulse_idx: u64, p_z: f64) -> State { todo!() }
#[derive(Clone, Copy, Debug)] pub struct Photon { pub pulse_idx: u64, pub state: State, pub two_photons: bool }
pub struct Source;
impl Source { pub fn new(p: &LinkParams) -> Self { Source } pub fn emit_frame(&self, s: &FrameSecret, n: u64, rng: &mut impl rand::Rng) -> Vec<Photon> { todo!() } }
#[derive(Clone, Copy, Debug)] pub enum Measurement { Z { late: bool }, X { minus: bool } }
#[derive(Clone, Copy, Debug)] pub struct Detection { pub pulse_idx: u64, pub measurement: Measurement }
pub struct Receiver;
impl Receiver { pub fn new(p: &LinkParams) -> Self { Receiver } pub fn detect_frame(&mut self, p: &[Photon], n: u64, rng: &mut impl rand::Rng) -> Vec<Detection> { todo!() } pub fn feedback(&mut self, a: u64, b: u64) {} pub fn phase_error_rad(&self) -> f64 { 0.0 } }
pub struct InterceptResend { pub fraction: f64 }
impl InterceptResend { pub fn attack(&self, p: &mut Vec<Photon>, rng: &mut impl rand::Rng) {} }
