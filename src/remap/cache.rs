//! What sync knows of one remapped table's keys without asking production (sans-IO): a bounded
//! cache from staging keys to what production holds for them, and the text form of keys.

use std::collections::HashMap;

use bytes::Bytes;

/// What production holds for a staging key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    /// A mapping is stored in the key map: the row lives under this production key.
    Mapped(i64),
    /// No stored mapping, and production has a row under the same key.
    Same,
    /// No stored mapping; whether production has the key was not checked.
    Unmapped,
}

/// A bounded map from staging keys to [`Known`]. When full it starts over: every entry can be
/// read again from production, so forgetting is only slower, never wrong.
///
/// A cache loaded with a table's whole key map is *complete*: a key it lacks has no stored
/// mapping, so nobody needs to ask production. Starting over ends that.
#[derive(Debug)]
pub struct KeyCache {
    entries: HashMap<i64, Known>,
    capacity: usize,
    complete: bool,
}

impl KeyCache {
    pub fn new(capacity: usize) -> KeyCache {
        KeyCache {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            complete: false,
        }
    }

    /// What is known of `source`; `Unmapped` for a key a complete cache lacks.
    pub fn get(&self, source: i64) -> Option<Known> {
        match self.entries.get(&source) {
            Some(known) => Some(*known),
            None if self.complete => Some(Known::Unmapped),
            None => None,
        }
    }

    pub fn set(&mut self, source: i64, known: Known) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&source) {
            self.entries.clear();
            self.complete = false;
        }
        self.entries.insert(source, known);
    }

    /// Fills the cache with a table's whole key map, when it fits (`false` otherwise).
    pub fn load_complete(&mut self, mappings: impl ExactSizeIterator<Item = (i64, i64)>) -> bool {
        if mappings.len() * 2 > self.capacity {
            return false;
        }
        self.entries.clear();
        self.entries.reserve(mappings.len());
        self.entries
            .extend(mappings.map(|(source, target)| (source, Known::Mapped(target))));
        self.complete = true;
        true
    }

    #[cfg(test)]
    fn is_complete(&self) -> bool {
        self.complete
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.complete = false;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// An integer key from the text staging sent.
pub fn parse_key(text: &[u8]) -> Option<i64> {
    std::str::from_utf8(text).ok()?.trim().parse().ok()
}

/// A production key in the text form apply sends.
pub fn format_key(key: i64) -> Bytes {
    Bytes::from(key.to_string())
}

/// `source + offset`, or `None` when it leaves the 64-bit range.
pub fn offset_key(source: i64, offset: i64) -> Option<i64> {
    source.checked_add(offset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_full_cache_starts_over() {
        let mut cache = KeyCache::new(2);
        cache.set(1, Known::Same);
        cache.set(2, Known::Mapped(20));
        cache.set(2, Known::Mapped(21));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(2), Some(Known::Mapped(21)));
        cache.set(3, Known::Unmapped);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(1), None);
        assert_eq!(cache.get(3), Some(Known::Unmapped));
    }

    #[test]
    fn a_complete_cache_knows_what_is_unmapped() {
        let mut cache = KeyCache::new(4);
        assert_eq!(cache.get(9), None);
        assert!(!cache.load_complete([(1, 10), (2, 20), (3, 30)].into_iter()));
        assert!(cache.load_complete([(1, 10)].into_iter()));
        assert!(cache.is_complete());
        assert_eq!(cache.get(1), Some(Known::Mapped(10)));
        assert_eq!(cache.get(9), Some(Known::Unmapped));
        cache.set(5, Known::Same);
        cache.set(6, Known::Same);
        cache.set(7, Known::Same);
        // Full: it started over and no longer knows what it lacks.
        cache.set(8, Known::Same);
        assert!(!cache.is_complete());
        assert_eq!(cache.get(9), None);
        assert_eq!(cache.get(8), Some(Known::Same));
    }

    #[test]
    fn keys_in_text() {
        assert_eq!(parse_key(b"42"), Some(42));
        assert_eq!(parse_key(b"-7"), Some(-7));
        assert_eq!(parse_key(b"4x"), None);
        assert_eq!(parse_key(b"\xff"), None);
        assert_eq!(&format_key(-12)[..], b"-12");
        assert_eq!(offset_key(i64::MAX, 1), None);
        assert_eq!(offset_key(5, -10), Some(-5));
    }

    proptest! {
        #[test]
        fn text_round_trip(key in any::<i64>()) {
            prop_assert_eq!(parse_key(&format_key(key)), Some(key));
        }
    }
}
