use crate::source::parse_document;

const GOOD: &str = r#"
[[pipelines]]
name = "orders"
key_field = "account_id"
time_field = "ts"

[[pipelines.enrichments]]
name = "customer"
key_template = "customer:{account_id}"
fields = { tier = "customer_tier" }

[[pipelines.aggregations]]
name = "per_minute"
window = { kind = "tumbling", size = "1m" }
"#;

#[test]
fn a_good_document_parses_and_validates() {
    let doc = parse_document(GOOD).unwrap();
    assert_eq!(doc.pipelines.len(), 1);
    let p = &doc.pipelines[0];
    assert_eq!(p.version, 1);
    assert_eq!(p.partitions, 4);
    assert_eq!(p.aggregations[0].window.size_millis(), 60_000);
    assert_eq!(p.aggregations[0].group_by[0].as_str(), "key");
}

#[test]
fn every_table_refuses_a_key_it_does_not_use_naming_the_pipeline_and_the_path() {
    let functions = [
        r#"{ fn = "count" }"#,
        r#"{ fn = "count", field = "payload.x" }"#,
        r#"{ fn = "sum", field = "payload.x" }"#,
        r#"{ fn = "min", field = "payload.x" }"#,
        r#"{ fn = "max", field = "payload.x" }"#,
        r#"{ fn = "avg", field = "payload.x" }"#,
        r#"{ fn = "first", field = "payload.x" }"#,
        r#"{ fn = "last", field = "payload.x" }"#,
        r#"{ fn = "count_distinct", field = "payload.x" }"#,
        r#"{ fn = "quantiles", field = "payload.x" }"#,
    ];
    for function in functions {
        let good = GOOD.replace(
            "window = { kind",
            &format!("functions = [{function}]\nwindow = {{ kind"),
        );
        parse_document(&good).unwrap_or_else(|e| panic!("{function}: {e}"));
        let extra = function.replace(" }", ", colour = 1 }");
        let bad = GOOD.replace(
            "window = { kind",
            &format!("functions = [{extra}]\nwindow = {{ kind"),
        );
        let err = parse_document(&bad).unwrap_err().to_string();
        assert!(
            err.contains("pipeline `orders`")
                && err.contains("aggregations[0].functions[0]")
                && err.contains("unknown field `colour`"),
            "{extra}: {err}"
        );
    }
    // Every other table, and each kind of the tagged ones.
    let tables = [
            ("name = \"orders\"", "name = \"orders\"\ncolour = 1"),
            ("fields = { tier", "colour = 1\nfields = { tier"),
            ("size = \"1m\" }", "size = \"1m\", colour = 1 }"),
            (
                "kind = \"tumbling\", size = \"1m\" }",
                "kind = \"hopping\", size = \"1m\", slide = \"30s\", colour = 1 }",
            ),
            (
                "kind = \"tumbling\", size = \"1m\" }",
                "kind = \"session\", gap = \"1m\", colour = 1 }",
            ),
            (
                "window = { kind",
                "filter = { field = \"payload.x\", op = \"eq\", value = 1, colour = 1 }\nwindow = { kind",
            ),
        ];
    for (from, to) in tables {
        let err = parse_document(&GOOD.replace(from, to))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("pipeline `orders`") && err.contains("unknown field `colour`"),
            "{to}: {err}"
        );
    }
    let archive = format!("{GOOD}\n[pipelines.archive]\nformat = \"parquet\"\ncolour = 1\n");
    let err = parse_document(&archive).unwrap_err().to_string();
    assert!(
        err.contains("archive.colour: unknown field `colour`"),
        "{err}"
    );
    let checks = [
        r#"kind = "required", field = "payload.x""#,
        r#"kind = "type", field = "payload.x", type = "string""#,
        r#"kind = "range", field = "payload.x", min = 1"#,
        r#"kind = "pattern", field = "payload.x", regex = "^a""#,
        r#"kind = "allowed", field = "payload.x", values = [1, 2]"#,
        r#"kind = "compare", left = "payload.x", op = "lt", right = "payload.y""#,
        r#"kind = "reference", enrichment = "customer""#,
        r#"kind = "freshness", max_age = "1h""#,
    ];
    for check in checks {
        let rule = |check: &str| {
            format!("{GOOD}\n[[pipelines.quality]]\nname = \"q\"\ncheck = {{ {check} }}\n")
        };
        parse_document(&rule(check)).unwrap_or_else(|e| panic!("{check}: {e}"));
        let err = parse_document(&rule(&format!("{check}, colour = 1")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("quality[0].check") && err.contains("unknown field `colour`"),
            "{check}: {err}"
        );
    }
    let rule = format!(
            "{GOOD}\n[[pipelines.quality]]\nname = \"q\"\ncolour = 1\ncheck = {{ kind = \"reference\", enrichment = \"customer\" }}\n"
        );
    assert!(parse_document(&rule)
        .unwrap_err()
        .to_string()
        .contains("unknown field `colour`"));
    let json = r#"{"pipelines":[{"name":"p","key_field":"k","time_field":"t","colour":1}]}"#;
    let err = parse_document(json).unwrap_err().to_string();
    assert!(
        err.contains("pipeline `p`") && err.contains("unknown field `colour`"),
        "{err}"
    );
    let err = crate::source::parse_definition(
        br#"{"name":"p","key_field":"k","time_field":"t","colour":1}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("pipeline `p`"), "{err}");
}

#[test]
fn idle_timeout_and_emit_are_read_and_checked() {
    use crate::model::Emit;
    let doc = parse_document(&GOOD.replace("window = { kind", "emit = \"final\"\nwindow = { kind"))
        .unwrap();
    assert_eq!(doc.pipelines[0].aggregations[0].emit, Emit::Final);
    assert_eq!(doc.pipelines[0].idle_timeout, None);
    let with_idle = |idle: &str| {
        GOOD.replacen(
            "name = \"orders\"",
            &format!("name = \"orders\"\nidle_timeout = \"{idle}\""),
            1,
        )
    };
    let doc = parse_document(&with_idle("30s")).unwrap();
    assert_eq!(
        doc.pipelines[0].idle_timeout,
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(doc.pipelines[0].aggregations[0].emit, Emit::Early);
    for idle in ["10ms", "8d"] {
        let err = parse_document(&with_idle(idle)).unwrap_err().to_string();
        assert!(
            err.contains("idle_timeout: must be between"),
            "{idle}: {err}"
        );
    }
    let err =
        parse_document(&GOOD.replace("window = { kind", "emit = \"sometimes\"\nwindow = { kind"))
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("pipeline `orders`") && err.contains("unknown variant `sometimes`"),
        "{err}"
    );
}

#[test]
fn kafka_outputs_name_an_aggregation_of_the_pipeline_once() {
    let with = |outputs: &str| format!("{GOOD}{outputs}");
    let good = "\n[[pipelines.outputs]]\nkind = \"kafka\"\naggregation = \"per_minute\"\n";
    let doc = parse_document(&with(good)).unwrap();
    assert!(doc.pipelines[0].kafka_output("per_minute"));
    assert_eq!(
        crate::topics::of_pipeline(&doc.pipelines[0])
            .last()
            .map(String::as_str),
        Some("orders.results.per_minute")
    );
    for (outputs, named) in [
            (
                "\n[[pipelines.outputs]]\nkind = \"kafka\"\naggregation = \"nope\"\n",
                "outputs[0].aggregation: `nope` is not an aggregation",
            ),
            (&format!("{good}{good}")[..], "outputs[1]: a Kafka output for `per_minute` is there twice"),
            (
                "\n[[pipelines.outputs]]\nkind = \"email\"\naggregation = \"per_minute\"\n",
                "unknown variant `email`",
            ),
            (
                "\n[[pipelines.outputs]]\nkind = \"kafka\"\naggregation = \"per_minute\"\ntopic = \"x\"\n",
                "unknown field `topic`",
            ),
        ] {
            let err = parse_document(&with(outputs)).unwrap_err().to_string();
            assert!(err.contains(named), "{outputs}: {err}");
        }
}

#[test]
fn a_new_version_hands_over_at_an_event_time_boundary_and_keeps_the_old_ones() {
    let v = |version: u64, size: &str| {
        let doc = GOOD
            .replacen(
                "name = \"orders\"",
                &format!("name = \"orders\"\nversion = {version}"),
                1,
            )
            .replace("size = \"1m\"", &format!("size = \"{size}\""));
        parse_document(&doc).unwrap().pipelines.remove(0)
    };
    let now = 1_714_564_800_000 + 90_000; // 12:01:30
    let two = v(2, "5m").succeeding(&v(1, "1m"), now);
    assert_eq!(
        two.effective_from,
        Some(1_714_564_800_000 + 300_000),
        "the next boundary of the longest window, 12:05"
    );
    assert_eq!(two.previous.len(), 1);
    assert_eq!(two.previous[0].version, 1);
    two.validate().unwrap();
    let ranges: Vec<(u64, i64, i64)> = two
        .versions()
        .map(|(d, from, until)| (d.version, from, until))
        .collect();
    let b = 1_714_565_100_000;
    assert_eq!(ranges, vec![(2, b, i64::MAX), (1, i64::MIN, b)]);
    assert_eq!(two.version_def(1).map(|d| d.version), Some(1));
    assert!(
        two.same_content(&v(2, "5m")),
        "stamps aside, as in the file"
    );
    assert!(!two.same_content(&v(2, "1m")));
    // Stored and read back: the stamps survive, as text.
    let text = toml::to_string(&crate::DefinitionsDocument {
        pipelines: vec![two.clone()],
    })
    .unwrap();
    assert!(
        text.contains("effective_from = \"2024-05-01T12:05:00Z\""),
        "{text}"
    );
    assert_eq!(parse_document(&text).unwrap().pipelines[0], two);
    // A given effective_from is kept; at most five versions are kept.
    let mut five = v(5, "1m");
    five.effective_from = Some(b + 600_000);
    let three = v(3, "1m").succeeding(&two, b + 1);
    let four = v(4, "1m").succeeding(&three, b + 2);
    let five = five.succeeding(&four, b + 3);
    assert_eq!(five.effective_from, Some(b + 600_000));
    let kept: Vec<u64> = five.previous.iter().map(|d| d.version).collect();
    assert_eq!(kept, vec![4, 3, 2, 1]);
    five.validate().unwrap();
    let six = v(6, "1m").succeeding(&five, b + 4);
    let seven = v(7, "1m").succeeding(&six, b + 5);
    let kept: Vec<u64> = seven.previous.iter().map(|d| d.version).collect();
    assert_eq!(kept, vec![6, 5, 4, 3, 2], "five kept");
    // Applied again before the stored version took over: not before it.
    assert!(seven.effective_from >= six.effective_from);
    seven.validate().unwrap();
}

#[test]
fn kept_versions_are_checked() {
    let one = parse_document(GOOD).unwrap().pipelines.remove(0);
    let mut two = one.clone();
    two.version = 2;
    let two = two.succeeding(&one, 0);
    let err = |d: &crate::PipelineDefinition| d.validate().unwrap_err().to_string();
    let mut unstamped = two.clone();
    unstamped.effective_from = None;
    assert!(
        err(&unstamped).contains("effective_from: is required"),
        "{}",
        err(&unstamped)
    );
    let mut newer = two.clone();
    newer.previous[0].version = 2;
    assert!(err(&newer).contains("previous[0].version: 2 is not below 2"));
    let mut off = two.clone();
    off.effective_from = Some(90_000);
    assert!(
        err(&off).contains("is not a window boundary of aggregations[0] (`per_minute`"),
        "{}",
        err(&off)
    );
    let mut later = two.clone();
    later.previous[0].effective_from = Some(i64::MAX);
    assert!(err(&later).contains("previous[0].effective_from"));
    // A repartitioned aggregation cannot change its grouping between versions.
    let regroup = |d: &mut crate::PipelineDefinition, field: &str| {
        d.aggregations[0].group_by = vec![field.parse().unwrap()];
    };
    let mut old = one.clone();
    regroup(&mut old, "payload.region");
    let mut new = old.clone();
    new.version = 2;
    regroup(&mut new, "payload.city");
    let new = new.succeeding(&old, 0);
    assert!(
        err(&new).contains("aggregations.per_minute.group_by: changed from version 1"),
        "{}",
        err(&new)
    );
}

#[test]
fn count_with_a_field_is_named_after_it_and_without_one_is_the_window_count() {
    use crate::model::Function;
    let doc = parse_document(&GOOD.replace(
            "window = { kind",
            "functions = [{ fn = \"count\" }, { fn = \"count\", field = \"payload.dep_delay\" }]\nwindow = { kind",
        ))
        .unwrap();
    let functions = &doc.pipelines[0].aggregations[0].functions;
    assert_eq!(functions[0], Function::Count { field: None });
    assert_eq!(functions[0].output_name(), "count");
    assert_eq!(functions[1].output_name(), "count_dep_delay");
    assert_eq!(
        functions[1].field().map(|f| f.as_str()),
        Some("payload.dep_delay")
    );
    let twice = GOOD.replace(
            "window = { kind",
            "functions = [{ fn = \"count\", field = \"payload.a.x\" }, { fn = \"count\", field = \"payload.b.x\" }]\nwindow = { kind",
        );
    let err = parse_document(&twice).unwrap_err().to_string();
    assert!(err.contains("`count_x` is computed twice"), "{err}");
}

#[test]
fn problems_name_their_fields() {
    let bad = GOOD
        .replace("name = \"orders\"", "name = \"Orders!\"")
        .replace("size = \"1m\"", "size = \"10ms\"");
    let err = parse_document(&bad).unwrap_err().to_string();
    assert!(err.contains("name: must be"), "{err}");
    assert!(err.contains("aggregations[0].window.size"), "{err}");
}

#[test]
fn enrichment_outputs_defaults_and_retries_are_checked() {
    let with = |line: &str| {
        GOOD.replace(
            "fields = { tier = \"customer_tier\" }",
            &format!("fields = {{ tier = \"customer_tier\" }}\n{line}"),
        )
    };
    parse_document(&with("defaults = { customer_tier = \"none\" }"))
        .expect("a default for an output field");
    parse_document(&with(
        "on_miss = \"retry\"\nretry_attempts = 5\nretry_backoff = \"100ms\"",
    ))
    .expect("a bounded retry");
    for (line, named) in [
        ("defaults = { other = 1 }", "enrichments[0].defaults"),
        (
            "on_miss = \"retry\"\nretry_attempts = 0",
            "enrichments[0].retry_attempts",
        ),
        (
            "on_miss = \"retry\"\nretry_backoff = \"1m\"",
            "enrichments[0].retry_attempts",
        ),
    ] {
        let err = parse_document(&with(line)).unwrap_err().to_string();
        assert!(err.contains(named), "{line}: {err}");
    }
    let twice = GOOD.replace(
        "fields = { tier = \"customer_tier\" }",
        "fields = { tier = \"customer_tier\", level = \"customer_tier\" }",
    );
    let err = parse_document(&twice).unwrap_err().to_string();
    assert!(err.contains("output of two fields"), "{err}");
}

#[test]
fn invalid_quality_rules_are_refused_naming_the_rule_and_the_reason() {
    let with = |rules: &str| {
        format!(
                "{GOOD}\n[[pipelines.quality]]\nname = \"ok\"\ncheck = {{ kind = \"required\", field = \"payload.amount\" }}\n{rules}"
            )
    };
    parse_document(&with(
            "[[pipelines.quality]]\nname = \"tier\"\naction = \"dead_letter\"\ncheck = { kind = \"allowed\", field = \"enrichment.customer_tier\", values = [\"gold\"] }\n\
             [[pipelines.quality]]\nname = \"known\"\ncheck = { kind = \"reference\", enrichment = \"customer\" }",
        ))
        .expect("good rules");
    for (rule, named) in [
        (
            "check = { kind = \"pattern\", field = \"payload.sku\", regex = \"([a-z\" }",
            "`bad`.check.regex: does not compile",
        ),
        (
            "check = { kind = \"range\", field = \"payload.amount\", min = 10, max = 1 }",
            "`bad`.check: min 10 is greater than max 1",
        ),
        (
            "check = { kind = \"range\", field = \"payload.amount\" }",
            "a range needs `min` or `max`",
        ),
        (
            "check = { kind = \"required\", field = \"enrichment.nope\" }",
            "field `enrichment.nope`: no enrichment rule writes `nope`",
        ),
        (
            "check = { kind = \"required\", field = \"amount\" }",
            "must be `key`, `payload.<field>` or `enrichment.<field>`",
        ),
        (
            "check = { kind = \"reference\", enrichment = \"nope\" }",
            "the pipeline has no enrichment rule `nope`",
        ),
        (
            "check = { kind = \"allowed\", field = \"key\", values = [] }",
            "`bad`.check.values: lists no value",
        ),
        ("check = { kind = \"freshness\" }", "freshness needs"),
    ] {
        let err = parse_document(&with(&format!(
            "[[pipelines.quality]]\nname = \"bad\"\n{rule}"
        )))
        .unwrap_err()
        .to_string();
        assert!(err.contains(named), "{rule}: {err}");
        assert!(err.contains("quality[1] `bad`"), "{rule}: {err}");
    }
    let twice = with(
        "[[pipelines.quality]]\nname = \"ok\"\ncheck = { kind = \"required\", field = \"key\" }",
    );
    assert!(parse_document(&twice)
        .unwrap_err()
        .to_string()
        .contains("is used twice"));
    // With a schema that declares its properties, a payload path must be one of them.
    let schema = with("[[pipelines.quality]]\nname = \"typo\"\ncheck = { kind = \"required\", field = \"payload.amuont\" }")
            .replace(
                "time_field = \"ts\"",
                "time_field = \"ts\"\nschema = '{\"type\":\"object\",\"properties\":{\"amount\":{\"type\":\"number\"}}}'",
            );
    let err = parse_document(&schema).unwrap_err().to_string();
    assert!(err.contains("declares no property `amuont`"), "{err}");
}

#[test]
fn schemas_are_compiled_when_applied() {
    let with = |schema: &str| {
        GOOD.replace(
            "time_field = \"ts\"",
            &format!("time_field = \"ts\"\n{schema}"),
        )
    };
    let doc = parse_document(&with(
        r#"schema = '{"type":"object","properties":{"amount":{"type":"number"}}}'"#,
    ))
    .expect("JSON text");
    assert_eq!(doc.pipelines[0].schema.as_ref().unwrap()["type"], "object");
    parse_document(&with(
        r#"schema = { type = "object", required = ["amount"] }"#,
    ))
    .expect("a TOML table");
    let err = parse_document(&with(r#"schema = '{"type":"nonsense"}'"#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("schema: does not compile"), "{err}");
    let err = parse_document(&with(r#"schema = '{"$ref":"https://example.com/s.json"}'"#))
        .unwrap_err()
        .to_string();
    assert!(err.contains("schema: does not compile"), "{err}");
    let err = parse_document(&with("schema = '{not json'"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("schema is not JSON"), "{err}");
}

#[test]
fn archive_columns_are_checked() {
    let with = |archive: &str| format!("{GOOD}\n[pipelines.archive]\n{archive}\n");
    let refused = |archive: &str| parse_document(&with(archive)).unwrap_err().to_string();
    let good = parse_document(&with(
            "format = \"parquet\"\ncolumns = [{ name = \"amount\", path = \"price.amount\", type = \"float64\" }]",
        ))
        .expect("a typed column");
    assert_eq!(good.pipelines[0].archive.columns[0].name, "amount");
    let err = refused("columns = [{ name = \"a\", path = \"a\", type = \"int64\" }]");
    assert!(err.contains("archive.columns: typed columns need"), "{err}");
    let err = refused(
            "format = \"parquet\"\ncolumns = [{ name = \"payload\", path = \"a\", type = \"string\" }, { name = \"a\", path = \"a\", type = \"string\" }, { name = \"a\", path = \"b\", type = \"boolean\" }]",
        );
    assert!(err.contains("archive.columns[0].name"), "{err}");
    assert!(
        err.contains("archive.columns[2].name: `a` is used twice"),
        "{err}"
    );
    let err = refused(
            "format = \"parquet\"\ncolumns = [{ name = \"Offset\", path = \"a\", type = \"int64\" }, { name = \"A\", path = \"a\", type = \"int64\" }, { name = \"a\", path = \"b\", type = \"int64\" }]",
        );
    assert!(err.contains("archive.columns[0].name"), "{err}");
    assert!(
        err.contains("archive.columns[2].name: `a` is used twice"),
        "{err}"
    );
}

#[test]
fn a_group_by_not_led_by_the_key_is_repartitioned_under_a_topic_safe_name() {
    let by_region = GOOD.replace("window = {", "group_by = [\"payload.region\"]\nwindow = {");
    let doc = parse_document(&by_region).unwrap();
    let agg = &doc.pipelines[0].aggregations[0];
    assert!(agg.repartitioned());
    assert_eq!(
        crate::topics::repartition("orders", &agg.name),
        "orders.by-per_minute"
    );
    let err = parse_document(&by_region.replace("\"per_minute\"", "\"Per Minute\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("aggregations[0].name: `Per Minute` must be"),
        "{err}"
    );
    let none = GOOD.replace("window = {", "group_by = []\nwindow = {");
    let err = parse_document(&none).unwrap_err().to_string();
    assert!(err.contains("group_by: names no field"), "{err}");
    assert!(!parse_document(GOOD).unwrap().pipelines[0].aggregations[0].repartitioned());
}

#[test]
fn json_documents_are_accepted() {
    let json = r#"{"pipelines":[{"name":"p","key_field":"k","time_field":"t"}]}"#;
    assert_eq!(parse_document(json).unwrap().pipelines[0].name, "p");
}
