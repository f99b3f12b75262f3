//! Recording files: a live or emulated run (the transmitter's frames and the receiver's tag
//! batches, as the device API carries them) written to one file that [`crate::replay`] serves
//! back to both sides.
//!
//! # Format (version 1)
//! * Bytes 0-7: the magic `\x89QKDREC\n` (the high first byte catches 7-bit transfers, the
//!   newline text-mode conversions, as PNG's signature does).
//! * Bytes 8-11: the format version, u32 little-endian (1).
//! * From byte 12: one zlib stream (RFC 1950 / 1951, `flate2` with its pure-Rust `miniz_oxide`
//!   backend) of records. A record is a LEB128 varint length n, n bytes of protobuf, and the
//!   CRC-32 (IEEE) of those n bytes, u32 little-endian. The first record is a `RecordingHeader`
//!   (`proto/device.proto`: version, writer, both devices' descriptions, free-text details),
//!   then `RecordingEntry` records (a `TransmitterEvent` or a `TagBatch`) in the order the
//!   devices produced them, and last a `RecordingEnd` entry with the counts.
//!
//! The writer flushes the compressor after every frame (a zlib sync flush), so a file whose
//! writer died is readable up to its last complete frame; the reader then reports the missing
//! end record as a truncation, after the records before it.
//!
//! Every error names the file and where: the byte offset in the record stream (the decompressed
//! bytes after the 12-byte prefix) and the compressed bytes consumed so far (the file offset),
//! or the file offset alone for the prefix.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use prost::Message;
use proto::device as pb;

/// The file's magic bytes.
pub const MAGIC: [u8; 8] = *b"\x89QKDREC\n";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Largest record accepted, bytes (a frame of 2^30 pulses' states).
pub const MAX_RECORD_BYTES: u64 = 256 << 20;
/// Length of the uncompressed prefix (magic and version).
const PREFIX: u64 = 12;

/// What is wrong with a recording.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordErrorKind {
    /// The file cannot be read or written.
    #[error("{0}")]
    Io(String),
    /// Not a recording.
    #[error("bad magic {0:02x?}: not a qkd-device recording")]
    BadMagic(Vec<u8>),
    /// Written by a newer (or unknown) format.
    #[error("format version {found} is not supported (this program reads version {supported})")]
    UnsupportedVersion {
        /// The file's version.
        found: u32,
        /// The version this program reads.
        supported: u32,
    },
    /// The file ends early.
    #[error("truncated: {0}")]
    Truncated(String),
    /// The compressed stream is damaged.
    #[error("corrupt compressed data: {0}")]
    Compressed(String),
    /// A record's checksum does not match its bytes.
    #[error("record checksum mismatch: stored {stored:08x}, computed {computed:08x}")]
    Checksum {
        /// The CRC-32 in the file.
        stored: u32,
        /// The CRC-32 of the record's bytes.
        computed: u32,
    },
    /// A record does not decode or breaks the format's rules.
    #[error("malformed record: {0}")]
    Malformed(String),
}

/// An error in a recording file: the file, where, and what (module docs).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}: {kind}", location(*.stream_offset, *.file_offset))]
pub struct RecordError {
    /// The file.
    pub file: String,
    /// Byte offset in the record stream (decompressed), when the error is inside it.
    pub stream_offset: Option<u64>,
    /// Byte offset in the file (for errors in the stream: the compressed bytes consumed so far).
    pub file_offset: u64,
    /// What is wrong.
    pub kind: RecordErrorKind,
}

fn location(stream: Option<u64>, file: u64) -> String {
    match stream {
        Some(s) => format!("record stream offset {s} (file offset {file})"),
        None => format!("file offset {file}"),
    }
}

/// One entry of a recording after its header.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// A transmitter frame or loss.
    Transmitter(pb::TransmitterEvent),
    /// A receiver tag batch.
    Tags(pb::TagBatch),
}

/// What [`RecordingWriter::finish`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecordingCounts {
    /// Transmitter events.
    pub transmitter_events: u64,
    /// Tag batches.
    pub tag_batches: u64,
}

/// Writes a recording (module docs).
pub struct RecordingWriter {
    path: PathBuf,
    enc: Option<flate2::write::ZlibEncoder<BufWriter<File>>>,
    buf: Vec<u8>,
    counts: RecordingCounts,
}

impl std::fmt::Debug for RecordingWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingWriter")
            .field("path", &self.path)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl RecordingWriter {
    /// Creates (or truncates) `path` and writes the prefix and `header` (its version is set).
    pub fn create(path: impl AsRef<Path>, mut header: pb::RecordingHeader) -> Result<Self, RecordError> {
        let path = path.as_ref().to_path_buf();
        let io = |e: std::io::Error| RecordError {
            file: path.display().to_string(),
            stream_offset: None,
            file_offset: 0,
            kind: RecordErrorKind::Io(e.to_string()),
        };
        let mut file = BufWriter::new(File::create(&path).map_err(io)?);
        file.write_all(&MAGIC).map_err(io)?;
        file.write_all(&VERSION.to_le_bytes()).map_err(io)?;
        let enc = flate2::write::ZlibEncoder::new(file, Compression::fast());
        let mut w = Self { path, enc: Some(enc), buf: Vec::new(), counts: RecordingCounts::default() };
        header.version = VERSION;
        w.write_message(&header)?;
        Ok(w)
    }

    fn error(&self, e: std::io::Error) -> RecordError {
        let file_offset = self.enc.as_ref().map_or(0, |e| PREFIX + e.total_out());
        RecordError {
            file: self.path.display().to_string(),
            stream_offset: self.enc.as_ref().map(|e| e.total_in()),
            file_offset,
            kind: RecordErrorKind::Io(e.to_string()),
        }
    }

    /// Writes one record whose protobuf bytes are `m`'s (`field` 0) or those of a message with
    /// `m` as its field number `field` (a `RecordingEntry` around it, without copying `m`).
    fn write_record(&mut self, field: u32, m: &impl Message) -> Result<(), RecordError> {
        self.buf.clear();
        let body = if field == 0 { m.encoded_len() } else { prost::encoding::message::encoded_len(field, m) };
        prost::encoding::encode_varint(body as u64, &mut self.buf);
        let start = self.buf.len();
        if field == 0 {
            m.encode(&mut self.buf).expect("a Vec grows");
        } else {
            prost::encoding::message::encode(field, m, &mut self.buf);
        }
        debug_assert_eq!(self.buf.len() - start, body);
        let crc = crc32fast::hash(&self.buf[start..]);
        self.buf.extend_from_slice(&crc.to_le_bytes());
        let enc = self.enc.as_mut().expect("not finished");
        let r = enc.write_all(&self.buf);
        r.map_err(|e| self.error(e))
    }

    fn write_message(&mut self, m: &impl Message) -> Result<(), RecordError> {
        self.write_record(0, m)
    }

    /// Appends a transmitter event.
    pub fn write_transmitter(&mut self, event: &pb::TransmitterEvent) -> Result<(), RecordError> {
        // `RecordingEntry.transmitter` is field 1.
        self.write_record(1, event)?;
        self.counts.transmitter_events += 1;
        Ok(())
    }

    /// Appends a tag batch.
    pub fn write_tags(&mut self, batch: &pb::TagBatch) -> Result<(), RecordError> {
        // `RecordingEntry.tags` is field 2.
        self.write_record(2, batch)?;
        self.counts.tag_batches += 1;
        Ok(())
    }

    /// Makes everything written so far readable from the file (a zlib sync flush), e.g. after
    /// each frame.
    pub fn flush(&mut self) -> Result<(), RecordError> {
        let r = self.enc.as_mut().expect("not finished").flush();
        r.map_err(|e| self.error(e))
    }

    /// The counts so far.
    pub fn counts(&self) -> RecordingCounts {
        self.counts
    }

    /// Writes the end record, completes the compressed stream and syncs the file to disk.
    pub fn finish(mut self) -> Result<RecordingCounts, RecordError> {
        let end = pb::RecordingEntry {
            entry: Some(pb::recording_entry::Entry::End(pb::RecordingEnd {
                transmitter_events: self.counts.transmitter_events,
                tag_batches: self.counts.tag_batches,
            })),
        };
        self.write_message(&end)?;
        let enc = self.enc.take().expect("not finished");
        let file = enc.finish().map_err(|e| self.error(e))?;
        let file = file.into_inner().map_err(|e| self.error(e.into_error()))?;
        file.sync_all().map_err(|e| self.error(e))?;
        Ok(self.counts)
    }
}

impl Drop for RecordingWriter {
    /// Without [`RecordingWriter::finish`] (an error, a panic): flushes what was written, so the
    /// file is readable up to its last record and then reported truncated.
    fn drop(&mut self) {
        if let Some(enc) = self.enc.as_mut() {
            let _ = enc.flush();
        }
    }
}

/// Reads a recording (module docs): the header at once, then the entries one by one.
pub struct RecordingReader {
    file: String,
    input: BufReader<flate2::bufread::ZlibDecoder<BufReader<File>>>,
    /// Decompressed bytes consumed.
    pos: u64,
    header: pb::RecordingHeader,
    counts: RecordingCounts,
    ended: bool,
    buf: Vec<u8>,
}

impl std::fmt::Debug for RecordingReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordingReader").field("file", &self.file).field("pos", &self.pos).finish_non_exhaustive()
    }
}

impl RecordingReader {
    /// Opens `path`, checks the prefix and reads the header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RecordError> {
        let name = path.as_ref().display().to_string();
        let at_file = |offset: u64, kind: RecordErrorKind| RecordError {
            file: name.clone(),
            stream_offset: None,
            file_offset: offset,
            kind,
        };
        let mut file =
            BufReader::new(File::open(path.as_ref()).map_err(|e| at_file(0, RecordErrorKind::Io(e.to_string())))?);
        let mut prefix = [0u8; PREFIX as usize];
        let got = read_full(&mut file, &mut prefix).map_err(|e| at_file(0, RecordErrorKind::Io(e.to_string())))?;
        if got < MAGIC.len() || prefix[..MAGIC.len()] != MAGIC {
            if got < MAGIC.len() && MAGIC.starts_with(&prefix[..got]) {
                return Err(at_file(
                    got as u64,
                    RecordErrorKind::Truncated(format!("the file ends inside the magic ({got} of 8 bytes)")),
                ));
            }
            return Err(at_file(0, RecordErrorKind::BadMagic(prefix[..got.min(8)].to_vec())));
        }
        if got < PREFIX as usize {
            return Err(at_file(
                got as u64,
                RecordErrorKind::Truncated(format!("the file ends inside the version ({} of 4 bytes)", got - 8)),
            ));
        }
        let version = u32::from_le_bytes(prefix[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(at_file(8, RecordErrorKind::UnsupportedVersion { found: version, supported: VERSION }));
        }
        let input = BufReader::new(flate2::bufread::ZlibDecoder::new(file));
        let mut r = Self {
            file: name,
            input,
            pos: 0,
            header: pb::RecordingHeader::default(),
            counts: RecordingCounts::default(),
            ended: false,
            buf: Vec::new(),
        };
        let start = r.pos;
        let Some(()) = r.read_record()? else {
            return Err(r.error(start, RecordErrorKind::Truncated("no header record".into())));
        };
        let header = pb::RecordingHeader::decode(r.buf.as_slice())
            .map_err(|e| r.error(start, RecordErrorKind::Malformed(format!("header: {e}"))))?;
        if header.version != VERSION {
            return Err(r.error(
                start,
                RecordErrorKind::Malformed(format!(
                    "header version {} differs from the file's {VERSION}",
                    header.version
                )),
            ));
        }
        r.header = header;
        Ok(r)
    }

    /// The file's name, as errors give it.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The header.
    pub fn header(&self) -> &pb::RecordingHeader {
        &self.header
    }

    /// Entries read so far.
    pub fn counts(&self) -> RecordingCounts {
        self.counts
    }

    /// An error at record-stream offset `offset`.
    fn error(&self, offset: u64, kind: RecordErrorKind) -> RecordError {
        RecordError {
            file: self.file.clone(),
            stream_offset: Some(offset),
            file_offset: PREFIX + self.input.get_ref().total_in(),
            kind,
        }
    }

    /// Reads bytes into `buf`, mapping decompression failures; returns how many were read (fewer
    /// at the end of the stream).
    fn read_bytes(&mut self, buf: &mut [u8]) -> Result<usize, RecordError> {
        let r = read_full(&mut self.input, buf);
        match r {
            Ok(n) => {
                self.pos += n as u64;
                Ok(n)
            }
            Err(e) => {
                let kind = match e.kind() {
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                        RecordErrorKind::Compressed(e.to_string())
                    }
                    std::io::ErrorKind::UnexpectedEof => {
                        RecordErrorKind::Truncated(format!("the compressed stream ends early ({e})"))
                    }
                    _ => RecordErrorKind::Io(e.to_string()),
                };
                Err(self.error(self.pos, kind))
            }
        }
    }

    /// Reads one record into `self.buf`; `Ok(None)` at a clean end of the stream (between
    /// records).
    fn read_record(&mut self) -> Result<Option<()>, RecordError> {
        let start = self.pos;
        let mut len = 0u64;
        let mut byte = [0u8; 1];
        for i in 0..10 {
            if self.read_bytes(&mut byte)? == 0 {
                if i == 0 {
                    return Ok(None);
                }
                return Err(
                    self.error(start, RecordErrorKind::Truncated("the stream ends inside a record length".into()))
                );
            }
            len |= u64::from(byte[0] & 0x7f) << (7 * i);
            if byte[0] & 0x80 == 0 {
                break;
            }
            if i == 9 {
                return Err(self.error(start, RecordErrorKind::Malformed("record length is not a varint".into())));
            }
        }
        if len > MAX_RECORD_BYTES {
            return Err(self.error(
                start,
                RecordErrorKind::Malformed(format!("record of {len} bytes exceeds the limit of {MAX_RECORD_BYTES}")),
            ));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(len as usize + 4, 0);
        let got = self.read_bytes(&mut buf);
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                self.buf = buf;
                return Err(e);
            }
        };
        if got < buf.len() {
            self.buf = buf;
            return Err(self.error(
                start,
                RecordErrorKind::Truncated(format!(
                    "the stream ends inside a record ({got} of {} bytes with its checksum)",
                    len + 4
                )),
            ));
        }
        let n = len as usize;
        let stored = u32::from_le_bytes(buf[n..].try_into().expect("4 bytes"));
        buf.truncate(n);
        self.buf = buf;
        let computed = crc32fast::hash(&self.buf);
        if stored != computed {
            return Err(self.error(start, RecordErrorKind::Checksum { stored, computed }));
        }
        Ok(Some(()))
    }

    /// The next entry; `Ok(None)` after the end record (having checked that nothing follows it
    /// and that the compressed stream's checksum holds).
    pub fn next_entry(&mut self) -> Result<Option<Entry>, RecordError> {
        if self.ended {
            return Ok(None);
        }
        let start = self.pos;
        if self.read_record()?.is_none() {
            return Err(self.error(
                start,
                RecordErrorKind::Truncated(format!(
                    "the stream ends without its end record, after {} transmitter events and {} tag batches",
                    self.counts.transmitter_events, self.counts.tag_batches
                )),
            ));
        }
        let entry = pb::RecordingEntry::decode(self.buf.as_slice())
            .map_err(|e| self.error(start, RecordErrorKind::Malformed(e.to_string())))?;
        match entry.entry {
            Some(pb::recording_entry::Entry::Transmitter(t)) => {
                self.counts.transmitter_events += 1;
                Ok(Some(Entry::Transmitter(t)))
            }
            Some(pb::recording_entry::Entry::Tags(b)) => {
                self.counts.tag_batches += 1;
                Ok(Some(Entry::Tags(b)))
            }
            Some(pb::recording_entry::Entry::End(end)) => {
                let want = RecordingCounts { transmitter_events: end.transmitter_events, tag_batches: end.tag_batches };
                if want != self.counts {
                    return Err(self.error(
                        start,
                        RecordErrorKind::Malformed(format!(
                            "the end record counts {want:?}, the file holds {:?}",
                            self.counts
                        )),
                    ));
                }
                let after = self.pos;
                let mut probe = [0u8; 1];
                if self.read_bytes(&mut probe)? != 0 {
                    return Err(self.error(after, RecordErrorKind::Malformed("data after the end record".into())));
                }
                self.ended = true;
                Ok(None)
            }
            None => Err(self.error(start, RecordErrorKind::Malformed("an entry without content".into()))),
        }
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A recording's contents, counted (`qkdctl device inspect`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Inspection {
    /// The header.
    pub header: pb::RecordingHeader,
    /// Transmitter frames.
    pub frames: u64,
    /// First and last frame index.
    pub frame_range: Option<(u64, u64)>,
    /// Lost-frame announcements, and the frames they name.
    pub lost_events: u64,
    /// Frames announced lost.
    pub lost_frames: u64,
    /// Tag batches.
    pub tag_batches: u64,
    /// Tags.
    pub tags: u64,
    /// Tags per channel (index: channel).
    pub tags_per_channel: Vec<u64>,
    /// Gap records, and the time they cover, ps.
    pub gaps: u64,
    /// Total time the gaps cover, ps.
    pub gap_ps: u64,
    /// Marker records.
    pub markers: u64,
    /// Stream starts (the first, and acquisition restarts).
    pub stream_starts: u64,
    /// First and last tag time, ps.
    pub tag_time_range: Option<(u64, u64)>,
    /// Compressed size of the file, bytes.
    pub file_bytes: u64,
    /// Whether the end record was found (a complete file).
    pub complete: bool,
    /// The error that stopped the reading, if any (the counts are those before it).
    pub error: Option<RecordError>,
}

/// Reads the whole recording at `path` and counts what it holds; an error in the middle is
/// returned inside the [`Inspection`] (with the counts up to it), one in the prefix or header
/// as the `Err`.
pub fn inspect(path: impl AsRef<Path>) -> Result<Inspection, RecordError> {
    let mut r = RecordingReader::open(path.as_ref())?;
    let mut ins = Inspection {
        header: r.header().clone(),
        tags_per_channel: vec![0; 256],
        file_bytes: std::fs::metadata(path.as_ref()).map_or(0, |m| m.len()),
        ..Inspection::default()
    };
    let mut records = Vec::new();
    loop {
        match r.next_entry() {
            Ok(Some(Entry::Transmitter(ev))) => match ev.event {
                Some(pb::transmitter_event::Event::Frame(f)) => {
                    ins.frames += 1;
                    ins.frame_range = Some(match ins.frame_range {
                        None => (f.frame_idx, f.frame_idx),
                        Some((a, b)) => (a.min(f.frame_idx), b.max(f.frame_idx)),
                    });
                }
                Some(pb::transmitter_event::Event::Lost(l)) => {
                    ins.lost_events += 1;
                    ins.lost_frames += l.count;
                }
                None => {}
            },
            Ok(Some(Entry::Tags(b))) => {
                ins.tag_batches += 1;
                ins.stream_starts += u64::from(b.start.is_some());
                records.clear();
                if let Err(e) = crate::tagwire::decode_batch(&b, &mut records) {
                    ins.error = Some(r.error(r.pos, RecordErrorKind::Malformed(e.to_string())));
                    break;
                }
                for rec in &records {
                    match *rec {
                        qkd_timetag::tags::Record::Tag(t) => {
                            ins.tags += 1;
                            ins.tags_per_channel[usize::from(t.channel)] += 1;
                            ins.tag_time_range = Some(match ins.tag_time_range {
                                None => (t.time_ps, t.time_ps),
                                Some((a, b)) => (a.min(t.time_ps), b.max(t.time_ps)),
                            });
                        }
                        qkd_timetag::tags::Record::Gap { from_ps, to_ps } => {
                            ins.gaps += 1;
                            ins.gap_ps += to_ps - from_ps;
                        }
                        qkd_timetag::tags::Record::Marker { .. } => ins.markers += 1,
                    }
                }
            }
            Ok(None) => {
                ins.complete = true;
                break;
            }
            Err(e) => {
                ins.error = Some(e);
                break;
            }
        }
    }
    Ok(ins)
}
