//! What the demo shows while it runs: per-stage throughput, consumer lag, the reference-data
//! hit ratio, dead letters and the top aggregates of the current window. Read from the
//! platform's own `/metrics` (the numbers an operator's dashboard would show) and from the
//! aggregate store.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

/// The totals the view and the summary need, from one scrape of `/metrics`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub ingested: f64,
    pub rejected_at_ingest: f64,
    pub enriched: f64,
    pub aggregated: f64,
    pub archived: f64,
    pub dead_letters: f64,
    pub lookups: f64,
    pub lookups_found: f64,
    /// Lookups the enricher's local cache was asked, and how many it answered.
    pub local_lookups: f64,
    pub local_hits: f64,
    /// (consumer group, summed lag over its partitions), by group name.
    pub lag: Vec<(String, f64)>,
}

impl Totals {
    pub fn from_exposition(text: &str) -> std::io::Result<Totals> {
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))?;
        let sum = |metric: &str, labels: &[(&str, &str)]| -> f64 {
            scrape
                .samples
                .iter()
                .filter(|s| s.metric == metric)
                .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
                .map(|s| scalar(&s.value))
                // `+ 0.0` turns the -0.0 that an empty f64 sum starts from into 0.
                .sum::<f64>()
                + 0.0
        };
        let mut lag: Vec<(String, f64)> = Vec::new();
        for s in scrape
            .samples
            .iter()
            .filter(|s| s.metric == "instream_consumer_lag")
        {
            let group = s.labels.get("group").unwrap_or("?").to_owned();
            match lag.iter_mut().find(|(g, _)| *g == group) {
                Some((_, total)) => *total += scalar(&s.value),
                None => lag.push((group, scalar(&s.value))),
            }
        }
        lag.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Totals {
            ingested: sum(
                "instream_events_total",
                &[("service", "ingest"), ("outcome", "accepted")],
            ),
            rejected_at_ingest: sum("instream_events_rejected_total", &[("service", "ingest")]),
            enriched: sum(
                "instream_events_total",
                &[("service", "enricher"), ("outcome", "enriched")],
            ),
            aggregated: sum(
                "instream_events_total",
                &[("service", "aggregator"), ("outcome", "aggregated")],
            ),
            archived: sum("instream_archive_records_total", &[]),
            dead_letters: sum("instream_dead_letters_total", &[]),
            lookups: sum("instream_enrich_lookups_total", &[]),
            lookups_found: sum("instream_enrich_lookups_total", &[("outcome", "hit")]),
            local_lookups: sum("instream_refdata_lookups_total", &[("level", "local")]),
            local_hits: sum(
                "instream_refdata_lookups_total",
                &[("level", "local"), ("outcome", "hit")],
            ),
            lag,
        })
    }
}

fn scalar(v: &Value) -> f64 {
    match v {
        Value::Counter(x) | Value::Gauge(x) | Value::Untyped(x) => *x,
        Value::Histogram(_) | Value::Summary(_) => 0.0,
    }
}

/// One frame of the live view.
pub struct Frame<'a> {
    pub elapsed: Duration,
    pub duration: Duration,
    pub now: &'a Totals,
    /// The totals one refresh ago, and how long ago that was: the rates come from the
    /// difference.
    pub before: &'a Totals,
    pub interval: Duration,
    /// (group key, count) of the current window, largest first.
    pub top: &'a [(String, i64)],
    pub top_title: &'a str,
}

impl Frame<'_> {
    pub fn render(&self) -> String {
        let secs = self.interval.as_secs_f64().max(0.001);
        let rate = |now: f64, before: f64| (now - before).max(0.0) / secs;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "instream demo  {:>4.0}s of {:.0}s   Ctrl-C stops and prints the summary",
            self.elapsed.min(self.duration).as_secs_f64(),
            self.duration.as_secs_f64()
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "  stage        events/s        total");
        let (n, b) = (self.now, self.before);
        for (stage, now, before) in [
            ("ingest", n.ingested, b.ingested),
            ("enricher", n.enriched, b.enriched),
            ("aggregator", n.aggregated, b.aggregated),
            ("archiver", n.archived, b.archived),
        ] {
            let _ = writeln!(
                out,
                "  {stage:<10} {:>10.0} {:>12.0}",
                rate(now, before),
                now
            );
        }
        let _ = writeln!(out);
        let lag = n
            .lag
            .iter()
            .map(|(g, l)| format!("{g} {l:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "  consumer lag      {}",
            if lag.is_empty() { "-".into() } else { lag }
        );
        let hit = if n.lookups > 0.0 {
            format!("{:.2}%", 100.0 * n.lookups_found / n.lookups)
        } else {
            "-".into()
        };
        let _ = writeln!(out, "  refdata hit ratio {hit} of {:.0} lookups", n.lookups);
        let local = if n.local_lookups > 0.0 {
            format!("{:.2}%", 100.0 * n.local_hits / n.local_lookups)
        } else {
            "-".into()
        };
        let _ = writeln!(out, "  local cache       {local} answered without Redis");
        let _ = writeln!(
            out,
            "  dead letters      {:.0}    refused at ingest {:.0}",
            n.dead_letters, n.rejected_at_ingest
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "  {}", self.top_title);
        if self.top.is_empty() {
            let _ = writeln!(out, "    (nothing yet)");
        }
        for (group, count) in self.top {
            let _ = writeln!(out, "    {group:<24} {count:>8}");
        }
        out
    }
}

/// Redraws a frame in place: home the cursor, write each line clearing what was there, clear
/// below. Only used when stdout is a terminal.
pub fn redraw(frame: &str) -> String {
    let mut out = String::from("\x1b[H");
    for line in frame.lines() {
        out.push_str(line);
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = r#"# TYPE instream_events_total counter
instream_events_total{service="ingest",pipeline="bids",outcome="accepted"} 1200
instream_events_total{service="enricher",pipeline="bids",outcome="enriched"} 1100
instream_events_total{service="aggregator",outcome="aggregated"} 1000
# TYPE instream_events_rejected_total counter
instream_events_rejected_total{service="ingest",pipeline="bids",code="missing_field"} 3
# TYPE instream_archive_records_total counter
instream_archive_records_total{pipeline="bids"} 900
# TYPE instream_dead_letters_total counter
instream_dead_letters_total{service="enricher",pipeline="bids",code="enrich_miss"} 7
# TYPE instream_enrich_lookups_total counter
instream_enrich_lookups_total{pipeline="bids",rule="auction",outcome="hit"} 99
instream_enrich_lookups_total{pipeline="bids",rule="auction",outcome="miss"} 1
# TYPE instream_consumer_lag gauge
instream_consumer_lag{group="instream-enricher",topic="bids.raw",partition="0"} 5
instream_consumer_lag{group="instream-enricher",topic="bids.raw",partition="1"} 6
instream_consumer_lag{group="instream-archiver",topic="bids.raw",partition="0"} 2
"#;

    #[test]
    fn totals_sum_the_right_series() {
        let t = Totals::from_exposition(EXPOSITION).expect("parses");
        assert_eq!(t.ingested, 1200.0);
        assert_eq!(t.enriched, 1100.0);
        assert_eq!(t.aggregated, 1000.0);
        assert_eq!(t.archived, 900.0);
        assert_eq!(t.rejected_at_ingest, 3.0);
        assert_eq!(t.dead_letters, 7.0);
        assert_eq!((t.lookups, t.lookups_found), (100.0, 99.0));
        assert_eq!(
            t.lag,
            vec![
                ("instream-archiver".to_owned(), 2.0),
                ("instream-enricher".to_owned(), 11.0)
            ]
        );
    }

    #[test]
    fn a_frame_shows_rates_and_the_top_window() {
        let now = Totals::from_exposition(EXPOSITION).expect("parses");
        let before = Totals {
            ingested: 200.0,
            ..now.clone()
        };
        let top = [("auction 1003".to_owned(), 42)];
        let text = Frame {
            elapsed: Duration::from_secs(10),
            duration: Duration::from_secs(30),
            now: &now,
            before: &before,
            interval: Duration::from_secs(2),
            top: &top,
            top_title: "hot auctions",
        }
        .render();
        assert!(
            text.contains("ingest            500         1200"),
            "{text}"
        );
        assert!(text.contains("refdata hit ratio 99.00%"), "{text}");
        assert!(text.contains("auction 1003"), "{text}");
        assert!(redraw(&text).starts_with("\x1b[H"));
    }
}
