//! Prints a PicoQuant PTU file as text: the record format and resolutions from the header, then
//! one line per record as [`qkd_timetag::ptu::PtuReader`] yields it (overflow records are
//! consumed by the reader and do not appear).
//!
//! ```text
//! cargo run -p qkd-timetag --example ptu_dump -- [--header] [--t3-sync-every N] FILE.ptu
//! ```
//!
//! Output, one item per line, fields separated by one space:
//!
//! ```text
//! file <path>
//! record_type <name> 0x<code> <T2|T3>
//! global_resolution_s <s>         (T2 time unit; T3 sync period)
//! resolution_s <s|none>           (T3 dtime unit)
//! num_records <n|unknown>         (TTResult_NumberOfRecords: records in the file, overflows included)
//! header_len <bytes>              (offset of the first record)
//! header <ident> <index> <value>  (with --header: every header entry, in file order)
//! tag <channel> <time_ps>         (channel 0 = sync; detector input c (0-based) = c + 1)
//! marker <marker> <time_ps>
//! gap <from_ps> <to_ps>
//! ```
//!
//! `--t3-sync-every N` also yields a sync tag on channel 0 every N sync periods of a T3 file
//! ([`qkd_timetag::ptu::PtuOptions::t3_sync_every`]). An unreadable or malformed file prints
//! the reader's error (file, byte offset, what is wrong) to stderr and exits with code 1; the
//! records before the fault have been printed by then. A closed stdout (`| head`) ends the
//! dump quietly.

use std::io::{BufWriter, ErrorKind, Write};
use std::process::ExitCode;

use qkd_timetag::ptu::{PtuOptions, PtuReader, TagValue};
use qkd_timetag::tags::Record;

const USAGE: &str = "usage: ptu_dump [--header] [--t3-sync-every N] FILE.ptu";

/// What ended the dump early.
enum Stop {
    /// Bad arguments or a reader error: print it, exit 1.
    Fail(String),
    /// Stdout was closed: exit 0 quietly.
    Closed,
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == ErrorKind::BrokenPipe { Stop::Closed } else { Stop::Fail(format!("writing stdout: {e}")) }
    }
}

fn value_text(v: &TagValue) -> String {
    match v {
        TagValue::Empty => "empty".into(),
        TagValue::Bool(b) => b.to_string(),
        TagValue::Int(i) => i.to_string(),
        TagValue::BitSet(b) | TagValue::Color(b) => format!("0x{b:x}"),
        TagValue::Float(f) | TagValue::DateTime(f) => format!("{f:e}"),
        TagValue::FloatArray(a) => format!("{a:?}"),
        TagValue::AnsiString(s) | TagValue::WideString(s) => format!("{s:?}"),
        TagValue::Blob(b) => format!("<{} bytes>", b.len()),
    }
}

fn run() -> Result<(), Stop> {
    let mut header_entries = false;
    let mut opts = PtuOptions::default();
    let mut path = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--header" => header_entries = true,
            "--t3-sync-every" => {
                let n = args.next().and_then(|n| n.parse::<u64>().ok()).filter(|&n| n > 0);
                opts.t3_sync_every =
                    Some(n.ok_or_else(|| Stop::Fail(format!("--t3-sync-every needs N > 0\n{USAGE}")))?);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ if path.is_none() && !a.starts_with("--") => path = Some(a),
            _ => return Err(Stop::Fail(format!("unexpected argument {a:?}\n{USAGE}"))),
        }
    }
    let path = path.ok_or_else(|| Stop::Fail(USAGE.to_string()))?;

    let reader = PtuReader::open(&path, opts).map_err(|e| Stop::Fail(e.to_string()))?;
    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let h = reader.header();
    writeln!(out, "file {path}")?;
    let t = if h.record_type.is_t3() { "T3" } else { "T2" };
    writeln!(out, "record_type {:?} 0x{:08x} {t}", h.record_type, h.record_type.code())?;
    writeln!(out, "global_resolution_s {:e}", h.global_resolution_s)?;
    match h.resolution_s {
        Some(r) => writeln!(out, "resolution_s {r:e}")?,
        None => writeln!(out, "resolution_s none")?,
    }
    match h.num_records {
        Some(n) => writeln!(out, "num_records {n}")?,
        None => writeln!(out, "num_records unknown")?,
    }
    writeln!(out, "header_len {}", h.header_len)?;
    if header_entries {
        for e in &h.tags {
            writeln!(out, "header {} {} {}", e.ident, e.index, value_text(&e.value))?;
        }
    }
    for rec in reader {
        match rec {
            Ok(Record::Tag(t)) => writeln!(out, "tag {} {}", t.channel, t.time_ps)?,
            Ok(Record::Marker { marker, time_ps }) => writeln!(out, "marker {marker} {time_ps}")?,
            Ok(Record::Gap { from_ps, to_ps }) => writeln!(out, "gap {from_ps} {to_ps}")?,
            Err(e) => {
                out.flush()?;
                return Err(Stop::Fail(e.to_string()));
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) | Err(Stop::Closed) => ExitCode::SUCCESS,
        Err(Stop::Fail(msg)) => {
            eprintln!("ptu_dump: {msg}");
            ExitCode::FAILURE
        }
    }
}
