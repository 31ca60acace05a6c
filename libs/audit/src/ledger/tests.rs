use super::*;

const H9: i64 = 1_765_098_000_000; // 2025-12-07T09:00Z

fn envelope(id: &str, ingest_time: i64) -> Vec<u8> {
    format!(
        r#"{{"event_id":"{id}","pipeline":"p","key":"k","event_time":0,"ingest_time":{ingest_time},"payload":{{}}}}"#
    )
    .into_bytes()
}

fn ledger() -> Ledger {
    let mut l = Ledger::new(H9, H9 + 2 * HOUR_MS);
    // Partition 0: 5 records in 09:xx (one a resend), 2 in 10:xx, one before the range.
    l.raw(0, 100, None, &envelope("old", H9 - 60_000));
    for (o, id) in [(101, "a"), (102, "b"), (103, "a"), (104, "c"), (105, "d")] {
        l.raw(0, o, None, &envelope(id, H9 + o));
    }
    l.raw(0, 107, None, &envelope("e", H9 + HOUR_MS)); // 106 is a marker
    l.raw(0, 108, Some(H9 + HOUR_MS + 5), b"not json");
    l
}

#[test]
fn counts_balance_when_every_raw_record_has_one_fate() {
    let mut l = ledger();
    for o in [101, 102, 103, 104, 107] {
        l.enriched(0, Some((0, o)), b"");
    }
    l.enriched(0, Some((0, 104)), b""); // re-emitted after a kill: one fate
    l.dead_lettered(Some((0, 105)), "quality");
    l.dead_lettered(Some((0, 108)), "decode_error");
    l.enriched(0, Some((0, 100)), b""); // before the range: not reported
    l.enriched(0, Some((7, 1)), b""); // no such raw record: ignored
    l.archived(0, |o| o != 106);
    let (hours, differences, _) = l.report(true);
    assert_eq!(differences, vec![], "{hours:#?}");
    assert_eq!(hours.len(), 2);
    assert_eq!(hours[0].hour, "2025-12-07T09:00:00Z");
    assert_eq!(
        hours[0].ingest,
        IngestCounts {
            raw_records: 5,
            events: 4,
            resent_copies: 1,
            unreadable: 0
        }
    );
    assert_eq!(hours[0].enricher.enriched, 4);
    assert_eq!(hours[0].enricher.extra_copies, 1);
    assert_eq!(hours[0].enricher.dead_lettered["quality"], 1);
    assert_eq!(hours[1].ingest.unreadable, 1);
    assert_eq!(hours[1].enricher.dead_lettered["decode_error"], 1);
    assert_eq!(hours[1].archiver.as_ref().unwrap().archived, 2);
}

#[test]
fn a_record_without_a_fate_is_a_difference_of_its_hour_and_stage() {
    let mut l = ledger();
    for o in [101, 102, 103, 105, 107, 108] {
        l.enriched(0, Some((0, o)), b"");
    }
    l.dead_lettered(Some((0, 102)), "enrich_miss");
    l.archived(0, |o| !(102..=103).contains(&o));
    let (_, differences, _) = l.report(true);
    let named: Vec<_> = differences
        .iter()
        .map(|d| (d.hour.as_str(), d.stage, d.size))
        .collect();
    assert_eq!(
        named,
        vec![
            ("2025-12-07T09:00:00Z", "enricher", 1), // 104 missing
            ("2025-12-07T09:00:00Z", "enricher", 1), // 102 both
            ("2025-12-07T09:00:00Z", "archiver", 2),
        ]
    );
    assert!(differences[0].what.contains("neither"));
    assert!(differences[1].what.contains("both"));
}

fn row(source: &str, hour: i64, aggregation: &str, counts: &[(&str, i64)]) -> LedgerRow {
    LedgerRow {
        pipeline: "p".into(),
        hour,
        source: source.into(),
        since: 0,
        aggregation: aggregation.into(),
        counts: counts.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
    }
}

#[test]
fn the_aggregator_balances_when_it_applied_every_enriched_record_and_its_forwards_arrived() {
    let mut l = ledger();
    for o in [101, 102, 103, 104, 105] {
        l.enriched(1, Some((0, o)), &envelope("x", H9 + o));
    }
    l.enriched(1, Some((0, 104)), &envelope("x", H9 + 104)); // a re-emit: applied too
    let rows = vec![
        row("p.enriched:1", H9, "", &[("records", 6)]),
        row(
            "p.enriched:1",
            H9,
            "per_minute",
            &[("counted", 4), ("repeated_origin", 1), ("too_late", 1)],
        ),
        row(
            "p.enriched:1",
            H9,
            "per_tier",
            &[
                ("forwarded", 4),
                ("repeated_origin", 1),
                ("filtered_out", 1),
            ],
        ),
        row("p.by-per_tier:0", H9, "per_tier", &[("counted", 3)]),
        row("p.by-per_tier:1", H9, "per_tier", &[("too_late", 1)]),
    ];
    let defined = vec![
        ("per_minute".to_owned(), Some(H9)),
        ("per_tier".to_owned(), Some(H9)),
        ("new".to_owned(), None),
    ];
    l.aggregator(&rows, defined.clone(), "p.enriched");
    let (hours, differences, _) = l.report(false);
    let names: Vec<_> = differences
        .iter()
        .filter(|d| d.stage == "aggregator")
        .collect();
    assert_eq!(names, Vec::<&Difference>::new(), "{hours:#?}");
    let agg = hours[0].aggregator.as_ref().unwrap();
    assert_eq!((agg.enriched_records, agg.applied), (6, 6));
    assert_eq!(agg.aggregations["per_tier"]["counted"], 3);
    assert_eq!(agg.aggregations["new"]["not_defined"], 6, "added later");

    // One record not applied, one forward not arrived.
    let mut short = rows.clone();
    short[0] = row("p.enriched:1", H9, "", &[("records", 5)]);
    short.pop();
    l.aggregator(&short, defined, "p.enriched");
    let (_, differences, _) = l.report(false);
    let named: Vec<_> = differences
        .iter()
        .filter(|d| d.stage == "aggregator")
        .map(|d| (d.size, d.what.as_str()))
        .collect();
    assert_eq!(named.len(), 2, "{named:?}");
    assert_eq!(named[0].0, 1);
    assert!(named[0].1.contains("not applied"));
    assert!(named[1].1.starts_with("`per_tier`: forwarded"), "{named:?}");
}

#[test]
fn hours_a_topic_no_longer_holds_whole_are_left_out_not_reported() {
    let mut l = ledger();
    // The enriched topic's partition 0 was read from its log start (12 > 0), its first
    // record written at 09:30: hour 09 is not whole there; hour 10 is.
    l.read(Topic::Enriched, 0, Some(H9 + 1_800_000));
    l.enriched(0, Some((0, 107)), &envelope("e", H9 + HOUR_MS));
    l.dead_lettered(Some((0, 108)), "decode_error");
    l.scanned(
        Topic::Enriched,
        &[ScannedPartition {
            partition: 0,
            low: 12,
            start: 12,
            end: 13,
        }],
    );
    l.aggregator(
        &[
            row("p.enriched:0", H9, "", &[("records", 5)]),
            row("p.enriched:0", H9 + HOUR_MS, "", &[("records", 1)]),
        ],
        vec![],
        "p.enriched",
    );
    let (hours, differences, notes) = l.report(false);
    assert_eq!(differences, vec![], "{hours:#?}");
    assert_eq!(hours.len(), 1, "only hour 10: {hours:#?}");
    assert!(
        notes[0].starts_with("5 raw records of partition 0 not audited"),
        "{notes:?}"
    );
    // A standalone restarted at 10:20 on a store file with its earlier runs' rows: the
    // aggregator is not audited for hour 10; the enricher is (its broker is this run's).
    l.broker_started(H9 + HOUR_MS + 1_200_000);
    let (hours, _, _) = l.report(false);
    assert_eq!(hours.len(), 1);
    assert!(hours[0].aggregator.is_none());
    assert_eq!(hours[0].enricher.raw_records, 2);
}

#[test]
fn a_record_without_an_outcome_for_a_defined_aggregation_is_a_difference() {
    let mut l = ledger();
    l.enriched(0, Some((0, 101)), &envelope("x", H9 + 101));
    l.enriched(0, Some((0, 102)), &envelope("y", H9 + 102));
    let rows = vec![
        row("p.enriched:0", H9, "", &[("records", 2)]),
        row("p.enriched:0", H9, "m", &[("counted", 1)]),
    ];
    // Defined since before the hour: the second record's outcome is missing.
    l.aggregator(&rows, vec![("m".to_owned(), Some(H9 - 1))], "p.enriched");
    let (_, differences, _) = l.report(false);
    let differences: Vec<_> = differences
        .into_iter()
        .filter(|d| d.stage == "aggregator")
        .collect();
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert_eq!(differences[0].size, 1);
    assert!(differences[0]
        .what
        .starts_with("`m`: records applied without"));
    // Added during the hour (or dropped since): not a difference, shown as not_defined.
    l.aggregator(
        &rows,
        vec![("m".to_owned(), Some(H9 + 60_000))],
        "p.enriched",
    );
    let (hours, differences, _) = l.report(false);
    assert!(
        differences.iter().all(|d| d.stage != "aggregator"),
        "{differences:?}"
    );
    let agg = hours[0].aggregator.as_ref().unwrap();
    assert_eq!(agg.aggregations["m"]["not_defined"], 1);
}

#[test]
fn an_event_dropped_out_of_order_by_the_origin_rule_is_a_difference() {
    let mut l = ledger();
    l.enriched(0, Some((0, 101)), &envelope("x", H9 + 101));
    l.enriched(0, Some((0, 102)), &envelope("y", H9 + 102));
    let rows = vec![
        row("p.enriched:0", H9, "", &[("records", 2)]),
        row(
            "p.enriched:0",
            H9,
            "m",
            &[("counted", 1), ("out_of_order_origin", 1)],
        ),
    ];
    l.aggregator(&rows, vec![("m".to_owned(), Some(H9 - 1))], "p.enriched");
    let (_, differences, _) = l.report(false);
    let differences: Vec<_> = differences
        .into_iter()
        .filter(|d| d.stage == "aggregator")
        .collect();
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert_eq!(differences[0].size, 1);
    assert!(differences[0]
        .what
        .starts_with("`m`: dropped below an origin offset"));
}

#[test]
fn what_the_aggregator_dead_lettered_unread_balances_its_partition() {
    let mut l = ledger();
    for o in [101, 102] {
        l.enriched(3, Some((0, o)), &envelope("x", H9 + o));
    }
    l.aggregator_dead_lettered(3, &envelope("x", H9 + 102));
    l.aggregator(
        &[row("p.enriched:3", H9, "", &[("records", 1)])],
        vec![],
        "p.enriched",
    );
    let (hours, differences, _) = l.report(false);
    assert!(
        differences.iter().all(|d| d.stage != "aggregator"),
        "{differences:?}"
    );
    assert_eq!(hours[0].aggregator.as_ref().unwrap().dead_lettered, 1);
}

#[test]
fn hours_are_whole_and_labelled() {
    let l = Ledger::new(H9 + 5, H9 + HOUR_MS + 1);
    assert_eq!((l.from, l.to), (H9, H9 + 2 * HOUR_MS));
    assert_eq!(
        hour_label(hour_of(H9 + 59 * 60_000)),
        "2025-12-07T09:00:00Z"
    );
    assert_eq!(origin(Some(b"3"), Some(b"42")), Some((3, 42)));
    assert_eq!(origin(Some(b"x"), Some(b"42")), None);
}
