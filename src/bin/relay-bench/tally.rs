//! Exactly-once accounting of the benchmark's event ids: every scenario ends by
//! checking that each id it sent was seen once, no id twice and nothing foreign.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The id of event `n` of a run tagged `tag`; `tally_index` reads it back.
pub fn event_id(tag: &str, n: usize) -> String {
    format!("{tag}-{n:08}")
}

/// Index of an id made by `event_id` with the same tag, if it is one.
pub fn tally_index(tag: &str, id: &str) -> Option<usize> {
    id.strip_prefix(tag)?.strip_prefix('-')?.parse().ok()
}

/// What a tally found wrong, in counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mismatch {
    /// Ids never seen.
    pub missing: u64,
    /// Extra sightings of ids already seen.
    pub duplicates: u64,
    /// Sightings of ids this run never sent (or that would not parse).
    pub foreign: u64,
}

impl Mismatch {
    /// True when every id was seen exactly once and nothing else was.
    pub fn is_exact(&self) -> bool {
        *self == Self::default()
    }
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} missing, {} duplicated, {} foreign",
            self.missing, self.duplicates, self.foreign
        )
    }
}

/// Counts sightings per id, lock-free, so recording stays cheap at full rate.
pub struct Tally {
    /// The run tag every id starts with.
    tag: String,
    /// Sightings of id n at index n.
    seen: Vec<AtomicU32>,
    /// Sightings that matched no id of this run.
    foreign: AtomicU64,
    /// All sightings of this run's ids, for "are we done yet" polling.
    total: AtomicU64,
}

impl Tally {
    /// A tally expecting ids 0..count of `tag`.
    pub fn new(tag: &str, count: usize) -> Self {
        Self {
            tag: tag.to_owned(),
            seen: (0..count).map(|_| AtomicU32::new(0)).collect(),
            foreign: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    /// Records one sighting of `id`.
    pub fn record(&self, id: &str) {
        match tally_index(&self.tag, id).and_then(|n| self.seen.get(n)) {
            Some(slot) => {
                slot.fetch_add(1, Ordering::Relaxed);
                self.total.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.foreign.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sightings of this run's ids so far (duplicates included).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The verdict.
    pub fn mismatch(&self) -> Mismatch {
        let mut m = Mismatch {
            foreign: self.foreign.load(Ordering::Relaxed),
            ..Mismatch::default()
        };
        for slot in &self.seen {
            match slot.load(Ordering::Relaxed) {
                0 => m.missing += 1,
                n => m.duplicates += u64::from(n - 1),
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_other_tags_do_not_match() {
        let id = event_id("rb1s2", 42);
        assert_eq!(tally_index("rb1s2", &id), Some(42));
        assert_eq!(tally_index("rb1s", &id), None);
        assert_eq!(tally_index("rb1s2", "rb1s2-x"), None);
    }

    #[test]
    fn exact_only_when_each_id_is_seen_once() {
        let t = Tally::new("t", 3);
        for n in 0..3 {
            t.record(&event_id("t", n));
        }
        assert!(t.mismatch().is_exact());
        t.record(&event_id("t", 1));
        t.record(&event_id("t", 3)); // out of range: never sent
        t.record("nonsense");
        assert_eq!(
            t.mismatch(),
            Mismatch {
                missing: 0,
                duplicates: 1,
                foreign: 2
            }
        );
        let short = Tally::new("t", 2);
        short.record(&event_id("t", 0));
        assert_eq!(short.mismatch().missing, 1);
        assert_eq!(short.total(), 1);
    }
}
