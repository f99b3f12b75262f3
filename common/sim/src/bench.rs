//! Measurements of the post-processing stages: reconciliation efficiency, frame error rate,
//! round trips and throughput of Cascade and LDPC, and the throughput of the verification hash,
//! Toeplitz hashing and sifting. Shared by `qkdctl bench-postproc` and
//! `cargo bench -p qkd-sim --bench postproc`.
//!
//! Like the rest of [`qkd_core::postproc`], this module never reads a clock: the caller passes one
//! (thread CPU time where the platform has it, so that "per core" means per core even on a busy
//! machine). Frames are simulated with exactly round(Q n) errors at uniformly random positions;
//! Bob's QBER estimate is Q (the link estimates it from recent blocks). Efficiency is
//! f = leak / (n h(Q)) with the leak the reconciliation counted (parities, or syndrome bits
//! minus punctured bits plus revealed bits); the verification tag is not included.

use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;

use crate::{Detection, FrameSecret, FrameStates, Measurement, State};
use qkd_core::bits::BitVec;
use qkd_core::postproc::binary_entropy;
use qkd_core::postproc::cascade::{CascadeOutcome, FrameParityQuery, MultiCascadeAlice, MultiCascadeBob};
use qkd_core::postproc::ldpc::{self, LdpcFamily, default_start_efficiency};
use qkd_core::postproc::toeplitz::toeplitz_hash;
use qkd_core::postproc::verify::{poly_hash_tag, tags_match};
use qkd_core::prepared::TxStates;
use qkd_core::sifting::{alice_sift, announce, bob_sift};

/// QBERs of the standard run (fractions).
pub const QBERS: [f64; 7] = [0.01, 0.02, 0.03, 0.05, 0.08, 0.10, 0.11];

/// Frame sizes of the standard run (bits).
pub const FRAME_BITS: [usize; 3] = [1 << 14, 100_000, 1_000_000];

/// The published efficiency of optimized Cascade at n = 2^14 (Martinez-Mateo, Pacher et al.,
/// arXiv:1407.3257, as tabulated in the project's post-processing notes): (QBER, f).
pub const PUBLISHED_OPTIMIZED_CASCADE: [(f64, f64); 7] =
    [(0.01, 1.045), (0.02, 1.04), (0.03, 1.04), (0.05, 1.045), (0.08, 1.052), (0.10, 1.057), (0.11, 1.06)];

/// The published efficiency of the original Cascade (4 passes), n = 1e4 to 1e6: (QBER, f).
pub const PUBLISHED_ORIGINAL_CASCADE: [(f64, f64); 7] =
    [(0.01, 1.13), (0.02, 1.15), (0.03, 1.165), (0.05, 1.18), (0.08, 1.21), (0.10, 1.21), (0.11, 1.235)];

/// The finite-length bound for one-way codes at FER 1e-3 (Tomamichel, Martinez-Mateo, Pacher,
/// Elkouss, QIP 16, 280 (2017), from the post-processing notes): (n, [(QBER, f)]).
pub const ONE_WAY_BOUND: [(usize, [(f64, f64); 6]); 3] = [
    (10_000, [(0.01, 1.244), (0.02, 1.167), (0.05, 1.098), (0.08, 1.072), (0.10, 1.061), (0.11, 1.057)]),
    (100_000, [(0.01, 1.079), (0.02, 1.054), (0.05, 1.031), (0.08, 1.023), (0.10, 1.020), (0.11, 1.018)]),
    (1_000_000, [(0.01, 1.025), (0.02, 1.017), (0.05, 1.010), (0.08, 1.007), (0.10, 1.006), (0.11, 1.006)]),
];

/// Which measurements to run and how many frames.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// QBERs to simulate (fractions).
    pub qbers: Vec<f64>,
    /// Frame sizes (bits).
    pub frame_bits: Vec<usize>,
    /// Cascade frames per point (None: [`default_frames`]).
    pub frames: Option<usize>,
    /// LDPC frames per point (None: [`default_ldpc_frames`]; the decoder is much slower).
    pub ldpc_frames: Option<usize>,
    /// Seed of the simulated keys and errors.
    pub seed: u64,
    /// Run Cascade.
    pub cascade: bool,
    /// Run LDPC.
    pub ldpc: bool,
    /// Run the verification hash, Toeplitz and sifting throughput measurements.
    pub throughput: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            qbers: QBERS.to_vec(),
            frame_bits: FRAME_BITS.to_vec(),
            frames: None,
            ldpc_frames: None,
            seed: 1,
            cascade: true,
            ldpc: true,
            throughput: true,
        }
    }
}

/// Cascade frames per point by default: 100 for frames up to 2^15 bits, 20 up to 2e5, 4 above
/// (a 10^6-bit frame takes about a second of CPU for both ends).
pub fn default_frames(frame_bits: usize) -> usize {
    if frame_bits <= 1 << 15 {
        100
    } else if frame_bits <= 200_000 {
        20
    } else {
        4
    }
}

/// LDPC frames per point by default (the blind decoder runs tens to hundreds of layered
/// iterations per frame): 20, 4 and 1.
pub fn default_ldpc_frames(frame_bits: usize) -> usize {
    if frame_bits <= 1 << 15 {
        20
    } else if frame_bits <= 200_000 {
        4
    } else {
        1
    }
}

/// Frames per multi-frame Cascade exchange (they share the shuffles and the round trips).
pub fn frames_per_exchange(frame_bits: usize) -> usize {
    if frame_bits <= 1 << 15 {
        16
    } else if frame_bits <= 200_000 {
        4
    } else {
        1
    }
}

/// Mean, standard deviation, minimum and maximum of a sample.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    /// Arithmetic mean.
    pub mean: f64,
    /// Standard deviation (population).
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (all zero for an empty sample).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self { mean: 0.0, std: 0.0, min: 0.0, max: 0.0 };
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Self { mean, std, min, max }
    }
}

/// One line of the benchmark: a reconciliation point (stage "cascade" or "ldpc") or a
/// throughput measurement (stage "verification", "toeplitz" or "sifting").
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// "cascade", "ldpc", "verification", "toeplitz" or "sifting".
    pub stage: &'static str,
    /// QBER of the simulated frames (fraction), for reconciliation rows.
    pub qber: Option<f64>,
    /// Frame (block) size, in bits; for sifting, detections per frame.
    pub frame_bits: usize,
    /// Frames simulated (reconciliation) or repetitions (throughput).
    pub frames: usize,
    /// Reconciliation efficiency f = leak / (n h(Q)) over the frames.
    pub efficiency: Option<Spread>,
    /// Fraction of frames with residual errors after reconciliation.
    pub frame_error_rate: Option<f64>,
    /// Frames with residual errors whose verification tags nevertheless matched (must be 0).
    pub undetected_errors: Option<usize>,
    /// Round trips per frame (Cascade: batches the frame took part in; LDPC: messages from
    /// Alice, the syndrome plus reveals).
    pub round_trips: Option<f64>,
    /// Throughput per core: key bits (or input bits) per CPU second, both ends of the protocol
    /// on the one core for reconciliation rows.
    pub mbit_per_s: f64,
    /// Bob's share alone (Cascade), Mbit/s per core.
    pub bob_mbit_per_s: Option<f64>,
    /// Alice's share alone (Cascade), Mbit/s per core.
    pub alice_mbit_per_s: Option<f64>,
    /// Sifting only: millions of detections per CPU second (alice_sift + bob_sift).
    pub mdetections_per_s: Option<f64>,
    /// Published optimized-Cascade efficiency at this QBER (n = 2^14), for comparison.
    pub published_cascade: Option<f64>,
    /// The one-way finite-length bound at this QBER and the nearest tabulated n (LDPC rows).
    pub one_way_bound: Option<f64>,
    /// Remarks (sizes, defaults).
    pub note: String,
}

impl BenchRow {
    fn throughput(stage: &'static str, frame_bits: usize, frames: usize, mbit_per_s: f64, note: String) -> Self {
        Self {
            stage,
            qber: None,
            frame_bits,
            frames,
            efficiency: None,
            frame_error_rate: None,
            undetected_errors: None,
            round_trips: None,
            mbit_per_s,
            bob_mbit_per_s: None,
            alice_mbit_per_s: None,
            mdetections_per_s: None,
            published_cascade: None,
            one_way_bound: None,
            note,
        }
    }
}

/// Runs the measurements of `options`, calling `report` with each row as soon as it is done
/// (a full run takes minutes), and returns all rows. `clock` gives the current CPU time of the
/// calling thread (or wall time).
pub fn run(options: &BenchOptions, clock: &dyn Fn() -> Duration, report: &mut dyn FnMut(&BenchRow)) -> Vec<BenchRow> {
    let mut rows = Vec::new();
    let mut push = |row: BenchRow, rows: &mut Vec<BenchRow>| {
        report(&row);
        rows.push(row);
    };
    for &n in &options.frame_bits {
        if options.cascade {
            for &q in &options.qbers {
                let frames = options.frames.unwrap_or_else(|| default_frames(n));
                push(bench_cascade(n, q, frames, options.seed, clock), &mut rows);
            }
        }
        if options.ldpc {
            let family = LdpcFamily::new(n);
            for &q in &options.qbers {
                let frames = options.ldpc_frames.unwrap_or_else(|| default_ldpc_frames(n));
                push(bench_ldpc(&family, q, frames, options.seed, clock), &mut rows);
            }
        }
        if options.throughput {
            push(bench_toeplitz(n, clock), &mut rows);
        }
    }
    if options.throughput {
        push(bench_verification(1_000_000, clock), &mut rows);
        push(bench_sifting(200_000, 1 << 22, clock), &mut rows);
        push(bench_sifting(1 << 18, 1 << 19, clock), &mut rows);
    }
    rows
}

/// A random key and a copy with exactly round(q n) errors.
fn frame_pair(rng: &mut ChaCha20Rng, n_bits: usize, qber: f64) -> (BitVec, BitVec) {
    let words: Vec<u64> = (0..n_bits.div_ceil(64)).map(|_| rng.next_u64()).collect();
    let alice = BitVec::from_words(words, n_bits);
    let mut bob = alice.clone();
    let n_errors = (qber * n_bits as f64).round() as usize;
    let mut flipped = 0;
    while flipped < n_errors.min(n_bits) {
        let i = rng.random_range(0..n_bits);
        if bob.get(i) == alice.get(i) {
            bob.flip(i);
            flipped += 1;
        }
    }
    (alice, bob)
}

/// Seconds of `clock` between two readings (at least a nanosecond).
fn seconds(start: Duration, end: Duration) -> f64 {
    end.saturating_sub(start).as_secs_f64().max(1e-9)
}

/// Counts frames with residual errors and those of them whose verification tags (random hash
/// key) still match.
fn residual_errors(rng: &mut ChaCha20Rng, pairs: &[(&BitVec, &BitVec)]) -> (usize, usize) {
    let mut with_errors = 0;
    let mut undetected = 0;
    for &(alice, bob) in pairs {
        if alice != bob {
            with_errors += 1;
            let hash_key = rng.next_u64();
            if tags_match(poly_hash_tag(alice, hash_key), poly_hash_tag(bob, hash_key)) {
                undetected += 1;
            }
        }
    }
    (with_errors, undetected)
}

/// CPU seconds a measurement must last at least: the thread CPU clock of Linux advances in
/// scheduler ticks (a few milliseconds), so short runs are repeated.
const MIN_MEASURE_SECONDS: f64 = 0.4;

/// Seconds per run of `work`: runs it (at least once) until `MIN_MEASURE_SECONDS` of `clock`
/// have passed and returns the average.
fn measure(clock: &dyn Fn() -> Duration, work: &mut dyn FnMut()) -> f64 {
    let start = clock();
    let mut runs = 0u32;
    loop {
        work();
        runs += 1;
        let elapsed = seconds(start, clock());
        if elapsed >= MIN_MEASURE_SECONDS {
            return elapsed / f64::from(runs);
        }
    }
}

/// The frames of one multi-frame exchange: Alice's keys, Bob's keys and the shuffle seed.
struct Exchange {
    alice_keys: Vec<BitVec>,
    bob_keys: Vec<BitVec>,
    seed: [u8; 32],
}

/// Bob's outcomes of one exchange and the batches Alice answered.
type ExchangeRun = (Vec<CascadeOutcome>, Vec<Vec<FrameParityQuery>>);

/// Runs one exchange in memory.
fn run_exchange(exchange: &Exchange, qber: f64) -> ExchangeRun {
    let mut alice = MultiCascadeAlice::new(&exchange.alice_keys, exchange.seed);
    let mut bob = MultiCascadeBob::new(exchange.bob_keys.clone(), qber, exchange.seed);
    let mut batches = Vec::new();
    while let Some(queries) = bob.next_queries() {
        // Bob only asks valid ranges, so Alice always answers.
        let parities = alice.answer(&queries).expect("bob's queries are valid");
        bob.receive(&parities).expect("alice answers every query");
        batches.push(queries);
    }
    (bob.finish(), batches)
}

/// Cascade at one point: `frames` frames in multi-frame exchanges of [`frames_per_exchange`],
/// both ends timed together, then Alice alone by replaying the recorded batches (Bob's share is
/// the difference).
pub fn bench_cascade(n_bits: usize, qber: f64, frames: usize, seed: u64, clock: &dyn Fn() -> Duration) -> BenchRow {
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (n_bits as u64) << 20 ^ (qber * 1e6) as u64);
    let frames = frames.max(1);
    let group = frames_per_exchange(n_bits).min(frames);
    let mut exchanges = Vec::new();
    let mut made = 0;
    while made < frames {
        let size = group.min(frames - made);
        let (alice_keys, bob_keys) = (0..size).map(|_| frame_pair(&mut rng, n_bits, qber)).unzip();
        let mut exchange_seed = [0u8; 32];
        rng.fill_bytes(&mut exchange_seed);
        exchanges.push(Exchange { alice_keys, bob_keys, seed: exchange_seed });
        made += size;
    }
    let mut results: Option<Vec<ExchangeRun>> = None;
    let total_s = measure(clock, &mut || {
        let run: Vec<_> = exchanges.iter().map(|exchange| run_exchange(exchange, qber)).collect();
        results.get_or_insert(run);
    });
    let results = results.expect("measure runs the work at least once");
    let alice_s = measure(clock, &mut || {
        for (exchange, (_, batches)) in exchanges.iter().zip(&results) {
            let mut replay = MultiCascadeAlice::new(&exchange.alice_keys, exchange.seed);
            for queries in batches {
                std::hint::black_box(replay.answer(queries).expect("recorded batches are valid"));
            }
        }
    });
    let n_errors = (qber * n_bits as f64).round() as usize;
    let h = binary_entropy(n_errors as f64 / n_bits as f64);
    let mut efficiencies = Vec::with_capacity(frames);
    let mut round_trips = Vec::with_capacity(frames);
    let mut pairs = Vec::with_capacity(frames);
    for (exchange, (outcomes, _)) in exchanges.iter().zip(&results) {
        for (outcome, alice_key) in outcomes.iter().zip(&exchange.alice_keys) {
            efficiencies.push(outcome.leak_bits as f64 / (n_bits as f64 * h));
            round_trips.push(f64::from(outcome.round_trips));
            pairs.push((alice_key, &outcome.key));
        }
    }
    let (with_errors, undetected) = residual_errors(&mut rng, &pairs);
    let bits = (n_bits * frames) as f64;
    BenchRow {
        stage: "cascade",
        qber: Some(qber),
        frame_bits: n_bits,
        frames,
        efficiency: Some(Spread::of(&efficiencies)),
        frame_error_rate: Some(with_errors as f64 / frames as f64),
        undetected_errors: Some(undetected),
        round_trips: Some(Spread::of(&round_trips).mean),
        mbit_per_s: bits / total_s / 1e6,
        bob_mbit_per_s: Some(bits / (total_s - alice_s).max(1e-9) / 1e6),
        alice_mbit_per_s: Some(bits / alice_s / 1e6),
        mdetections_per_s: None,
        published_cascade: PUBLISHED_OPTIMIZED_CASCADE.iter().find(|p| (p.0 - qber).abs() < 1e-9).map(|p| p.1),
        one_way_bound: None,
        note: format!("{group} frames per exchange"),
    }
}

/// The one-way bound for the tabulated n nearest to `n_bits` (in log scale) at `qber`, when
/// that QBER is tabulated.
fn one_way_bound(n_bits: usize, qber: f64) -> Option<f64> {
    let (_, points) = ONE_WAY_BOUND
        .iter()
        .min_by(|a, b| {
            let da = ((a.0 as f64).ln() - (n_bits as f64).ln()).abs();
            let db = ((b.0 as f64).ln() - (n_bits as f64).ln()).abs();
            da.total_cmp(&db)
        })
        .expect("the table is not empty");
    points.iter().find(|p| (p.0 - qber).abs() < 1e-9).map(|p| p.1)
}

/// Blind LDPC at one point: the family's code and puncturing for Q, started at
/// [`default_start_efficiency`], reveals in 10 steps.
pub fn bench_ldpc(family: &LdpcFamily, qber: f64, frames: usize, seed: u64, clock: &dyn Fn() -> Duration) -> BenchRow {
    let n_bits = family.key_bits();
    let mut rng = ChaCha20Rng::seed_from_u64(seed ^ (n_bits as u64) << 20 ^ (qber * 1e6) as u64 ^ 0x1d9c);
    let (rate_index, n_punctured) = family.select(qber, default_start_efficiency(qber));
    let code = family.code(rate_index);
    let n_errors = (qber * n_bits as f64).round() as usize;
    let h = binary_entropy(n_errors as f64 / n_bits as f64);
    let pairs: Vec<(BitVec, BitVec)> = (0..frames).map(|_| frame_pair(&mut rng, n_bits, qber)).collect();
    let mut outcomes = None;
    let total_s = measure(clock, &mut || {
        let run: Vec<ldpc::LdpcOutcome> = pairs
            .iter()
            .map(|(alice_key, bob_key)| {
                ldpc::reconcile_in_memory(code, alice_key, bob_key, qber, n_punctured, 10, &mut rng)
                    .expect("keys and code match")
            })
            .collect();
        outcomes.get_or_insert(run);
    });
    let outcomes = outcomes.expect("measure runs the work at least once");
    let efficiencies: Vec<f64> = outcomes.iter().map(|o| o.leak_bits as f64 / (n_bits as f64 * h)).collect();
    let messages: Vec<f64> = outcomes.iter().map(|o| f64::from(o.messages)).collect();
    let keys: Vec<(BitVec, BitVec)> =
        pairs.iter().zip(&outcomes).map(|((alice_key, _), o)| (alice_key.clone(), o.key.clone())).collect();
    let refs: Vec<(&BitVec, &BitVec)> = keys.iter().map(|(a, b)| (a, b)).collect();
    let (with_errors, undetected) = residual_errors(&mut rng, &refs);
    BenchRow {
        stage: "ldpc",
        qber: Some(qber),
        frame_bits: n_bits,
        frames,
        efficiency: Some(Spread::of(&efficiencies)),
        frame_error_rate: Some(with_errors as f64 / frames.max(1) as f64),
        undetected_errors: Some(undetected),
        round_trips: Some(Spread::of(&messages).mean),
        mbit_per_s: (n_bits * frames) as f64 / total_s / 1e6,
        bob_mbit_per_s: None,
        alice_mbit_per_s: None,
        mdetections_per_s: None,
        published_cascade: None,
        one_way_bound: one_way_bound(n_bits, qber),
        note: format!(
            "mother rate {:.2}, {} checks, {} of {} adaptation bits punctured",
            code.mother_rate(),
            code.n_checks(),
            n_punctured,
            code.n_adaptation()
        ),
    }
}

/// Repeats `work` until `min_seconds` of `clock` have passed; returns (repetitions, seconds per
/// repetition), the best of three such rounds (the machine may be shared).
fn time_repeated(clock: &dyn Fn() -> Duration, min_seconds: f64, work: &mut dyn FnMut()) -> (usize, f64) {
    let mut best = f64::INFINITY;
    let mut total_reps = 0;
    for _ in 0..3 {
        let start = clock();
        let mut reps = 0;
        loop {
            work();
            reps += 1;
            let elapsed = seconds(start, clock());
            if elapsed >= min_seconds {
                best = best.min(elapsed / reps as f64);
                break;
            }
        }
        total_reps += reps;
    }
    (total_reps, best)
}

/// Toeplitz hashing of an `n_bits`-bit block to n/2 bits (the automatic path: Karatsuba up to
/// the threshold, the ternary FFT above).
pub fn bench_toeplitz(n_bits: usize, clock: &dyn Fn() -> Duration) -> BenchRow {
    let mut rng = ChaCha20Rng::seed_from_u64(n_bits as u64);
    let out_bits = n_bits / 2;
    let random =
        |rng: &mut ChaCha20Rng, n: usize| BitVec::from_words((0..n.div_ceil(64)).map(|_| rng.next_u64()).collect(), n);
    let input = random(&mut rng, n_bits);
    let seed = random(&mut rng, n_bits + out_bits - 1);
    let (reps, per_rep) = time_repeated(clock, 0.3, &mut || {
        std::hint::black_box(toeplitz_hash(&input, &seed, out_bits));
    });
    BenchRow::throughput(
        "toeplitz",
        n_bits,
        reps,
        n_bits as f64 / per_rep / 1e6,
        format!("m = n/2 = {out_bits} output bits"),
    )
}

/// The verification tag of an `n_bits`-bit block.
pub fn bench_verification(n_bits: usize, clock: &dyn Fn() -> Duration) -> BenchRow {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let key = BitVec::from_words((0..n_bits.div_ceil(64)).map(|_| rng.next_u64()).collect(), n_bits);
    let hash_key = rng.next_u64();
    let (reps, per_rep) = time_repeated(clock, 0.3, &mut || {
        std::hint::black_box(poly_hash_tag(&key, hash_key));
    });
    BenchRow::throughput("verification", n_bits, reps, n_bits as f64 / per_rep / 1e6, "GF(2^64) polynomial hash".into())
}

/// Sifting of one frame of `n_pulses` pulses with `n_detections` clicks at distinct uniformly
/// random pulses (Bob's basis half Z, half X, noiseless; Alice's p_z = 0.9), both sides:
/// Alice's `alice_sift` (which decodes Bob's announcement and recomputes her state of every
/// clicked pulse from the frame secret) and Bob's `bob_sift`. Bob's `announce` is prepared once,
/// outside the timing. Sparse frames (the standard run: 200 000 clicks in 2^22 pulses, about one
/// in 21) share almost no AES block between clicks; dense ones (half the pulses) share many.
pub fn bench_sifting(n_detections: usize, n_pulses: u64, clock: &dyn Fn() -> Duration) -> BenchRow {
    let p_z = 0.9;
    let secret = FrameSecret::from_bytes([5; 32]);
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let n_detections = n_detections.min(usize::try_from(n_pulses).unwrap_or(usize::MAX));
    let mut indices: Vec<u64> =
        rand::seq::index::sample(&mut rng, n_pulses as usize, n_detections).into_iter().map(|i| i as u64).collect();
    indices.sort_unstable();
    let states = FrameStates::new(&secret).states(&indices, p_z);
    let detections: Vec<Detection> = indices
        .into_iter()
        .zip(states)
        .map(|(pulse_idx, state)| {
            let measurement = if rng.random_bool(0.5) {
                Measurement::Z { late: state == State::Late }
            } else {
                Measurement::X { minus: rng.random_bool(0.5) }
            };
            Detection { pulse_idx, measurement }
        })
        .collect();
    let (deltas, codes) = announce(&detections);
    let (reps, per_rep) = time_repeated(clock, 0.3, &mut || {
        let (secret, deltas, codes) = std::hint::black_box((&secret, &deltas, &codes));
        // Valid by construction: the announcement comes from these detections.
        // The frame's key is expanded per call, as Alice's core does per sifted frame.
        let states = TxStates::derived(secret.clone(), p_z);
        let (answer, alice) = alice_sift(&states, n_pulses, deltas, codes).expect("valid announcement");
        let bob = bob_sift(std::hint::black_box(&detections), &answer).expect("valid answer");
        std::hint::black_box((alice, bob));
    });
    let mut row = BenchRow::throughput(
        "sifting",
        detections.len(),
        reps,
        0.0,
        format!(
            "{} detections per frame of {} pulses (1 in {:.1}), alice_sift + bob_sift",
            detections.len(),
            pulses_label(n_pulses),
            n_pulses as f64 / detections.len().max(1) as f64
        ),
    );
    row.mdetections_per_s = Some(detections.len() as f64 / per_rep / 1e6);
    row
}

/// `n` as 2^k when it is a power of two.
fn pulses_label(n: u64) -> String {
    if n.is_power_of_two() { format!("2^{}", n.trailing_zeros()) } else { n.to_string() }
}

/// The rows as a text table with the published curves beside them.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    let reconciliation: Vec<&BenchRow> = rows.iter().filter(|r| r.efficiency.is_some()).collect();
    if !reconciliation.is_empty() {
        out.push_str(
            "Reconciliation: f = leak / (n h(Q)); FER = frames with residual errors (all must be caught by\n\
             verification: 'undet' counts those that were not); RT = round trips per frame (LDPC: messages);\n\
             Mbit/s = key bits per CPU second with both ends on one core (Bob and Alice alone for Cascade).\n",
        );
        out.push_str(&format!(
            "{:<8} {:>8} {:>5} {:>6} {:>7} {:>6} {:>7} {:>7} {:>5} {:>7} {:>8} {:>7} {:>7} {:>9} {:>8}\n",
            "stage",
            "n",
            "QBER",
            "frames",
            "f mean",
            "f std",
            "f max",
            "FER",
            "undet",
            "RT",
            "Mbit/s",
            "Bob",
            "Alice",
            "published",
            "bound"
        ));
        for r in reconciliation {
            let e = r.efficiency.expect("filtered");
            let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |x| format!("{x:.prec$}"));
            out.push_str(&format!(
                "{:<8} {:>8} {:>4.0}% {:>6} {:>7.4} {:>6.4} {:>7.4} {:>7.4} {:>5} {:>7.1} {:>8.2} {:>7} {:>7} {:>9} {:>8}\n",
                r.stage,
                r.frame_bits,
                r.qber.unwrap_or(0.0) * 100.0,
                r.frames,
                e.mean,
                e.std,
                e.max,
                r.frame_error_rate.unwrap_or(0.0),
                r.undetected_errors.unwrap_or(0),
                r.round_trips.unwrap_or(0.0),
                r.mbit_per_s,
                opt(r.bob_mbit_per_s, 1),
                opt(r.alice_mbit_per_s, 1),
                opt(r.published_cascade, 3),
                opt(r.one_way_bound, 3),
            ));
        }
        out.push_str(
            "published: optimized Cascade at n = 2^14 (arXiv:1407.3257); original 4-pass Cascade: 1.13 1.15 1.165 1.18 1.21 1.21 1.235\n\
             at 1 2 3 5 8 10 11 %. bound: one-way finite-length bound, FER 1e-3, nearest tabulated n (1e4, 1e5, 1e6).\n",
        );
    }
    let throughput: Vec<&BenchRow> = rows.iter().filter(|r| r.efficiency.is_none()).collect();
    if !throughput.is_empty() {
        out.push_str("\nThroughput per core (best of three rounds):\n");
        for r in throughput {
            match r.mdetections_per_s {
                Some(md) => out.push_str(&format!(
                    "{:<13} {:>10}  {:>8.2} M detections/s   ({})\n",
                    r.stage, r.frame_bits, md, r.note
                )),
                None => out.push_str(&format!(
                    "{:<13} {:>10}  {:>8.1} Mbit/s            ({})\n",
                    r.stage, r.frame_bits, r.mbit_per_s, r.note
                )),
            }
        }
    }
    out
}
