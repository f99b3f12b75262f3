//! The `replay` driver: recorded runs served back to the daemons.
//!
//! * [`ReplayTransmitter`]: the transmitter frames of a [`crate::record`] file.
//! * [`ReplayReceiver`]: the tag batches of a recording, or the tags of a PicoQuant PTU file
//!   (T2 or T3, `qkd_timetag::ptu`) or a text tag file (`qkd_timetag::text`), with a channel-map
//!   sidecar (`role = channel` lines) and the timing the file does not carry
//!   ([`TagFileSpec`]); the tags go through the same [`TagReceiver`] pipeline as live ones.
//!
//! A replay reads its file synchronously, a chunk per call (recordings are read a record at a
//! time, tag files 2^16 records at a time): cheap next to what the daemon does with a frame.
//! Phase reports are accepted and ignored (a recording cannot be steered). Both ends of one
//! recording replay the same run: the transmitter's frame f and the receiver's frame f
//! correspond, as they did live.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use proto::device as pb;
use qkd_timetag::ptu::{PtuOptions, PtuReader};
use qkd_timetag::tags::Record;
use qkd_timetag::text::{TextReader, read_channel_map};

use crate::frames::{LockState, Monitors, RxEvent, TxEvent};
use crate::info::{DeviceInfo, exact_period, role_to_proto};
use crate::record::{Entry, RecordingReader};
use crate::tagrx::{PipelineOptions, StreamStartInfo, TagReceiver};
use crate::{DeviceError, DeviceRole, ReceiverDevice, TransmitterDevice};

/// Records read from a tag file per call.
const CHUNK: usize = 1 << 16;

/// The description a recording holds for `role`, validated.
fn recorded_info(r: &RecordingReader, role: DeviceRole) -> Result<DeviceInfo, DeviceError> {
    let h = r.header();
    let desc = match role {
        DeviceRole::Transmitter => h.transmitter.clone(),
        DeviceRole::Receiver => h.receiver.clone(),
    };
    let desc =
        desc.ok_or_else(|| DeviceError::Description(format!("{}: the recording has no {role} description", r.file())))?;
    let info = DeviceInfo::new(desc).map_err(|e| DeviceError::Description(format!("{}: {e}", r.file())))?;
    if info.role() != role {
        return Err(DeviceError::Description(format!("{}: the recorded {role} describes a {}", r.file(), info.role())));
    }
    Ok(info)
}

/// Alice's frames from a recording.
#[derive(Debug)]
pub struct ReplayTransmitter {
    info: DeviceInfo,
    reader: RecordingReader,
    next: u64,
    frames: u64,
    last_reading: Option<qkd_core::postproc::finite_key::SourceReading>,
    ticker: Option<tokio::time::Interval>,
}

impl ReplayTransmitter {
    /// Opens the recording at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, DeviceError> {
        let reader = RecordingReader::open(path)?;
        let info = recorded_info(&reader, DeviceRole::Transmitter)?;
        Ok(Self { info, reader, next: 0, frames: 0, last_reading: None, ticker: None })
    }

    /// Serves one frame per frame period of wall-clock time (as the live source did) instead of
    /// as fast as they are taken. Needs a tokio runtime with the time driver.
    pub fn paced(mut self) -> Self {
        let frame_s = self.info.frame_pulses() as f64 * self.info.period_ps() * 1e-12;
        let mut ticker = tokio::time::interval(std::time::Duration::from_secs_f64(frame_s));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        self.ticker = Some(ticker);
        self
    }
}

impl TransmitterDevice for ReplayTransmitter {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    async fn next_event(&mut self) -> Result<Option<TxEvent>, DeviceError> {
        loop {
            match self.reader.next_entry()? {
                Some(Entry::Transmitter(ev)) => {
                    if let Some(t) = self.ticker.as_mut() {
                        t.tick().await;
                    }
                    let ev = TxEvent::from_proto(&self.info, ev, &mut self.next)?;
                    if let TxEvent::Frame(f) = &ev {
                        self.frames += 1;
                        self.last_reading = f.reading;
                    }
                    return Ok(Some(ev));
                }
                Some(Entry::Tags(_)) => {}
                None => return Ok(None),
            }
        }
    }

    async fn monitors(&mut self) -> Result<Monitors, DeviceError> {
        Ok(Monitors { source: self.last_reading, frames: self.frames, ..Monitors::default() })
    }
}

/// The timing a tag file does not carry: what a device would describe.
#[derive(Clone, Debug, PartialEq)]
pub struct TagFileTiming {
    /// Alice's pulse rate, Hz.
    pub pulse_rate_hz: f64,
    /// Time-bin separation, ps.
    pub bin_separation_ps: f64,
    /// Acceptance window width, ps.
    pub window_ps: f64,
    /// Pulses per frame.
    pub frame_pulses: u64,
    /// Pulses between sync tags (0: no sync; the clock is then recovered from the Z clicks).
    pub sync_every_pulses: u64,
    /// Global pulse index of the first sync tag.
    pub first_sync_pulse: i64,
    /// Tagger time at which the acquisition began, ps (PicoQuant files: 0; `None`: the first
    /// record's time).
    pub acquisition_start_ps: Option<u64>,
    /// Largest frequency offset of the tagger, ppm.
    pub max_clock_offset_ppm: f64,
    /// Whether the file came from an emulator or simulator.
    pub simulated: bool,
}

impl TagFileTiming {
    /// The timing of the simulator's link `params`, frames of `frame_pulses` pulses and a sync
    /// every `sync_every` pulses starting at pulse 0, acquisition from time 0.
    pub fn from_params(params: &qkd_sim::LinkParams, frame_pulses: u64, sync_every: u64, simulated: bool) -> Self {
        Self {
            pulse_rate_hz: params.clock_hz,
            bin_separation_ps: params.bin_separation_ps,
            window_ps: params.window_ns * 1e3,
            frame_pulses,
            sync_every_pulses: sync_every,
            first_sync_pulse: 0,
            acquisition_start_ps: Some(0),
            max_clock_offset_ppm: 200.0,
            simulated,
        }
    }
}

/// A tag file to replay on Bob's side.
#[derive(Clone, Debug, PartialEq)]
pub struct TagFileSpec {
    /// The tags: a `.ptu` file (PicoQuant), or anything else as text.
    pub path: PathBuf,
    /// The channel-map sidecar (`role = channel` lines, `qkd_timetag::text`).
    pub channel_map: PathBuf,
    /// The timing.
    pub timing: TagFileTiming,
    /// PTU reader options (T3 files: a sync tag every N sync periods).
    pub ptu: PtuOptions,
}

enum Source {
    Recording(Box<RecordingReader>),
    Ptu(Box<PtuReader<BufReader<File>>>),
    Text(Box<TextReader<BufReader<File>>>),
}

/// Bob's tags from a recording or a tag file, through the pipeline.
pub struct ReplayReceiver {
    source: Source,
    rx: TagReceiver,
    ended: bool,
    records: Vec<Record>,
}

impl std::fmt::Debug for ReplayReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayReceiver").field("rx", &self.rx).field("ended", &self.ended).finish_non_exhaustive()
    }
}

impl ReplayReceiver {
    /// Bob's side of the recording at `path`.
    pub fn open_recording(path: impl AsRef<Path>, opts: PipelineOptions) -> Result<Self, DeviceError> {
        let reader = RecordingReader::open(path)?;
        let info = recorded_info(&reader, DeviceRole::Receiver)?;
        Ok(Self {
            source: Source::Recording(Box::new(reader)),
            rx: TagReceiver::new(info, opts)?,
            ended: false,
            records: Vec::new(),
        })
    }

    /// The tag file `spec`.
    pub fn open_tag_file(spec: &TagFileSpec, opts: PipelineOptions) -> Result<Self, DeviceError> {
        let t = &spec.timing;
        let map = read_channel_map(&spec.channel_map, t.sync_every_pulses > 0)
            .map_err(|e| DeviceError::TagFile(e.to_string()))?;
        let desc = pb::DeviceDescription {
            role: pb::DeviceRole::Receiver as i32,
            vendor: "replay".into(),
            model: format!("tag file {}", spec.path.display()),
            driver: format!("qkd-device {}", env!("CARGO_PKG_VERSION")),
            simulated: t.simulated,
            pulse_rate_hz: t.pulse_rate_hz,
            pulse_period: exact_period(t.pulse_rate_hz),
            timestamp_resolution_ps: 1.0,
            bin_separation_ps: t.bin_separation_ps,
            window_ps: t.window_ps,
            frame_pulses: t.frame_pulses,
            sync_every_pulses: t.sync_every_pulses,
            max_clock_offset_ppm: t.max_clock_offset_ppm,
            channels: map
                .entries()
                .iter()
                .map(|&(role, channel)| pb::Channel {
                    channel: u32::from(channel),
                    role: role_to_proto(role) as i32,
                    name: role.name().into(),
                    delay_ps: 0.0,
                })
                .collect(),
            capabilities: Some(pb::Capabilities { hardware_sync: t.sync_every_pulses > 0, ..Default::default() }),
            ..Default::default()
        };
        let info = DeviceInfo::new(desc)?;
        let is_ptu = spec.path.extension().is_some_and(|e| e.eq_ignore_ascii_case("ptu"));
        let source = if is_ptu {
            Source::Ptu(Box::new(
                PtuReader::open(&spec.path, spec.ptu).map_err(|e| DeviceError::TagFile(e.to_string()))?,
            ))
        } else {
            Source::Text(Box::new(TextReader::open(&spec.path).map_err(|e| DeviceError::TagFile(e.to_string()))?))
        };
        let mut rx = TagReceiver::new(info, opts)?;
        rx.start(StreamStartInfo {
            acquisition_start_ps: t.acquisition_start_ps,
            first_sync_pulse: t.first_sync_pulse,
        })?;
        Ok(Self { source, rx, ended: false, records: Vec::new() })
    }

    /// The time-tag pipeline (statistics, clock estimate, first frame).
    pub fn tags(&self) -> &TagReceiver {
        &self.rx
    }

    /// Reads the next chunk into the pipeline; false at the end of the file.
    fn read_chunk(&mut self) -> Result<bool, DeviceError> {
        match &mut self.source {
            Source::Recording(r) => loop {
                match r.next_entry()? {
                    Some(Entry::Tags(b)) => {
                        self.rx.push_batch(&b)?;
                        return Ok(true);
                    }
                    Some(Entry::Transmitter(_)) => {}
                    None => return Ok(false),
                }
            },
            Source::Ptu(r) => {
                self.records.clear();
                for rec in r.by_ref().take(CHUNK) {
                    self.records.push(rec.map_err(|e| DeviceError::TagFile(e.to_string()))?);
                }
                let more = self.records.len() == CHUNK;
                self.rx.push_records(&self.records)?;
                Ok(more || !self.records.is_empty())
            }
            Source::Text(r) => {
                self.records.clear();
                for rec in r.by_ref().take(CHUNK) {
                    self.records.push(rec.map_err(|e| DeviceError::TagFile(e.to_string()))?);
                }
                let more = self.records.len() == CHUNK;
                self.rx.push_records(&self.records)?;
                Ok(more || !self.records.is_empty())
            }
        }
    }
}

impl ReceiverDevice for ReplayReceiver {
    fn info(&self) -> &DeviceInfo {
        self.rx.info()
    }

    async fn next_event(&mut self) -> Result<Option<RxEvent>, DeviceError> {
        loop {
            if let Some(ev) = self.rx.next_event() {
                return Ok(Some(ev));
            }
            if self.ended {
                return Ok(None);
            }
            if !self.read_chunk()? {
                self.ended = true;
                self.rx.finish()?;
            }
        }
    }

    async fn report_phase_errors(&mut self, _frame: u64, _test_events: u64, _errors: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    async fn monitors(&mut self) -> Result<Monitors, DeviceError> {
        let s = self.rx.stats();
        Ok(Monitors {
            sync: if self.rx.clock_estimate().is_some_and(|c| c.locked) {
                LockState::Locked
            } else {
                LockState::Unknown
            },
            phase: LockState::Absent,
            frames: s.frames_ready + s.frames_dropped,
            ..Monitors::default()
        })
    }
}
