//! TEMPORARY STUB (replaced by the post-processing work).
#![allow(missing_docs, unused_variables, dead_code)]
pub mod cascade {
    use crate::bits::BitVec;
    #[derive(Debug, Clone, Copy, PartialEq, Eq)] pub struct ParityQuery { pub pass: u32, pub start: u32, pub end: u32 }
    #[derive(Debug, thiserror::Error)] #[error("x")] pub struct CascadeError;
    pub struct CascadeAlice;
    impl CascadeAlice { pub fn new(k: &BitVec, s: [u8; 32]) -> Self { todo!() } pub fn answer(&mut self, q: &[ParityQuery]) -> Result<Vec<bool>, CascadeError> { todo!() } pub fn leak_bits(&self) -> u64 { 0 } }
    pub struct CascadeBob;
    pub struct CascadeOutcome { pub key: BitVec, pub leak_bits: u64, pub n_corrected: u64, pub round_trips: u32 }
    impl CascadeBob { pub fn new(k: BitVec, q: f64, s: [u8; 32]) -> Self { todo!() } pub fn next_queries(&mut self) -> Option<Vec<ParityQuery>> { todo!() } pub fn receive(&mut self, p: &[bool]) -> Result<(), CascadeError> { todo!() } pub fn finish(self) -> CascadeOutcome { todo!() } }
}
pub mod verify {
    use crate::bits::BitVec;
    pub fn poly_hash_tag(key: &BitVec, k: u64) -> u64 { todo!() }
    pub fn tags_match(a: u64, b: u64) -> bool { todo!() }
}
pub mod toeplitz {
    use crate::bits::BitVec;
    pub fn toeplitz_hash(input: &BitVec, seed: &BitVec, out_bits: usize) -> BitVec { todo!() }
}
pub mod finite_key {
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub struct XCounts { pub e_plus: u64, pub e_minus: u64, pub l_plus: u64, pub l_minus: u64, pub plus_plus: u64, pub plus_minus: u64 }
    impl XCounts { pub fn add(&mut self, o: &XCounts) {} pub fn qber_x(&self) -> f64 { 0.0 } }
    #[derive(Clone, Debug)] pub struct SecurityParams { pub eps_sec: f64, pub eps_cor: f64, pub eps_pe: f64, pub g2: f64, pub mu: f64, pub p_z: f64 }
    pub struct BlockStats { pub n_key_bits: u64, pub n_pulses: u64, pub x_counts: XCounts, pub leak_ec_bits: u64 }
    pub struct KeyLength { pub final_bits: u64, pub phase_error_upper: f64 }
    #[derive(Debug, thiserror::Error)] #[error("x")] pub struct KeyLengthError;
    pub fn phase_error_upper(s: &BlockStats, p: &SecurityParams) -> Result<f64, KeyLengthError> { todo!() }
    pub fn secret_key_length(s: &BlockStats, p: &SecurityParams) -> Result<KeyLength, KeyLengthError> { todo!() }
}
