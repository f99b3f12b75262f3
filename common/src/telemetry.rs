//! What an operator sees of a running daemon besides its logs: Prometheus metrics, an hour of
//! history for the status page, and the current state for `qkdctl status`. All three are served
//! by the health listener ([`crate::service::serve_health`]); none of them holds key material
//! (counts, rates, ratios and levels only).
//!
//! Each daemon has a recorder of its own ([`Telemetry`]), not the process-wide one of the
//! `metrics` crate: the integration tests run several Alices and Bobs in one process, and each
//! daemon's `/metrics` must show its own link only. Values recorded where they happen (the KME's
//! requests) go through [`Telemetry::recorder`] with `metrics::with_local_recorder`; the link's
//! values are read from the daemon's status at each scrape and each sample
//! ([`NodeSnapshot`]). Every series carries the labels `node` (the daemon's `node_id`) and
//! `role` (`alice`, `bob`).
//!
//! Names follow Prometheus's conventions (`qkd_` prefix, `_total` counters, `_seconds`
//! histograms, ratios as `_ratio`, amounts of key in bytes, the base unit `promtool check metrics`
//! asks for). QKD reasons in bits: the totals are the bit counts divided by 8 (rounded down;
//! multiply by 8 in PromQL for bits), and the rate gauges are in bits per second
//! (`qkd_secret_key_rate_bits_per_second`), as the status page and `qkdctl status` show them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use qkd_store::{KeyStore, SledStore};
use tokio_util::sync::CancellationToken;

/// Time between two samples of the history.
pub const SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// Samples kept: one hour.
pub const HISTORY_SAMPLES: usize = 720;

/// The window over which the rate gauges are computed.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// The window over which the store's draw is measured for the time to exhaustion.
pub const DRAW_WINDOW: Duration = Duration::from_secs(300);

/// A daemon's state as its status holds it, read at each scrape and sample. Cumulative values
/// count since the daemon started.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeSnapshot {
    /// In words: "linked", "waiting for Bob", "connecting to Alice", "device failed".
    pub state: String,
    /// Whether the link to the peer works (Bob: a session is open; Alice: Bob called within
    /// the last 10 s).
    pub link_up: bool,
    /// The last block's key-basis QBER (error correction's count).
    pub qber_z: Option<f64>,
    /// The last block's test-basis QBER.
    pub qber_x: Option<f64>,
    /// The last block's finite-size upper bound on the phase error.
    pub phase_error_upper: Option<f64>,
    /// The last committed block's reconciliation efficiency, leak / (n h(QBER Z)).
    pub reconciliation_efficiency: Option<f64>,
    /// Detections announced (Bob only).
    pub detections: Option<u64>,
    /// Sifted key bits.
    pub sifted_bits: u64,
    /// Secret key bits stored (the final keys of committed blocks, authentication refill included).
    pub secret_bits: u64,
    /// Bits disclosed by error correction and verification in committed blocks.
    pub leak_bits: u64,
    /// Blocks committed.
    pub blocks_committed: u64,
    /// Blocks aborted, by reason ([`reason_label`]).
    pub blocks_aborted: BTreeMap<String, u64>,
    /// Frames of the quantum channel taken (Alice: emitted or reported by the device; Bob: sifted).
    pub frames: u64,
    /// Frames dropped at both ends (Bob) or lost by the source (Alice).
    pub frames_dropped: u64,
    /// Frame periods the simulated source skipped (Alice).
    pub frames_missed: Option<u64>,
    /// Sessions opened (Bob).
    pub sessions: Option<u64>,
    /// The decoder's uncorrected phase offset, radians: what the phase feedback has left to
    /// correct (simulated receivers report it).
    pub phase_offset_rad: Option<f64>,
    /// Unused bits of the authentication key pool.
    pub auth_pool_bits: Option<u64>,
    /// Key units this end dropped at `Hello` because the peer's store did not hold them (the
    /// re-agreement of the stores after one was lost or restored from an older copy).
    #[serde(default)]
    pub units_dropped_at_hello: u64,
    /// KME reservations this end erased at `Hello` because the two stores differed.
    #[serde(default)]
    pub reservations_dropped_at_hello: u64,
    /// The device's monitors, as last read.
    pub device: DeviceReadings,
}

/// A quantum device's monitor readings, where it has them.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceReadings {
    /// The source monitor's mean photon number per pulse.
    pub source_mu: Option<f64>,
    /// The source monitor's g2(0).
    pub source_g2: Option<f64>,
    /// (detector channel, counts per second).
    pub count_rates: Vec<(u8, f64)>,
    /// (sensor, kelvin).
    pub temperatures: Vec<(String, f64)>,
    /// (lock: `reference_clock`, `sync`, `phase`; locked), for the locks the device reports.
    pub locks: Vec<(String, bool)>,
}

/// The Prometheus label value of an abort reason: its text in snake case ("QBER too high" ->
/// `qber_too_high`). A fixed set: the reason's details never become label values.
pub fn reason_label(reason: &impl std::fmt::Display) -> String {
    let text = reason.to_string().to_lowercase();
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').to_string()
}

/// Reconciliation efficiency f = leak / (n h(Q)), where it is defined (0 < Q < 1/2, n > 0).
pub fn reconciliation_efficiency(leak_bits: u64, n_bits: u64, qber: f64) -> Option<f64> {
    let h = qkd_core::postproc::binary_entropy(qber);
    (n_bits > 0 && qber > 0.0 && qber < 0.5 && h > 0.0).then(|| leak_bits as f64 / (n_bits as f64 * h))
}

/// One point of the history (what the status page plots), every [`SAMPLE_PERIOD`].
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Unix time, seconds.
    pub t: f64,
    /// Whether the link was up.
    pub link_up: bool,
    /// The last block's QBER Z and X at that time.
    pub qber_z: Option<f64>,
    /// See `qber_z`.
    pub qber_x: Option<f64>,
    /// Secret key rate over the last [`RATE_WINDOW`], bit/s.
    pub secret_key_rate_bps: Option<f64>,
    /// Sifted key rate over the last [`RATE_WINDOW`], bit/s.
    pub sifted_key_rate_bps: Option<f64>,
    /// Detection rate over the last [`RATE_WINDOW`], per second (Bob).
    pub detection_rate_hz: Option<f64>,
    /// The decoder's phase offset, radians.
    pub phase_offset_rad: Option<f64>,
    /// The authentication pool's level, bits.
    pub auth_pool_bits: Option<u64>,
    /// Ready key units in the store.
    pub store_ready_units: Option<u64>,
    /// Cumulative counts, for the rates.
    #[serde(skip)]
    counts: Counts,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    secret_bits: u64,
    sifted_bits: u64,
    detections: Option<u64>,
}

/// The store's unit counts: held units from the store's kept count, pending units from the
/// records of its pending blocks.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StoreLevels {
    /// Units ready to be served.
    pub ready_units: u64,
    /// Units of blocks not committed at the other end yet.
    pub pending_units: u64,
}

/// The current state as `GET /status.json` gives it (`qkdctl status`).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    /// The daemon's `node_id`.
    pub node: String,
    /// `alice` or `bob`.
    pub role: String,
    /// The link and its counters.
    #[serde(flatten)]
    pub snapshot: NodeSnapshot,
    /// Secret key rate over the last minute, bit/s (absent before two samples).
    pub secret_key_rate_bps: Option<f64>,
    /// Sifted key rate over the last minute, bit/s.
    pub sifted_key_rate_bps: Option<f64>,
    /// Detection rate over the last minute, per second (Bob).
    pub detection_rate_hz: Option<f64>,
    /// The key store.
    pub store: Option<StoreLevels>,
    /// Most units the store may hold, when limited.
    pub store_capacity_units: Option<u64>,
    /// Seconds until no ready unit is left if the ready count keeps falling as over the last
    /// five minutes; absent when it is not falling (or not known yet).
    pub store_exhaustion_s: Option<f64>,
}

/// The history as `GET /status/history.json` gives it (the status page).
#[derive(Clone, Debug, serde::Serialize)]
pub struct History<'a> {
    /// The daemon's `node_id`.
    pub node: &'a str,
    /// `alice` or `bob`.
    pub role: &'a str,
    /// Seconds between samples.
    pub period_s: f64,
    /// The current state.
    pub now: NodeStatus,
    /// Oldest first, at most an hour.
    pub samples: Vec<Sample>,
}

/// What the store's units are counted in.
#[derive(Clone, Copy, Debug)]
pub struct UnitSize {
    /// Bits of one key unit (`[protocol] key_unit_bits`).
    pub unit_bits: u64,
    /// Bits of each committed block's final key that go to the authentication pool.
    pub auth_refill_bits: u64,
}

type SnapshotFn = dyn Fn() -> NodeSnapshot + Send + Sync;

/// A daemon's metrics recorder, its history and where its values come from.
pub struct Telemetry {
    node: String,
    role: &'static str,
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    source: Box<SnapshotFn>,
    store: Arc<SledStore>,
    unit: UnitSize,
    capacity_units: Option<u64>,
    history: Mutex<VecDeque<Sample>>,
    store_levels: Mutex<Option<StoreLevels>>,
}

impl Telemetry {
    /// The telemetry of daemon `node` (role `alice` or `bob`), reading its state with `source`
    /// and its store's levels from `store` (`capacity_units`: its limit, if any).
    pub fn new(
        node: &str,
        role: &'static str,
        source: impl Fn() -> NodeSnapshot + Send + Sync + 'static,
        store: Arc<SledStore>,
        unit: UnitSize,
        capacity_units: Option<u64>,
    ) -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .add_global_label("node", node)
            .add_global_label("role", role)
            .set_buckets_for_metric(
                Matcher::Full("qkd_etsi_request_duration_seconds".into()),
                &qkd_kme::server::LATENCY_BUCKETS_S,
            )
            .expect("the latency buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let telemetry = Self {
            node: node.to_string(),
            role,
            recorder: Arc::new(recorder),
            handle,
            source: Box::new(source),
            store,
            unit,
            capacity_units,
            history: Mutex::new(VecDeque::with_capacity(HISTORY_SAMPLES)),
            store_levels: Mutex::new(None),
        };
        metrics::with_local_recorder(telemetry.recorder.as_ref(), describe);
        Arc::new(telemetry)
    }

    /// The daemon's recorder, for values recorded where they happen (the KME's requests).
    pub fn recorder(&self) -> qkd_kme::SharedRecorder {
        self.recorder.clone()
    }

    /// The daemon's `node_id`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Takes a sample now: the store's levels, the history, the rate gauges. Reads the store
    /// (its pending blocks' records): call it off the async workers.
    pub fn sample(&self) {
        let levels = self.read_store_levels();
        *self.store_levels.lock().expect("telemetry lock poisoned") = levels;
        let snapshot = (self.source)();
        let now = unix_now();
        let counts = Counts {
            secret_bits: snapshot.secret_bits,
            sifted_bits: snapshot.sifted_bits,
            detections: snapshot.detections,
        };
        let mut history = self.history.lock().expect("telemetry lock poisoned");
        let mut sample = Sample {
            t: now,
            link_up: snapshot.link_up,
            qber_z: snapshot.qber_z,
            qber_x: snapshot.qber_x,
            phase_offset_rad: snapshot.phase_offset_rad,
            auth_pool_bits: snapshot.auth_pool_bits,
            store_ready_units: levels.map(|l| l.ready_units),
            counts,
            ..Sample::default()
        };
        if let Some(old) = window_start(&history, now, RATE_WINDOW) {
            let dt = now - old.t;
            if dt > 0.0 {
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                sample.secret_key_rate_bps = Some(rate(counts.secret_bits, old.counts.secret_bits));
                sample.sifted_key_rate_bps = Some(rate(counts.sifted_bits, old.counts.sifted_bits));
                sample.detection_rate_hz = counts.detections.zip(old.counts.detections).map(|(a, b)| rate(a, b));
            }
        }
        if history.len() == HISTORY_SAMPLES {
            history.pop_front();
        }
        history.push_back(sample);
        drop(history);
        self.handle.run_upkeep();
    }

    /// The current state: the daemon's snapshot, the rates of the last sample, the store.
    pub fn status(&self) -> NodeStatus {
        let snapshot = (self.source)();
        let history = self.history.lock().expect("telemetry lock poisoned");
        let last = history.back();
        let store = *self.store_levels.lock().expect("telemetry lock poisoned");
        NodeStatus {
            node: self.node.clone(),
            role: self.role.to_string(),
            snapshot,
            secret_key_rate_bps: last.and_then(|s| s.secret_key_rate_bps),
            sifted_key_rate_bps: last.and_then(|s| s.sifted_key_rate_bps),
            detection_rate_hz: last.and_then(|s| s.detection_rate_hz),
            store,
            store_capacity_units: self.capacity_units,
            store_exhaustion_s: store.and_then(|levels| exhaustion_s(&history, levels.ready_units)),
        }
    }

    /// The hour of history and the current state.
    pub fn history(&self) -> History<'_> {
        let now = self.status();
        let samples = self.history.lock().expect("telemetry lock poisoned").iter().cloned().collect();
        History { node: &self.node, role: self.role, period_s: SAMPLE_PERIOD.as_secs_f64(), now, samples }
    }

    /// The Prometheus text exposition of this daemon's metrics, with the link's values as they
    /// are now.
    pub fn render(&self) -> String {
        let status = self.status();
        metrics::with_local_recorder(self.recorder.as_ref(), || record_status(&status));
        self.handle.render()
    }

    /// Samples every [`SAMPLE_PERIOD`] (the first at once) until `shutdown`.
    pub async fn run_sampler(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(SAMPLE_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let telemetry = self.clone();
            if tokio::task::spawn_blocking(move || telemetry.sample()).await.is_err() {
                tracing::warn!("taking a telemetry sample failed");
            }
        }
    }

    /// The store's levels, or `None` while it is out of service.
    fn read_store_levels(&self) -> Option<StoreLevels> {
        let held = self.store.n_units().ok()?;
        let blocks = self.store.blocks().ok()?;
        let unit_bits = self.unit.unit_bits.max(1);
        let pending_units: u64 = blocks
            .iter()
            .filter(|(_, state)| *state == qkd_core::store::BlockState::Pending)
            .map(|(meta, _)| meta.final_bits.saturating_sub(self.unit.auth_refill_bits) / unit_bits)
            .sum();
        Some(StoreLevels { ready_units: held.saturating_sub(pending_units), pending_units })
    }
}

/// The oldest sample no older than `window` before `now` (the first of the history until the
/// history spans the window).
fn window_start(history: &VecDeque<Sample>, now: f64, window: Duration) -> Option<&Sample> {
    history.iter().find(|s| now - s.t <= window.as_secs_f64() + 0.5)
}

/// Seconds until the store's ready units run out at the draw of the last [`DRAW_WINDOW`]:
/// `Some(inf)` when they are not falling, `None` before the history has two samples.
fn exhaustion_s(history: &VecDeque<Sample>, ready_now: u64) -> Option<f64> {
    let last = history.back()?;
    let first = window_start(history, last.t, DRAW_WINDOW)?;
    let (Some(a), Some(b)) = (first.store_ready_units, last.store_ready_units) else { return None };
    let dt = last.t - first.t;
    if dt <= 0.0 {
        return None;
    }
    let slope = (b as f64 - a as f64) / dt;
    Some(if slope < 0.0 { ready_now as f64 / -slope } else { f64::INFINITY })
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Every metric of the link with its help text (promtool wants one for each).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "qkd_link_up",
        "1 while the link to the peer works (Bob: a session is open; Alice: Bob called within 10 s)"
    );
    describe_gauge!(
        "qkd_qber_ratio",
        "Quantum bit error rate of the last block, by basis (z: key basis, from error correction; x: test basis)"
    );
    describe_gauge!("qkd_phase_error_bound_ratio", "Finite-size upper bound on the phase error of the last block");
    describe_gauge!(
        "qkd_reconciliation_efficiency",
        "Reconciliation efficiency f = leak / (n h(QBER Z)) of the last committed block (1 is the Shannon limit)"
    );
    describe_counter!(
        "qkd_reconciliation_disclosed_bytes_total",
        "Key disclosed by error correction and verification in committed blocks, bytes (bits / 8)"
    );
    describe_counter!("qkd_detections_total", "Detections announced by Bob's receiver");
    describe_counter!("qkd_sifted_key_bytes_total", "Sifted key, bytes (bits / 8)");
    describe_counter!(
        "qkd_secret_key_bytes_total",
        "Secret key of committed blocks (final keys, authentication refill included), bytes (bits / 8)"
    );
    describe_gauge!("qkd_detection_rate_per_second", "Detections per second over the last minute");
    describe_gauge!("qkd_sifted_key_rate_bits_per_second", "Sifted key bits per second over the last minute");
    describe_gauge!("qkd_secret_key_rate_bits_per_second", "Secret key bits per second over the last minute");
    describe_counter!("qkd_blocks_total", "Finite-key blocks by outcome (committed, aborted) and abort reason");
    describe_counter!("qkd_frames_total", "Frames of the quantum channel taken (Alice: emitted; Bob: sifted)");
    describe_counter!("qkd_frames_dropped_total", "Frames dropped at both ends (Bob) or lost by the source (Alice)");
    describe_counter!(
        "qkd_frames_missed_total",
        "Frame periods the simulated source skipped because it fell behind its clock"
    );
    describe_counter!("qkd_sessions_total", "Sessions of the classical channel opened");
    describe_counter!(
        "qkd_store_units_dropped_at_hello_total",
        "Key units dropped at Hello because the peer's store did not hold them (a store lost or restored)"
    );
    describe_counter!(
        "qkd_store_reservations_dropped_at_hello_total",
        "KME reservations erased at Hello because the two stores differed"
    );
    describe_gauge!(
        "qkd_decoder_phase_offset_radians",
        "The decoder's uncorrected phase offset: what the phase feedback has left to correct"
    );
    describe_gauge!("qkd_auth_pool_bytes", "Unused key in the authentication key pool, bytes (bits / 8)");
    describe_gauge!(
        "qkd_store_units",
        "Key units in the store, by state (ready: servable; pending: awaiting the peer's commit)"
    );
    describe_gauge!("qkd_store_capacity_units", "Most key units the store may hold (max_stored_units)");
    describe_gauge!(
        "qkd_store_exhaustion_seconds",
        "Seconds until no ready key unit is left at the draw of the last five minutes (+Inf when not falling)"
    );
    describe_gauge!("qkd_source_mean_photon_number", "The source monitor's mean photon number per pulse");
    describe_gauge!("qkd_source_g2", "The source monitor's g2(0)");
    describe_gauge!(
        "qkd_detector_count_rate_per_second",
        "Counts per second of each detector channel, as the receiver reports them"
    );
    describe_gauge!("qkd_device_temperature_kelvin", "Temperatures the quantum device reports");
    describe_gauge!("qkd_device_locked", "1 when the device's lock (reference_clock, sync, phase) holds, 0 when not");
    describe_counter!("qkd_etsi_requests_total", "ETSI GS QKD 014 requests by endpoint, method and HTTP status");
    describe_histogram!(
        "qkd_etsi_request_duration_seconds",
        "ETSI GS QKD 014 request latency, from routing to the response"
    );
    describe_gauge!("qkd_etsi_connections_open", "ETSI API connections admitted and open now");
    describe_counter!(
        "qkd_etsi_connections_refused_total",
        "ETSI API connections refused by reason: kme_connections (503, max_connections), sae_connections (429, max_connections_per_sae)"
    );
}

/// Sets the link's metrics from `status` (in the daemon's recorder).
fn record_status(status: &NodeStatus) {
    use metrics::{counter, gauge};
    let s = &status.snapshot;
    gauge!("qkd_link_up").set(if s.link_up { 1.0 } else { 0.0 });
    if let Some(q) = s.qber_z {
        gauge!("qkd_qber_ratio", "basis" => "z").set(q);
    }
    if let Some(q) = s.qber_x {
        gauge!("qkd_qber_ratio", "basis" => "x").set(q);
    }
    if let Some(p) = s.phase_error_upper {
        gauge!("qkd_phase_error_bound_ratio").set(p);
    }
    if let Some(f) = s.reconciliation_efficiency {
        gauge!("qkd_reconciliation_efficiency").set(f);
    }
    counter!("qkd_reconciliation_disclosed_bytes_total").absolute(s.leak_bits / 8);
    if let Some(d) = s.detections {
        counter!("qkd_detections_total").absolute(d);
    }
    counter!("qkd_sifted_key_bytes_total").absolute(s.sifted_bits / 8);
    counter!("qkd_secret_key_bytes_total").absolute(s.secret_bits / 8);
    if let Some(r) = status.detection_rate_hz {
        gauge!("qkd_detection_rate_per_second").set(r);
    }
    if let Some(r) = status.sifted_key_rate_bps {
        gauge!("qkd_sifted_key_rate_bits_per_second").set(r);
    }
    if let Some(r) = status.secret_key_rate_bps {
        gauge!("qkd_secret_key_rate_bits_per_second").set(r);
    }
    counter!("qkd_blocks_total", "outcome" => "committed").absolute(s.blocks_committed);
    for (reason, n) in &s.blocks_aborted {
        counter!("qkd_blocks_total", "outcome" => "aborted", "reason" => reason.clone()).absolute(*n);
    }
    counter!("qkd_frames_total").absolute(s.frames);
    counter!("qkd_frames_dropped_total").absolute(s.frames_dropped);
    if let Some(n) = s.frames_missed {
        counter!("qkd_frames_missed_total").absolute(n);
    }
    if let Some(n) = s.sessions {
        counter!("qkd_sessions_total").absolute(n);
    }
    counter!("qkd_store_units_dropped_at_hello_total").absolute(s.units_dropped_at_hello);
    counter!("qkd_store_reservations_dropped_at_hello_total").absolute(s.reservations_dropped_at_hello);
    if let Some(p) = s.phase_offset_rad {
        gauge!("qkd_decoder_phase_offset_radians").set(p);
    }
    if let Some(bits) = s.auth_pool_bits {
        gauge!("qkd_auth_pool_bytes").set(bits as f64 / 8.0);
    }
    if let Some(levels) = status.store {
        gauge!("qkd_store_units", "state" => "ready").set(levels.ready_units as f64);
        gauge!("qkd_store_units", "state" => "pending").set(levels.pending_units as f64);
    }
    if let Some(cap) = status.store_capacity_units {
        gauge!("qkd_store_capacity_units").set(cap as f64);
    }
    if let Some(t) = status.store_exhaustion_s {
        gauge!("qkd_store_exhaustion_seconds").set(t);
    }
    let d = &s.device;
    if let Some(mu) = d.source_mu {
        gauge!("qkd_source_mean_photon_number").set(mu);
    }
    if let Some(g2) = d.source_g2 {
        gauge!("qkd_source_g2").set(g2);
    }
    for (channel, rate) in &d.count_rates {
        gauge!("qkd_detector_count_rate_per_second", "channel" => channel.to_string()).set(*rate);
    }
    for (sensor, kelvin) in &d.temperatures {
        gauge!("qkd_device_temperature_kelvin", "sensor" => sensor.clone()).set(*kelvin);
    }
    for (lock, locked) in &d.locks {
        gauge!("qkd_device_locked", "lock" => lock.clone()).set(if *locked { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_reasons_become_snake_case_labels() {
        assert_eq!(reason_label(&"QBER too high"), "qber_too_high");
        assert_eq!(reason_label(&"detector side-slot monitor"), "detector_side_slot_monitor");
        assert_eq!(reason_label(&"unknown reason 42"), "unknown_reason_42");
    }

    #[test]
    fn efficiency_is_leak_over_shannon_limit() {
        let f = reconciliation_efficiency(1100, 10_000, 0.0110).unwrap();
        let h = qkd_core::postproc::binary_entropy(0.011);
        assert!((f - 1100.0 / (10_000.0 * h)).abs() < 1e-12);
        assert_eq!(reconciliation_efficiency(10, 0, 0.01), None);
        assert_eq!(reconciliation_efficiency(10, 100, 0.0), None);
    }

    fn sample(t: f64, ready: u64) -> Sample {
        Sample { t, store_ready_units: Some(ready), ..Sample::default() }
    }

    #[test]
    fn exhaustion_follows_the_draw_of_the_window() {
        let mut h = VecDeque::new();
        assert_eq!(exhaustion_s(&h, 100), None);
        h.push_back(sample(1000.0, 200));
        h.push_back(sample(1100.0, 100));
        // 1 unit/s drawn: 100 units last 100 s.
        assert_eq!(exhaustion_s(&h, 100), Some(100.0));
        h.push_back(sample(1200.0, 150));
        // Still falling over the window (200 -> 150 in 200 s): 150 units at 0.25 unit/s.
        assert_eq!(exhaustion_s(&h, 150), Some(600.0));
        h.push_back(sample(1300.0, 250));
        // Rising over the window: never at this draw.
        assert_eq!(exhaustion_s(&h, 250), Some(f64::INFINITY));
    }
}
