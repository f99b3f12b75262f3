//! Plain-text time tags and channel maps: simple formats for emulators, tests and hand-made
//! data, read line by line with errors that name the file and the line.
//!
//! # Tag files
//! One record per line, fields separated by a comma and/or whitespace, `#` starts a comment
//! (whole line or trailing), blank lines are ignored:
//!
//! ```text
//! # channel, time in ps
//! 0, 1000000
//! 1  1003012
//! gap 2000000 2500000      # data lost from 2000000 ps to 2500000 ps
//! marker 3 2600000         # marker 3 at 2600000 ps
//! ```
//!
//! Channels are 0..=255 (the crate's numbering, [`crate::tags`]); times are non-negative integer
//! ps, in non-decreasing order.
//!
//! # Channel-map files (sidecar)
//! One `role = channel` per line, roles as [`Role::name`] gives them (`z`, `x_plus`, `x_minus`,
//! `sync`, `clock`), `#` comments; validated as a [`ChannelMap`] (no duplicates, a Z detector,
//! X detectors in pairs, and a sync unless read for data-only clock recovery):
//!
//! ```text
//! sync = 0
//! z = 1
//! x_plus = 2
//! x_minus = 3
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use crate::tags::{ChannelMap, ChannelMapError, Record, Role, Tag};

/// An error in a text file: the file, the line (1-based; 0 for the file as a whole) and what.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", if *line > 0 { format!(":{line}") } else { String::new() })]
pub struct TextError {
    /// File name (or source).
    pub file: String,
    /// Line number, 1-based; 0 when the error concerns the whole file.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Streaming reader of a tag file: an iterator of records.
#[derive(Debug)]
pub struct TextReader<R: BufRead> {
    file: String,
    input: R,
    line_no: usize,
    buf: String,
    last_time: u64,
    done: bool,
}

impl TextReader<BufReader<File>> {
    /// Opens the tag file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, TextError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let f = File::open(path).map_err(|e| TextError { file: name.clone(), line: 0, message: e.to_string() })?;
        Ok(Self::new(BufReader::new(f), &name))
    }
}

impl<R: BufRead> TextReader<R> {
    /// A reader of `input`, named `file` in errors.
    pub fn new(input: R, file: &str) -> Self {
        Self { file: file.to_string(), input, line_no: 0, buf: String::new(), last_time: 0, done: false }
    }

    fn err(&self, message: String) -> TextError {
        TextError { file: self.file.clone(), line: self.line_no, message }
    }

    /// Parses one non-empty line.
    fn parse(&self, fields: &[&str]) -> Result<Record, TextError> {
        let time = |s: &str, what: &str| {
            s.parse::<u64>().map_err(|_| self.err(format!("{what} {s:?} is not a non-negative integer number of ps")))
        };
        let small =
            |s: &str, what: &str| s.parse::<u8>().map_err(|_| self.err(format!("{what} {s:?} is not in 0..=255")));
        match fields {
            ["gap", from, to] => {
                let (from_ps, to_ps) = (time(from, "gap start")?, time(to, "gap end")?);
                if to_ps < from_ps {
                    return Err(self.err(format!("gap ends ({to_ps}) before it starts ({from_ps})")));
                }
                Ok(Record::Gap { from_ps, to_ps })
            }
            ["marker", m, t] => Ok(Record::Marker { marker: small(m, "marker")?, time_ps: time(t, "time")? }),
            [ch, t] => Ok(Record::Tag(Tag::new(small(ch, "channel")?, time(t, "time")?))),
            _ => Err(self.err(format!(
                "expected \"channel, time_ps\", \"gap from_ps to_ps\" or \"marker m time_ps\", found {} fields",
                fields.len()
            ))),
        }
    }
}

/// The fields of a line: comment removed, split at commas and whitespace.
fn fields(line: &str) -> Vec<&str> {
    let content = line.split('#').next().unwrap_or("");
    content.split(|c: char| c == ',' || c.is_whitespace()).filter(|f| !f.is_empty()).collect()
}

impl<R: BufRead> Iterator for TextReader<R> {
    type Item = Result<Record, TextError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.buf.clear();
            self.line_no += 1;
            match self.input.read_line(&mut self.buf) {
                Ok(0) => self.done = true,
                Ok(_) => {
                    let f = fields(&self.buf);
                    if f.is_empty() {
                        continue;
                    }
                    let r = self.parse(&f).and_then(|r| {
                        if r.time_ps() < self.last_time {
                            return Err(self.err(format!(
                                "time {} ps goes back (previous {} ps)",
                                r.time_ps(),
                                self.last_time
                            )));
                        }
                        Ok(r)
                    });
                    match r {
                        Ok(r) => {
                            self.last_time = match r {
                                Record::Gap { to_ps, .. } => to_ps,
                                _ => r.time_ps(),
                            };
                            return Some(Ok(r));
                        }
                        Err(e) => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(self.err(e.to_string())));
                }
            }
        }
        None
    }
}

/// Parses a channel-map text (module docs), named `file` in errors; a sync is required when
/// `require_sync`.
pub fn parse_channel_map(text: &str, file: &str, require_sync: bool) -> Result<ChannelMap, TextError> {
    let err = |line: usize, message: String| TextError { file: file.to_string(), line, message };
    let mut entries: Vec<(Role, u8)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let Some((role, channel)) = content.split_once('=') else {
            return Err(err(line, format!("expected \"role = channel\", found {content:?}")));
        };
        let (role, channel) = (role.trim(), channel.trim());
        let r = Role::from_name(role).ok_or_else(|| {
            let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
            err(line, format!("unknown role {role:?} (expected one of {})", names.join(", ")))
        })?;
        let ch = channel.parse::<u8>().map_err(|_| err(line, format!("channel {channel:?} is not in 0..=255")))?;
        entries.push((r, ch));
        // Duplicates are reported at the line that repeats.
        if let Err(e @ (ChannelMapError::DuplicateChannel { .. } | ChannelMapError::DuplicateRole { .. })) =
            check_duplicates(&entries)
        {
            return Err(err(line, e.to_string()));
        }
    }
    let map = if require_sync { ChannelMap::new(&entries) } else { ChannelMap::without_sync(&entries) };
    map.map_err(|e| err(0, e.to_string()))
}

/// The duplicate check of [`ChannelMap`] alone.
fn check_duplicates(entries: &[(Role, u8)]) -> Result<(), ChannelMapError> {
    match ChannelMap::without_sync(entries) {
        Err(e @ (ChannelMapError::DuplicateChannel { .. } | ChannelMapError::DuplicateRole { .. })) => Err(e),
        _ => Ok(()),
    }
}

/// Reads the channel-map file at `path` (see [`parse_channel_map`]).
pub fn read_channel_map(path: impl AsRef<Path>, require_sync: bool) -> Result<ChannelMap, TextError> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| TextError { file: name.clone(), line: 0, message: e.to_string() })?;
    parse_channel_map(&text, &name, require_sync)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<Record>, TextError> {
        TextReader::new(text.as_bytes(), "tags.txt").collect()
    }

    #[test]
    fn tag_lines_in_every_form() {
        let text = "# header\n\n0,1000\n1 1003 # trailing\n  2 ,\t1003\ngap 2000 2500\nmarker 3 2600\n255,18446744073709551615\n";
        assert_eq!(
            read(text).unwrap(),
            vec![
                Record::Tag(Tag::new(0, 1000)),
                Record::Tag(Tag::new(1, 1003)),
                Record::Tag(Tag::new(2, 1003)),
                Record::Gap { from_ps: 2000, to_ps: 2500 },
                Record::Marker { marker: 3, time_ps: 2600 },
                Record::Tag(Tag::new(255, u64::MAX)),
            ]
        );
        assert!(read("").unwrap().is_empty());
        // No final newline.
        assert_eq!(read("4,5").unwrap(), vec![Record::Tag(Tag::new(4, 5))]);
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases = [
            ("0,10\n1,x\n", 2, "time \"x\" is not a non-negative integer number of ps"),
            ("# c\n256,10\n", 2, "channel \"256\" is not in 0..=255"),
            (
                "1,10\n\n1,2,3\n",
                3,
                "expected \"channel, time_ps\", \"gap from_ps to_ps\" or \"marker m time_ps\", found 3 fields",
            ),
            ("1,10\n1,-4\n", 2, "time \"-4\" is not a non-negative integer number of ps"),
            ("gap 10 5\n", 1, "gap ends (5) before it starts (10)"),
            ("1,10\n1,9\n", 2, "time 9 ps goes back (previous 10 ps)"),
            ("gap 10 50\n1,20\n", 2, "time 20 ps goes back (previous 50 ps)"),
        ];
        for (text, line, msg) in cases {
            let e = read(text).unwrap_err();
            assert_eq!((e.line, e.message.as_str()), (line, msg), "{text:?}");
            assert_eq!(e.to_string(), format!("tags.txt:{line}: {msg}"));
        }
        // Reading stops at the first error.
        let mut r = TextReader::new("1,x\n1,5\n".as_bytes(), "t");
        assert!(r.next().unwrap().is_err());
        assert!(r.next().is_none());
        let e = TextReader::open("/nonexistent/tags.txt").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("/nonexistent/tags.txt", 0));
        assert!(e.to_string().starts_with("/nonexistent/tags.txt: "), "{e}");
    }

    #[test]
    fn channel_maps_parse_and_validate() {
        let text = "# Bob's tagger\nsync = 0\nz=1\n  x_plus = 2   # D+\nx_minus = 3\nclock = 7\n";
        let m = parse_channel_map(text, "map.txt", true).unwrap();
        assert_eq!(m.channel(Role::XPlus), Some(2));
        assert_eq!(m.channel(Role::Clock), Some(7));
        let only_z = parse_channel_map("z = 4", "map.txt", false).unwrap();
        assert_eq!(only_z.channel(Role::Z), Some(4));
        let cases = [
            ("sync = 0\nz = 1\nx_plus = 1\n", true, 3, "channel 1 is assigned twice: as z and as x_plus"),
            ("sync = 0\nz = 1\nz = 2\n", true, 3, "role z is assigned twice: to channel 1 and to channel 2"),
            (
                "sync = 0\ndetector = 1\n",
                true,
                2,
                "unknown role \"detector\" (expected one of z, x_plus, x_minus, sync, clock)",
            ),
            ("z = 300\n", true, 1, "channel \"300\" is not in 0..=255"),
            ("z 1\n", true, 1, "expected \"role = channel\", found \"z 1\""),
            (
                "z = 1\n",
                true,
                0,
                "no channel is the sync (role sync); clock recovery from the data alone needs a map built for it",
            ),
            ("sync = 0\n", false, 0, "no channel is the Z detector (role z)"),
            (
                "z = 1\nx_plus = 2\n",
                false,
                0,
                "role x_plus is assigned but x_minus is not: the X detectors come in pairs",
            ),
        ];
        for (text, sync, line, msg) in cases {
            let e = parse_channel_map(text, "map.txt", sync).unwrap_err();
            assert_eq!((e.line, e.message.as_str()), (line, msg), "{text:?}");
        }
        let e = parse_channel_map("z = 1\n", "map.txt", true).unwrap_err();
        assert!(e.to_string().starts_with("map.txt: no channel is the sync"), "{e}");
    }

    #[test]
    fn files_round_trip_through_the_file_system() {
        let dir = std::env::temp_dir().join(format!("qkd-timetag-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tags = dir.join("tags.txt");
        let map = dir.join("tags.map");
        std::fs::write(&tags, "0,100\n1,250\n").unwrap();
        std::fs::write(&map, "sync = 0\nz = 1\n").unwrap();
        let recs: Vec<Record> = TextReader::open(&tags).unwrap().map(Result::unwrap).collect();
        assert_eq!(recs.len(), 2);
        let m = read_channel_map(&map, true).unwrap();
        assert_eq!(m.role(1), Some(Role::Z));
        let e = read_channel_map(dir.join("missing.map"), true).unwrap_err();
        assert!(e.file.ends_with("missing.map") && e.line == 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
