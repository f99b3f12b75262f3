//! Reader for PicoQuant PTU files (unified TTTR format), streaming: the header is parsed up
//! front, then records are decoded one at a time from any [`Read`].
//!
//! The format follows PicoQuant's file format documentation and demo code (the `PTU` demos
//! shipped with the devices' software and on PicoQuant's GitHub, "Read_PTU.c"/"Read_PTU.py";
//! names below are theirs):
//!
//! * Header: the magic `PQTTTR\0\0`, an 8-byte version string, then tagged entries of 48 bytes
//!   (32-byte identifier, NUL-padded; `i32` index, -1 for none; `u32` type; 8-byte value, all
//!   little-endian) until the identifier `Header_End`. For the types Float8Array, AnsiString,
//!   WideString and BinaryBlob the value is a byte count and that many bytes follow.
//! * `TTResultFormat_TTTRRecType` names the record format; `TTResult_NumberOfRecords` their
//!   count (read to the end of the file when absent); `MeasDesc_GlobalResolution` (s) is the
//!   T2 time unit and, in T3 mode, the sync period; `MeasDesc_Resolution` (s) the T3 `dtime`
//!   unit.
//! * Records are little-endian `u32`:
//!   - PicoHarp T2 (0x00010203): time:28, chan:4; chan 15 is special: low 4 bits of time 0 =
//!     overflow (+210698240), else markers.
//!   - PicoHarp T3 (0x00010303): nsync:16, dtime:12, chan:4; chan 15 special: dtime 0 =
//!     overflow (+65536 syncs), else markers.
//!   - HydraHarp V1 (0x00010204 T2, 0x00010304 T3) and V2-style formats: HydraHarp V2
//!     (0x01010204, 0x01010304), TimeHarp 260 N (0x00010205, 0x00010305) and P (0x00010206,
//!     0x00010306), MultiHarp (0x00010207, 0x00010307). T2: timetag:25, channel:6,
//!     special:1; T3: nsync:10, dtime:15, channel:6, special:1. Special with channel 63 is an
//!     overflow: T2 adds 33552000 (V1) or 33554432 times the count in timetag (V2; 0 means 1);
//!     T3 adds 1024 syncs (V1) or 1024 times the count in nsync (V2; 0 means 1). Special with
//!     channel 1..=15 is a marker; T2 special with channel 0 is the sync.
//!
//! # Channels and times
//! Output channels follow the crate's convention ([`crate::tags`]): 0 is the sync; a
//! HydraHarp-family input channel c (0-based in the record) is c + 1, as PicoQuant's demo code
//! reports it; PicoHarp channels are passed as recorded (T2: 0 is the sync input, 1 the
//! detector; T3: the routing channels 1..=4). T2 times are the unwrapped time tag times the
//! global resolution, in ps (an integer multiplication when the resolution is a whole number of
//! ps). T3 times are nsync x sync period + dtime x resolution, in ps, rounded (`f64`: exact to
//! under 1 ps for runs of up to about two hours). Optionally ([`PtuOptions::t3_sync_every`]),
//! a T3 stream also yields a sync tag on channel 0 every n sync periods (nsync = 0, n, 2n, ...),
//! so that sync-based clock recovery can run on it. Overflow records are consumed; markers come
//! out as [`Record::Marker`].

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::tags::{Record, Tag};

/// The file magic.
pub const MAGIC: [u8; 8] = *b"PQTTTR\0\0";

/// Header entry types (PicoQuant's `tyEmpty8` ... `tyBinaryBlob`).
pub mod tag_type {
    /// No value.
    pub const EMPTY8: u32 = 0xFFFF_0008;
    /// Boolean (8 bytes, nonzero is true).
    pub const BOOL8: u32 = 0x0000_0008;
    /// Signed 64-bit integer.
    pub const INT8: u32 = 0x1000_0008;
    /// 64-bit bit set.
    pub const BITSET64: u32 = 0x1100_0008;
    /// Colour (8 bytes).
    pub const COLOR8: u32 = 0x1200_0008;
    /// IEEE 754 double.
    pub const FLOAT8: u32 = 0x2000_0008;
    /// Date and time: a double, days since 1899-12-30.
    pub const TDATETIME: u32 = 0x2100_0008;
    /// Array of doubles; the value is the byte count.
    pub const FLOAT8_ARRAY: u32 = 0x2001_FFFF;
    /// 8-bit string; the value is the byte count.
    pub const ANSI_STRING: u32 = 0x4001_FFFF;
    /// UTF-16LE string; the value is the byte count.
    pub const WIDE_STRING: u32 = 0x4002_FFFF;
    /// Opaque bytes; the value is the byte count.
    pub const BINARY_BLOB: u32 = 0xFFFF_FFFF;
}

/// Largest variable-length header value accepted, in bytes (a guard against corrupt counts).
const MAX_TAG_BYTES: i64 = 1 << 28;

/// A decoded header value.
#[derive(Clone, Debug, PartialEq)]
pub enum TagValue {
    /// tyEmpty8.
    Empty,
    /// tyBool8.
    Bool(bool),
    /// tyInt8.
    Int(i64),
    /// tyBitSet64.
    BitSet(u64),
    /// tyColor8.
    Color(u64),
    /// tyFloat8.
    Float(f64),
    /// tyTDateTime: days since 1899-12-30.
    DateTime(f64),
    /// tyFloat8Array.
    FloatArray(Vec<f64>),
    /// tyAnsiString (up to the first NUL; bytes above 127 as Latin-1).
    AnsiString(String),
    /// tyWideString (UTF-16LE, up to the first NUL).
    WideString(String),
    /// tyBinaryBlob.
    Blob(Vec<u8>),
}

/// One header entry.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderTag {
    /// Identifier (without padding).
    pub ident: String,
    /// Index, -1 for a non-array entry.
    pub index: i32,
    /// Value.
    pub value: TagValue,
}

/// Record formats (`TTResultFormat_TTTRRecType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordType {
    /// PicoHarp 300 T2, 0x00010203.
    PicoHarpT2,
    /// PicoHarp 300 T3, 0x00010303.
    PicoHarpT3,
    /// HydraHarp 400 V1 T2, 0x00010204.
    HydraHarpV1T2,
    /// HydraHarp 400 V1 T3, 0x00010304.
    HydraHarpV1T3,
    /// HydraHarp 400 V2 T2, 0x01010204.
    HydraHarpV2T2,
    /// HydraHarp 400 V2 T3, 0x01010304.
    HydraHarpV2T3,
    /// TimeHarp 260 N T2, 0x00010205.
    TimeHarp260NT2,
    /// TimeHarp 260 N T3, 0x00010305.
    TimeHarp260NT3,
    /// TimeHarp 260 P T2, 0x00010206.
    TimeHarp260PT2,
    /// TimeHarp 260 P T3, 0x00010306.
    TimeHarp260PT3,
    /// MultiHarp T2, 0x00010207.
    MultiHarpT2,
    /// MultiHarp T3, 0x00010307.
    MultiHarpT3,
}

/// Record decoding families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    PicoHarpT2,
    PicoHarpT3,
    /// HydraHarp layout; `true` for the V2 overflow counts.
    HydraT2(bool),
    HydraT3(bool),
}

impl RecordType {
    /// All known formats.
    pub const ALL: [RecordType; 12] = [
        RecordType::PicoHarpT2,
        RecordType::PicoHarpT3,
        RecordType::HydraHarpV1T2,
        RecordType::HydraHarpV1T3,
        RecordType::HydraHarpV2T2,
        RecordType::HydraHarpV2T3,
        RecordType::TimeHarp260NT2,
        RecordType::TimeHarp260NT3,
        RecordType::TimeHarp260PT2,
        RecordType::TimeHarp260PT3,
        RecordType::MultiHarpT2,
        RecordType::MultiHarpT3,
    ];

    /// The format's code in the header.
    pub fn code(self) -> u32 {
        match self {
            RecordType::PicoHarpT2 => 0x0001_0203,
            RecordType::PicoHarpT3 => 0x0001_0303,
            RecordType::HydraHarpV1T2 => 0x0001_0204,
            RecordType::HydraHarpV1T3 => 0x0001_0304,
            RecordType::HydraHarpV2T2 => 0x0101_0204,
            RecordType::HydraHarpV2T3 => 0x0101_0304,
            RecordType::TimeHarp260NT2 => 0x0001_0205,
            RecordType::TimeHarp260NT3 => 0x0001_0305,
            RecordType::TimeHarp260PT2 => 0x0001_0206,
            RecordType::TimeHarp260PT3 => 0x0001_0306,
            RecordType::MultiHarpT2 => 0x0001_0207,
            RecordType::MultiHarpT3 => 0x0001_0307,
        }
    }

    /// The format with header code `code`.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Whether the format is a T3 (sync-relative) one.
    pub fn is_t3(self) -> bool {
        matches!(self.family(), Family::PicoHarpT3 | Family::HydraT3(_))
    }

    fn family(self) -> Family {
        use RecordType::*;
        match self {
            PicoHarpT2 => Family::PicoHarpT2,
            PicoHarpT3 => Family::PicoHarpT3,
            HydraHarpV1T2 => Family::HydraT2(false),
            HydraHarpV1T3 => Family::HydraT3(false),
            HydraHarpV2T2 | TimeHarp260NT2 | TimeHarp260PT2 | MultiHarpT2 => Family::HydraT2(true),
            HydraHarpV2T3 | TimeHarp260NT3 | TimeHarp260PT3 | MultiHarpT3 => Family::HydraT3(true),
        }
    }
}

/// What went wrong, without the location.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PtuErrorKind {
    /// Reading failed.
    #[error("read error: {0}")]
    Io(String),
    /// The file does not start with `PQTTTR\0\0`.
    #[error("bad magic {0:?} (not a PTU file)")]
    BadMagic(Vec<u8>),
    /// The header ends before `Header_End`.
    #[error("header truncated")]
    TruncatedHeader,
    /// A header entry is malformed.
    #[error("header entry {ident:?}: {reason}")]
    BadTag {
        /// The entry's identifier.
        ident: String,
        /// What is wrong.
        reason: String,
    },
    /// A required header entry is missing.
    #[error("header entry {0} missing")]
    MissingTag(&'static str),
    /// The record format is not one this reader knows.
    #[error("unknown record type 0x{0:08x}")]
    UnknownRecordType(u32),
    /// The file ends inside a record, or before the announced number of records.
    #[error("record truncated: {got} of 4 bytes ({missing} records missing)")]
    TruncatedRecord {
        /// Bytes of the last record present.
        got: usize,
        /// Records announced but missing (including that one).
        missing: u64,
    },
}

/// An error reading a PTU file: the file, the byte offset and what happened.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{file}: byte {offset}: {kind}")]
pub struct PtuError {
    /// Name of the file (or source).
    pub file: String,
    /// Byte offset of the entry or record at fault.
    pub offset: u64,
    /// What happened.
    pub kind: PtuErrorKind,
}

/// The parsed header.
#[derive(Clone, Debug, PartialEq)]
pub struct PtuHeader {
    /// The version string.
    pub version: String,
    /// Every entry, in file order.
    pub tags: Vec<HeaderTag>,
    /// The record format.
    pub record_type: RecordType,
    /// Records announced (`TTResult_NumberOfRecords`).
    pub num_records: Option<u64>,
    /// `MeasDesc_GlobalResolution`, in s (T2 unit; T3 sync period).
    pub global_resolution_s: f64,
    /// `MeasDesc_Resolution`, in s (T3 dtime unit).
    pub resolution_s: Option<f64>,
    /// Header length: offset of the first record.
    pub header_len: u64,
}

impl PtuHeader {
    /// The first entry named `ident` (any index).
    pub fn get(&self, ident: &str) -> Option<&TagValue> {
        self.tags.iter().find(|t| t.ident == ident).map(|t| &t.value)
    }
}

/// Reader options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PtuOptions {
    /// T3 only: also yield a sync tag on channel 0 every this many sync periods.
    pub t3_sync_every: Option<u64>,
}

/// How T2 time units become ps.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Unit {
    /// A whole number of ps.
    Int(u64),
    /// A fractional number of ps.
    Float(f64),
}

impl Unit {
    fn of_seconds(s: f64) -> Unit {
        let ps = s * 1e12;
        let r = ps.round();
        if r >= 1.0 && (ps - r).abs() <= 1e-6 * ps { Unit::Int(r as u64) } else { Unit::Float(ps) }
    }

    #[inline]
    fn ps(self, units: u64) -> u64 {
        match self {
            Unit::Int(u) => units.wrapping_mul(u),
            Unit::Float(f) => (units as f64 * f).round() as u64,
        }
    }
}

/// Streaming reader: an iterator of records over a PTU stream.
#[derive(Debug)]
pub struct PtuReader<R: Read> {
    file: String,
    input: R,
    header: PtuHeader,
    opts: PtuOptions,
    family: Family,
    /// Byte offset of the next record.
    offset: u64,
    /// Records still announced.
    remaining: Option<u64>,
    /// Unwrapped overflow: time units (T2) or syncs (T3).
    overflow: u64,
    t2_unit: Unit,
    /// T3: sync period and dtime unit, ps.
    sync_ps: f64,
    dtime_ps: f64,
    /// T3 sync emission: next sync count to emit.
    next_sync: u64,
    /// T3: sync count of the last record decoded.
    last_nsync: u64,
    queued: VecDeque<Record>,
    done: bool,
}

impl PtuReader<BufReader<File>> {
    /// Opens the PTU file at `path` and parses its header.
    pub fn open(path: impl AsRef<Path>, opts: PtuOptions) -> Result<Self, PtuError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let f = File::open(path).map_err(|e| PtuError {
            file: name.clone(),
            offset: 0,
            kind: PtuErrorKind::Io(e.to_string()),
        })?;
        PtuReader::new(BufReader::with_capacity(1 << 16, f), &name, opts)
    }
}

impl<R: Read> PtuReader<R> {
    /// Parses the header of `input`, named `file` in errors.
    pub fn new(mut input: R, file: &str, opts: PtuOptions) -> Result<Self, PtuError> {
        let header = parse_header(&mut input, file)?;
        let family = header.record_type.family();
        let t3 = header.record_type.is_t3();
        Ok(Self {
            file: file.to_string(),
            input,
            opts,
            family,
            offset: header.header_len,
            remaining: header.num_records,
            overflow: 0,
            t2_unit: Unit::of_seconds(header.global_resolution_s),
            sync_ps: header.global_resolution_s * 1e12,
            dtime_ps: header.resolution_s.unwrap_or(0.0) * 1e12,
            next_sync: if t3 && opts.t3_sync_every.is_some_and(|n| n > 0) { 0 } else { u64::MAX },
            last_nsync: 0,
            queued: VecDeque::new(),
            done: false,
            header,
        })
    }

    /// The header.
    pub fn header(&self) -> &PtuHeader {
        &self.header
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn err(&self, offset: u64, kind: PtuErrorKind) -> PtuError {
        PtuError { file: self.file.clone(), offset, kind }
    }

    /// The next raw record, `None` at the end.
    fn read_raw(&mut self) -> Result<Option<u32>, PtuError> {
        if self.remaining == Some(0) {
            return Ok(None);
        }
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.input.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(self.offset, PtuErrorKind::Io(e.to_string()))),
            }
        }
        if got == 0 && self.remaining.is_none() {
            return Ok(None);
        }
        if got < 4 {
            let missing = self.remaining.unwrap_or(1);
            return Err(self.err(self.offset, PtuErrorKind::TruncatedRecord { got, missing }));
        }
        self.offset += 4;
        if let Some(r) = &mut self.remaining {
            *r -= 1;
        }
        Ok(Some(u32::from_le_bytes(buf)))
    }

    /// Decodes one raw record: `None` for overflows and ignored specials.
    fn decode(&mut self, rec: u32) -> Option<Record> {
        match self.family {
            Family::PicoHarpT2 => {
                let (time, chan) = (u64::from(rec & 0x0FFF_FFFF), (rec >> 28) as u8);
                if chan == 0xF {
                    let markers = (time & 0xF) as u8;
                    if markers == 0 {
                        self.overflow += 210_698_240;
                        return None;
                    }
                    return Some(Record::Marker { marker: markers, time_ps: self.t2_unit.ps(self.overflow + time) });
                }
                Some(Record::Tag(Tag::new(chan, self.t2_unit.ps(self.overflow + time))))
            }
            Family::PicoHarpT3 => {
                let (nsync, dtime, chan) = (u64::from(rec & 0xFFFF), u64::from((rec >> 16) & 0xFFF), (rec >> 28) as u8);
                if chan == 0xF {
                    if dtime == 0 {
                        self.overflow += 65_536;
                        return None;
                    }
                    return Some(self.t3_marker(dtime as u8, self.overflow + nsync));
                }
                Some(self.t3_tag(chan, self.overflow + nsync, dtime))
            }
            Family::HydraT2(v2) => {
                let (timetag, channel, special) = (u64::from(rec & 0x01FF_FFFF), ((rec >> 25) & 0x3F) as u8, rec >> 31);
                if special == 0 {
                    return Some(Record::Tag(Tag::new(channel + 1, self.t2_unit.ps(self.overflow + timetag))));
                }
                match channel {
                    0x3F => {
                        self.overflow += match (v2, timetag) {
                            (false, _) => 33_552_000,
                            (true, 0) => 33_554_432,
                            (true, n) => 33_554_432 * n,
                        };
                        None
                    }
                    0 => Some(Record::Tag(Tag::new(0, self.t2_unit.ps(self.overflow + timetag)))),
                    1..=15 => {
                        Some(Record::Marker { marker: channel, time_ps: self.t2_unit.ps(self.overflow + timetag) })
                    }
                    _ => None,
                }
            }
            Family::HydraT3(v2) => {
                let nsync = u64::from(rec & 0x3FF);
                let dtime = u64::from((rec >> 10) & 0x7FFF);
                let (channel, special) = (((rec >> 25) & 0x3F) as u8, rec >> 31);
                if special == 0 {
                    return Some(self.t3_tag(channel + 1, self.overflow + nsync, dtime));
                }
                match channel {
                    0x3F => {
                        self.overflow += if !v2 || nsync == 0 { 1024 } else { 1024 * nsync };
                        None
                    }
                    1..=15 => Some(self.t3_marker(channel, self.overflow + nsync)),
                    _ => None,
                }
            }
        }
    }

    fn t3_tag(&mut self, channel: u8, nsync: u64, dtime: u64) -> Record {
        self.last_nsync = nsync;
        let t = nsync as f64 * self.sync_ps + dtime as f64 * self.dtime_ps;
        Record::Tag(Tag::new(channel, t.round() as u64))
    }

    fn t3_marker(&mut self, marker: u8, nsync: u64) -> Record {
        self.last_nsync = nsync;
        Record::Marker { marker, time_ps: (nsync as f64 * self.sync_ps).round() as u64 }
    }

    /// T3 with sync emission: the sync tags due before a record at `nsync` syncs.
    fn queue_syncs(&mut self, nsync: u64) {
        let Some(every) = self.opts.t3_sync_every else { return };
        while self.next_sync <= nsync {
            let t = (self.next_sync as f64 * self.sync_ps).round() as u64;
            self.queued.push_back(Record::Tag(Tag::new(0, t)));
            self.next_sync = self.next_sync.saturating_add(every);
        }
    }
}

impl<R: Read> Iterator for PtuReader<R> {
    type Item = Result<Record, PtuError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.queued.pop_front() {
                return Some(Ok(r));
            }
            if self.done {
                return None;
            }
            let raw = match self.read_raw() {
                Ok(Some(raw)) => raw,
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            let Some(rec) = self.decode(raw) else { continue };
            if self.next_sync != u64::MAX {
                self.queue_syncs(self.last_nsync);
            }
            self.queued.push_back(rec);
        }
    }
}

/// Reads exactly `buf.len()` bytes, or reports a truncated header.
fn read_header_bytes(input: &mut impl Read, buf: &mut [u8], file: &str, offset: u64) -> Result<(), PtuError> {
    input.read_exact(buf).map_err(|e| PtuError {
        file: file.to_string(),
        offset,
        kind: if e.kind() == std::io::ErrorKind::UnexpectedEof {
            PtuErrorKind::TruncatedHeader
        } else {
            PtuErrorKind::Io(e.to_string())
        },
    })
}

/// A NUL-terminated byte string (Latin-1).
fn ansi(bytes: &[u8]) -> String {
    bytes.iter().take_while(|&&b| b != 0).map(|&b| char::from(b)).collect()
}

/// Parses the header (module docs).
fn parse_header(input: &mut impl Read, file: &str) -> Result<PtuHeader, PtuError> {
    let mut magic = [0u8; 8];
    read_header_bytes(input, &mut magic, file, 0)?;
    if magic != MAGIC {
        return Err(PtuError { file: file.into(), offset: 0, kind: PtuErrorKind::BadMagic(magic.to_vec()) });
    }
    let mut version = [0u8; 8];
    read_header_bytes(input, &mut version, file, 8)?;
    let mut offset = 16u64;
    let mut tags = Vec::new();
    let mut rec_type_at = None;
    loop {
        let start = offset;
        let mut head = [0u8; 48];
        read_header_bytes(input, &mut head, file, start)?;
        offset += 48;
        let ident = ansi(&head[..32]);
        let index = i32::from_le_bytes(head[32..36].try_into().expect("4 bytes"));
        let typ = u32::from_le_bytes(head[36..40].try_into().expect("4 bytes"));
        let raw: [u8; 8] = head[40..48].try_into().expect("8 bytes");
        let (int, float) = (i64::from_le_bytes(raw), f64::from_le_bytes(raw));
        let bad = |reason: String| PtuError {
            file: file.into(),
            offset: start,
            kind: PtuErrorKind::BadTag { ident: ident.clone(), reason },
        };
        let mut var = |n: i64| -> Result<Vec<u8>, PtuError> {
            if !(0..=MAX_TAG_BYTES).contains(&n) {
                return Err(bad(format!("length {n} out of range")));
            }
            let mut v = vec![0u8; n as usize];
            read_header_bytes(input, &mut v, file, start)?;
            offset += n as u64;
            Ok(v)
        };
        let value = match typ {
            tag_type::EMPTY8 => TagValue::Empty,
            tag_type::BOOL8 => TagValue::Bool(int != 0),
            tag_type::INT8 => TagValue::Int(int),
            tag_type::BITSET64 => TagValue::BitSet(int as u64),
            tag_type::COLOR8 => TagValue::Color(int as u64),
            tag_type::FLOAT8 => TagValue::Float(float),
            tag_type::TDATETIME => TagValue::DateTime(float),
            tag_type::FLOAT8_ARRAY => {
                let v = var(int)?;
                if v.len() % 8 != 0 {
                    return Err(bad(format!("array of {} bytes is not a multiple of 8", v.len())));
                }
                TagValue::FloatArray(v.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8"))).collect())
            }
            tag_type::ANSI_STRING => TagValue::AnsiString(ansi(&var(int)?)),
            tag_type::WIDE_STRING => {
                let v = var(int)?;
                let units: Vec<u16> =
                    v.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
                TagValue::WideString(String::from_utf16_lossy(&units))
            }
            tag_type::BINARY_BLOB => TagValue::Blob(var(int)?),
            other => return Err(bad(format!("unknown type 0x{other:08x}"))),
        };
        if ident == "TTResultFormat_TTTRRecType" {
            rec_type_at = Some(start);
        }
        let end = ident == "Header_End";
        tags.push(HeaderTag { ident, index, value });
        if end {
            break;
        }
    }
    let missing = |name: &'static str| PtuError { file: file.into(), offset, kind: PtuErrorKind::MissingTag(name) };
    let find = |name: &str| tags.iter().find(|t| t.ident == name).map(|t| &t.value);
    let code = match find("TTResultFormat_TTTRRecType") {
        Some(TagValue::Int(c)) => *c as u32,
        _ => return Err(missing("TTResultFormat_TTTRRecType")),
    };
    let record_type = RecordType::from_code(code).ok_or_else(|| PtuError {
        file: file.into(),
        offset: rec_type_at.unwrap_or(offset),
        kind: PtuErrorKind::UnknownRecordType(code),
    })?;
    let global_resolution_s = match find("MeasDesc_GlobalResolution") {
        Some(TagValue::Float(f)) if *f > 0.0 => *f,
        _ => return Err(missing("MeasDesc_GlobalResolution")),
    };
    let resolution_s = match find("MeasDesc_Resolution") {
        Some(TagValue::Float(f)) if *f > 0.0 => Some(*f),
        _ if record_type.is_t3() => return Err(missing("MeasDesc_Resolution")),
        _ => None,
    };
    let num_records = match find("TTResult_NumberOfRecords") {
        Some(TagValue::Int(n)) if *n >= 0 => Some(*n as u64),
        _ => None,
    };
    Ok(PtuHeader {
        version: ansi(&version),
        tags,
        record_type,
        num_records,
        global_resolution_s,
        resolution_s,
        header_len: offset,
    })
}

/// A PTU writer for tests (this crate's and the pipeline's replay tests).
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A minimal PTU writer following PicoQuant's format description, for tests.
    pub(crate) struct Writer {
        pub(crate) buf: Vec<u8>,
    }

    impl Writer {
        pub(crate) fn new() -> Self {
            let mut buf = MAGIC.to_vec();
            buf.extend_from_slice(b"1.0.00\0\0");
            Self { buf }
        }

        pub(crate) fn entry(&mut self, ident: &str, index: i32, typ: u32, value: [u8; 8]) -> &mut Self {
            let mut id = [0u8; 32];
            id[..ident.len()].copy_from_slice(ident.as_bytes());
            self.buf.extend_from_slice(&id);
            self.buf.extend_from_slice(&index.to_le_bytes());
            self.buf.extend_from_slice(&typ.to_le_bytes());
            self.buf.extend_from_slice(&value);
            self
        }

        pub(crate) fn int(&mut self, ident: &str, v: i64) -> &mut Self {
            self.entry(ident, -1, tag_type::INT8, v.to_le_bytes())
        }

        pub(crate) fn float(&mut self, ident: &str, v: f64) -> &mut Self {
            self.entry(ident, -1, tag_type::FLOAT8, v.to_le_bytes())
        }

        pub(crate) fn var(&mut self, ident: &str, typ: u32, data: &[u8]) -> &mut Self {
            self.entry(ident, -1, typ, (data.len() as i64).to_le_bytes());
            self.buf.extend_from_slice(data);
            self
        }

        /// A complete header for `rec_type` with `n` records (None: no count).
        pub(crate) fn header(rec_type: u32, n: Option<i64>, glob_s: f64, res_s: Option<f64>) -> Self {
            let mut w = Self::new();
            w.var("File_Comment", tag_type::ANSI_STRING, b"qkd test\0\0\0\0");
            w.int("TTResultFormat_TTTRRecType", i64::from(rec_type));
            if let Some(n) = n {
                w.int("TTResult_NumberOfRecords", n);
            }
            w.float("MeasDesc_GlobalResolution", glob_s);
            if let Some(r) = res_s {
                w.float("MeasDesc_Resolution", r);
            }
            w.entry("Header_End", -1, tag_type::EMPTY8, [0; 8]);
            w
        }

        pub(crate) fn records(&mut self, recs: &[u32]) -> Vec<u8> {
            for r in recs {
                self.buf.extend_from_slice(&r.to_le_bytes());
            }
            self.buf.clone()
        }
    }

    /// HydraHarp-layout T2 record.
    pub(crate) fn hh_t2(special: u32, channel: u32, timetag: u32) -> u32 {
        (special << 31) | (channel << 25) | timetag
    }

    /// HydraHarp V2 T2 records (1 ps units) of a stream: sync as special channel 0, channel
    /// c >= 1 as input c - 1, markers as special channels, overflows with counts; gaps have no
    /// PTU form and are left out.
    pub(crate) fn encode_hh_v2_t2(records: &[Record]) -> Vec<u32> {
        const WRAP: u64 = 33_554_432;
        let mut out = Vec::new();
        let mut base = 0u64;
        for r in records {
            let (special, channel, t) = match *r {
                Record::Tag(t) if t.channel == 0 => (1, 0, t.time_ps),
                Record::Tag(t) => (0, u32::from(t.channel) - 1, t.time_ps),
                Record::Marker { marker, time_ps } => (1, u32::from(marker), time_ps),
                Record::Gap { .. } => continue,
            };
            while t / WRAP > base {
                let n = (t / WRAP - base).min(0x1FF_FFFF);
                out.push(hh_t2(1, 63, n as u32));
                base += n;
            }
            out.push(hh_t2(special, channel, (t - base * WRAP) as u32));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Writer, hh_t2};
    use super::*;

    /// HydraHarp-layout T3 record.
    fn hh_t3(special: u32, channel: u32, dtime: u32, nsync: u32) -> u32 {
        (special << 31) | (channel << 25) | (dtime << 10) | nsync
    }

    fn read_all(bytes: &[u8], opts: PtuOptions) -> Result<Vec<Record>, PtuError> {
        PtuReader::new(bytes, "test.ptu", opts)?.collect()
    }

    fn tag(channel: u8, time_ps: u64) -> Record {
        Record::Tag(Tag::new(channel, time_ps))
    }

    #[test]
    fn header_entries_of_every_type_are_decoded() {
        let mut w = Writer::new();
        w.entry("E", -1, tag_type::EMPTY8, [0; 8])
            .entry("B", -1, tag_type::BOOL8, 1i64.to_le_bytes())
            .int("I", -42)
            .entry("S", -1, tag_type::BITSET64, 0xF0u64.to_le_bytes())
            .entry("C", 3, tag_type::COLOR8, 0x00FF_00FFu64.to_le_bytes())
            .float("F", 2.5)
            .entry("D", -1, tag_type::TDATETIME, 45000.25f64.to_le_bytes());
        let arr: Vec<u8> = [1.0f64, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        w.var("A", tag_type::FLOAT8_ARRAY, &arr);
        w.var("T", tag_type::ANSI_STRING, b"caf\xe9\0pad");
        let wide: Vec<u8> = "Zürich\0".encode_utf16().flat_map(u16::to_le_bytes).collect();
        w.var("W", tag_type::WIDE_STRING, &wide);
        w.var("X", tag_type::BINARY_BLOB, &[1, 2, 3]);
        w.int("TTResultFormat_TTTRRecType", 0x0101_0204).float("MeasDesc_GlobalResolution", 1e-12);
        w.entry("Header_End", -1, tag_type::EMPTY8, [0; 8]);
        let bytes = w.records(&[]);
        let r = PtuReader::new(bytes.as_slice(), "h.ptu", PtuOptions::default()).unwrap();
        let h = r.header();
        assert_eq!(h.version, "1.0.00");
        assert_eq!(h.get("E"), Some(&TagValue::Empty));
        assert_eq!(h.get("B"), Some(&TagValue::Bool(true)));
        assert_eq!(h.get("I"), Some(&TagValue::Int(-42)));
        assert_eq!(h.get("S"), Some(&TagValue::BitSet(0xF0)));
        assert_eq!(h.get("C"), Some(&TagValue::Color(0x00FF_00FF)));
        assert_eq!(h.tags.iter().find(|t| t.ident == "C").unwrap().index, 3);
        assert_eq!(h.get("F"), Some(&TagValue::Float(2.5)));
        assert_eq!(h.get("D"), Some(&TagValue::DateTime(45000.25)));
        assert_eq!(h.get("A"), Some(&TagValue::FloatArray(vec![1.0, -2.0])));
        assert_eq!(h.get("T"), Some(&TagValue::AnsiString("café".into())));
        assert_eq!(h.get("W"), Some(&TagValue::WideString("Zürich".into())));
        assert_eq!(h.get("X"), Some(&TagValue::Blob(vec![1, 2, 3])));
        assert_eq!(h.record_type, RecordType::HydraHarpV2T2);
        assert_eq!(h.num_records, None);
        assert_eq!(h.header_len, bytes.len() as u64);
        assert_eq!(r.count(), 0);
    }

    #[test]
    fn hydraharp_v2_t2_unwraps_counted_overflows() {
        const W: u64 = 33_554_432;
        let recs = [
            hh_t2(0, 0, 100),         // input 0 -> channel 1
            hh_t2(1, 0, 200),         // sync -> channel 0
            hh_t2(1, 63, 3),          // three overflows
            hh_t2(0, 5, 7),           // input 5 -> channel 6
            hh_t2(1, 63, 0),          // old-style single overflow
            hh_t2(1, 2, 50),          // marker 2
            hh_t2(0, 63, 0x1FF_FFFF), // input 63 -> channel 64, largest time tag
        ];
        let bytes = Writer::header(0x0101_0204, Some(recs.len() as i64), 1e-12, None).records(&recs);
        let got = read_all(&bytes, PtuOptions::default()).unwrap();
        assert_eq!(
            got,
            vec![
                tag(1, 100),
                tag(0, 200),
                tag(6, 3 * W + 7),
                Record::Marker { marker: 2, time_ps: 4 * W + 50 },
                tag(64, 4 * W + 0x1FF_FFFF),
            ]
        );
        // The same records as MultiHarp and TimeHarp 260 (V2 layout), with 5 ps units.
        for code in [0x0001_0207, 0x0001_0205, 0x0001_0206] {
            let bytes = Writer::header(code, Some(recs.len() as i64), 5e-12, None).records(&recs);
            let got = read_all(&bytes, PtuOptions::default()).unwrap();
            assert_eq!(got[2], tag(6, 5 * (3 * W + 7)), "type 0x{code:08x}");
        }
    }

    #[test]
    fn hydraharp_v1_t2_wraps_by_33552000() {
        let recs = [hh_t2(1, 63, 5), hh_t2(1, 63, 0), hh_t2(0, 1, 9)];
        let bytes = Writer::header(0x0001_0204, Some(3), 1e-12, None).records(&recs);
        assert_eq!(read_all(&bytes, PtuOptions::default()).unwrap(), vec![tag(2, 2 * 33_552_000 + 9)]);
    }

    #[test]
    fn picoharp_t2_wraps_and_scales_by_4_ps() {
        const W: u64 = 210_698_240;
        let ph = |chan: u32, time: u32| (chan << 28) | time;
        let recs = [ph(1, 1000), ph(0, 5), ph(15, 0), ph(15, 0), ph(1, 3), ph(15, 0x40 | 0b0101)];
        let bytes = Writer::header(0x0001_0203, Some(6), 4e-12, None).records(&recs);
        assert_eq!(
            read_all(&bytes, PtuOptions::default()).unwrap(),
            vec![
                tag(1, 4000),
                tag(0, 20),
                tag(1, 4 * (2 * W + 3)),
                Record::Marker { marker: 5, time_ps: 4 * (2 * W + 0x45) }
            ]
        );
    }

    #[test]
    fn picoharp_t3_unwraps_syncs_and_adds_dtime() {
        let sync = 1e12 / 76e6; // ps
        let ph3 = |chan: u32, dtime: u32, nsync: u32| (chan << 28) | (dtime << 16) | nsync;
        let recs = [ph3(1, 100, 10), ph3(15, 0, 0), ph3(2, 7, 3), ph3(15, 4, 9)];
        let bytes = Writer::header(0x0001_0303, Some(4), sync * 1e-12, Some(4e-12)).records(&recs);
        let got = read_all(&bytes, PtuOptions::default()).unwrap();
        let t = |n: u64, d: u64| ((n as f64) * sync + d as f64 * 4.0).round() as u64;
        assert_eq!(
            got,
            vec![tag(1, t(10, 100)), tag(2, t(65_539, 7)), Record::Marker { marker: 4, time_ps: t(65_545, 0) }]
        );
    }

    #[test]
    fn hydraharp_t3_overflow_counts_and_sync_emission() {
        let sync = 12_500.0; // 80 MHz, ps
        // V2: the overflow count is in nsync.
        let recs = [hh_t3(0, 0, 30, 5), hh_t3(1, 63, 0, 2), hh_t3(0, 3, 1, 1), hh_t3(1, 63, 0, 0), hh_t3(1, 4, 0, 9)];
        let bytes = Writer::header(0x0101_0304, Some(5), sync * 1e-12, Some(25e-12)).records(&recs);
        let got = read_all(&bytes, PtuOptions::default()).unwrap();
        let t = |n: u64, d: u64| ((n as f64) * sync + d as f64 * 25.0).round() as u64;
        assert_eq!(
            got,
            vec![tag(1, t(5, 30)), tag(4, t(2049, 1)), Record::Marker { marker: 4, time_ps: t(3 * 1024 + 9, 0) }]
        );
        // V1: every overflow record is one wrap, whatever nsync holds.
        let bytes = Writer::header(0x0001_0304, Some(5), sync * 1e-12, Some(25e-12)).records(&recs);
        let got = read_all(&bytes, PtuOptions::default()).unwrap();
        assert_eq!(got[1], tag(4, t(1025, 1)));
        // Sync emission every 1000 syncs: 0 and 1000, 2000 before the record at 2049.
        let opts = PtuOptions { t3_sync_every: Some(1000) };
        let bytes = Writer::header(0x0101_0304, Some(5), sync * 1e-12, Some(25e-12)).records(&recs);
        let got = read_all(&bytes, opts).unwrap();
        assert_eq!(
            &got[..5],
            &[tag(0, 0), tag(1, t(5, 30)), tag(0, t(1000, 0)), tag(0, t(2000, 0)), tag(4, t(2049, 1))]
        );
    }

    #[test]
    fn records_stream_from_a_trickling_reader() {
        /// Hands out one byte per read.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() || buf.is_empty() {
                    return Ok(0);
                }
                buf[0] = self.0[0];
                self.0 = &self.0[1..];
                Ok(1)
            }
        }
        let recs: Vec<u32> = (0..1000).map(|i| hh_t2(0, i % 4, i * 1000)).collect();
        let bytes = Writer::header(0x0101_0204, None, 1e-12, None).records(&recs);
        let slow: Vec<Record> =
            PtuReader::new(Trickle(&bytes), "t", PtuOptions::default()).unwrap().map(Result::unwrap).collect();
        assert_eq!(slow, read_all(&bytes, PtuOptions::default()).unwrap());
        assert_eq!(slow.len(), 1000);
        assert_eq!(slow[999], tag(4, 999_000));
    }

    #[test]
    fn errors_name_the_file_and_the_offset() {
        let good = Writer::header(0x0101_0204, Some(2), 1e-12, None).records(&[hh_t2(0, 0, 1), hh_t2(0, 0, 2)]);
        let header_len = good.len() as u64 - 8;
        // Bad magic.
        let mut bad = good.clone();
        bad[0] = b'X';
        let e = read_all(&bad, PtuOptions::default()).unwrap_err();
        assert_eq!((e.offset, e.file.as_str()), (0, "test.ptu"));
        assert!(matches!(e.kind, PtuErrorKind::BadMagic(_)));
        assert!(e.to_string().starts_with("test.ptu: byte 0: bad magic"), "{e}");
        // Header truncated inside an entry or its data: the entry's offset (the first entry,
        // a comment, spans 16..76 with its 12 bytes of text).
        let e = read_all(&good[..16 + 48 + 5], PtuOptions::default()).unwrap_err();
        assert_eq!((e.offset, e.kind), (16, PtuErrorKind::TruncatedHeader));
        let e = read_all(&good[..76 + 20], PtuOptions::default()).unwrap_err();
        assert_eq!((e.offset, e.kind), (76, PtuErrorKind::TruncatedHeader));
        let e = read_all(&good[..5], PtuOptions::default()).unwrap_err();
        assert_eq!((e.offset, e.kind), (0, PtuErrorKind::TruncatedHeader));
        // A record cut short, and a missing announced record.
        let e = read_all(&good[..good.len() - 1], PtuOptions::default()).unwrap_err();
        assert_eq!((e.offset, e.kind), (header_len + 4, PtuErrorKind::TruncatedRecord { got: 3, missing: 1 }));
        let e = read_all(&good[..good.len() - 4], PtuOptions::default()).unwrap_err();
        assert_eq!((e.offset, e.kind), (header_len + 4, PtuErrorKind::TruncatedRecord { got: 0, missing: 1 }));
        // Without a count, a partial record is still an error; a clean end is not.
        let open = Writer::header(0x0101_0204, None, 1e-12, None).records(&[hh_t2(0, 0, 1)]);
        assert_eq!(read_all(&open, PtuOptions::default()).unwrap().len(), 1);
        let e = read_all(&open[..open.len() - 2], PtuOptions::default()).unwrap_err();
        assert_eq!(e.kind, PtuErrorKind::TruncatedRecord { got: 2, missing: 1 });
        // An unknown record type: the offset of the entry that names it.
        let unknown = Writer::header(0x0001_0299, Some(0), 1e-12, None).records(&[]);
        let e = read_all(&unknown, PtuOptions::default()).unwrap_err();
        let at = 16 + 48 + 12; // magic + version, the comment entry and its 12 bytes
        assert_eq!((e.offset, e.kind.clone()), (at, PtuErrorKind::UnknownRecordType(0x0001_0299)));
        assert!(e.to_string().contains("unknown record type 0x00010299"), "{e}");
        // Missing entries.
        let no_res = Writer::header(0x0101_0304, Some(0), 1e-8, None).records(&[]);
        assert_eq!(
            read_all(&no_res, PtuOptions::default()).unwrap_err().kind,
            PtuErrorKind::MissingTag("MeasDesc_Resolution")
        );
        let mut w = Writer::new();
        w.entry("Header_End", -1, tag_type::EMPTY8, [0; 8]);
        let bytes = w.records(&[]);
        assert_eq!(
            read_all(&bytes, PtuOptions::default()).unwrap_err().kind,
            PtuErrorKind::MissingTag("TTResultFormat_TTTRRecType")
        );
        // A corrupt length and an unknown entry type.
        let mut w = Writer::new();
        w.entry("Huge", -1, tag_type::BINARY_BLOB, (-5i64).to_le_bytes());
        let e = read_all(&w.records(&[]), PtuOptions::default()).unwrap_err();
        assert!(matches!(e.kind, PtuErrorKind::BadTag { .. }) && e.offset == 16, "{e}");
        let mut w = Writer::new();
        w.entry("Odd", -1, 0x1234_5678, [0; 8]);
        let e = read_all(&w.records(&[]), PtuOptions::default()).unwrap_err();
        assert!(e.to_string().contains("unknown type 0x12345678"), "{e}");
        // Opening a file that does not exist names it.
        let e = PtuReader::open("/nonexistent/x.ptu", PtuOptions::default()).unwrap_err();
        assert_eq!(e.file, "/nonexistent/x.ptu");
        assert!(matches!(e.kind, PtuErrorKind::Io(_)));
    }

    #[test]
    fn record_type_codes_round_trip() {
        for r in RecordType::ALL {
            assert_eq!(RecordType::from_code(r.code()), Some(r));
        }
        assert_eq!(RecordType::from_code(0x0001_0299), None);
        assert!(RecordType::MultiHarpT3.is_t3() && !RecordType::PicoHarpT2.is_t3());
        assert_eq!(Unit::of_seconds(4e-12), Unit::Int(4));
        assert_eq!(Unit::of_seconds(1e-12), Unit::Int(1));
        assert!(matches!(Unit::of_seconds(0.5e-12), Unit::Float(_)));
    }
}
