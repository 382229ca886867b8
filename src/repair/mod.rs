//! Online repair's watermarks (sans-IO): the messages `verify --repair` writes into staging's
//! WAL around each chunk it re-reads, and the window sync keeps between them.
//!
//! For each chunk of a table that differs, the repair writes a *low* watermark (a transactional
//! logical message, prefix [`PREFIX`], in a transaction of its own), then reads the chunk's rows
//! on staging in one snapshot and writes, in that same transaction, the *high* watermark: the
//! rows production must take (those missing or different there when the repair looked) and the
//! keys it must lose. Every transaction the stream carries between the two may have changed a
//! row after the snapshot read it, so sync notes the keys of the chunk's table that the stream
//! changes between the watermarks ([`Windows`]) and, at the high watermark, applies the chunk
//! minus those keys ([`Chunk::without`]): the stream's version of them wins. The chunk is applied
//! in the high watermark's place in the stream, in the production transaction that records its
//! position, so it is applied exactly once; a window sync did not see open (it restarted between
//! the watermarks) makes the chunk *interrupted*, and the repair reads it again.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// The logical message prefix of a repair's watermarks.
pub const PREFIX: &str = "stagingprop.repair";

/// A row's key as text values, in the chunk's key order.
pub type KeyText = Vec<Option<String>>;

/// Which repair chunk a watermark belongs to, and for which target.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkId {
    /// `stagingprop.repairs.id` on the target.
    pub repair: i64,
    pub chunk: i32,
    /// The target it was computed for (its progress row's slot): other targets ignore it.
    pub target: String,
}

/// The high watermark's content: what production's rows of one chunk must become.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    #[serde(flatten)]
    pub id: ChunkId,
    /// `schema.table` as the config names it.
    pub table: String,
    /// Staging's managed columns, in table order, as the rows carry them.
    pub columns: Vec<String>,
    /// Indexes into `columns` of the key, in key order.
    pub key: Vec<usize>,
    /// Rows production must have as they are (text values).
    pub upserts: Vec<Vec<Option<String>>>,
    /// Keys production must not have.
    pub deletes: Vec<KeyText>,
}

/// One watermark message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Watermark {
    Low {
        #[serde(flatten)]
        id: ChunkId,
        table: String,
        /// The key columns' names, in key order (the stream's changes are matched by them).
        key: Vec<String>,
    },
    High(Chunk),
    /// A seeding repair (`resync`, a table added) starts: until its `Seeded`, the stream's
    /// changes of these tables that meet a missing row (or one already there) are the seed's
    /// to settle.
    Seeding {
        repair: i64,
        target: String,
        tables: Vec<String>,
    },
    /// Every chunk of the seeding repair is applied: its tables conflict as usual again.
    Seeded {
        repair: i64,
        target: String,
        tables: Vec<String>,
    },
}

impl Watermark {
    pub fn parse(content: &[u8]) -> Result<Watermark, String> {
        serde_json::from_slice(content)
            .map_err(|e| format!("a repair watermark ({PREFIX}) that cannot be read: {e}"))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a watermark serializes")
    }
}

impl Chunk {
    /// The chunk without the rows and keys the stream changed between the watermarks; how many
    /// it left out.
    pub fn without(mut self, changed: &HashSet<KeyText>) -> (Chunk, usize) {
        let before = self.upserts.len() + self.deletes.len();
        let key = self.key.clone();
        self.upserts.retain(|row| {
            let k: KeyText = key.iter().map(|&k| row[k].clone()).collect();
            !changed.contains(&k)
        });
        self.deletes.retain(|k| !changed.contains(k));
        let left_out = before - self.upserts.len() - self.deletes.len();
        (self, left_out)
    }
}

/// The open windows of one sync session: per chunk, the keys of its table the stream changed
/// since its low watermark.
#[derive(Debug, Default)]
pub struct Windows {
    open: HashMap<ChunkId, Window>,
}

#[derive(Debug)]
struct Window {
    table: String,
    key: Vec<String>,
    changed: HashSet<KeyText>,
    /// Something changed the table that cannot be told by key (a TRUNCATE, a change whose key
    /// was not sent, a transaction streamed while it was open): the chunk is read again.
    spoiled: bool,
}

/// What sync does at a high watermark.
#[derive(Debug, PartialEq, Eq)]
pub enum AtHigh {
    /// Apply it; `left_out` rows or keys the stream changed in the window were dropped.
    Apply { chunk: Chunk, left_out: usize },
    /// The window was not seen whole: record the chunk interrupted, apply nothing of it.
    Interrupted(Chunk),
}

impl Windows {
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// A low watermark: the window opens. A repair sends one chunk at a time to a target, so
    /// a window still open for the same target was abandoned (its repair stopped before the
    /// high watermark) and is closed.
    pub fn open(&mut self, id: ChunkId, table: String, key: Vec<String>) {
        self.open.retain(|open, _| open.target != id.target);
        self.open.insert(
            id,
            Window {
                table,
                key,
                changed: HashSet::new(),
                spoiled: false,
            },
        );
    }

    /// The key column names of `table` whose windows are open (one list per open window on
    /// it; usually none): the stream's changes of the table report their keys by these.
    pub fn keys_watched(&self, table: &str) -> Vec<&[String]> {
        self.open
            .values()
            .filter(|w| w.table == table)
            .map(|w| w.key.as_slice())
            .collect()
    }

    /// The stream changed the row of `table` whose values of columns `key` are `values`
    /// (`None`: it cannot tell which row).
    pub fn changed(&mut self, table: &str, key: &[String], values: Option<KeyText>) {
        for window in self.open.values_mut() {
            if window.table != table || window.key != key {
                continue;
            }
            match &values {
                Some(v) => {
                    window.changed.insert(v.clone());
                }
                None => window.spoiled = true,
            }
        }
    }

    /// Every open window of `table` (all of them with `None`) loses track.
    pub fn spoil(&mut self, table: Option<&str>) {
        for window in self.open.values_mut() {
            if table.is_none_or(|t| t == window.table) {
                window.spoiled = true;
            }
        }
    }

    /// A high watermark: its window closes.
    pub fn close(&mut self, chunk: Chunk) -> AtHigh {
        match self.open.remove(&chunk.id) {
            Some(window) if !window.spoiled && window.table == chunk.table => {
                let (chunk, left_out) = chunk.without(&window.changed);
                AtHigh::Apply { chunk, left_out }
            }
            _ => AtHigh::Interrupted(chunk),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(chunk: i32) -> ChunkId {
        ChunkId {
            repair: 1,
            chunk,
            target: "sp".into(),
        }
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    fn chunk(n: i32) -> Chunk {
        Chunk {
            id: id(n),
            table: "public.item".into(),
            columns: vec!["id".into(), "name".into()],
            key: vec![0],
            upserts: vec![vec![s("1"), s("one")], vec![s("2"), None]],
            deletes: vec![vec![s("3")], vec![s("4")]],
        }
    }

    #[test]
    fn watermarks_read_back_as_written() {
        let low = Watermark::Low {
            id: id(3),
            table: "public.item".into(),
            key: vec!["id".into()],
        };
        assert_eq!(Watermark::parse(low.to_json().as_bytes()), Ok(low));
        let high = Watermark::High(chunk(3));
        let text = high.to_json();
        assert!(text.contains("\"kind\":\"high\""), "{text}");
        assert_eq!(Watermark::parse(text.as_bytes()), Ok(high));
        let seeded = Watermark::Seeded {
            repair: 1,
            target: "sp".into(),
            tables: vec!["public.item".into()],
        };
        assert_eq!(Watermark::parse(seeded.to_json().as_bytes()), Ok(seeded));
        let bad = Watermark::parse(b"{\"kind\":\"middle\"}").unwrap_err();
        assert!(bad.contains(PREFIX), "{bad}");
    }

    #[test]
    fn the_stream_wins_for_keys_it_changed_inside_the_window() {
        let mut windows = Windows::default();
        let key = vec!["id".to_owned()];
        // Before the low watermark: not the window's business.
        windows.changed("public.item", &key, Some(vec![s("1")]));
        windows.open(id(1), "public.item".into(), key.clone());
        assert_eq!(windows.keys_watched("public.item"), vec![key.as_slice()]);
        assert!(windows.keys_watched("public.other").is_empty());
        windows.changed("public.item", &key, Some(vec![s("2")]));
        windows.changed("public.item", &key, Some(vec![s("4")]));
        windows.changed("public.other", &key, Some(vec![s("1")]));
        let AtHigh::Apply {
            chunk: applied,
            left_out,
        } = windows.close(chunk(1))
        else {
            panic!("the window was whole");
        };
        assert_eq!(left_out, 2);
        assert_eq!(applied.upserts, vec![vec![s("1"), s("one")]]);
        assert_eq!(applied.deletes, vec![vec![s("3")]]);
        assert!(windows.is_empty());
    }

    #[test]
    fn a_window_not_seen_whole_interrupts_its_chunk() {
        let mut windows = Windows::default();
        // No low watermark seen (sync restarted between the two).
        assert_eq!(windows.close(chunk(1)), AtHigh::Interrupted(chunk(1)));
        let key = vec!["id".to_owned()];
        windows.open(id(2), "public.item".into(), key.clone());
        windows.changed("public.item", &key, None);
        assert_eq!(windows.close(chunk(2)), AtHigh::Interrupted(chunk(2)));
        windows.open(id(3), "public.item".into(), key.clone());
        // An abandoned window of the same target closes when the next one opens.
        windows.open(id(5), "public.item".into(), key.clone());
        windows.open(id(3), "public.item".into(), key.clone());
        assert_eq!(windows.close(chunk(5)), AtHigh::Interrupted(chunk(5)));
        windows.spoil(Some("public.other"));
        assert!(matches!(windows.close(chunk(3)), AtHigh::Apply { .. }));
        windows.open(id(4), "public.item".into(), key);
        windows.spoil(None);
        assert_eq!(windows.close(chunk(4)), AtHigh::Interrupted(chunk(4)));
    }
}
