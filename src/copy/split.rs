//! How a group of tables is cut into work for several workers: large tables into block ranges
//! (read with a TID range scan in the shared snapshot), and the pieces packed into as many
//! transactions as there are workers. Plain functions, no I/O.
//!
//! A group cut this way is loaded by several target transactions that must become visible
//! together (a failed copy leaves every table untouched or complete), so each is prepared
//! (`PREPARE TRANSACTION`) under a global id naming the copy run, the group and the part, and
//! all are committed once the last one is prepared; [`parse_gid`] lets the next copy find what an
//! interrupted one left prepared.

/// A range of heap blocks `[start, end)`; `end: None` reaches past the last block, so rows in
/// blocks added after the table was measured are still read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    pub start: u64,
    pub end: Option<u64>,
}

impl BlockRange {
    /// The `WHERE` condition selecting this range's rows (a TID range scan, PostgreSQL 14+).
    pub fn condition(&self) -> String {
        let start = format!("ctid >= '({},0)'::tid", self.start);
        match self.end {
            Some(end) => format!("{start} AND ctid < '({end},0)'::tid"),
            None => start,
        }
    }
}

/// `blocks 0-1200`, `blocks 1200-end`.
impl std::fmt::Display for BlockRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.end {
            Some(end) => write!(f, "blocks {}-{end}", self.start),
            None => write!(f, "blocks {}-end", self.start),
        }
    }
}

/// `parts` adjacent ranges covering a table of `blocks` blocks (one when it has fewer blocks
/// than parts).
pub fn block_ranges(blocks: u64, parts: usize) -> Vec<BlockRange> {
    let parts = (parts.max(1) as u64).min(blocks.max(1));
    let bound = |i: u64| blocks * i / parts;
    (0..parts)
        .map(|i| BlockRange {
            start: bound(i),
            end: (i + 1 < parts).then(|| bound(i + 1)),
        })
        .collect()
}

/// One table, or one range of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Index of the table among the copied tables.
    pub table: usize,
    /// `None`: the whole table.
    pub range: Option<BlockRange>,
    /// Estimated bytes, for balancing.
    pub bytes: u64,
}

impl Piece {
    /// Whether this piece writes what is written once per table (its key-map entries): the whole
    /// table or its first range.
    pub fn first_of_table(&self) -> bool {
        self.range.is_none_or(|r| r.start == 0)
    }
}

/// Packs pieces into at most `bins` lists of about equal size, largest first into the lightest
/// list so far (longest-processing-time greedy); no list is empty.
pub fn pack(mut pieces: Vec<Piece>, bins: usize) -> Vec<Vec<Piece>> {
    let bins = bins.max(1).min(pieces.len().max(1));
    pieces.sort_by_key(|p| std::cmp::Reverse(p.bytes));
    let mut packed: Vec<(u64, Vec<Piece>)> = vec![(0, Vec::new()); bins];
    for piece in pieces {
        if let Some(lightest) = packed.iter_mut().min_by_key(|(bytes, _)| *bytes) {
            lightest.0 += piece.bytes;
            lightest.1.push(piece);
        }
    }
    packed
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty())
        .collect()
}

/// The prefix of every global transaction id a copy prepares.
pub const GID_PREFIX: &str = "stagingprop_copy";

/// The id shared by every part of group `group` of copy run `run` (what a commit decision
/// names).
pub fn group_id(run: &str, group: usize) -> String {
    format!("{GID_PREFIX}:{run}:{group}")
}

/// The global transaction id of one part of a group.
pub fn part_gid(group_id: &str, part: usize) -> String {
    format!("{group_id}:{part}")
}

/// The group id of a global id this module made, or `None` for anyone else's.
pub fn parse_gid(gid: &str) -> Option<&str> {
    let (group, part) = gid.rsplit_once(':')?;
    let mut fields = group.split(':');
    let ok = fields.next() == Some(GID_PREFIX)
        && fields.next().is_some_and(|run| !run.is_empty())
        && fields.next().is_some_and(|g| g.parse::<usize>().is_ok())
        && fields.next().is_none()
        && part.parse::<usize>().is_ok();
    ok.then_some(group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_cover_every_block_once_and_the_last_is_open() {
        assert_eq!(
            block_ranges(10, 3),
            vec![
                BlockRange {
                    start: 0,
                    end: Some(3)
                },
                BlockRange {
                    start: 3,
                    end: Some(6)
                },
                BlockRange {
                    start: 6,
                    end: None
                },
            ]
        );
        assert_eq!(
            block_ranges(0, 4),
            vec![BlockRange {
                start: 0,
                end: None
            }]
        );
        assert_eq!(block_ranges(2, 8).len(), 2);
        assert_eq!(
            block_ranges(10, 3)[1].condition(),
            "ctid >= '(3,0)'::tid AND ctid < '(6,0)'::tid"
        );
        assert_eq!(block_ranges(10, 3)[2].condition(), "ctid >= '(6,0)'::tid");
    }

    proptest! {
        #[test]
        fn ranges_are_adjacent_and_non_empty(blocks in 0u64..1_000_000, parts in 1usize..64) {
            let ranges = block_ranges(blocks, parts);
            prop_assert!(!ranges.is_empty() && ranges.len() <= parts);
            prop_assert_eq!(ranges[0].start, 0);
            prop_assert_eq!(ranges.last().unwrap().end, None);
            for pair in ranges.windows(2) {
                prop_assert_eq!(pair[0].end, Some(pair[1].start));
                prop_assert!(pair[0].start < pair[1].start);
            }
        }

        #[test]
        fn packing_keeps_every_piece_and_balances(sizes in proptest::collection::vec(1u64..1000, 1..40), bins in 1usize..8) {
            let pieces: Vec<Piece> = sizes.iter().enumerate()
                .map(|(table, &bytes)| Piece { table, range: None, bytes })
                .collect();
            let packed = pack(pieces, bins);
            prop_assert!(packed.len() <= bins && packed.iter().all(|b| !b.is_empty()));
            let mut tables: Vec<usize> = packed.iter().flatten().map(|p| p.table).collect();
            tables.sort_unstable();
            prop_assert_eq!(tables, (0..sizes.len()).collect::<Vec<_>>());
            // Greedy's bound: no bin exceeds the average by more than the largest piece.
            let total: u64 = sizes.iter().sum();
            let largest = *sizes.iter().max().unwrap();
            for bin in &packed {
                let load: u64 = bin.iter().map(|p| p.bytes).sum();
                prop_assert!(load <= total / packed.len() as u64 + largest);
            }
        }
    }

    #[test]
    fn global_ids_name_run_group_and_part() {
        let id = part_gid(&group_id("a1b2", 3), 1);
        assert_eq!(id, "stagingprop_copy:a1b2:3:1");
        assert_eq!(parse_gid(&id), Some("stagingprop_copy:a1b2:3"));
        assert_eq!(parse_gid(&id), Some(group_id("a1b2", 3).as_str()));
        for other in [
            "stagingprop_copy:a1b2:3",
            "other:a1b2:3:1",
            "stagingprop_copy::3:1",
            "stagingprop_copy:a:b:1",
            "stagingprop_copy:a:1:2:3",
            "",
        ] {
            assert_eq!(parse_gid(other), None, "{other}");
        }
    }

    #[test]
    fn only_a_whole_table_or_its_first_range_is_first() {
        let whole = Piece {
            table: 0,
            range: None,
            bytes: 1,
        };
        assert!(whole.first_of_table());
        let ranges = block_ranges(100, 2);
        let first = Piece {
            range: Some(ranges[0]),
            ..whole.clone()
        };
        let second = Piece {
            range: Some(ranges[1]),
            ..whole
        };
        assert!(first.first_of_table() && !second.first_of_table());
    }
}
