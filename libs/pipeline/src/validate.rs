//! The one validation of a definition, used by every stage and by `instream pipeline apply`.

use std::collections::BTreeSet;
use std::time::Duration;

use instream_event::FieldPath;

use crate::model::{ArchiveFormat, Function, MissPolicy, PipelineDefinition, Window};
use crate::source::DefinitionError;

/// The columns every Parquet archive file has; typed payload columns take other names.
pub const RAW_COLUMNS: [&str; 7] = [
    "offset",
    "event_id",
    "key",
    "event_time",
    "ingest_time",
    "headers",
    "payload",
];

/// Largest partition count instream creates topics with.
const MAX_PARTITIONS: i32 = 1024;

/// Whether `name` can name a pipeline: 1-64 of `[a-z0-9_-]` (so it is safe in topic names,
/// paths and URLs as it is).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// `key`, or `payload.<path>` / `enrichment.<path>`: what an aggregation can read.
fn field_root_ok(path: &FieldPath) -> bool {
    match path.segments()[0].as_str() {
        "key" => path.segments().len() == 1,
        "payload" | "enrichment" => path.segments().len() > 1,
        _ => false,
    }
}

impl PipelineDefinition {
    /// Checks the definition without I/O; every problem is listed, each with its field.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        let mut problems = Vec::new();
        let mut problem =
            |field: String, reason: String| problems.push(format!("{field}: {reason}"));

        self.limit_problems(&mut problem);
        self.enrichment_problems(&mut problem);
        self.aggregation_problems(&mut problem);
        self.output_problems(&mut problem);
        if let Some(schema) = &self.schema {
            if let Err(e) = jsonschema::validator_for(schema) {
                problem("schema".into(), format!("does not compile: {e}"));
            }
        }
        self.archive_problems(&mut problem);
        crate::quality::validate_rules(self, &mut problem);
        self.validate_versions(&mut problem);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(DefinitionError::Invalid {
                pipeline: self.name.clone(),
                problems,
            })
        }
    }
}

impl PipelineDefinition {
    /// The name, version, partitions and the definition-wide durations.
    fn limit_problems(&self, problem: &mut impl FnMut(String, String)) {
        if !valid_name(&self.name) {
            problem("name".into(), "must be 1-64 of [a-z0-9_-]".into());
        }
        if self.version == 0 {
            problem("version".into(), "must be at least 1".into());
        }
        if !(1..=MAX_PARTITIONS).contains(&self.partitions) {
            problem(
                "partitions".into(),
                format!("{} is outside 1..={MAX_PARTITIONS}", self.partitions),
            );
        }
        // Open windows stay in memory (and in checkpoints) until the watermark passes them.
        if self.max_out_of_orderness > Duration::from_secs(24 * 3600) {
            problem(
                "max_out_of_orderness".into(),
                "must be at most 24h: windows stay open (in memory) until it passes".into(),
            );
        }
        if self.max_time_ahead < Duration::from_secs(1)
            || self.max_time_ahead > Duration::from_secs(7 * 24 * 3600)
        {
            problem(
                "max_time_ahead".into(),
                "must be between 1s and 7 days".into(),
            );
        }
        if let Some(idle) = self.idle_timeout {
            if idle < Duration::from_secs(1) || idle > Duration::from_secs(7 * 24 * 3600) {
                problem(
                    "idle_timeout".into(),
                    "must be between 1s and 7 days (leave it out for windows that wait for \
                     the next event)"
                        .into(),
                );
            }
        }
    }

    /// Each enrichment rule: its name, fields, defaults and retries.
    fn enrichment_problems(&self, problem: &mut impl FnMut(String, String)) {
        let mut names = BTreeSet::new();
        for (i, rule) in self.enrichments.iter().enumerate() {
            if rule.name.is_empty() || !names.insert(rule.name.as_str()) {
                problem(
                    format!("enrichments[{i}].name"),
                    format!("`{}` is empty or used twice", rule.name),
                );
            }
            for (from, to) in &rule.fields {
                if from.is_empty() || to.is_empty() || to.starts_with('_') {
                    problem(
                        format!("enrichments[{i}].fields"),
                        format!("`{from}` -> `{to}`: names must be non-empty; `_` prefixes are reserved"),
                    );
                }
            }
            let mut outputs = BTreeSet::new();
            for to in rule.fields.values() {
                if !outputs.insert(to.as_str()) {
                    problem(
                        format!("enrichments[{i}].fields"),
                        format!("`{to}` is the output of two fields"),
                    );
                }
            }
            for name in rule.defaults.keys() {
                if name.is_empty() || name.starts_with('_') {
                    problem(
                        format!("enrichments[{i}].defaults"),
                        format!("`{name}`: names must be non-empty; `_` prefixes are reserved"),
                    );
                } else if !rule.fields.is_empty() && !rule.fields.values().any(|to| to == name) {
                    problem(
                        format!("enrichments[{i}].defaults"),
                        format!("`{name}` is not one of the rule's output fields"),
                    );
                }
            }
            if rule.on_miss == MissPolicy::Retry
                && (!(1..=20).contains(&rule.retry_attempts)
                    || rule.retry_backoff.is_zero()
                    || rule.retry_backoff > Duration::from_secs(5))
            {
                problem(
                    format!("enrichments[{i}].retry_attempts"),
                    "retry needs 1 to 20 attempts and a backoff above 0s and at most 5s".into(),
                );
            }
        }
    }

    /// Each aggregation: its name, window, functions, filter, lateness and group-by.
    fn aggregation_problems(&self, problem: &mut impl FnMut(String, String)) {
        let mut names = BTreeSet::new();
        for (i, agg) in self.aggregations.iter().enumerate() {
            if agg.name.is_empty() || !names.insert(agg.name.as_str()) {
                problem(
                    format!("aggregations[{i}].name"),
                    format!("`{}` is empty or used twice", agg.name),
                );
            }
            window_problems(i, &agg.window, problem);
            function_problems(i, &agg.functions, problem);
            if let Some(filter) = &agg.filter {
                if !field_root_ok(&filter.field) {
                    problem(
                        format!("aggregations[{i}].filter.field"),
                        format!(
                            "`{}` must be `key`, `payload.<field>` or `enrichment.<field>`",
                            filter.field
                        ),
                    );
                }
            }
            if agg.allowed_lateness > Duration::from_secs(7 * 24 * 3600) {
                problem(
                    format!("aggregations[{i}].allowed_lateness"),
                    "must be at most 7 days: windows stay open (in memory) until it passes".into(),
                );
            }
            if agg.group_by.is_empty() {
                problem(
                    format!("aggregations[{i}].group_by"),
                    "names no field".into(),
                );
            }
            // A group-by not led by the key is repartitioned through `<pipeline>.by-<name>`.
            let topic_safe = !agg.name.is_empty()
                && agg.name.len() <= 64
                && agg
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if agg.repartitioned() && !topic_safe {
                problem(
                    format!("aggregations[{i}].name"),
                    format!(
                        "`{}` must be 1-64 of [a-z0-9_-]: a group-by not led by `key` is \
                         repartitioned through the topic `{}.by-<name>`",
                        agg.name, self.name
                    ),
                );
            }
            for (j, path) in agg.group_by.iter().enumerate() {
                if !field_root_ok(path) {
                    problem(
                        format!("aggregations[{i}].group_by[{j}]"),
                        format!(
                            "`{path}` must be `key`, `payload.<field>` or `enrichment.<field>`"
                        ),
                    );
                }
            }
        }
    }

    /// Typed archive columns: for Parquet only, named apart from the raw columns and each
    /// other.
    fn archive_problems(&self, problem: &mut impl FnMut(String, String)) {
        let archive = &self.archive;
        if !archive.columns.is_empty() && archive.format != ArchiveFormat::Parquet {
            problem(
                "archive.columns".into(),
                "typed columns need `archive.format = \"parquet\"`".into(),
            );
        }
        let mut columns = BTreeSet::new();
        for (i, column) in archive.columns.iter().enumerate() {
            let name_ok = !column.name.is_empty()
                && column
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            // Case-insensitive: Spark and Hive fold column names.
            let folded = column.name.to_ascii_lowercase();
            if !name_ok || RAW_COLUMNS.contains(&folded.as_str()) {
                problem(
                    format!("archive.columns[{i}].name"),
                    format!(
                        "`{}` must be [A-Za-z0-9_] and not one of the raw columns {RAW_COLUMNS:?}",
                        column.name
                    ),
                );
            } else if !columns.insert(folded) {
                problem(
                    format!("archive.columns[{i}].name"),
                    format!("`{}` is used twice", column.name),
                );
            }
        }
    }
}

/// Aggregation `i`'s window: sizes, gaps and slides a window store can keep.
fn window_problems(i: usize, window: &Window, problem: &mut impl FnMut(String, String)) {
    match window {
        Window::Tumbling { size } => {
            if *size < Duration::from_secs(1) {
                problem(
                    format!("aggregations[{i}].window.size"),
                    "must be at least 1s".into(),
                );
            }
        }
        Window::Session { gap } => {
            if *gap < Duration::from_secs(1) {
                problem(
                    format!("aggregations[{i}].window.gap"),
                    "must be at least 1s".into(),
                );
            }
        }
        Window::Hopping { size, slide } => {
            if *slide < Duration::from_secs(1) || slide > size {
                problem(
                    format!("aggregations[{i}].window.slide"),
                    "must be at least 1s and at most the window size".into(),
                );
            } else if size.as_millis() / slide.as_millis() > 100 {
                problem(
                    format!("aggregations[{i}].window.slide"),
                    "puts each event in more than 100 windows; use a longer slide".into(),
                );
            }
        }
    }
}

/// Aggregation `i`'s functions: their fields, outputs and parameters.
fn function_problems(i: usize, functions: &[Function], problem: &mut impl FnMut(String, String)) {
    let mut outputs = BTreeSet::new();
    for (j, function) in functions.iter().enumerate() {
        let at = format!("aggregations[{i}].functions[{j}]");
        if let Some(path) = function.field() {
            if !field_root_ok(path) {
                problem(
                    format!("{at}.field"),
                    format!("`{path}` must be `key`, `payload.<field>` or `enrichment.<field>`"),
                );
            }
        }
        if !outputs.insert(function.output_name()) {
            problem(
                at.clone(),
                format!("`{}` is computed twice", function.output_name()),
            );
        }
        match function {
            Function::CountDistinct { precision, .. } if !(4..=18).contains(precision) => {
                problem(
                    format!("{at}.precision"),
                    format!("{precision} is outside 4..=18"),
                );
            }
            Function::Quantiles {
                q,
                relative_accuracy,
                ..
            } => {
                if q.is_empty() || q.iter().any(|q| !(0.0..=1.0).contains(q)) {
                    problem(format!("{at}.q"), "needs quantiles between 0 and 1".into());
                }
                if !(*relative_accuracy > 0.0 && *relative_accuracy < 0.5) {
                    problem(
                        format!("{at}.relative_accuracy"),
                        "must be above 0 and below 0.5".into(),
                    );
                }
            }
            _ => {}
        }
    }
}

impl PipelineDefinition {
    /// The versions kept in `previous`: older, each before the next in event time, and each
    /// repartitioned aggregation grouped as in every version (its windows have one owner, the
    /// partition its group hashes to).
    fn validate_versions(&self, problem: &mut impl FnMut(String, String)) {
        if !self.previous.is_empty() && self.effective_from.is_none() {
            problem(
                "effective_from".into(),
                "is required with previous versions: it is where they hand over".into(),
            );
        }
        if let (Some(from), false) = (self.effective_from, self.previous.is_empty()) {
            // Events from it to this version's first window would be in no window.
            for (i, agg) in self.aggregations.iter().enumerate() {
                let step = match agg.window {
                    crate::Window::Tumbling { size } => size,
                    crate::Window::Hopping { slide, .. } => slide,
                    crate::Window::Session { .. } => continue,
                };
                let step = step.as_millis().max(1) as i64;
                if from.rem_euclid(step) != 0 {
                    problem(
                        "effective_from".into(),
                        format!(
                            "{} is not a window boundary of aggregations[{i}] (`{}`, every \
                             {step} ms): events between it and that aggregation's next window \
                             would be in no window",
                            instream_event::format_rfc3339_millis(from),
                            agg.name
                        ),
                    );
                }
            }
        }
        let mut newer = self;
        for (i, old) in self.previous.iter().enumerate() {
            let field = |key: &str| format!("previous[{i}].{key}");
            // Structure only: a kept version was valid when applied, and a rule tightened
            // since must not make the definition that keeps it invalid for good.
            if old.effective_from.is_none() && i + 1 < self.previous.len() {
                problem(
                    field("effective_from"),
                    "is required on every kept version but the oldest".into(),
                );
            }
            if old.name != self.name {
                problem(field("name"), format!("`{}` is another pipeline", old.name));
            }
            if old.version >= newer.version {
                problem(
                    field("version"),
                    format!("{} is not below {}", old.version, newer.version),
                );
            }
            if !old.previous.is_empty() {
                problem(
                    field("previous"),
                    "versions are listed flat, newest first".into(),
                );
            }
            if let (Some(from), Some(until)) = (old.effective_from, newer.effective_from) {
                if from > until {
                    problem(
                        field("effective_from"),
                        "is after the effective_from of the version that follows it".into(),
                    );
                }
            }
            for agg in old.aggregations.iter().filter(|a| a.repartitioned()) {
                let changed = self
                    .aggregations
                    .iter()
                    .find(|a| a.name == agg.name)
                    .is_some_and(|a| a.group_by != agg.group_by);
                if changed {
                    problem(
                        format!("aggregations.{}.group_by", agg.name),
                        format!(
                            "changed from version {}: a repartitioned aggregation keeps its \
                             group_by (its windows are owned by the partition their group hashes \
                             to); give the new grouping a new aggregation name",
                            old.version
                        ),
                    );
                }
            }
            newer = old;
        }
    }
}

#[cfg(test)]
mod tests {
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
        let doc =
            parse_document(&GOOD.replace("window = { kind", "emit = \"final\"\nwindow = { kind"))
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
        let err = parse_document(
            &GOOD.replace("window = { kind", "emit = \"sometimes\"\nwindow = { kind"),
        )
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
        let twice = with("[[pipelines.quality]]\nname = \"ok\"\ncheck = { kind = \"required\", field = \"key\" }");
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
}
