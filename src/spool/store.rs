//! The spool on disk: a directory of segment files named by the commit LSN of their first
//! transaction (`{lsn:016X}.seg`, so names sort in stream order). A segment holds whole staging
//! transactions and starts with the Relation records of every table seen so far, so a reader can
//! start at any segment. The writer appends framed records ([`super::segment`]) and makes them
//! durable with `fdatasync`; on open it cuts whatever follows the last complete transaction (a
//! torn record, or a transaction a crash interrupted), which staging still holds because it was
//! never confirmed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::record::{self, RecordError};
use super::segment::{self, HEADER, Scan};
use crate::model::{Lsn, Oid, Relation};
use crate::pgoutput::LogicalMessage;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "spool segment {} is damaged at byte {offset}: {reason}. Nothing after it is read; \
         move the segment away and re-seed or replay from another copy",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "another stagingprop process is using the spool in {} (a sync with this spool, or a \
         replay into production): stop it first, since two would apply the same transactions",
        dir.display()
    )]
    Locked { dir: PathBuf },
    #[error(transparent)]
    TooLarge(#[from] segment::TooLarge),
    #[error("staging sent a {0} outside a transaction; it cannot be spooled")]
    OutsideTransaction(&'static str),
    #[error(
        "the spool in {} does not hold everything staging committed after {covered}: the \
         transaction committing at {commit} follows transactions up to {previous_end} that are \
         not in it (removed after being applied, or the spool was started later)",
        dir.display()
    )]
    Gap {
        dir: PathBuf,
        covered: Lsn,
        previous_end: Lsn,
        commit: Lsn,
    },
    #[error("spool segment {} at byte {offset}: {source}", path.display())]
    Record {
        path: PathBuf,
        offset: u64,
        source: RecordError,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The segment files of `dir`, in stream order, with the commit LSN each starts at.
pub fn segments(dir: &Path) -> Result<Vec<(Lsn, PathBuf)>, SpoolError> {
    let mut found = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io_error(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io_error(dir))?.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".seg"))
        else {
            continue;
        };
        if let Ok(lsn) = u64::from_str_radix(stem, 16) {
            found.push((Lsn(lsn), path));
        }
    }
    found.sort();
    Ok(found)
}

fn segment_path(dir: &Path, first_commit: Lsn) -> PathBuf {
    dir.join(format!("{:016X}.seg", first_commit.0))
}

/// What the writer found when it opened the spool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The end LSN of the last complete transaction spooled (invalid when empty).
    pub durable_end: Lsn,
    /// Bytes cut from the end: a torn record or an interrupted transaction.
    pub cut_bytes: u64,
    pub segments: usize,
    pub bytes: u64,
}

/// Bytes of a segment read at a time when scanning it: memory stays at this (or the largest
/// record) whatever the segment's size; one huge transaction makes a huge segment.
const SCAN_CHUNK: usize = 8 << 20;

/// Where the last complete transaction of a segment ends: (byte offset, its end LSN, the
/// segment's length). Reads the segment in chunks.
fn last_commit(path: &Path) -> Result<(u64, Option<Lsn>, u64), SpoolError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let len = file.metadata().map_err(io_error(path))?.len();
    let mut window: Vec<u8> = Vec::new();
    // The file offset of window[0], and the offset in the window being scanned.
    let (mut window_start, mut at) = (0u64, 0usize);
    let mut eof = false;
    let mut last = (0u64, None);
    loop {
        let scan = segment::next_frame(&window, at);
        if !eof && !matches!(scan, Scan::Frame { .. }) {
            // Not decided until the rest of the file is seen: drop what was scanned, read on.
            window.drain(..at);
            window_start += at as u64;
            at = 0;
            let had = window.len();
            window.resize(had + SCAN_CHUNK, 0);
            let got = read_full(&mut file, &mut window[had..]).map_err(io_error(path))?;
            window.truncate(had + got);
            eof = got < SCAN_CHUNK;
            continue;
        }
        match scan {
            Scan::Frame { payload, next } => {
                let offset = window_start + at as u64;
                let record = record::decode(Bytes::copy_from_slice(&window[payload]))
                    .and_then(record::from_record)
                    .map_err(|source| SpoolError::Record {
                        path: path.to_owned(),
                        offset,
                        source,
                    })?;
                if let (_, LogicalMessage::Commit { end_lsn, .. }) = record {
                    last = (window_start + next as u64, Some(end_lsn));
                }
                at = next;
            }
            Scan::End | Scan::Torn => return Ok((last.0, last.1, len)),
            Scan::Corrupt { reason } => {
                return Err(SpoolError::Corrupt {
                    path: path.to_owned(),
                    offset: window_start + at as u64,
                    reason: reason.to_owned(),
                });
            }
        }
    }
}

/// An exclusive lock on a spool directory (a `lock` file in it), held by a sync that writes the
/// spool and by a replay into production for as long as they run: two of them would apply the
/// same transactions. Released when dropped, or when the process dies.
pub struct SpoolLock {
    _file: File,
}

impl SpoolLock {
    pub fn acquire(dir: &Path) -> Result<SpoolLock, SpoolError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(SpoolLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(SpoolError::Locked {
                dir: dir.to_owned(),
            }),
            Err(fs::TryLockError::Error(e)) => Err(io_error(&path)(e)),
        }
    }
}

/// A position in the spool: the end of a complete transaction (`end`), found in the segment
/// named by `segment` before byte `offset`. The writer publishes the durable one; a reader in
/// the same process reads no further, so it never sees a transaction the writer may still cut.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpoolMark {
    pub segment: Lsn,
    pub offset: u64,
    pub end: Lsn,
}

/// The segment being appended to.
struct Active {
    file: File,
    path: PathBuf,
    /// The commit LSN of its first transaction (its name).
    first: Lsn,
    /// Bytes written to the file.
    len: u64,
}

/// Appends staging's transactions to the spool.
pub struct SpoolWriter {
    dir: PathBuf,
    segment_bytes: u64,
    active: Option<Active>,
    buffer: Vec<u8>,
    payload: Vec<u8>,
    /// Where the last complete transaction written ends (durable after `flush`).
    written: SpoolMark,
    durable: SpoolMark,
    /// Everything committed up to here is in the spool or was never needed: the next Begin
    /// records it as its `previous_end_lsn`.
    chain_end: Lsn,
    relations: HashMap<Oid, Relation>,
    bytes: u64,
}

impl SpoolWriter {
    /// Opens (creating) the spool in `dir`, cutting what follows its last complete transaction.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(SpoolWriter, Recovered), SpoolError> {
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(io_error(dir))?;
            // The directory itself must survive a power cut before anything in it is confirmed.
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            sync_dir(parent)?;
        }
        let mut found = segments(dir)?;
        let mut recovered = Recovered::default();
        let mut active = None;
        let mut durable = SpoolMark::default();
        while let Some((first, path)) = found.last().cloned() {
            let (keep, end, len) = last_commit(&path)?;
            recovered.cut_bytes += len - keep;
            if end.is_none() {
                // Nothing complete in it: the crash came before its first commit.
                fs::remove_file(&path).map_err(io_error(&path))?;
                found.pop();
                continue;
            }
            let file = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_error(&path))?;
            if keep < len {
                file.set_len(keep).map_err(io_error(&path))?;
                file.sync_all().map_err(io_error(&path))?;
            }
            recovered.durable_end = end.unwrap_or_default();
            durable = SpoolMark {
                segment: first,
                offset: keep,
                end: recovered.durable_end,
            };
            active = Some(Active {
                file,
                path,
                first,
                len: keep,
            });
            break;
        }
        for (_, path) in &found {
            recovered.bytes += fs::metadata(path).map_err(io_error(path))?.len();
        }
        recovered.segments = found.len();
        if recovered.cut_bytes > 0 {
            sync_dir(dir)?;
        }
        Ok((
            SpoolWriter {
                dir: dir.to_owned(),
                segment_bytes: segment_bytes.max(1),
                active,
                buffer: Vec::new(),
                payload: Vec::new(),
                written: durable,
                durable,
                chain_end: durable.end,
                relations: HashMap::new(),
                bytes: recovered.bytes,
            },
            recovered.clone(),
        ))
    }

    /// Declares that staging holds nothing before `lsn` the spool lacks: the slot released
    /// everything up to there after the target applied it. The next transaction records it.
    pub fn resume_from(&mut self, lsn: Lsn) {
        self.chain_end = self.chain_end.max(lsn);
    }

    /// Spools one message (those the spool keeps; others are ignored). A Begin past the segment
    /// size starts a new segment.
    pub fn append(&mut self, lsn: Lsn, message: &LogicalMessage) -> Result<(), SpoolError> {
        if let LogicalMessage::Relation { relation, .. } = message {
            self.relations.insert(relation.oid, relation.clone());
        }
        if let LogicalMessage::Begin { final_lsn, .. } = message {
            let full = self
                .active
                .as_ref()
                .is_none_or(|a| a.len + self.buffer.len() as u64 >= self.segment_bytes);
            if full {
                self.rotate(*final_lsn)?;
            }
        }
        let Some(active) = &self.active else {
            // Before the first transaction: a Relation is remembered, and written at the start
            // of the first segment; changes only come inside transactions.
            return match message {
                LogicalMessage::Relation { .. } => Ok(()),
                other => match record::to_record(lsn, other, &self.relations) {
                    None => Ok(()),
                    Some(_) => Err(SpoolError::OutsideTransaction(other.name())),
                },
            };
        };
        let segment = active.first;
        let Some(mut record) = record::to_record(lsn, message, &self.relations) else {
            return Ok(());
        };
        if let Some(super::proto::record::Body::Begin(begin)) = &mut record.body {
            begin.previous_end_lsn = self.chain_end.0;
        }
        self.frame(&record)?;
        if let LogicalMessage::Commit { end_lsn, .. } = message {
            self.chain_end = *end_lsn;
            self.written = SpoolMark {
                segment,
                offset: self.active.as_ref().map_or(0, |a| a.len) + self.buffer.len() as u64,
                end: *end_lsn,
            };
        }
        Ok(())
    }

    fn frame(&mut self, record: &super::proto::Record) -> Result<(), SpoolError> {
        self.payload.clear();
        record::encode(record, &mut self.payload);
        Ok(segment::encode_frame(&self.payload, &mut self.buffer)?)
    }

    /// Closes the active segment (durably) and starts one for the transaction committing at
    /// `first_commit`, beginning with every known table's Relation record.
    fn rotate(&mut self, first_commit: Lsn) -> Result<(), SpoolError> {
        self.write_buffer()?;
        if let Some(active) = self.active.take() {
            active.file.sync_data().map_err(io_error(&active.path))?;
        }
        let path = segment_path(&self.dir, first_commit);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_error(&path))?;
        sync_dir(&self.dir)?;
        self.active = Some(Active {
            file,
            path,
            first: first_commit,
            len: 0,
        });
        let relations: Vec<Relation> = self.relations.values().cloned().collect();
        for relation in relations {
            let message = LogicalMessage::Relation {
                xid: None,
                relation,
            };
            if let Some(record) = record::to_record(Lsn::INVALID, &message, &self.relations) {
                self.frame(&record)?;
            }
        }
        Ok(())
    }

    fn write_buffer(&mut self) -> Result<(), SpoolError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            // `append` frames nothing before the first segment exists.
            return Err(SpoolError::OutsideTransaction("record"));
        };
        active
            .file
            .write_all(&self.buffer)
            .map_err(io_error(&active.path))?;
        active.len += self.buffer.len() as u64;
        self.bytes += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Writes what was appended and makes it durable. Returns the end LSN of the last complete
    /// transaction now on disk: staging may be told it.
    pub fn flush(&mut self) -> Result<Lsn, SpoolError> {
        if !self.buffer.is_empty() {
            self.write_buffer()?;
            if let Some(active) = &self.active {
                active.file.sync_data().map_err(io_error(&active.path))?;
            }
        }
        self.durable = self.written;
        Ok(self.durable.end)
    }

    pub fn durable_end(&self) -> Lsn {
        self.durable.end
    }

    /// Where the last durable complete transaction ends.
    pub fn durable_mark(&self) -> SpoolMark {
        self.durable
    }

    /// Whether something appended is not durable yet.
    pub fn unflushed(&self) -> bool {
        !self.buffer.is_empty() || self.written != self.durable
    }

    /// Bytes appended but not yet written to the segment file.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// Bytes in the spool's segments (written so far).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// [`remove_applied`] on this writer's spool; the active segment always stays.
    pub fn remove_applied(
        &mut self,
        applied_end: Lsn,
        retain: std::time::Duration,
        max_bytes: u64,
    ) -> Result<u64, SpoolError> {
        let removed = remove_applied(&self.dir, applied_end, retain, max_bytes)?;
        self.bytes = self.bytes.saturating_sub(removed);
        Ok(removed)
    }
}

/// What a spool holds, as read without changing it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpoolSummary {
    pub segments: usize,
    pub bytes: u64,
    /// The commit LSN of the oldest transaction held.
    pub oldest: Option<Lsn>,
    /// The end LSN of the newest complete transaction.
    pub newest_end: Option<Lsn>,
}

/// Reads what the spool in `dir` holds (for `status`); the newest segments are scanned back to
/// their last complete transaction.
pub fn summary(dir: &Path) -> Result<SpoolSummary, SpoolError> {
    let found = segments(dir)?;
    let mut out = SpoolSummary {
        segments: found.len(),
        oldest: found.first().map(|(lsn, _)| *lsn),
        ..SpoolSummary::default()
    };
    for (_, path) in &found {
        out.bytes += fs::metadata(path).map_err(io_error(path))?.len();
    }
    out.newest_end = complete_mark(dir)?.map(|m| m.end);
    Ok(out)
}

/// Where the last complete transaction in the spool ends (the newest segments are scanned back
/// to it); what a reader of a spool another process may be writing reads up to.
pub fn complete_mark(dir: &Path) -> Result<Option<SpoolMark>, SpoolError> {
    for (first, path) in segments(dir)?.iter().rev() {
        let scanned = match last_commit(path) {
            Err(SpoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                continue;
            }
            other => other?,
        };
        if let (offset, Some(end), _) = scanned {
            return Ok(Some(SpoolMark {
                segment: *first,
                offset,
                end,
            }));
        }
    }
    Ok(None)
}

/// Removes segments production no longer needs: every transaction in them applied (the next
/// segment starts at or before `applied_end`), and either older than `retain` (kept that long
/// for `replay`) or, while the spool is over `max_bytes`, regardless of age, oldest first. The
/// newest segment stays. Returns the bytes removed.
pub fn remove_applied(
    dir: &Path,
    applied_end: Lsn,
    retain: std::time::Duration,
    max_bytes: u64,
) -> Result<u64, SpoolError> {
    let found = segments(dir)?;
    let mut sizes = Vec::with_capacity(found.len());
    for (_, path) in &found {
        let meta = fs::metadata(path).map_err(io_error(path))?;
        let age = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .unwrap_or_default();
        sizes.push((meta.len(), age));
    }
    let mut total: u64 = sizes.iter().map(|(len, _)| len).sum();
    let mut removed = 0;
    for (i, window) in found.windows(2).enumerate() {
        let (_, path) = &window[0];
        let (next_first, _) = window[1];
        if !applied_end.is_valid() || next_first > applied_end {
            break;
        }
        let (len, age) = sizes[i];
        if age >= retain || total > max_bytes {
            fs::remove_file(path).map_err(io_error(path))?;
            total -= len;
            removed += len;
        }
    }
    Ok(removed)
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// The segment holding transactions committing at or after `from`.
fn start_of(segments: &[(Lsn, PathBuf)], from: Lsn) -> usize {
    segments
        .iter()
        .rposition(|(first, _)| *first <= from)
        .unwrap_or(0)
}

/// A spooled message and the position staging sent it at.
type Spooled = (Lsn, LogicalMessage);

/// Reads spooled messages in order, from the segment holding a position on.
pub struct SpoolReader {
    dir: PathBuf,
    from: Lsn,
    /// The segments as last listed (the directory is listed again at every segment change:
    /// the writer adds segments, retention removes them).
    segments: Vec<(Lsn, PathBuf)>,
    /// The first commit of the segment read last (what names it).
    last_segment: Option<Lsn>,
    current: Option<Reading>,
    /// Everything committed up to here was read (or was before `from`): a Begin whose
    /// `previous_end_lsn` lies beyond it follows a gap.
    covered: Option<Lsn>,
    /// Whether a Begin was read yet.
    begun: bool,
    /// What the last Begin read records as committed before it (`previous_end_lsn`).
    previous_end: Lsn,
}

/// The segment being read.
struct Reading {
    reader: BufReader<File>,
    path: PathBuf,
    first: Lsn,
    offset: u64,
    /// No newer segment was listed when it was opened: a record cut short at its end is where
    /// the writer is, not damage.
    last: bool,
}

impl SpoolReader {
    /// A reader starting at the segment that holds transactions committing at or after `from`
    /// (the caller skips the earlier ones of that segment). With `from` valid, the spool must
    /// hold every transaction committed after it: a gap is an error, not a silent skip.
    pub fn open(dir: &Path, from: Lsn) -> Result<SpoolReader, SpoolError> {
        Ok(SpoolReader {
            dir: dir.to_owned(),
            from,
            segments: segments(dir)?,
            last_segment: None,
            current: None,
            covered: from.is_valid().then_some(from),
            begun: false,
            previous_end: Lsn::INVALID,
        })
    }

    /// Where everything committed before the transaction read last ends, as its Begin
    /// records it (invalid before the first Begin, or in a spool too old to record it).
    pub fn previous_end(&self) -> Lsn {
        self.previous_end
    }

    /// The commit LSN of the first transaction the spool holds.
    pub fn oldest(&self) -> Option<Lsn> {
        self.segments.first().map(|(lsn, _)| *lsn)
    }

    /// The segment to read next, from a fresh listing: the one holding `from` at first, then
    /// the one after the segment read last.
    fn next_segment(&mut self) -> Result<Option<(Lsn, PathBuf)>, SpoolError> {
        self.segments = segments(&self.dir)?;
        Ok(match self.last_segment {
            None => self
                .segments
                .get(start_of(&self.segments, self.from))
                .cloned(),
            Some(last) => self.segments.iter().find(|(f, _)| *f > last).cloned(),
        })
    }

    /// Lists the segments again; whether one newer than `first` appeared (the writer moved on,
    /// so the segment `first` names is complete).
    fn next_segment_listed(&mut self, first: Lsn) -> Result<bool, SpoolError> {
        self.segments = segments(&self.dir)?;
        Ok(self.has_newer(first))
    }

    /// Whether a segment newer than `first` was listed last time.
    fn has_newer(&self, first: Lsn) -> bool {
        self.segments.iter().any(|(f, _)| *f > first)
    }

    /// The next message and the position staging sent it at; `None` at the end of the spool
    /// for now: the reader can be asked again and goes on when the writer appended more. An
    /// incomplete record at the end of the last segment is where the writer is (or what it cuts
    /// when it opens); anywhere else it is damage.
    pub fn next_message(&mut self) -> Result<Option<(Lsn, LogicalMessage)>, SpoolError> {
        self.next_message_within(None)
    }

    /// [`Self::next_message`], reading nothing at or past `limit` (the writer's durable mark
    /// when it runs in the same process, or the last complete transaction when replaying).
    pub fn next_message_within(
        &mut self,
        limit: Option<SpoolMark>,
    ) -> Result<Option<(Lsn, LogicalMessage)>, SpoolError> {
        let Some(message) = self.next_record(limit)? else {
            return Ok(None);
        };
        let (previous_end, message) = message;
        match &message.1 {
            LogicalMessage::Begin { final_lsn, .. } => {
                self.previous_end = previous_end;
                let first = !std::mem::replace(&mut self.begun, true);
                if let Some(covered) = self.covered {
                    // A Begin that does not say what precedes it (an old spool) proves nothing
                    // when the reader starts after the spool's first transaction.
                    let unknown = !previous_end.is_valid() && first && *final_lsn > covered;
                    if previous_end > covered || unknown {
                        return Err(SpoolError::Gap {
                            dir: self.dir.clone(),
                            covered,
                            previous_end: if unknown { *final_lsn } else { previous_end },
                            commit: *final_lsn,
                        });
                    }
                }
            }
            LogicalMessage::Commit { end_lsn, .. } => {
                self.covered = Some(self.covered.unwrap_or_default().max(*end_lsn));
            }
            _ => {}
        }
        Ok(Some(message))
    }

    /// The next record as a message, after the `previous_end_lsn` a Begin records (invalid
    /// for other records).
    fn next_record(
        &mut self,
        limit: Option<SpoolMark>,
    ) -> Result<Option<(Lsn, Spooled)>, SpoolError> {
        loop {
            if self.current.is_none() {
                let Some((first, path)) = self.next_segment()? else {
                    return Ok(None);
                };
                if limit.is_some_and(|l| first > l.segment) {
                    return Ok(None);
                }
                let file = match File::open(&path) {
                    Ok(file) => file,
                    // Removed since it was listed (applied and past retention): list again.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error(&path)(e)),
                };
                self.current = Some(Reading {
                    reader: BufReader::with_capacity(1 << 20, file),
                    path,
                    first,
                    offset: 0,
                    last: !self.has_newer(first),
                });
                self.last_segment = Some(first);
            }
            let Reading {
                reader,
                path,
                first,
                offset,
                last,
            } = self.current.as_mut().expect("opened above");
            let last = *last;
            if limit.is_some_and(|l| *first == l.segment && *offset >= l.offset) {
                // Drop what the buffer read past the limit: the writer may still cut and
                // rewrite it (a transaction received in part when a session failed).
                reader
                    .seek(SeekFrom::Start(*offset))
                    .map_err(io_error(path))?;
                return Ok(None);
            }
            let mut header = [0u8; HEADER];
            let got = read_full(reader, &mut header).map_err(io_error(path))?;
            if got == 0 {
                let first = *first;
                if !last || self.next_segment_listed(first)? {
                    self.current = None;
                    continue;
                }
                return Ok(None);
            }
            // Not all of a record is there yet: read it again from its start next time.
            let wait = |reader: &mut BufReader<File>, path: &Path, at: u64| {
                reader
                    .seek(SeekFrom::Start(at))
                    .map(|_| None)
                    .map_err(io_error(path))
            };
            let corrupt = |reason: &str, at: u64| SpoolError::Corrupt {
                path: path.clone(),
                offset: at,
                reason: reason.to_owned(),
            };
            if got < HEADER {
                return if last {
                    wait(reader, path, *offset)
                } else {
                    Err(corrupt("the segment ends inside a record", *offset))
                };
            }
            let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            if crc32c::crc32c(&header[..8]) != be32(&header[8..]) {
                // Zeros where the last write of a crashed writer did not land.
                return if last && header.iter().all(|&b| b == 0) {
                    wait(reader, path, *offset)
                } else {
                    Err(corrupt(
                        "the record header's checksum does not match",
                        *offset,
                    ))
                };
            }
            let len = be32(&header[..4]) as usize;
            if len > segment::MAX_PAYLOAD {
                return Err(corrupt(
                    "the record header names an impossible length",
                    *offset,
                ));
            }
            let mut frame = vec![0u8; HEADER + len];
            frame[..HEADER].copy_from_slice(&header);
            let got = read_full(reader, &mut frame[HEADER..]).map_err(io_error(path))?;
            if got < len {
                return if last {
                    wait(reader, path, *offset)
                } else {
                    Err(corrupt("the segment ends inside a record", *offset))
                };
            }
            if crc32c::crc32c(&frame[HEADER..]) != be32(&header[4..8]) {
                return Err(corrupt(
                    "the record's checksum does not match its contents",
                    *offset,
                ));
            }
            let payload = HEADER..frame.len();
            let at = *offset;
            *offset += frame.len() as u64;
            let record_error = |source| SpoolError::Record {
                path: path.clone(),
                offset: at,
                source,
            };
            let record = record::decode(Bytes::from(frame).slice(payload)).map_err(record_error)?;
            let previous_end = match &record.body {
                Some(super::proto::record::Body::Begin(b)) => Lsn(b.previous_end_lsn),
                _ => Lsn::INVALID,
            };
            let message = record::from_record(record).map_err(record_error)?;
            return Ok(Some((previous_end, message)));
        }
    }
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Column, PgTimestamp, ReplicaIdentity, Value};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("stagingprop-spool-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn relation() -> Relation {
        Relation {
            oid: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "id".into(),
                is_key: true,
                type_oid: 20,
                type_modifier: -1,
            }],
        }
    }

    /// Transaction `n`: commit at 100n, end at 100n + 8, one insert of row n.
    fn transaction(n: u64) -> Vec<(Lsn, LogicalMessage)> {
        let commit = Lsn(100 * n);
        vec![
            (
                commit,
                LogicalMessage::Begin {
                    final_lsn: commit,
                    commit_time: PgTimestamp(n as i64),
                    xid: n as u32,
                },
            ),
            (
                Lsn(100 * n - 50),
                LogicalMessage::Relation {
                    xid: None,
                    relation: relation(),
                },
            ),
            (
                Lsn(100 * n - 40),
                LogicalMessage::Insert {
                    xid: None,
                    relation: 1,
                    new: vec![Value::Text(Bytes::from(n.to_string()))],
                },
            ),
            (
                commit,
                LogicalMessage::Commit {
                    flags: 0,
                    commit_lsn: commit,
                    end_lsn: Lsn(100 * n + 8),
                    commit_time: PgTimestamp(n as i64),
                },
            ),
        ]
    }

    fn write(dir: &Path, from: u64, to: u64, segment_bytes: u64) -> Lsn {
        let (mut writer, _) = SpoolWriter::open(dir, segment_bytes).unwrap();
        for n in from..=to {
            for (lsn, m) in transaction(n) {
                writer.append(lsn, &m).unwrap();
            }
        }
        writer.flush().unwrap()
    }

    fn inserted(dir: &Path, from: Lsn) -> Result<Vec<u64>, SpoolError> {
        let mut reader = SpoolReader::open(dir, from)?;
        let mut rows = Vec::new();
        while let Some((_, m)) = reader.next_message()? {
            if let LogicalMessage::Insert { new, .. } = m {
                let Value::Text(b) = &new[0] else { panic!() };
                rows.push(std::str::from_utf8(b).unwrap().parse().unwrap());
            }
        }
        Ok(rows)
    }

    #[test]
    fn one_lock_holder_at_a_time() {
        let dir = TempDir::new("lock");
        let held = SpoolLock::acquire(&dir.0).unwrap();
        let err = SpoolLock::acquire(&dir.0)
            .err()
            .expect("a second holder is refused");
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        drop(held);
        assert!(SpoolLock::acquire(&dir.0).is_ok());
    }

    #[test]
    fn a_reader_reads_nothing_past_the_writers_durable_mark() {
        let dir = TempDir::new("mark");
        let (mut writer, _) = SpoolWriter::open(&dir.0, 1 << 20).unwrap();
        let append = |writer: &mut SpoolWriter, n| {
            for (lsn, m) in transaction(n) {
                writer.append(lsn, &m).unwrap();
            }
        };
        append(&mut writer, 1);
        writer.flush().unwrap();
        let mark = writer.durable_mark();
        assert_eq!(mark.end, Lsn(108));
        // Transaction 2 is written to the file and half of 3 too, but not made durable.
        append(&mut writer, 2);
        for (lsn, m) in transaction(3).into_iter().take(2) {
            writer.append(lsn, &m).unwrap();
        }
        writer.write_buffer().unwrap();
        let mut reader = SpoolReader::open(&dir.0, Lsn::INVALID).unwrap();
        let mut ends = Vec::new();
        while let Some((_, m)) = reader.next_message_within(Some(mark)).unwrap() {
            if let LogicalMessage::Commit { end_lsn, .. } = m {
                ends.push(end_lsn);
            }
        }
        assert_eq!(ends, vec![Lsn(108)]);
        writer.flush().unwrap();
        let mark = writer.durable_mark();
        assert_eq!(
            mark.end,
            Lsn(208),
            "a durable mark ends at a complete transaction"
        );
        while let Some((_, m)) = reader.next_message_within(Some(mark)).unwrap() {
            if let LogicalMessage::Commit { end_lsn, .. } = m {
                ends.push(end_lsn);
            }
        }
        assert_eq!(ends, vec![Lsn(108), Lsn(208)]);
    }

    /// Commits (and the rows inserted, as `Lsn(row)`) of the transactions read up to `limit`.
    fn read_commits(reader: &mut SpoolReader, limit: Option<SpoolMark>) -> Vec<Lsn> {
        let mut read = Vec::new();
        while let Some((_, m)) = reader.next_message_within(limit).unwrap() {
            match m {
                LogicalMessage::Commit { commit_lsn, .. } => read.push(commit_lsn),
                LogicalMessage::Insert { new, .. } => {
                    let Value::Text(b) = &new[0] else { panic!() };
                    read.push(Lsn(std::str::from_utf8(b).unwrap().parse().unwrap()));
                }
                _ => {}
            }
        }
        read
    }

    #[test]
    fn bytes_cut_and_written_again_past_the_mark_are_read_as_they_are_now() {
        let dir = TempDir::new("rewritten");
        let (mut writer, _) = SpoolWriter::open(&dir.0, 1 << 20).unwrap();
        for (lsn, m) in transaction(1) {
            writer.append(lsn, &m).unwrap();
        }
        writer.flush().unwrap();
        // Half of transaction 2 reaches the file, then the session fails.
        for (lsn, m) in transaction(2).into_iter().take(3) {
            writer.append(lsn, &m).unwrap();
        }
        writer.write_buffer().unwrap();
        let mut reader = SpoolReader::open(&dir.0, Lsn::INVALID).unwrap();
        assert_eq!(
            read_commits(&mut reader, Some(writer.durable_mark())),
            vec![Lsn(1), Lsn(100)]
        );
        drop(writer);
        // Reopened: the half transaction is cut, and what follows is different.
        let (mut writer, recovered) = SpoolWriter::open(&dir.0, 1 << 20).unwrap();
        assert!(recovered.cut_bytes > 0);
        for (lsn, m) in transaction(3) {
            writer.append(lsn, &m).unwrap();
        }
        writer.flush().unwrap();
        assert_eq!(
            read_commits(&mut reader, Some(writer.durable_mark())),
            vec![Lsn(3), Lsn(300)]
        );
    }

    #[test]
    fn a_reader_goes_on_when_the_segment_it_finished_is_removed() {
        let dir = TempDir::new("removed");
        let (mut writer, _) = SpoolWriter::open(&dir.0, 1).unwrap();
        for (lsn, m) in transaction(1) {
            writer.append(lsn, &m).unwrap();
        }
        writer.flush().unwrap();
        let mut reader = SpoolReader::open(&dir.0, Lsn::INVALID).unwrap();
        assert_eq!(
            read_commits(&mut reader, Some(writer.durable_mark())),
            vec![Lsn(1), Lsn(100)]
        );
        // Two more segments, and the one read is applied and removed.
        for n in [2, 3] {
            for (lsn, m) in transaction(n) {
                writer.append(lsn, &m).unwrap();
            }
        }
        writer.flush().unwrap();
        let removed = writer
            .remove_applied(Lsn(208), std::time::Duration::ZERO, u64::MAX)
            .unwrap();
        assert!(removed > 0);
        assert_eq!(segments(&dir.0).unwrap().len(), 2);
        assert_eq!(
            read_commits(&mut reader, Some(writer.durable_mark())),
            vec![Lsn(2), Lsn(200), Lsn(3), Lsn(300)]
        );
    }

    #[test]
    fn a_segment_larger_than_a_scan_chunk_is_recovered_in_chunks() {
        let dir = TempDir::new("bigsegment");
        let (mut writer, _) = SpoolWriter::open(&dir.0, u64::MAX).unwrap();
        // One transaction of 12 MB in rows of 100 KB: records straddle the 8 MB chunks.
        let mut big = transaction(1);
        let commit = big.pop().unwrap();
        for i in 0..120u32 {
            let value = Bytes::from(vec![b'a' + (i % 26) as u8; 100_000]);
            big.push((
                Lsn(60),
                LogicalMessage::Insert {
                    xid: None,
                    relation: 1,
                    new: vec![Value::Text(value)],
                },
            ));
        }
        big.push(commit);
        for (lsn, m) in big.into_iter().chain(transaction(2)) {
            writer.append(lsn, &m).unwrap();
        }
        writer.flush().unwrap();
        let whole = writer.durable_mark();
        assert!(whole.offset > 2 * SCAN_CHUNK as u64, "{whole:?}");
        // Half of a third transaction, then a crash.
        for (lsn, m) in transaction(3).into_iter().take(3) {
            writer.append(lsn, &m).unwrap();
        }
        writer.flush().unwrap();
        drop(writer);
        assert_eq!(complete_mark(&dir.0).unwrap(), Some(whole));
        let (writer, recovered) = SpoolWriter::open(&dir.0, u64::MAX).unwrap();
        assert_eq!(recovered.durable_end, Lsn(208));
        assert!(recovered.cut_bytes > 0);
        assert_eq!(writer.durable_mark(), whole);
    }

    #[test]
    fn a_start_the_spool_does_not_reach_back_to_is_a_gap() {
        let dir = TempDir::new("gap");
        let (mut writer, _) = SpoolWriter::open(&dir.0, 300).unwrap();
        writer.resume_from(Lsn(850));
        for n in 9..=20 {
            for (lsn, m) in transaction(n) {
                writer.append(lsn, &m).unwrap();
            }
        }
        writer.flush().unwrap();
        drop(writer);
        // Everything after 850 is there; before it, the spool cannot say.
        assert_eq!(
            inserted(&dir.0, Lsn(850)).unwrap(),
            (9..=20).collect::<Vec<_>>()
        );
        let later = inserted(&dir.0, Lsn(1208)).unwrap();
        assert!(
            later.ends_with(&[13, 14, 15, 16, 17, 18, 19, 20]),
            "{later:?}"
        );
        match inserted(&dir.0, Lsn(700)) {
            Err(SpoolError::Gap {
                covered,
                previous_end,
                commit,
                ..
            }) => assert_eq!(
                (covered, previous_end, commit),
                (Lsn(700), Lsn(850), Lsn(900))
            ),
            other => panic!("{other:?}"),
        }
        // Segments removed after being applied: a target behind them finds the gap too.
        let segs = segments(&dir.0).unwrap();
        fs::remove_file(&segs[0].1).unwrap();
        let err = inserted(&dir.0, Lsn(850)).unwrap_err();
        assert!(matches!(err, SpoolError::Gap { .. }), "{err}");
        assert!(err.to_string().contains("after 0/352"), "{err}");
        // Reading everything it holds (tail) is not held to a start.
        assert!(inserted(&dir.0, Lsn::INVALID).is_ok());
    }

    #[test]
    fn transactions_come_back_across_segments() {
        let dir = TempDir::new("roundtrip");
        assert_eq!(write(&dir.0, 1, 20, 300), Lsn(2008));
        let segs = segments(&dir.0).unwrap();
        assert!(segs.len() > 3, "{segs:?}");
        assert_eq!(
            inserted(&dir.0, Lsn::INVALID).unwrap(),
            (1..=20).collect::<Vec<_>>()
        );
        // A reader from a later position starts at the segment holding it, and every segment
        // carries the relation it needs.
        let from = segs[2].0;
        let rows = inserted(&dir.0, from).unwrap();
        assert_eq!(rows.first().copied(), Some(from.0 / 100));
        // Reopening continues after what is there.
        let (writer, recovered) = SpoolWriter::open(&dir.0, 300).unwrap();
        assert_eq!(recovered.durable_end, Lsn(2008));
        assert_eq!(recovered.cut_bytes, 0);
        assert_eq!(
            writer.bytes(),
            segs.iter()
                .map(|(_, p)| fs::metadata(p).unwrap().len())
                .sum::<u64>()
        );
    }

    #[test]
    fn a_relation_before_the_first_transaction_starts_the_first_segment() {
        let dir = TempDir::new("early");
        let (mut writer, _) = SpoolWriter::open(&dir.0, 1 << 20).unwrap();
        let relation = LogicalMessage::Relation {
            xid: None,
            relation: relation(),
        };
        writer.append(Lsn(1), &relation).unwrap();
        let insert = &transaction(1)[2];
        assert!(matches!(
            writer.append(insert.0, &insert.1),
            Err(SpoolError::OutsideTransaction("Insert"))
        ));
        for (lsn, m) in transaction(1) {
            writer.append(lsn, &m).unwrap();
        }
        writer.flush().unwrap();
        let mut reader = SpoolReader::open(&dir.0, Lsn::INVALID).unwrap();
        assert_eq!(reader.next_message().unwrap().unwrap().1, relation);
    }

    #[test]
    fn a_reader_follows_the_writer() {
        let dir = TempDir::new("follow");
        let (mut writer, _) = SpoolWriter::open(&dir.0, 400).unwrap();
        let mut reader = SpoolReader::open(&dir.0, Lsn::INVALID).unwrap();
        let mut rows = Vec::new();
        let drain = |reader: &mut SpoolReader, rows: &mut Vec<u64>| {
            while let Some((_, m)) = reader.next_message().unwrap() {
                if let LogicalMessage::Insert { new, .. } = m {
                    let Value::Text(b) = &new[0] else { panic!() };
                    rows.push(std::str::from_utf8(b).unwrap().parse().unwrap());
                }
            }
        };
        for batch in [1..=3u64, 4..=9, 10..=10] {
            for n in batch {
                for (lsn, m) in transaction(n) {
                    writer.append(lsn, &m).unwrap();
                }
            }
            writer.flush().unwrap();
            drain(&mut reader, &mut rows);
        }
        assert_eq!(rows, (1..=10).collect::<Vec<_>>());
        assert!(segments(&dir.0).unwrap().len() > 2);

        // Half a record at the end (the writer is in the middle of it): wait, then go on.
        for (lsn, m) in transaction(11) {
            writer.append(lsn, &m).unwrap();
        }
        let (_, path) = segments(&dir.0).unwrap().pop().unwrap();
        let before = fs::metadata(&path).unwrap().len();
        writer.flush().unwrap();
        let data = fs::read(&path).unwrap();
        fs::write(&path, &data[..before as usize + 7]).unwrap();
        drain(&mut reader, &mut rows);
        assert_eq!(rows.len(), 10);
        fs::write(&path, &data).unwrap();
        drain(&mut reader, &mut rows);
        assert_eq!(rows.last(), Some(&11));
    }

    #[test]
    fn a_summary_says_what_the_spool_holds() {
        let dir = TempDir::new("summary");
        assert_eq!(summary(&dir.0).unwrap(), SpoolSummary::default());
        write(&dir.0, 3, 9, 300);
        let held = summary(&dir.0).unwrap();
        assert_eq!(held.oldest, Some(Lsn(300)));
        assert_eq!(held.newest_end, Some(Lsn(908)));
        assert!(held.segments > 1);
        let files: u64 = segments(&dir.0)
            .unwrap()
            .iter()
            .map(|(_, p)| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(held.bytes, files);
    }

    #[test]
    fn applied_segments_go_after_retention_or_when_over_the_limit() {
        let dir = TempDir::new("retain");
        write(&dir.0, 1, 20, 300);
        let before = segments(&dir.0).unwrap();
        let long = std::time::Duration::from_secs(3600);
        // Nothing applied: nothing goes, whatever the size.
        assert_eq!(remove_applied(&dir.0, Lsn::INVALID, long, 0).unwrap(), 0);
        // Applied but young, and under the limit: kept for replay.
        assert_eq!(
            remove_applied(&dir.0, Lsn(1008), long, u64::MAX).unwrap(),
            0
        );
        // Over the limit: applied segments go, oldest first, until under it.
        let removed = remove_applied(&dir.0, Lsn(1008), long, 0).unwrap();
        assert!(removed > 0);
        let after = segments(&dir.0).unwrap();
        assert!(after.len() < before.len());
        assert!(
            after[0].0 <= Lsn(1000),
            "the segment holding unapplied transactions stays"
        );
        let rows = inserted(&dir.0, Lsn::INVALID).unwrap();
        assert!(rows.contains(&11) && rows.contains(&20), "{rows:?}");
        // Retention zero: everything applied goes, but never the newest segment.
        remove_applied(&dir.0, Lsn(2008), std::time::Duration::ZERO, u64::MAX).unwrap();
        assert_eq!(segments(&dir.0).unwrap().len(), 1);
        assert_eq!(inserted(&dir.0, Lsn::INVALID).unwrap().last(), Some(&20));
    }

    #[test]
    fn a_torn_tail_and_an_interrupted_transaction_are_cut() {
        let dir = TempDir::new("torn");
        write(&dir.0, 1, 5, 1 << 20);
        let (_, path) = segments(&dir.0).unwrap().pop().unwrap();
        let len = fs::metadata(&path).unwrap().len();
        // kill -9 while writing: the last record is half there.
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let (mut writer, recovered) = SpoolWriter::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovered.durable_end, Lsn(408), "transaction 5 is gone");
        assert!(recovered.cut_bytes > 5);
        assert_eq!(inserted(&dir.0, Lsn::INVALID).unwrap(), vec![1, 2, 3, 4]);
        // A transaction begun but not committed when the process died is cut too.
        for (lsn, m) in transaction(5).into_iter().take(3) {
            writer.append(lsn, &m).unwrap();
        }
        writer.flush().unwrap();
        drop(writer);
        let (_, recovered) = SpoolWriter::open(&dir.0, 1 << 20).unwrap();
        assert_eq!(recovered.durable_end, Lsn(408));
        // Staging resends transaction 5; it is spooled once.
        write(&dir.0, 5, 6, 1 << 20);
        assert_eq!(
            inserted(&dir.0, Lsn::INVALID).unwrap(),
            vec![1, 2, 3, 4, 5, 6]
        );
    }

    #[test]
    fn damage_in_the_middle_is_an_error_naming_segment_and_offset() {
        let dir = TempDir::new("flip");
        write(&dir.0, 1, 5, 1 << 20);
        let (_, path) = segments(&dir.0).unwrap().pop().unwrap();
        let mut data = fs::read(&path).unwrap();
        data[HEADER + 3] ^= 0x01;
        fs::write(&path, &data).unwrap();
        let err = inserted(&dir.0, Lsn::INVALID).unwrap_err();
        assert!(
            matches!(&err, SpoolError::Corrupt { path: p, offset: 0, .. } if *p == path),
            "{err}"
        );
        let err = SpoolWriter::open(&dir.0, 1 << 20).err().expect("refused");
        assert!(err.to_string().contains("damaged at byte 0"), "{err}");
    }
}
