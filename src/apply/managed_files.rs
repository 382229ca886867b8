//! Managed files: the rows of a table configured with `files = { dir, path_column,
//! content_column }` are published as files under `dir`, in the same order and batches as
//! production receives them.
//!
//! A change is written to a temporary file beside its target as soon as it is received (so a
//! batch's file contents are never held in memory), synced, and renamed into place with the
//! rest of its batch just before production commits that batch. A crash in between leaves the
//! files ahead of production, never behind: the batch is applied again and rewrites identical
//! content. A batch rolled back (conflict, error, stop) removes its temporary files.
//!
//! The file I/O blocks the pipeline's task while it runs, which is deliberate: managed-file
//! tables change rarely, and the replication reader goes on in a task of its own meanwhile.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use crate::catalog::TableMeta;
use crate::config::{FilesConfig, TableName};
use crate::model::{ReplicaIdentity, Tuple, Value};

/// Temporary files end with this; left over by a crash, they are removed at the next start.
const STAGED_SUFFIX: &str = ".stagingprop-tmp";

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "managed files of {table}: files.{field} names {column}, which is not a column of the \
         table on production; fix the config"
    )]
    NoColumn {
        table: TableName,
        field: &'static str,
        column: String,
    },
    #[error(
        "managed files of {table}: staging sends changes of the table without its whole old \
         row, so a DELETE or a path change would not say which file to remove or what the moved \
         file holds. On staging run ALTER TABLE {table} REPLICA IDENTITY FULL; changes made \
         before that still lack it: take files = out of the table's config to get past them (its \
         rows keep replicating), then put it back and publish the files again with `copy`"
    )]
    NotFullIdentity { table: TableName },
    #[error(
        "managed files of {table}: cannot {what} {}: {source}. Fix the directory (permissions, \
         space) and run the command again: sync rolls back the batch on production and applies \
         it again, copy records no hand-off until every file is written",
        path.display()
    )]
    Io {
        table: TableName,
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "managed files of {table}: the content of {path:?} is not in bytea's hex output format; \
         set bytea_output = 'hex' on staging"
    )]
    NotHex { table: TableName, path: String },
    #[error("managed files of {table}: binary values are not published (sync streams text)")]
    Binary { table: TableName },
}

/// Counters for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStats {
    /// Files written (or moved to a new path).
    pub written: u64,
    pub removed: u64,
    /// Changes whose path was refused (empty, absolute outside `dir`, or with `..`).
    pub refused: u64,
}

impl FileStats {
    pub fn add(&mut self, other: FileStats) {
        self.written += other.written;
        self.removed += other.removed;
        self.refused += other.refused;
    }
}

/// One managed-file table, with its columns as production orders them.
#[derive(Debug)]
struct FileTable {
    name: TableName,
    dir: PathBuf,
    path: usize,
    content: usize,
    /// bytea content arrives as hex text and is decoded; any other type is written as its
    /// text output.
    bytea: bool,
}

/// What publishing a batch does, in staging's order. Each sets what a path holds (or that it
/// holds nothing), whatever was there: applying any tail of a sequence of them again, as a
/// replay after a crash does, ends in the same files.
#[derive(Debug)]
enum FileOp {
    /// Moves `staged` (written and synced already) to `target`.
    Write {
        staged: PathBuf,
        target: PathBuf,
    },
    Remove {
        target: PathBuf,
    },
    /// TRUNCATE: every file under `dir`.
    Clear {
        dir: PathBuf,
    },
}

/// Publishes the managed-file tables' changes batch by batch.
#[derive(Debug, Default)]
pub struct Publisher {
    tables: HashMap<usize, FileTable>,
    /// The open batch's operations, oldest first (with the table each belongs to).
    open: Vec<(usize, FileOp)>,
    /// The closed batch's operations, published just before its COMMIT.
    closed: Vec<(usize, FileOp)>,
    pub stats: FileStats,
}

impl Publisher {
    /// Sets up publishing for `tables` (applier table index, files config, production
    /// metadata) and creates the directories.
    pub fn new(tables: Vec<(usize, &FilesConfig, &TableMeta)>) -> Result<Publisher, FileError> {
        let mut publisher = Publisher::default();
        for (index, files, meta) in tables {
            let name = meta.table_name();
            let column = |field: &'static str, column: &str| {
                meta.column_index(column)
                    .ok_or_else(|| FileError::NoColumn {
                        table: name.clone(),
                        field,
                        column: column.to_owned(),
                    })
            };
            let path = column("path_column", &files.path_column)?;
            let content = column("content_column", &files.content_column)?;
            let table = FileTable {
                bytea: meta.columns[content].type_sql == "bytea",
                name,
                dir: files.dir.clone(),
                path,
                content,
            };
            fs::create_dir_all(&table.dir).map_err(|e| table.io("create", &table.dir, e))?;
            publisher.tables.insert(index, table);
        }
        Ok(publisher)
    }

    /// Removes the temporary files a crash left behind (at the start of a session, before any
    /// other publisher of the same tables stages files).
    pub fn remove_leftovers(&self) -> Result<(), FileError> {
        for table in self.tables.values() {
            let left = remove_staged(&table.dir).map_err(|(p, e)| table.io("remove", &p, e))?;
            if left > 0 {
                tracing::info!(
                    table = %table.name,
                    "removed {left} temporary file(s) an earlier run left in {}",
                    table.dir.display()
                );
            }
        }
        Ok(())
    }

    /// Staging must send the whole old row with every UPDATE and DELETE of a managed-file
    /// table (`REPLICA IDENTITY FULL`): its path says which file goes, and its content (sent
    /// in full even when TOASTed) what a file moved to a new path holds.
    pub fn check_identity(&self, table: usize, identity: ReplicaIdentity) -> Result<(), FileError> {
        match self.tables.get(&table) {
            Some(t) if identity != ReplicaIdentity::Full => Err(FileError::NotFullIdentity {
                table: t.name.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// Takes one row change in production column order: `old` is the old row as staging sent
    /// it (`None` for an INSERT), `new` the new row (`None` for a DELETE). Writes new content
    /// to a temporary file now.
    pub fn stage(
        &mut self,
        table: usize,
        old: Option<&Tuple>,
        new: Option<&Tuple>,
    ) -> Result<(), FileError> {
        let Some(t) = self.tables.get(&table) else {
            return Ok(());
        };
        let (path_column, content_column) = (t.path, t.content);
        let old_path = old.and_then(|row| text(&row[path_column]));
        let new_path = match new.map(|row| &row[path_column]) {
            Some(Value::UnchangedToast) => old_path,
            Some(value) => text(value),
            None => None,
        };
        let moved = old_path.is_some_and(|p| Some(p) != new_path);
        let content = match new.map(|row| &row[content_column]) {
            // Unchanged and not sent: a file that stays where it is stays as it is; one that
            // moves takes the old row's content.
            Some(Value::UnchangedToast) if moved => old.map(|row| &row[content_column]),
            content => content,
        };
        let mut ops = Vec::new();
        if let Some(from) = old_path.filter(|_| moved) {
            ops.extend(
                self.target(table, from)
                    .map(|target| FileOp::Remove { target }),
            );
        }
        if let (Some(content), Some(path)) = (content, new_path) {
            match content {
                Value::UnchangedToast if moved => {
                    tracing::warn!(
                        table = %self.tables[&table].name,
                        "staging did not send the content of the file moved to {:?}; it is \
                         published with the row's next content change",
                        String::from_utf8_lossy(path)
                    );
                }
                Value::UnchangedToast => {}
                Value::Null => {
                    if let Some(target) = self.target(table, path) {
                        ops.push(FileOp::Remove { target });
                    }
                }
                Value::Text(bytes) => {
                    let body = self.body(table, bytes, path)?;
                    if let Some(target) = self.target(table, path) {
                        let staged = self.write_staged(table, &target, &body)?;
                        ops.push(FileOp::Write { staged, target });
                    }
                }
                Value::Binary(_) => {
                    return Err(FileError::Binary {
                        table: self.tables[&table].name.clone(),
                    });
                }
            }
        }
        self.open.extend(ops.into_iter().map(|op| (table, op)));
        Ok(())
    }

    /// TRUNCATE of `table`: its files go when the batch is published.
    pub fn clear(&mut self, table: usize) {
        if let Some(t) = self.tables.get(&table) {
            let dir = t.dir.clone();
            self.open.push((table, FileOp::Clear { dir }));
        }
    }

    /// A file's content from its column's text: bytea's hex decoded, any other type as is.
    fn body<'a>(
        &self,
        table: usize,
        text: &'a [u8],
        path: &[u8],
    ) -> Result<Cow<'a, [u8]>, FileError> {
        let t = &self.tables[&table];
        if !t.bytea {
            return Ok(Cow::Borrowed(text));
        }
        decode_hex(text)
            .map(Cow::Owned)
            .ok_or_else(|| FileError::NotHex {
                table: t.name.clone(),
                path: String::from_utf8_lossy(path).into_owned(),
            })
    }

    /// A point in the open batch to [`Publisher::rewind`] to.
    pub fn mark(&self) -> usize {
        self.open.len()
    }

    /// Forgets the open batch's operations after `mark` (a subtransaction rolled back).
    pub fn rewind(&mut self, mark: usize) {
        for (_, op) in self.open.drain(mark.min(self.open.len())..) {
            if let FileOp::Write { staged, .. } = op {
                let _ = fs::remove_file(staged);
            }
        }
    }

    /// The open batch ends: its operations wait for [`Publisher::publish`].
    pub fn close(&mut self) {
        self.closed.append(&mut self.open);
    }

    /// Puts the closed batch's files in place, in staging's order, and syncs the directories.
    pub fn publish(&mut self) -> Result<(), FileError> {
        let mut dirs = BTreeMap::new();
        let ops = std::mem::take(&mut self.closed);
        let mut ops = ops.into_iter();
        while let Some((table, op)) = ops.next() {
            if let Err(e) = self.apply(table, &op, &mut dirs) {
                // What stays staged is removed; the batch is applied again next time.
                for (_, later) in std::iter::once((table, op)).chain(ops) {
                    if let FileOp::Write { staged, .. } = later {
                        let _ = fs::remove_file(staged);
                    }
                }
                return Err(e);
            }
        }
        for (dir, table) in dirs {
            sync_dir(&dir).map_err(|e| self.io_error(table, "sync", &dir, e))?;
        }
        Ok(())
    }

    /// Abandons the open and the closed batch: their temporary files are removed.
    pub fn discard(&mut self) {
        for (_, op) in self.open.drain(..).chain(self.closed.drain(..)) {
            if let FileOp::Write { staged, .. } = op {
                let _ = fs::remove_file(staged);
            }
        }
    }

    fn apply(
        &mut self,
        table: usize,
        op: &FileOp,
        dirs: &mut BTreeMap<PathBuf, usize>,
    ) -> Result<(), FileError> {
        match op {
            FileOp::Write { staged, target } => {
                fs::rename(staged, target).map_err(|e| self.io_error(table, "write", target, e))?;
                self.stats.written += 1;
                dirs.insert(parent(target), table);
            }
            FileOp::Remove { target } => match fs::remove_file(target) {
                Ok(()) => {
                    self.stats.removed += 1;
                    dirs.insert(parent(target), table);
                }
                // Nothing to remove (its directory may not even exist): nothing to sync either.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io_error(table, "remove", target, e)),
            },
            FileOp::Clear { dir } => {
                let removed = clear(dir).map_err(|(p, e)| self.io_error(table, "remove", &p, e))?;
                self.stats.removed += removed.len() as u64;
                dirs.extend(removed.iter().map(|p| (parent(p), table)));
            }
        }
        Ok(())
    }

    /// Where `raw` is published for `table`, or `None` (counted and logged) when the path
    /// would leave the table's directory.
    fn target(&mut self, table: usize, raw: &[u8]) -> Option<PathBuf> {
        let t = &self.tables[&table];
        let resolved = std::str::from_utf8(raw)
            .ok()
            .and_then(|path| resolve(&t.dir, path));
        if resolved.is_none() {
            self.stats.refused += 1;
            tracing::warn!(
                table = %t.name,
                "not publishing a file at {:?}: the path must stay inside {} (no '..', not empty)",
                String::from_utf8_lossy(raw),
                t.dir.display()
            );
        }
        resolved
    }

    /// Writes `body` to a new temporary file beside `target` and syncs it.
    fn write_staged(
        &mut self,
        table: usize,
        target: &Path,
        body: &[u8],
    ) -> Result<PathBuf, FileError> {
        write_aside(target, body).map_err(|e| self.io_error(table, "write", target, e))
    }

    fn io_error(
        &self,
        table: usize,
        what: &'static str,
        path: &Path,
        source: std::io::Error,
    ) -> FileError {
        self.tables[&table].io(what, path, source)
    }
}

impl Drop for Publisher {
    /// A session that ends with a batch still open leaves no temporary files behind.
    fn drop(&mut self) {
        self.discard();
    }
}

impl FileTable {
    fn io(&self, what: &'static str, path: &Path, source: std::io::Error) -> FileError {
        io_error(&self.name, what, path, source)
    }
}

fn io_error(
    table: &TableName,
    what: &'static str,
    path: &Path,
    source: std::io::Error,
) -> FileError {
    FileError::Io {
        table: table.clone(),
        what,
        path: path.to_owned(),
        source,
    }
}

/// Publishes a whole table's files anew, row by row (after `copy` seeded the table): every
/// file is written aside and renamed into place; at the end, files under the directory that
/// no row names are removed.
pub struct Republish {
    table: TableName,
    dir: PathBuf,
    seen: HashSet<PathBuf>,
    dirs: HashSet<PathBuf>,
    pub stats: FileStats,
}

impl Republish {
    pub fn new(table: TableName, files: &FilesConfig) -> Result<Republish, FileError> {
        let dir = files.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| io_error(&table, "create", &dir, e))?;
        remove_staged(&dir).map_err(|(p, e)| io_error(&table, "remove", &p, e))?;
        Ok(Republish {
            table,
            dir,
            seen: HashSet::new(),
            dirs: HashSet::new(),
            stats: FileStats::default(),
        })
    }

    /// One row: its path and content (`None`: the row has no file).
    pub fn row(&mut self, path: Option<&str>, content: Option<&[u8]>) -> Result<(), FileError> {
        let (Some(path), Some(content)) = (path, content) else {
            return Ok(());
        };
        let Some(target) = resolve(&self.dir, path) else {
            self.stats.refused += 1;
            tracing::warn!(
                table = %self.table,
                "not publishing a file at {path:?}: the path must stay inside {} (no '..', not empty)",
                self.dir.display()
            );
            return Ok(());
        };
        write_aside(&target, content)
            .and_then(|staged| fs::rename(&staged, &target))
            .map_err(|e| io_error(&self.table, "write", &target, e))?;
        self.stats.written += 1;
        self.dirs.insert(parent(&target));
        self.seen.insert(target);
        Ok(())
    }

    /// Removes the files no row named and makes everything durable.
    pub fn finish(mut self) -> Result<FileStats, FileError> {
        let mut files = Vec::new();
        walk(&self.dir, &mut files).map_err(|e| io_error(&self.table, "read", &self.dir, e))?;
        for (path, _) in files {
            if !self.seen.contains(&path) {
                fs::remove_file(&path).map_err(|e| io_error(&self.table, "remove", &path, e))?;
                self.stats.removed += 1;
                self.dirs.insert(parent(&path));
            }
        }
        for dir in &self.dirs {
            sync_dir(dir).map_err(|e| io_error(&self.table, "sync", dir, e))?;
        }
        Ok(self.stats)
    }
}

/// Writes `body` to a new temporary file beside `target` and syncs it. The name is unique in
/// the process: the sessions of a streamed transaction and of the main batch stage at once.
fn write_aside(target: &Path, body: &[u8]) -> std::io::Result<PathBuf> {
    static STAGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = STAGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = target.file_name().unwrap_or_default().to_string_lossy();
    let staged = parent(target).join(format!(".{name}.{}.{n}{STAGED_SUFFIX}", std::process::id()));
    let write = || -> std::io::Result<()> {
        create_parent(target)?;
        let mut file = fs::File::create(&staged)?;
        file.write_all(body)?;
        file.sync_data()
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&staged);
    })?;
    Ok(staged)
}

fn text(value: &Value) -> Option<&[u8]> {
    match value {
        Value::Text(b) => Some(b),
        _ => None,
    }
}

/// `path` under `dir`: leading slashes are taken as relative to `dir`; `None` for an empty
/// path or one with `..` (or anything else that could leave `dir`).
fn resolve(dir: &Path, path: &str) -> Option<PathBuf> {
    let relative = Path::new(path.trim_start_matches('/'));
    let mut resolved = dir.to_path_buf();
    let mut parts = 0;
    for component in relative.components() {
        match component {
            Component::Normal(part) => {
                resolved.push(part);
                parts += 1;
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    let is_staged_name = resolved
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(STAGED_SUFFIX));
    (parts > 0 && !path.ends_with('/') && !is_staged_name).then_some(resolved)
}

/// bytea's hex output (`\x0a1b...`) as bytes.
fn decode_hex(text: &[u8]) -> Option<Vec<u8>> {
    let digits = text.strip_prefix(b"\\x")?;
    if digits.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    digits
        .chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn create_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => fs::create_dir_all(dir),
        None => Ok(()),
    }
}

/// Makes renames and removals in `dir` durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Every file under `dir`, recursively, with whether it is a temporary one.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, bool)>) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, out)?;
        } else {
            let staged = entry.file_name().to_string_lossy().ends_with(STAGED_SUFFIX);
            out.push((path, staged));
        }
    }
    Ok(())
}

/// Removes the published files under `dir` (temporary ones stay: a later change of the same
/// batch may own them); returns what it removed.
fn clear(dir: &Path) -> Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    remove_where(dir, false)
}

/// Removes the temporary files under `dir`; returns how many.
fn remove_staged(dir: &Path) -> Result<usize, (PathBuf, std::io::Error)> {
    remove_where(dir, true).map(|removed| removed.len())
}

fn remove_where(dir: &Path, staged: bool) -> Result<Vec<PathBuf>, (PathBuf, std::io::Error)> {
    let mut files = Vec::new();
    walk(dir, &mut files).map_err(|e| (dir.to_path_buf(), e))?;
    let mut removed = Vec::new();
    for (path, is_staged) in files {
        if is_staged != staged {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err((path, e)),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::ColumnMeta;
    use bytes::Bytes;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("stagingprop-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn meta(content_type: &str) -> TableMeta {
        let column = |name: &str, type_sql: &str| ColumnMeta::new(name, type_sql);
        TableMeta {
            schema: "public".into(),
            name: "managedfile".into(),
            columns: vec![
                column("id", "bigint"),
                column("path", "text"),
                column("content", content_type),
            ],
            key: vec![0],
            identity_full: false,
            partitioned: false,
        }
    }

    fn publisher(dir: &Path, content_type: &str) -> Publisher {
        let files = FilesConfig {
            dir: dir.to_path_buf(),
            path_column: "path".into(),
            content_column: "content".into(),
        };
        Publisher::new(vec![(3, &files, &meta(content_type))]).unwrap()
    }

    fn row(id: &str, path: Option<&str>, content: Value) -> Tuple {
        vec![
            Value::Text(Bytes::from(id.to_owned())),
            path.map_or(Value::Null, |p| Value::Text(Bytes::from(p.to_owned()))),
            content,
        ]
    }

    /// Stages the insert of row `id` with a file at `path`.
    fn insert(p: &mut Publisher, id: &str, path: &str, body: &str) {
        p.stage(3, None, Some(&row(id, Some(path), content(body))))
            .unwrap();
    }

    fn content(text: &str) -> Value {
        Value::Text(Bytes::from(text.to_owned()))
    }

    /// Every file under `dir` with its content, relative paths.
    fn tree(dir: &Path) -> Vec<(String, String)> {
        let mut files = Vec::new();
        walk(dir, &mut files).unwrap();
        let mut out: Vec<(String, String)> = files
            .into_iter()
            .map(|(p, _)| {
                (
                    p.strip_prefix(dir).unwrap().to_string_lossy().into_owned(),
                    String::from_utf8_lossy(&fs::read(&p).unwrap()).into_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(p, c)| (p.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn paths_stay_inside_the_directory() {
        let dir = Path::new("/srv/assets");
        assert_eq!(
            resolve(dir, "img/a.png"),
            Some(PathBuf::from("/srv/assets/img/a.png"))
        );
        assert_eq!(
            resolve(dir, "/img/./a.png"),
            Some(PathBuf::from("/srv/assets/img/a.png"))
        );
        for bad in [
            "",
            "/",
            "../etc/passwd",
            "img/../../x",
            "img/",
            "a.stagingprop-tmp",
        ] {
            assert_eq!(resolve(dir, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bytea_hex_output_decodes() {
        assert_eq!(decode_hex(b"\\x00ff7F"), Some(vec![0, 255, 127]));
        assert_eq!(decode_hex(b"\\x"), Some(vec![]));
        assert_eq!(decode_hex(b"\\x0"), None);
        assert_eq!(decode_hex(b"\\xzz"), None);
        assert_eq!(decode_hex(b"00"), None);
    }

    #[test]
    fn a_batch_appears_only_when_published_and_in_staging_order() {
        let dir = scratch("order");
        let mut p = publisher(&dir, "text");
        let a = row("1", Some("a/one.txt"), content("first"));
        p.stage(3, None, Some(&a)).unwrap();
        insert(&mut p, "1", "a/one.txt", "second");
        insert(&mut p, "2", "two.txt", "2");
        // Staged, not published: only temporary files exist.
        assert!(tree(&dir).iter().all(|(p, _)| p.ends_with(STAGED_SUFFIX)));
        p.close();
        p.publish().unwrap();
        assert_eq!(
            tree(&dir),
            pairs(&[("a/one.txt", "second"), ("two.txt", "2")])
        );

        // A path change with unchanged content writes the old row's content at the new path;
        // a delete removes the file.
        let old = row("1", Some("a/one.txt"), content("second"));
        let moved = row("1", Some("b/one.txt"), Value::UnchangedToast);
        p.stage(3, Some(&old), Some(&moved)).unwrap();
        p.stage(3, Some(&row("2", Some("two.txt"), Value::Null)), None)
            .unwrap();
        p.close();
        p.publish().unwrap();
        assert_eq!(tree(&dir), pairs(&[("b/one.txt", "second")]));
        assert_eq!(p.stats.written, 4);
        assert_eq!(p.stats.removed, 2);

        // Published again from the start of the second batch (a replay after a crash before
        // its COMMIT): the same files.
        p.stage(3, Some(&old), Some(&moved)).unwrap();
        p.stage(3, Some(&row("2", Some("two.txt"), Value::Null)), None)
            .unwrap();
        p.close();
        p.publish().unwrap();
        assert_eq!(tree(&dir), pairs(&[("b/one.txt", "second")]));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_discarded_batch_leaves_nothing_and_truncate_clears() {
        let dir = scratch("discard");
        let mut p = publisher(&dir, "bytea");
        insert(&mut p, "1", "kept.bin", "\\x6b6570");
        p.close();
        p.publish().unwrap();
        insert(&mut p, "2", "gone.bin", "\\x00");
        p.close();
        insert(&mut p, "3", "open.bin", "\\x01");
        p.discard();
        assert_eq!(tree(&dir), pairs(&[("kept.bin", "kep")]));

        // Refused paths are counted, not written.
        insert(&mut p, "4", "../escape", "\\x01");
        assert_eq!(p.stats.refused, 1);
        assert!(!dir.parent().unwrap().join("escape").exists());

        // TRUNCATE, then an insert in the same batch: only the insert remains.
        p.clear(3);
        insert(&mut p, "5", "after.bin", "\\x41");
        p.close();
        p.publish().unwrap();
        assert_eq!(tree(&dir), pairs(&[("after.bin", "A")]));

        // A temporary file left by a crash goes at the next start.
        fs::write(dir.join(format!(".x.1.1{STAGED_SUFFIX}")), b"x").unwrap();
        publisher(&dir, "bytea").remove_leftovers().unwrap();
        assert_eq!(tree(&dir), pairs(&[("after.bin", "A")]));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// One staging change of the model below: (old row, new row), as sync hands them over.
    type Change = (Option<Tuple>, Option<Tuple>);

    /// Random changes of a few rows with unique paths, in batches, and the files they leave.
    /// `steps` drive it: (what, row, path, content) picked modulo what is possible.
    fn model(
        steps: &[(u8, u8, u8, u8)],
        per_batch: usize,
    ) -> (Vec<Vec<Change>>, Vec<(String, String)>) {
        const PATHS: [&str; 6] = ["a", "b", "c/d", "c/e", "f/g/h", "i"];
        // id -> (path, content); contents are long enough to be "TOASTed" (sent as unchanged).
        let mut rows: HashMap<u8, (usize, Option<String>)> = HashMap::new();
        let tuple =
            |id: u8, path: usize, content: Value| row(&id.to_string(), Some(PATHS[path]), content);
        let text = |c: &Option<String>| c.as_deref().map_or(Value::Null, self::content);
        let mut changes = Vec::new();
        for &(what, id, path, body) in steps {
            let id = id % 5;
            let free: Vec<usize> = (0..PATHS.len())
                .filter(|p| !rows.values().any(|(q, _)| q == p))
                .collect();
            let body = (body % 4 != 0).then(|| format!("body {body}"));
            match (what % 5, rows.get(&id).cloned()) {
                (_, None) if !free.is_empty() => {
                    let path = free[path as usize % free.len()];
                    changes.push((None, Some(tuple(id, path, text(&body)))));
                    rows.insert(id, (path, body));
                }
                (_, None) => {}
                (0, Some((old_path, old_body))) if !free.is_empty() => {
                    // The path changes, the content is not sent.
                    let path = free[path as usize % free.len()];
                    changes.push((
                        Some(tuple(id, old_path, text(&old_body))),
                        Some(tuple(id, path, Value::UnchangedToast)),
                    ));
                    rows.insert(id, (path, old_body));
                }
                (1, Some((old_path, old_body))) => {
                    changes.push((
                        Some(tuple(id, old_path, text(&old_body))),
                        Some(tuple(id, old_path, text(&body))),
                    ));
                    rows.insert(id, (old_path, body));
                }
                (2, Some((old_path, old_body))) => {
                    changes.push((Some(tuple(id, old_path, text(&old_body))), None));
                    rows.remove(&id);
                }
                (3, Some(_)) if id == 4 => {
                    // TRUNCATE, marked by a change with neither row.
                    changes.push((None, None));
                    rows.clear();
                }
                _ => {}
            }
        }
        let batches = changes
            .chunks(per_batch.max(1))
            .map(<[Change]>::to_vec)
            .collect();
        let mut files: Vec<(String, String)> = rows
            .values()
            .filter_map(|(p, c)| c.clone().map(|c| (PATHS[*p].to_owned(), c)))
            .collect();
        files.sort();
        (batches, files)
    }

    fn publish_batches(p: &mut Publisher, batches: &[Vec<Change>]) {
        for batch in batches {
            for (old, new) in batch {
                match (old, new) {
                    (None, None) => p.clear(3),
                    (old, new) => p.stage(3, old.as_ref(), new.as_ref()).unwrap(),
                }
            }
            p.close();
            p.publish().unwrap();
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// The files end as staging's rows say, and so they do when any tail of the batches is
        /// published again (production lost those commits, or a crash came before one).
        #[test]
        fn publishing_any_tail_again_ends_in_the_same_files(
            steps in proptest::collection::vec(proptest::prelude::any::<(u8, u8, u8, u8)>(), 1..40),
            per_batch in 1usize..6,
            replay_from in proptest::prelude::any::<usize>(),
        ) {
            let dir = scratch(&format!("replay-{}", steps.len()));
            let mut p = publisher(&dir, "text");
            let (batches, expected) = model(&steps, per_batch);
            publish_batches(&mut p, &batches);
            proptest::prop_assert_eq!(&tree(&dir), &expected);
            let from = replay_from % (batches.len() + 1);
            publish_batches(&mut p, &batches[from..]);
            proptest::prop_assert_eq!(&tree(&dir), &expected);
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_column_the_table_lacks_is_named() {
        let files = FilesConfig {
            dir: scratch("nocolumn"),
            path_column: "filename".into(),
            content_column: "content".into(),
        };
        let err = Publisher::new(vec![(0, &files, &meta("bytea"))]).unwrap_err();
        assert!(
            err.to_string().contains("files.path_column names filename"),
            "{err}"
        );
    }
}
