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
mod tests;
