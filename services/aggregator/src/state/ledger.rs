//! One input partition's audit ledger (docs/guarantees.md, "Auditing what happened"): per
//! hour of ingest time, how many records it applied and, per aggregation, what became of
//! each. Kept in the checkpoint with the state it describes — a replay after a crash counts
//! on from the checkpoint's numbers, so nothing is counted twice — and written to the store
//! as whole values before each checkpoint (a row written again replaces, never adds).

use instream_store::LedgerRow;
use serde::{Deserialize, Serialize};

const HOUR_MS: i64 = 3_600_000;

/// An hour's line stays in the state this many hours behind the partition's newest ingest
/// time (records come nearly in ingest-time order); an older one is let go once saved, and a
/// record for it after that (a redriven dead letter) starts a new line, another row.
const HOURS_KEPT: i64 = 2;

/// What became of a record, for one aggregation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tally {
    Counted,
    TooLate,
    /// Its filter refused the event.
    FilteredOut,
    /// In no window of the aggregation (before it was defined, or after it was removed).
    OutsideWindows,
    RepeatedEvent,
    RepeatedOrigin,
    FutureTime,
    /// Sent on to the aggregation's repartition topic, counted there.
    Forwarded,
    /// At or below the highest origin offset counted, but not a repeat by its `event_id`:
    /// written out of order upstream (a broker that does not keep an idempotent producer's
    /// order), or re-emitted beyond the de-duplication horizon. Dropped, as the origin rule
    /// says, and alerted on (`InstreamOriginOutOfOrder`).
    OutOfOrderOrigin,
}

const TALLIES: [Tally; 9] = [
    Tally::Counted,
    Tally::TooLate,
    Tally::FilteredOut,
    Tally::OutsideWindows,
    Tally::RepeatedEvent,
    Tally::RepeatedOrigin,
    Tally::FutureTime,
    Tally::Forwarded,
    Tally::OutOfOrderOrigin,
];

impl Tally {
    pub fn as_str(self) -> &'static str {
        match self {
            Tally::Counted => "counted",
            Tally::TooLate => "too_late",
            Tally::FilteredOut => "filtered_out",
            Tally::OutsideWindows => "outside_windows",
            Tally::RepeatedEvent => "repeated_event",
            Tally::RepeatedOrigin => "repeated_origin",
            Tally::FutureTime => "future_time",
            Tally::Forwarded => "forwarded",
            Tally::OutOfOrderOrigin => "out_of_order_origin",
        }
    }
}

/// The records of one hour this partition applied (from offset `since` on).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HourLine {
    hour: i64,
    since: i64,
    records: u64,
    /// Per aggregation, its counts in the order of [`TALLIES`] (a line restored from an
    /// older checkpoint may hold fewer: the tallies added since count from zero).
    aggregations: Vec<(String, Vec<u64>)>,
    /// Changed since its row was last written (every line restored is: its row may be
    /// behind or ahead of the checkpoint).
    #[serde(skip, default = "written_again")]
    dirty: bool,
}

fn written_again() -> bool {
    true
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    lines: Vec<HourLine>,
}

impl Ledger {
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The line of `ingest_time`'s hour, made (counting from `offset`) if there is none.
    pub fn line(&mut self, ingest_time: i64, offset: i64) -> usize {
        let hour = ingest_time.div_euclid(HOUR_MS) * HOUR_MS;
        // The current hour is nearly always the last line.
        if let Some(at) = self.lines.iter().rposition(|l| l.hour == hour) {
            return at;
        }
        self.lines.push(HourLine {
            hour,
            since: offset,
            records: 0,
            aggregations: Vec::new(),
            dirty: true,
        });
        self.lines.len() - 1
    }

    /// One more record applied in the line.
    pub fn applied(&mut self, line: usize) {
        if let Some(l) = self.lines.get_mut(line) {
            l.records += 1;
            l.dirty = true;
        }
    }

    pub fn tally(&mut self, line: usize, aggregation: &str, tally: Tally) {
        let Some(l) = self.lines.get_mut(line) else {
            return;
        };
        l.dirty = true;
        let counts = match l.aggregations.iter().position(|(a, _)| a == aggregation) {
            Some(at) => &mut l.aggregations[at].1,
            None => {
                l.aggregations
                    .push((aggregation.to_owned(), vec![0; TALLIES.len()]));
                &mut l.aggregations.last_mut().expect("just pushed").1
            }
        };
        if counts.len() < TALLIES.len() {
            counts.resize(TALLIES.len(), 0);
        }
        counts[tally as usize] += 1;
    }

    /// The rows of the lines changed since [`Self::written`]: the partition's own
    /// (`records`) and one per aggregation.
    pub fn rows(&self, pipeline: &str, source: &str) -> Vec<LedgerRow> {
        let mut rows = Vec::new();
        for l in self.lines.iter().filter(|l| l.dirty) {
            let row = |aggregation: &str, counts| LedgerRow {
                pipeline: pipeline.to_owned(),
                hour: l.hour,
                source: source.to_owned(),
                since: l.since,
                aggregation: aggregation.to_owned(),
                counts,
            };
            rows.push(row("", [("records".to_owned(), l.records as i64)].into()));
            for (aggregation, counts) in &l.aggregations {
                let counts = TALLIES
                    .iter()
                    .zip(counts)
                    .filter(|(_, n)| **n > 0)
                    .map(|(t, n)| (t.as_str().to_owned(), *n as i64))
                    .collect();
                rows.push(row(aggregation, counts));
            }
        }
        rows
    }

    /// The rows from [`Self::rows`] are in the store.
    pub fn written(&mut self) {
        for l in &mut self.lines {
            l.dirty = false;
        }
    }

    /// Lets go of the lines written more than [`HOURS_KEPT`] hours before `newest_ingest_time`.
    pub fn let_go_before(&mut self, newest_ingest_time: i64) {
        let oldest_kept = oldest_kept(newest_ingest_time);
        self.lines.retain(|l| l.dirty || l.hour >= oldest_kept);
    }

    /// Restored from a checkpoint whose state reached `newest_ingest_time`: lets go of what
    /// the run that saved it let go of once it was saved (every line of a checkpoint was
    /// written before it), so that a replay counts an old hour in a line of its own again,
    /// as that run did — not into the checkpoint's line, whose row holds it already.
    pub fn restored(&mut self, newest_ingest_time: i64) {
        let oldest_kept = oldest_kept(newest_ingest_time);
        self.lines.retain(|l| l.hour >= oldest_kept);
    }
}

/// The ledger as checkpoint format 7 held it: a fixed array of the eight tallies of then.
#[derive(Deserialize)]
pub(super) struct LedgerV7 {
    lines: Vec<HourLineV7>,
}

#[derive(Deserialize)]
struct HourLineV7 {
    hour: i64,
    since: i64,
    records: u64,
    aggregations: Vec<(String, [u64; 8])>,
}

impl From<LedgerV7> for Ledger {
    fn from(v7: LedgerV7) -> Ledger {
        let lines = v7
            .lines
            .into_iter()
            .map(|l| HourLine {
                hour: l.hour,
                since: l.since,
                records: l.records,
                aggregations: l
                    .aggregations
                    .into_iter()
                    .map(|(name, counts)| (name, counts.to_vec()))
                    .collect(),
                dirty: written_again(),
            })
            .collect();
        Ledger { lines }
    }
}

fn oldest_kept(newest_ingest_time: i64) -> i64 {
    newest_ingest_time
        .div_euclid(HOUR_MS)
        .saturating_sub(HOURS_KEPT)
        .saturating_mul(HOUR_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 1_700_002_800_000;

    #[test]
    fn rows_hold_whole_counts_of_the_changed_lines_only() {
        let mut l = Ledger::default();
        let line = l.line(H + 5, 10);
        l.applied(line);
        l.tally(line, "per_minute", Tally::Counted);
        l.tally(line, "per_minute", Tally::Counted);
        l.tally(line, "per_tier", Tally::Forwarded);
        let rows = l.rows("p", "p.enriched:0");
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].aggregation, "");
        assert_eq!(rows[0].counts["records"], 1);
        assert_eq!(rows[1].counts["counted"], 2);
        assert_eq!(rows[1].counts.len(), 1, "no zero counts");
        assert_eq!((rows[2].hour, rows[2].since), (H, 10));
        l.written();
        assert!(l.rows("p", "s").is_empty(), "nothing changed since");
        let next = l.line(H + HOUR_MS, 20);
        l.applied(next);
        let rows = l.rows("p", "s");
        assert_eq!(rows.len(), 1, "only the new hour: {rows:?}");
    }

    #[test]
    fn an_hour_let_go_comes_back_as_another_row() {
        let mut l = Ledger::default();
        let old = l.line(H, 1);
        l.applied(old);
        l.written();
        l.let_go_before(H + 3 * HOUR_MS);
        assert!(l.is_empty(), "written and three hours old");
        let again = l.line(H + 1, 500);
        l.applied(again);
        let rows = l.rows("p", "s");
        assert_eq!((rows[0].since, rows[0].counts["records"]), (500, 1));
        l.let_go_before(H + 3 * HOUR_MS);
        assert!(!l.is_empty(), "not written yet: kept");
    }

    #[test]
    fn a_restored_ledger_writes_every_line_again() {
        let mut l = Ledger::default();
        let line = l.line(H, 1);
        l.applied(line);
        l.written();
        let bytes = postcard::to_allocvec(&l).unwrap();
        let back: Ledger = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.rows("p", "s").len(), 1);
    }

    #[test]
    fn a_format_7_ledger_reads_with_the_outcomes_added_since_at_zero() {
        // Format 7's layout: per line hour, since, records, and per aggregation an array of
        // the eight outcomes of then.
        let mut eight = [0u64; 8];
        eight[Tally::Counted as usize] = 5;
        eight[Tally::RepeatedOrigin as usize] = 2;
        let v7 = vec![(H, 10i64, 7u64, vec![("per_minute".to_owned(), eight)])];
        let bytes = postcard::to_allocvec(&v7).unwrap();
        let mut l: Ledger = postcard::from_bytes::<LedgerV7>(&bytes).unwrap().into();
        l.tally(0, "per_minute", Tally::OutOfOrderOrigin);
        let rows = l.rows("p", "p.enriched:0");
        assert_eq!(rows[0].counts["records"], 7);
        let counts = &rows[1].counts;
        assert_eq!(counts["counted"], 5);
        assert_eq!(counts["repeated_origin"], 2);
        assert_eq!(counts["out_of_order_origin"], 1);
        assert_eq!(counts.len(), 3);
    }
}
