use super::*;
use instream_event::Event;
use instream_pipeline::parse_document;
use serde_json::value::RawValue;

const HORIZON: Duration = Duration::from_secs(600);

fn def() -> PipelineDefinition {
    parse_document(
        r#"
[[pipelines]]
name = "p"
key_field = "k"
time_field = "t"
max_out_of_orderness = "0s"
[[pipelines.aggregations]]
name = "per_minute"
window = { kind = "tumbling", size = "1m" }
allowed_lateness = "30s"
"#,
    )
    .unwrap()
    .pipelines
    .remove(0)
}

fn event(id: &str, t: i64, ingest: i64) -> Event {
    Event {
        event_id: id.into(),
        pipeline: "p".into(),
        key: "k1".into(),
        event_time: t,
        ingest_time: ingest,
        headers: Default::default(),
        payload: RawValue::from_string("{}".into()).unwrap(),
        enrichment: None,
    }
}

fn counts(state: &mut PartitionState) -> Vec<(i64, i64)> {
    let mut rows = Vec::new();
    for (_, v) in state.windows.values_mut() {
        v.dirty = true;
    }
    let d = def();
    state.take_dirty(|_| Some(&d), true, &mut rows);
    let mut out: Vec<(i64, i64)> = rows.iter().map(|r| (r.window_start, r.count)).collect();
    out.sort();
    out
}

#[test]
fn repeats_by_id_and_by_origin_are_dropped_and_replays_skipped() {
    let def = def();
    let mut s = PartitionState::default();
    assert_eq!(
        s.apply(0, &event("a", 0, 0), Some((0, 10)), &def, HORIZON),
        Outcome::Counted
    );
    assert_eq!(
        s.apply(1, &event("a", 0, 1), Some((0, 11)), &def, HORIZON),
        Outcome::RepeatedEvent,
        "a client retry carries the same id"
    );
    assert_eq!(
        s.apply(2, &event("a", 0, 2), Some((0, 10)), &def, HORIZON),
        Outcome::RepeatedOrigin,
        "an enricher re-run re-emits origin offset 10"
    );
    assert_eq!(
        s.apply(3, &event("b", 0, 3), Some((0, 9)), &def, HORIZON),
        Outcome::OutOfOrderOrigin,
        "a new event below the highest origin counted came out of order"
    );
    assert_eq!(
        s.apply(1, &event("c", 0, 2), None, &def, HORIZON),
        Outcome::AlreadyApplied
    );
    assert_eq!(counts(&mut s), vec![(0, 1)]);
}

#[test]
fn an_unseen_event_below_the_origin_counted_is_out_of_order_only_within_the_horizon() {
    let def = def();
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 0, 1_000_000), Some((0, 10)), &def, HORIZON);
    assert_eq!(
        s.apply(1, &event("b", 0, 999_000), Some((0, 9)), &def, HORIZON),
        Outcome::OutOfOrderOrigin,
        "accepted a second before the newest, never seen: written out of order"
    );
    assert_eq!(
        s.apply(2, &event("c", 0, 1_000), Some((0, 8)), &def, HORIZON),
        Outcome::RepeatedOrigin,
        "accepted before the horizon: a re-emit of an older range (its id forgotten)"
    );
    assert_eq!(counts(&mut s), vec![(0, 1)]);
}

#[test]
fn ids_older_than_the_horizon_are_forgotten() {
    let def = def();
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 0, 0), None, &def, HORIZON);
    s.apply(1, &event("x", 0, 600_001), None, &def, HORIZON);
    assert_eq!(s.remembered_ids(), 1, "a is older than the horizon");
    assert_eq!(
        s.apply(2, &event("a", 0, 600_002), None, &def, HORIZON),
        Outcome::Counted
    );
}

#[test]
fn late_events_within_lateness_count_and_beyond_it_do_not() {
    let def = def();
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 10_000, 1_000_000), None, &def, HORIZON);
    // The watermark is 85 s: window [0, 60 s) closes at 90 s, so it still takes events.
    s.apply(1, &event("b", 85_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(
        s.apply(2, &event("c", 5_000, 1_000_000), None, &def, HORIZON),
        Outcome::Counted
    );
    s.apply(3, &event("d", 90_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(
        s.apply(4, &event("e", 5_000, 1_000_000), None, &def, HORIZON),
        Outcome::TooLate(vec!["per_minute".into()])
    );
    assert_eq!(counts(&mut s), vec![(0, 2), (60_000, 2)]);
    let closed = s.close_windows(|_| Some(Duration::ZERO));
    assert_eq!(closed, 1, "[0, 60 s) is flushed and past its lateness");
}

#[test]
fn a_restored_checkpoint_plus_the_reread_range_equals_the_live_state() {
    let def = def();
    let mut live = PartitionState::default();
    let events: Vec<Event> = (0..50)
        .map(|i| event(&format!("e{}", i % 40), i * 1_000, i * 20_000))
        .collect();
    let mut payloads = Vec::new();
    for (offset, e) in events.iter().enumerate() {
        live.apply(offset as i64, e, None, &def, HORIZON);
        payloads.push(instream_event::encode(e));
    }
    let (next, bytes) = live.snapshot().expect("changed");
    live.mark_saved();
    assert!(live.snapshot().is_none(), "nothing changed since");
    assert_eq!(next, 50);
    let (mut restored, seen_from) = PartitionState::restore(&bytes).unwrap();
    assert!(seen_from > 0, "old ids were pruned: {seen_from}");
    for (offset, payload) in payloads.iter().enumerate().skip(seen_from as usize) {
        restored.rebuild_seen(offset as i64, payload);
    }
    restored.finish_rebuild(HORIZON);
    assert_eq!(restored.seen.order, live.seen.order);
    assert_eq!(restored.seen.ids, live.seen.ids);
    assert_eq!(counts(&mut restored), counts(&mut live));
    // Both treat what comes next the same way.
    for (offset, e) in [
        (50, event("e45", 51_000, 1_000_000)),
        (51, event("e49", 52_000, 1_000_001)),
    ] {
        assert_eq!(
            restored.apply(offset, &e, None, &def, HORIZON),
            live.apply(offset, &e, None, &def, HORIZON)
        );
    }
    assert!(PartitionState::restore(b"garbage").is_err());
}

#[test]
fn without_early_results_only_windows_the_watermark_passed_are_taken() {
    let def = def();
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 10_000, 1_000_000), None, &def, HORIZON);
    let mut rows = Vec::new();
    s.take_dirty(|_| Some(&def), false, &mut rows);
    assert!(rows.is_empty(), "[0, 60 s) is still open");
    // The watermark passes 60 s: the window is due, the new one [60 s, 120 s) is not.
    s.apply(1, &event("b", 61_000, 1_000_000), None, &def, HORIZON);
    s.take_dirty(|_| Some(&def), false, &mut rows);
    let starts: Vec<i64> = rows.iter().map(|r| r.window_start).collect();
    assert_eq!(starts, vec![0]);
    rows.clear();
    s.take_dirty(|_| Some(&def), true, &mut rows);
    let starts: Vec<i64> = rows.iter().map(|r| r.window_start).collect();
    assert_eq!(starts, vec![60_000], "an early round takes the open one");
}

#[test]
fn an_event_far_ahead_of_its_ingest_time_moves_nothing() {
    let def = def();
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 10_000, 10_000), None, &def, HORIZON);
    // Microseconds sent as milliseconds: a thousand times too late in the future.
    let wild = event("b", 10_000_000_000, 10_000);
    assert_eq!(s.apply(1, &wild, None, &def, HORIZON), Outcome::TooFarAhead);
    assert_eq!(
        s.apply(2, &event("c", 20_000, 20_000), None, &def, HORIZON),
        Outcome::Counted,
        "the watermark did not move"
    );
}

/// `def()` with its aggregation grouped by a payload field: repartitioned.
fn repartitioned_def() -> PipelineDefinition {
    let mut def = def();
    def.aggregations[0].group_by = vec!["payload.region".parse().unwrap()];
    // Origins 0 and 1: an enriched partition that never sent holds a watermark back too.
    def.partitions = 2;
    def
}

#[test]
fn a_repartition_partition_waits_for_its_slowest_origin() {
    let def = repartitioned_def();
    let scope = |idle_secs: u64| Scope::Repartitioned {
        aggregation: "per_minute",
        group: Some("eu"),
        idle_timeout: Duration::from_secs(idle_secs),
    };
    // Origin 0 races ten minutes ahead while origin 1 (say, restarting) is still at 0.
    let run = |idle_secs| {
        let mut s = PartitionState::default();
        let outcomes = [
            s.apply_in(
                scope(idle_secs),
                0,
                &event("a", 0, 1_000_000),
                Some((1, 0)),
                &def,
                HORIZON,
            ),
            s.apply_in(
                scope(idle_secs),
                1,
                &event("b", 600_000, 1_000_000 + 1),
                Some((0, 0)),
                &def,
                HORIZON,
            ),
            s.apply_in(
                scope(idle_secs),
                2,
                &event("c", 1_000, 1_000_000 + 2),
                Some((1, 1)),
                &def,
                HORIZON,
            ),
        ];
        (outcomes, s)
    };
    let (outcomes, mut s) = run(3600);
    // Origin 1's second event is in order for origin 1: counted, as in one clean pass.
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Counted),
        "{outcomes:?}"
    );
    assert_eq!(counts(&mut s), [(0, 2), (600_000, 1)]);
    // The group is the record's key, whatever the payload says.
    let mut rows = Vec::new();
    s.take_dirty(|_| Some(&def), true, &mut rows);
    assert!(rows.iter().all(|r| r.group_key == "eu"));
    // A restored state keeps each origin's progress: origin 0 racing further ahead still
    // waits for origin 1.
    let (_, bytes) = s.snapshot().unwrap();
    let (mut restored, _) = PartitionState::restore(&bytes).unwrap();
    let apply = |state: &mut PartitionState, offset, id, t, origin| {
        state.apply_in(
            scope(3600),
            offset,
            &event(id, t, 1_000_000 + offset),
            Some(origin),
            &def,
            HORIZON,
        )
    };
    apply(&mut restored, 3, "g", 900_000, (0, 2));
    assert_eq!(
        apply(&mut restored, 4, "d", 2_000, (1, 2)),
        Outcome::Counted
    );
    // Origin 1 then falls silent for longer than the idle timeout: origin 0 alone sets the
    // pace, and origin 1's old times are late when it comes back.
    restored.origin_times.get_mut(&1).unwrap().1 -= 7_200_000;
    apply(&mut restored, 5, "e", 950_000, (0, 3));
    assert!(matches!(
        apply(&mut restored, 6, "f", 3_000, (1, 3)),
        Outcome::TooLate(_)
    ));
    // The keyed behaviour, one watermark for all origins, would have refused it.
    let keyed_def = self::def();
    let mut keyed = PartitionState::default();
    keyed.apply(
        0,
        &event("a", 0, 1_000_000),
        Some((1, 0)),
        &keyed_def,
        HORIZON,
    );
    keyed.apply(
        1,
        &event("b", 600_000, 1_000_000 + 1),
        Some((0, 0)),
        &keyed_def,
        HORIZON,
    );
    assert!(matches!(
        keyed.apply(
            2,
            &event("c", 1_000, 1_000_000 + 2),
            Some((1, 1)),
            &keyed_def,
            HORIZON
        ),
        Outcome::TooLate(_)
    ));
}

#[test]
fn format_3_checkpoints_are_still_read() {
    let v3 = super::snapshot::SnapshotV3 {
        next_offset: 5,
        max_event_time: 1_000,
        max_ingest_time: 2_000,
        seen_from: 5,
        origin_max: vec![(0, 4)],
        windows: Vec::new(),
    };
    let mut bytes = vec![3u8];
    bytes.extend(postcard::to_allocvec(&v3).unwrap());
    let (state, seen_from) = PartitionState::restore(&bytes).unwrap();
    assert_eq!((state.next_offset(), seen_from), (5, 5));
    assert!(PartitionState::restore(&[2u8]).is_err());
}

#[test]
fn a_window_id_hashes_the_same_in_one_piece_and_streamed() {
    use super::{window_hash, window_hash_streaming};
    // Totals of 46 to 196 bytes: each of xxh3's short-input branches, the largest id of the
    // one-piece path (192) and one past it.
    for n in [0, 2, 32, 83, 146, 147, 150] {
        let group = "x".repeat(n);
        assert_eq!(
            window_hash("bids", "per_minute", &group, 1_700_000_000_000),
            window_hash_streaming("bids", "per_minute", &group, 1_700_000_000_000),
            "group of {n} bytes"
        );
    }
    assert_ne!(
        window_hash("bids", "per_minute", "k1", 0),
        window_hash("bids", "per_minutek", "1", 0)
    );
}

#[test]
fn one_producers_clock_ahead_does_not_make_the_others_events_late() {
    let def = def();
    let now = 100 * 60_000;
    let mut s = PartitionState::default();
    s.apply(0, &event("a", now, now), None, &def, HORIZON);
    // Another producer's clock is 50 minutes ahead (inside max_time_ahead): its event counts
    // in its own window, but the watermark goes no further than its ingest time.
    let ahead = event("b", now + 50 * 60_000, now + 10);
    assert_eq!(s.apply(1, &ahead, None, &def, HORIZON), Outcome::Counted);
    // The others' current events are not late.
    for (i, t) in [now - 20_000, now + 20, now + 500].into_iter().enumerate() {
        assert_eq!(
            s.apply(
                2 + i as i64,
                &event(&format!("c{i}"), t, now + 20),
                None,
                &def,
                HORIZON
            ),
            Outcome::Counted,
            "event time {t}"
        );
    }
    assert!(s.watermark_for(&def) <= now + 20 + WATERMARK_AHEAD_OF_INGEST_MILLIS);
}

#[test]
fn the_same_event_id_from_two_producers_is_two_events() {
    let def = def();
    let with_producer = |id: &str, producer: &str, t: i64| {
        let mut e = event(id, t, t);
        e.headers
            .insert(instream_pipeline::PRODUCER_HEADER.into(), producer.into());
        e
    };
    let mut s = PartitionState::default();
    assert_eq!(
        s.apply(
            0,
            &with_producer("order-1", "shop", 1_000),
            None,
            &def,
            HORIZON
        ),
        Outcome::Counted
    );
    assert_eq!(
        s.apply(
            1,
            &with_producer("order-1", "crm", 1_000),
            None,
            &def,
            HORIZON
        ),
        Outcome::Counted,
        "another producer's id of the same text"
    );
    assert_eq!(
        s.apply(
            2,
            &with_producer("order-1", "shop", 1_000),
            None,
            &def,
            HORIZON
        ),
        Outcome::RepeatedEvent,
        "the same producer's retry"
    );
    // Rebuilt after a restore, the ids keep their scope.
    let events = [
        with_producer("order-1", "shop", 1_000),
        with_producer("order-1", "crm", 1_000),
    ];
    let mut restored = PartitionState::default();
    for (offset, e) in events.iter().enumerate() {
        restored.next_offset = 2;
        restored.rebuild_seen(offset as i64, &instream_event::encode(e));
    }
    assert!(restored.seen.contains(event_identity(&events[1]), i64::MIN));
    assert!(!restored.seen.contains(
        event_identity(&with_producer("order-1", "erp", 1_000)),
        i64::MIN
    ));
}

#[test]
fn format_4_checkpoints_have_their_group_keys_rewritten_as_json_arrays() {
    let mut def = def();
    def.aggregations[0].group_by = vec!["key".parse().unwrap(), "payload.tier".parse().unwrap()];
    let window = |group: &str| {
        (
            WindowId {
                pipeline: "p".into(),
                aggregation: "per_minute".into(),
                group_key: group.into(),
                start: 0,
            },
            WindowValue {
                end: 60_000,
                closes_at: 90_000,
                version: 1,
                count: 3,
                accs: Vec::new(),
                gap: None,
                dirty: true,
            },
        )
    };
    let v4 = super::snapshot::Snapshot {
        next_offset: 3,
        max_event_time: 1_000,
        max_ingest_time: 1_000,
        seen_from: 3,
        origin_max: Vec::new(),
        windows: vec![window("k1|gold"), window("k2|null")],
        origin_times: Vec::new(),
    };
    let mut bytes = vec![4u8];
    bytes.extend(postcard::to_allocvec(&v4).unwrap());
    let (mut s, _) = PartitionState::restore(&bytes).unwrap();
    // The next event of group (k1, gold) finds the window opened before the upgrade.
    let mut e = event("new", 2_000, 2_000);
    e.payload = RawValue::from_string(r#"{"tier":"gold"}"#.into()).unwrap();
    assert_eq!(s.apply(3, &e, None, &def, HORIZON), Outcome::Counted);
    let mut rows = Vec::new();
    s.take_dirty(|_| Some(&def), true, &mut rows);
    let mut got: Vec<(String, i64)> = rows.into_iter().map(|r| (r.group_key, r.count)).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (r#"["k1","gold"]"#.to_owned(), 4),
            (r#"["k2",null]"#.to_owned(), 3)
        ]
    );
    let mut old_rows: Vec<&str> = s.deletes().iter().map(|r| r.group_key.as_str()).collect();
    old_rows.sort();
    assert_eq!(
        old_rows,
        ["k1|gold", "k2|null"],
        "the rows under the old names go"
    );
    let (_, saved) = s.snapshot().unwrap();
    assert_eq!(saved[0], 8, "saved in the new format");
    // A repartitioned aggregation's windows keep their old names (their owner is the
    // partition the old name hashed to).
    def.aggregations[0].group_by = vec![
        "payload.tier".parse().unwrap(),
        "payload.x".parse().unwrap(),
    ];
    let (mut r, _) = PartitionState::restore(&bytes).unwrap();
    r.upgrade_group_keys(|_| Some(&def));
    let mut keys: Vec<String> = r
        .windows
        .values()
        .map(|(id, _)| id.group_key.clone())
        .collect();
    keys.sort();
    assert_eq!(keys, ["k1|gold", "k2|null"]);
    assert!(r.deletes().is_empty());
}

/// (window start, count, final) of what `take_dirty` takes now, then the closed windows
/// dropped as a flush does.
fn flushed(s: &mut PartitionState, def: &PipelineDefinition, early: bool) -> Vec<(i64, i64, bool)> {
    let mut rows = Vec::new();
    s.take_dirty(|_| Some(def), early, &mut rows);
    s.close_windows(|_| Some(def.max_out_of_orderness));
    let mut out: Vec<_> = rows
        .iter()
        .map(|r| (r.window_start, r.count, r.is_final))
        .collect();
    out.sort();
    out
}

#[test]
fn a_window_is_written_final_once_its_lateness_has_run_out() {
    let def = def(); // 1-minute windows, 30 s of allowed lateness
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 10_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(flushed(&mut s, &def, true), vec![(0, 1, false)], "open");
    // The watermark passes the end: closed, still open to late events.
    s.apply(1, &event("b", 61_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(
        flushed(&mut s, &def, false),
        vec![],
        "[0, 60 s) has nothing new and is not final before 90 s; [60 s, 120 s) is open"
    );
    s.apply(2, &event("c", 20_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(
        flushed(&mut s, &def, false),
        vec![(0, 2, false)],
        "a late event"
    );
    // Past 90 s: [0, 60 s) is written once more, final, although nothing changed in it.
    s.apply(3, &event("d", 95_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(flushed(&mut s, &def, false), vec![(0, 2, true)]);
    assert_eq!(flushed(&mut s, &def, false), vec![], "and then dropped");
}

#[test]
fn emit_final_writes_each_window_once_with_its_final_value() {
    let mut def = def();
    def.aggregations[0].emit = instream_pipeline::Emit::Final;
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 10_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(flushed(&mut s, &def, true), vec![], "no early value");
    s.apply(1, &event("b", 61_000, 1_000_000), None, &def, HORIZON);
    s.apply(2, &event("c", 20_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(flushed(&mut s, &def, true), vec![], "closed but not final");
    s.apply(3, &event("d", 95_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(flushed(&mut s, &def, true), vec![(0, 2, true)]);
    assert_eq!(flushed(&mut s, &def, true), vec![]);
}

#[test]
fn an_idle_partition_moves_on_from_its_last_event_by_the_quiet_time_only_when_read_to_end() {
    let def = def(); // 1-minute windows, 30 s of lateness, no out-of-orderness
    let ooo = def.max_out_of_orderness;
    let idle = Duration::from_secs(5);
    let now = 1_000_000_000; // wall clock, ms
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 10_000, now), None, &def, HORIZON);
    s.heard_from(now);
    assert!(
        !s.advance_idle(now + 4_000, idle, true, ooo),
        "not quiet long enough"
    );
    assert!(!s.is_idle());
    assert!(
        !s.advance_idle(now + 60_000, idle, false, ooo),
        "a partition with records still to read is not idle"
    );
    // Read to its end now: the quiet time counts from here.
    assert!(!s.advance_idle(now + 64_000, idle, true, ooo));
    assert!(!s.is_idle());
    assert!(
        !s.advance_idle(now + 66_000, idle, true, ooo),
        "idle, but nothing would close: nothing moves (nor is checkpointed)"
    );
    assert!(s.is_idle());
    assert_eq!(s.max_event_time, 10_000);
    // Quiet on: [0, 60 s) closes once 60 s of event time plus its 30 s lateness have passed.
    assert!(s.advance_idle(now + 60_000 + 90_000, idle, true, ooo));
    assert_eq!(
        s.max_event_time,
        10_000 + 90_000,
        "from the last event time by the time that passed, not to the wall clock"
    );
    assert_eq!(
        flushed(&mut s, &def, false),
        vec![],
        "the final value waits until the advance is in a checkpoint"
    );
    assert_eq!(s.window_count(), 1, "and the window with it");
    s.mark_saved();
    assert_eq!(flushed(&mut s, &def, false), vec![(0, 1, true)]);
    // An event resets the quiet time.
    s.apply(1, &event("b", 200_000, now + 151_000), None, &def, HORIZON);
    s.heard_from(now + 151_000);
    assert!(!s.is_idle());
    assert!(!s.advance_idle(now + 152_000, idle, true, ooo));
}

#[test]
fn an_idle_watermark_never_passes_the_wall_clock() {
    let def = def();
    let ooo = def.max_out_of_orderness;
    let now = 1_000_000_000;
    let mut s = PartitionState::default();
    // Events a little ahead of their ingest time, within the tolerance.
    s.apply(0, &event("a", now - 500, now - 1_000), None, &def, HORIZON);
    s.heard_from(now - 1_000);
    assert!(s.advance_idle(now + 100_000, Duration::from_secs(1), true, ooo));
    assert_eq!(s.max_event_time, now + 100_000, "capped at now");
    let mut fresh = PartitionState::default();
    fresh.heard_from(now);
    assert!(
        !fresh.advance_idle(now + 10_000, Duration::from_secs(1), true, ooo),
        "a partition that never had an event has nothing to move on from"
    );
}

/// Version 1 counts; version 2, from 120 s of event time on, also sums `x` and has hopping
/// windows of 2 minutes every minute instead of tumbling minutes for `per_slide`.
fn versions() -> (PipelineDefinition, PipelineDefinition) {
    let doc = |version: u64, functions: &str, window: &str| {
        parse_document(&format!(
            r#"
[[pipelines]]
name = "p"
version = {version}
key_field = "k"
time_field = "t"
max_out_of_orderness = "1m"
[[pipelines.aggregations]]
name = "per_minute"
window = {{ kind = "tumbling", size = "1m" }}
allowed_lateness = "0s"
functions = [{functions}]
[[pipelines.aggregations]]
name = "per_slide"
window = {window}
allowed_lateness = "0s"
"#
        ))
        .unwrap()
        .pipelines
        .remove(0)
    };
    let one = doc(1, "", r#"{ kind = "tumbling", size = "1m" }"#);
    let mut two = doc(
        2,
        r#"{ fn = "sum", field = "payload.x" }"#,
        r#"{ kind = "hopping", size = "2m", slide = "1m" }"#,
    );
    two.effective_from = Some(120_000);
    let two = two.succeeding(&one, 0);
    (one, two)
}

fn with_x(id: &str, t: i64) -> Event {
    Event {
        payload: RawValue::from_string(r#"{"x": 2}"#.into()).unwrap(),
        ..event(id, t, 1_000_000)
    }
}

#[test]
fn a_definition_change_switches_at_its_event_time_boundary_whenever_a_partition_sees_it() {
    let (one, two) = versions();
    assert_eq!(two.effective_from, Some(120_000));
    // Event times in arrival order: before the boundary, across it, and late ones from
    // before it arriving after events from after it.
    let times = [
        10_000, 70_000, 110_000, 125_000, 100_000, 170_000, 119_000, 200_000,
    ];
    let first_after = times.iter().position(|t| *t >= 120_000).unwrap();
    let run = |switch_at: usize| {
        let mut s = PartitionState::default();
        for (offset, t) in times.iter().enumerate() {
            let def = if offset < switch_at { &one } else { &two };
            let outcome = s.apply(
                offset as i64,
                &with_x(&format!("e{offset}"), *t),
                None,
                def,
                HORIZON,
            );
            assert_eq!(outcome, Outcome::Counted, "event at {t}");
        }
        let mut rows = Vec::new();
        s.take_dirty(|_| Some(&two), true, &mut rows);
        let mut rows: Vec<_> = rows
            .into_iter()
            .map(|r| {
                (
                    r.aggregation,
                    r.window_start,
                    r.definition_version,
                    r.count,
                    r.values,
                )
            })
            .collect();
        rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        rows
    };
    let expected = run(0);
    let sum = |n: i64| {
        serde_json::json!({ "sum_x": n as f64 })
            .as_object()
            .cloned()
            .unwrap()
    };
    let none = serde_json::Map::new();
    assert_eq!(
        expected,
        vec![
            // Windows starting before 120 s: version 1, no sum; from it on: version 2.
            ("per_minute".into(), 0, 1, 1, none.clone()),
            ("per_minute".into(), 60_000, 1, 4, none.clone()),
            ("per_minute".into(), 120_000, 2, 2, sum(4)),
            ("per_minute".into(), 180_000, 2, 1, sum(2)),
            ("per_slide".into(), 0, 1, 1, none.clone()),
            ("per_slide".into(), 60_000, 1, 4, none.clone()),
            // Hopping under version 2: [120 s, 240 s) and [180 s, 300 s); the one starting at
            // 60 s would hold events after 120 s but is version 1's tumbling minute.
            ("per_slide".into(), 120_000, 2, 3, none.clone()),
            ("per_slide".into(), 180_000, 2, 1, none.clone()),
        ]
        .into_iter()
        .map(|(a, s, v, c, values): (String, i64, i64, i64, _)| (a, s, v, c, values))
        .collect::<Vec<_>>()
    );
    for switch_at in 1..=first_after {
        assert_eq!(run(switch_at), expected, "seen at record {switch_at}");
    }
}

#[test]
fn an_origin_not_heard_from_yet_holds_a_repartition_watermark_back() {
    let def = repartitioned_def(); // two enriched partitions
    let scope = Scope::Repartitioned {
        aggregation: "per_minute",
        group: Some("eu"),
        idle_timeout: Duration::from_secs(3600),
    };
    let mut s = PartitionState::default();
    // Origin 0's backlog comes through first, ten minutes of it.
    for (offset, t) in [0, 300_000, 600_000].into_iter().enumerate() {
        let id = format!("a{offset}");
        let e = event(&id, t, 1_000_000 + offset as i64);
        s.apply_in(
            scope,
            offset as i64,
            &e,
            Some((0, offset as i64)),
            &def,
            HORIZON,
        );
    }
    // Origin 1's first event, from the start of those ten minutes, is not late.
    assert_eq!(
        s.apply_in(
            scope,
            3,
            &event("b", 1_000, 1_000_010),
            Some((1, 0)),
            &def,
            HORIZON
        ),
        Outcome::Counted
    );
}

fn with_webhooks() -> PipelineDefinition {
    let mut def = def();
    for hook in [
        r#"kind = "webhook"
name = "busy"
aggregation = "per_minute"
url = "https://hooks.example.com/busy"
on = "early"
when = { field = "count", op = "gte", value = 2 }"#,
        r#"kind = "webhook"
name = "closed"
aggregation = "per_minute"
url = "https://hooks.example.com/closed""#,
    ] {
        def.outputs.push(toml::from_str(hook).unwrap());
    }
    def
}

/// Writes what is due (as a flush does) and returns the notifications made, by webhook name.
fn notified(s: &mut PartitionState, def: &PipelineDefinition, early: bool) -> Vec<String> {
    let mut rows = Vec::new();
    s.take_dirty(|_| Some(def), early, &mut rows);
    let (made, refused) = s.notify(&rows, |_| Some(def), 10);
    assert!(refused.is_empty());
    s.close_windows(|_| Some(def.max_out_of_orderness));
    made.into_iter().map(|n| n.output).collect()
}

#[test]
fn each_webhook_notifies_a_window_once_and_its_notifications_stay_owed_until_done() {
    let def = with_webhooks(); // 1-minute windows, 30 s of allowed lateness
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 10_000, 1_000_000), None, &def, HORIZON);
    assert!(
        notified(&mut s, &def, true).is_empty(),
        "count 1 < 2, not final"
    );
    s.apply(1, &event("b", 11_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(
        notified(&mut s, &def, true),
        vec!["busy"],
        "the first value meeting it"
    );
    s.apply(2, &event("c", 12_000, 1_000_000), None, &def, HORIZON);
    assert!(notified(&mut s, &def, true).is_empty(), "once per window");
    assert_eq!(s.pending_notifications(), 1);

    // Checkpointed: a restore owes the same notification and remembers what fired.
    let (_, bytes) = s.snapshot().unwrap();
    let (mut restored, _) = PartitionState::restore(&bytes).unwrap();
    let owed = restored.owed_notifications();
    assert_eq!(owed.len(), 1);
    assert!(restored.owed_notifications().is_empty(), "handed over once");
    restored.apply(3, &event("d", 13_000, 1_000_000), None, &def, HORIZON);
    assert!(notified(&mut restored, &def, true).is_empty());

    // Final: the webhook without a condition fires once; the window then closes.
    restored.apply(4, &event("e", 95_000, 1_000_000), None, &def, HORIZON);
    assert_eq!(notified(&mut restored, &def, false), vec!["closed"]);
    assert_eq!(restored.pending_notifications(), 2);
    let done: std::collections::HashSet<String> = [owed[0].id.clone()].into();
    restored.mark_saved();
    restored.notifications_done(&done);
    assert_eq!(restored.pending_notifications(), 1);
    assert!(
        restored.snapshot().is_some(),
        "a done notification changes the checkpoint"
    );
    assert!(
        restored.outbox.snapshot().notified.is_empty(),
        "what fired for a closed window is forgotten with it"
    );
}

#[test]
fn a_state_without_notifications_or_marks_is_saved_in_format_5_and_with_them_in_6() {
    let def = def();
    let mut s = PartitionState::default();
    s.apply(0, &event("a", 10_000, 1_000_000), None, &def, HORIZON);
    let (_, with_ledger) = s.snapshot().unwrap();
    assert_eq!(with_ledger[0], 8, "with its audit ledger");
    let (restored, _) = PartitionState::restore(&with_ledger).unwrap();
    assert_eq!(restored.ledger_rows("p", "s").len(), 2);
    // A state with no ledger (as formats 5 and 6 were written) is saved and read as before.
    s.ledger = Default::default();
    let (_, v5) = s.snapshot().unwrap();
    assert_eq!(v5[0], 5, "a build before format 6 still reads it");
    let (mut restored, _) = PartitionState::restore(&v5).unwrap();
    assert_eq!(restored.window_count(), 1);
    assert!(restored.owed_notifications().is_empty());
    s.set_result_marks(vec![("p.results.m".into(), 0, 7)]);
    let (_, v6) = s.snapshot().unwrap();
    assert_eq!(v6[0], 6);
    let (restored, _) = PartitionState::restore(&v6).unwrap();
    assert_eq!(restored.result_marks(), [("p.results.m".to_owned(), 0, 7)]);
    assert!(!restored.result_waits_for_marks("p.results.m"));
    assert!(restored.result_waits_for_marks("p.results.other"));
}

fn ledger_def() -> PipelineDefinition {
    parse_document(
        r#"
[[pipelines]]
name = "p"
key_field = "k"
time_field = "t"
max_out_of_orderness = "0s"
max_time_ahead = "1m"
[[pipelines.aggregations]]
name = "per_minute"
window = { kind = "tumbling", size = "1m" }
[[pipelines.aggregations]]
name = "big"
window = { kind = "tumbling", size = "1m" }
filter = { field = "payload.x", op = "gt", value = 5 }
"#,
    )
    .unwrap()
    .pipelines
    .remove(0)
}

/// The store's ledger: rows by (hour, since, aggregation), a row written again replacing.
type Rows = BTreeMap<(i64, i64, String), BTreeMap<String, i64>>;

fn write_ledger(s: &mut PartitionState, rows: &mut Rows) {
    for r in s.ledger_rows("p", "p.enriched:0") {
        rows.insert((r.hour, r.since, r.aggregation), r.counts);
    }
    s.ledger_written();
}

const H: i64 = 1_700_002_800_000;

/// Records of two hours of ingest time: new events, a client's resend, an enricher's re-emit,
/// a late one, one too far ahead, some the filter of `big` refuses.
fn ledger_records() -> Vec<(Event, Option<(i32, i64)>)> {
    let at = |id: &str, t: i64, ingest: i64, x: i64| {
        let mut e = event(id, t, ingest);
        e.payload = RawValue::from_string(format!(r#"{{"x":{x}}}"#)).unwrap();
        e
    };
    let mut out = Vec::new();
    for i in 0..40 {
        let ingest = H + i * 360_000; // 40 records over four hours
        out.push((at(&format!("e{i}"), ingest, ingest, i % 10), Some((0, i))));
    }
    let h4 = H + 4 * 3_600_000;
    out.push((at("e39", H, h4 + 1, 1), Some((0, 40)))); // resent
    out.push((at("e39", H, h4 + 2, 9), Some((0, 39)))); // re-emitted origin
    out.push((at("e41", H, h4 + 3, 9), Some((0, 41)))); // far behind: too late
    out.push((at("e42", h4 + 200_000, h4 + 4, 9), Some((0, 42)))); // ahead
                                                                   // Redriven long after: its ingest hour's line was let go.
    out.push((at("e43", h4 + 5, H + 5, 9), Some((0, 43))));
    out
}

#[test]
fn the_ledger_says_what_became_of_every_record_per_hour_and_aggregation() {
    let def = ledger_def();
    let mut s = PartitionState::default();
    for (offset, (e, origin)) in ledger_records().iter().enumerate() {
        s.apply(offset as i64, e, *origin, &def, HORIZON);
    }
    let mut rows = Rows::new();
    write_ledger(&mut s, &mut rows);
    let got = |hour: i64, aggregation: &str, outcome: &str| {
        rows.get(&(hour, 0, aggregation.to_owned()))
            .or_else(|| {
                rows.iter()
                    .find(|((h, _, a), _)| *h == hour && a == aggregation)
                    .map(|(_, c)| c)
            })
            .and_then(|c| c.get(outcome).copied())
            .unwrap_or(0)
    };
    let (h0, h1, h4) = (H, H + 3_600_000, H + 4 * 3_600_000);
    assert_eq!(got(h0, "", "records"), 11, "ten, and the redriven one");
    assert_eq!(got(h1, "", "records"), 10);
    assert_eq!(got(h4, "", "records"), 4);
    assert_eq!(got(h1, "per_minute", "counted"), 10);
    assert_eq!(got(h1, "big", "counted"), 4, "x of 6 to 9");
    assert_eq!(got(h1, "big", "filtered_out"), 6);
    for aggregation in ["per_minute", "big"] {
        assert_eq!(got(h4, aggregation, "repeated_event"), 1);
        assert_eq!(got(h4, aggregation, "repeated_origin"), 1);
        assert_eq!(got(h4, aggregation, "too_late"), 1);
        assert_eq!(got(h4, aggregation, "future_time"), 1);
        // Every record applied is accounted for, for every aggregation.
        for hour in [h0, h1, h4] {
            let line = &rows
                .iter()
                .find(|((h, _, a), _)| *h == hour && a == aggregation)
                .unwrap()
                .1;
            assert_eq!(line.values().sum::<i64>(), got(hour, "", "records"));
        }
    }
}

#[test]
fn the_ledger_is_exact_through_a_crash_between_its_rows_and_the_checkpoint() {
    let def = ledger_def();
    let records = ledger_records();
    let payloads: Vec<Vec<u8>> = records
        .iter()
        .map(|(e, _)| instream_event::encode(e))
        .collect();
    // Applies records `from..to`, flushing (rows, then the checkpoint) after every tenth;
    // returns the last checkpoint.
    let run = |s: &mut PartitionState, rows: &mut Rows, from: usize, to: usize| {
        let mut checkpoint = Vec::new();
        for (offset, (e, origin)) in records.iter().enumerate().take(to).skip(from) {
            s.apply(offset as i64, e, *origin, &def, HORIZON);
            if offset % 10 == 9 {
                write_ledger(s, rows);
                checkpoint = s.snapshot().unwrap().1;
                s.mark_saved();
            }
        }
        checkpoint
    };
    let mut clean = PartitionState::default();
    let mut clean_rows = Rows::new();
    run(&mut clean, &mut clean_rows, 0, records.len());
    write_ledger(&mut clean, &mut clean_rows);
    // Killed after its rows went further than its checkpoint: at 35 (checkpoint at 29), and
    // at the end (checkpoint at 39, which let the first hour's line go; the redriven record
    // then made a new line for it, written before the kill).
    let mut replayed = Vec::new();
    for killed_at in [36, records.len()] {
        let mut killed = PartitionState::default();
        let mut rows = Rows::new();
        let checkpoint = run(&mut killed, &mut rows, 0, killed_at);
        write_ledger(&mut killed, &mut rows);
        let (mut restored, seen_from) = PartitionState::restore(&checkpoint).unwrap();
        let from = restored.next_offset() as usize;
        for (offset, payload) in payloads
            .iter()
            .enumerate()
            .take(from)
            .skip(seen_from as usize)
        {
            restored.rebuild_seen(offset as i64, payload);
        }
        restored.finish_rebuild(HORIZON);
        run(&mut restored, &mut rows, from, records.len());
        write_ledger(&mut restored, &mut rows);
        assert!(
            rows.keys()
                .any(|(hour, since, _)| *hour == H && *since == 44),
            "the redriven record's hour came back as a line of its own: {rows:?}"
        );
        replayed.push(rows);
    }
    let totals = |rows: &Rows| {
        let mut t: BTreeMap<(i64, String, String), i64> = BTreeMap::new();
        for ((hour, _, aggregation), counts) in rows {
            for (outcome, n) in counts {
                *t.entry((*hour, aggregation.clone(), outcome.clone()))
                    .or_default() += n;
            }
        }
        t
    };
    for rows in &replayed {
        assert_eq!(
            totals(rows),
            totals(&clean_rows),
            "the replay counted nothing twice"
        );
    }
}
