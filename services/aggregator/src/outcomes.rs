//! The stage's per-event counters, added up over a batch and written once per batch: a
//! counter looked up by its labels for every event was ~5% of the stage's CPU.

use crate::state::{Outcome, Scope};
use crate::SERVICE;

/// The counters counted per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counter {
    /// `instream_events_total`: what became of a record of the enriched topic.
    Events,
    /// `instream_aggregator_repartition_events_total`: what became of a forwarded copy.
    Repartition,
    /// `instream_aggregator_repartitioned_total`: copies forwarded.
    Forwarded,
}

#[derive(Debug)]
struct Row {
    counter: Counter,
    pipeline: String,
    aggregation: Option<String>,
    outcome: &'static str,
    n: u64,
}

/// Counts of one batch, by counter and labels.
#[derive(Debug, Default)]
pub(crate) struct BatchCounts {
    rows: Vec<Row>,
}

impl BatchCounts {
    /// An event's outcome, once per enriched record in `instream_events_total` (the stage's
    /// throughput, as for every service); what a repartition partition does with its
    /// forwarded copy is counted apart, per aggregation, so that a forwarded event is not
    /// counted twice there.
    pub fn outcome(&mut self, pipeline: &str, scope: Scope, outcome: &Outcome) {
        let outcome = match outcome {
            Outcome::Counted => "aggregated",
            Outcome::AlreadyApplied => "already_applied",
            Outcome::RepeatedOrigin => "repeated_origin",
            Outcome::OutOfOrderOrigin => "out_of_order_origin",
            Outcome::RepeatedEvent => "repeated_event",
            Outcome::TooLate(_) => "too_late",
            Outcome::TooFarAhead => "future_time",
        };
        match scope {
            Scope::Keyed => self.add(Counter::Events, pipeline, None, outcome),
            Scope::Repartitioned { aggregation, .. } => {
                self.add(Counter::Repartition, pipeline, Some(aggregation), outcome)
            }
            // Not a live stage: `archive recompute` reports its own counts.
            Scope::Recompute { .. } => {}
        }
    }

    /// A copy forwarded to an aggregation's repartition topic.
    pub fn forwarded(&mut self, pipeline: &str, aggregation: &str) {
        self.add(Counter::Forwarded, pipeline, Some(aggregation), "");
    }

    fn add(
        &mut self,
        counter: Counter,
        pipeline: &str,
        aggregation: Option<&str>,
        outcome: &'static str,
    ) {
        let found = self.rows.iter_mut().find(|row| {
            row.counter == counter
                && row.outcome == outcome
                && row.pipeline == pipeline
                && row.aggregation.as_deref() == aggregation
        });
        match found {
            Some(row) => row.n += 1,
            None => self.rows.push(Row {
                counter,
                pipeline: pipeline.to_owned(),
                aggregation: aggregation.map(str::to_owned),
                outcome,
                n: 1,
            }),
        }
    }

    /// Adds the batch's counts to the counters.
    pub fn emit(&mut self) {
        for row in self.rows.drain(..) {
            let (pipeline, aggregation, outcome) = (
                row.pipeline,
                row.aggregation.unwrap_or_default(),
                row.outcome,
            );
            match row.counter {
                Counter::Events => {
                    instream_core::events::events_handled(SERVICE, pipeline, outcome, row.n);
                }
                Counter::Repartition => {
                    metrics::counter!("instream_aggregator_repartition_events_total", "pipeline" => pipeline, "aggregation" => aggregation, "outcome" => outcome)
                        .increment(row.n);
                }
                Counter::Forwarded => {
                    metrics::counter!("instream_aggregator_repartitioned_total", "pipeline" => pipeline, "aggregation" => aggregation)
                        .increment(row.n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_adds_up_per_counter_and_labels() {
        let mut counts = BatchCounts::default();
        let repartitioned = Scope::Repartitioned {
            aggregation: "by_city",
            group: None,
            idle_timeout: std::time::Duration::from_secs(1),
        };
        for _ in 0..3 {
            counts.outcome("p", Scope::Keyed, &Outcome::Counted);
        }
        counts.outcome("p", Scope::Keyed, &Outcome::RepeatedEvent);
        counts.outcome("q", Scope::Keyed, &Outcome::Counted);
        counts.outcome("p", repartitioned, &Outcome::Counted);
        counts.forwarded("p", "by_city");
        counts.forwarded("p", "by_city");
        let rows: Vec<(Counter, &str, Option<&str>, &str, u64)> = counts
            .rows
            .iter()
            .map(|r| {
                let aggregation = r.aggregation.as_deref();
                (r.counter, r.pipeline.as_str(), aggregation, r.outcome, r.n)
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (Counter::Events, "p", None, "aggregated", 3),
                (Counter::Events, "p", None, "repeated_event", 1),
                (Counter::Events, "q", None, "aggregated", 1),
                (Counter::Repartition, "p", Some("by_city"), "aggregated", 1),
                (Counter::Forwarded, "p", Some("by_city"), "", 2),
            ]
        );
        counts.emit();
        assert!(counts.rows.is_empty(), "emitted once, not again");
    }
}
