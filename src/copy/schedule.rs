//! The order in which independently committed pieces may load: which job a free worker takes
//! next. When the target role may not set `session_replication_role`, the target checks every
//! foreign key as rows arrive, so a table's pieces wait until every piece of its parent tables
//! has committed, and a failed parent stops its children. Plain data, no I/O.

use std::collections::VecDeque;

/// Per table: pieces not yet committed, and whether one failed.
#[derive(Debug)]
pub struct Board {
    remaining: Vec<usize>,
    failed: Vec<bool>,
    /// Jobs taken and not yet reported done.
    in_flight: usize,
}

/// What a free worker does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Pick {
    /// Take the job at this queue index.
    Run(usize),
    /// The job at this index can never load: this parent table failed.
    Blocked(usize, usize),
    /// Every queued job waits for pieces other workers are loading.
    Wait,
    /// Nothing left.
    Empty,
}

impl Board {
    /// `pieces[t]`: how many pieces of table `t` are queued.
    pub fn new(pieces: Vec<usize>) -> Board {
        Board {
            failed: vec![false; pieces.len()],
            remaining: pieces,
            in_flight: 0,
        }
    }

    /// The first queued job whose `needs` (parent tables) are complete, scanning in queue order.
    pub fn pick<J>(&mut self, queue: &VecDeque<J>, needs: impl Fn(&J) -> &[usize]) -> Pick {
        if queue.is_empty() {
            return Pick::Empty;
        }
        for (i, job) in queue.iter().enumerate() {
            let needs = needs(job);
            if let Some(&parent) = needs.iter().find(|&&p| self.failed[p]) {
                return Pick::Blocked(i, parent);
            }
            if needs.iter().all(|&p| self.remaining[p] == 0) {
                self.in_flight += 1;
                return Pick::Run(i);
            }
        }
        if self.in_flight == 0 {
            // Nothing loading could ever release the queue (a dependency cycle the planner
            // should have kept out): report the first job as blocked rather than wait forever.
            let parent = needs(&queue[0])
                .iter()
                .copied()
                .find(|&p| self.remaining[p] > 0)
                .unwrap_or(0);
            return Pick::Blocked(0, parent);
        }
        Pick::Wait
    }

    /// Jobs taken and not yet reported done.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A taken job ended; `tables` are its pieces' tables. Returns the tables it completed.
    pub fn finished(&mut self, tables: &[usize], committed: bool) -> Vec<usize> {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.settle(tables, committed)
    }

    /// A blocked job's pieces will never load.
    pub fn abandoned(&mut self, tables: &[usize]) {
        self.settle(tables, false);
    }

    fn settle(&mut self, tables: &[usize], committed: bool) -> Vec<usize> {
        let mut completed = Vec::new();
        for &t in tables {
            self.remaining[t] = self.remaining[t].saturating_sub(1);
            if !committed {
                self.failed[t] = true;
            } else if self.remaining[t] == 0 && !self.failed[t] {
                completed.push(t);
            }
        }
        completed
    }
}

/// Tables that lie on a cycle of foreign keys between different tables (`edges`: child,
/// parent): they cannot load parents first.
pub fn on_cycle(count: usize, edges: &[(usize, usize)]) -> Vec<bool> {
    let reaches = |from: usize, to: usize| {
        let mut seen = vec![false; count];
        let mut stack = vec![from];
        while let Some(t) = stack.pop() {
            for &(child, parent) in edges {
                if child == t && !seen[parent] {
                    if parent == to {
                        return true;
                    }
                    seen[parent] = true;
                    stack.push(parent);
                }
            }
        }
        false
    };
    (0..count).map(|t| reaches(t, t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn needs(job: &(usize, Vec<usize>)) -> &[usize] {
        &job.1
    }

    fn queue(jobs: &[(usize, &[usize])]) -> VecDeque<(usize, Vec<usize>)> {
        jobs.iter().map(|(t, n)| (*t, n.to_vec())).collect()
    }

    #[test]
    fn children_wait_for_every_piece_of_their_parents() {
        // Table 1 (child of 0) is queued first because it is larger.
        let mut q = queue(&[(1, &[0]), (0, &[]), (0, &[])]);
        let mut board = Board::new(vec![2, 1]);
        assert_eq!(board.pick(&q, needs), Pick::Run(1));
        q.remove(1);
        assert_eq!(board.pick(&q, needs), Pick::Run(1));
        q.remove(1);
        // Both ranges of the parent are loading: the child waits.
        assert_eq!(board.pick(&q, needs), Pick::Wait);
        assert_eq!(board.finished(&[0], true), Vec::<usize>::new());
        assert_eq!(board.pick(&q, needs), Pick::Wait);
        assert_eq!(board.finished(&[0], true), vec![0]);
        assert_eq!(board.pick(&q, needs), Pick::Run(0));
        q.remove(0);
        assert_eq!(board.finished(&[1], true), vec![1]);
        assert_eq!(board.pick(&q, needs), Pick::Empty);
    }

    #[test]
    fn a_failed_parent_blocks_its_children_and_their_children() {
        let mut q = queue(&[(0, &[]), (1, &[0]), (2, &[1])]);
        let mut board = Board::new(vec![1, 1, 1]);
        assert_eq!(board.pick(&q, needs), Pick::Run(0));
        q.remove(0);
        assert_eq!(board.finished(&[0], false), Vec::<usize>::new());
        assert_eq!(board.pick(&q, needs), Pick::Blocked(0, 0));
        q.remove(0);
        board.abandoned(&[1]);
        assert_eq!(board.pick(&q, needs), Pick::Blocked(0, 1));
    }

    #[test]
    fn a_failed_range_leaves_its_table_incomplete() {
        let mut board = Board::new(vec![2]);
        let q = queue(&[(0, &[]), (0, &[])]);
        assert_eq!(board.pick(&q, needs), Pick::Run(0));
        assert_eq!(board.pick(&q, needs), Pick::Run(0));
        assert_eq!(board.finished(&[0], false), Vec::<usize>::new());
        assert_eq!(board.finished(&[0], true), Vec::<usize>::new());
    }

    #[test]
    fn a_queue_nothing_can_release_is_reported_not_awaited() {
        let q = queue(&[(0, &[1])]);
        let mut board = Board::new(vec![1, 1]);
        assert_eq!(board.pick(&q, needs), Pick::Blocked(0, 1));
    }

    #[test]
    fn cycles_are_found_and_chains_are_not() {
        assert_eq!(on_cycle(3, &[(0, 1), (1, 2)]), vec![false; 3]);
        assert_eq!(
            on_cycle(4, &[(0, 1), (1, 2), (2, 0), (3, 0)]),
            vec![true, true, true, false]
        );
    }
}
