//! The enricher's work on one batch without I/O: read each record's envelope (borrowed, not
//! copied), plan its lookups from the few payload fields its rules' key templates name, and,
//! given the answers, write the enriched record by splicing an `enrichment` object into the
//! original bytes. Benchmarked in `benches/enrich.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use instream_event::{Envelope, FieldPath, Paths, Scalar};
use instream_kafka::{DeadLetterCode, Record};
use instream_pipeline::quality::{QualityAction, Severity};
use instream_pipeline::{Catalog, EnrichmentRule, MissPolicy, PipelineDefinition, RecordShape};
use instream_quality::{EventFacts, RuleSetCache, Sampler, Violation, ViolationRecord};
use instream_refdata::{Found, RefRecord};
use serde_json::Value;

/// One lookup to make: the full Redis key and its shape.
pub type Lookup = (String, RecordShape);

/// What the batch needs from reference data, and what each record became.
pub struct Plans<'r> {
    pub plans: Vec<Plan<'r>>,
    /// Distinct lookups of the whole batch.
    pub lookups: Vec<Lookup>,
    /// Per lookup, the most retries any rule asking for it allows (`None`: no retry rule).
    pub retries: Vec<Option<(u32, std::time::Duration)>>,
    /// Per rule of each planned event (see [`Plan::Enrich`]): the index of its lookup, or
    /// `None` when the event lacks a key field. One vector for the batch.
    pub rule_lookups: Vec<Option<usize>>,
}

pub enum Plan<'r> {
    Dead {
        code: DeadLetterCode,
        reason: String,
    },
    Enrich {
        envelope: Envelope<'r>,
        def: Arc<PipelineDefinition>,
        /// This event's part of [`Plans::rule_lookups`], one per rule.
        lookups: std::ops::Range<usize>,
    },
}

/// What to do with one record once its lookups are answered.
pub enum Output {
    /// Produce `bytes` to the pipeline's enriched topic.
    Enriched {
        pipeline: Arc<PipelineDefinition>,
        /// The event's partition key (the enriched topic is keyed as the raw one), in the arena.
        key: std::ops::Range<usize>,
        /// The enriched record, in the arena.
        bytes: std::ops::Range<usize>,
        ingest_time: i64,
        /// The quality rules with action `tag` the event broke, comma-separated (the
        /// `instream.quality` header).
        tags: Option<String>,
    },
    Dead {
        code: DeadLetterCode,
        reason: String,
    },
}

/// The data-quality side of the batches: compiled rule sets and the sampler (kept from batch
/// to batch), and what one batch found.
pub struct Quality {
    pub rules: RuleSetCache,
    pub sampler: Sampler,
    /// One record per violation of the batch, for `<pipeline>.quality`.
    pub records: Vec<ViolationRecord>,
    /// Events checked in the batch, by pipeline.
    pub checked: Vec<(Arc<PipelineDefinition>, u64)>,
}

impl Quality {
    pub fn new(samples_per_minute: u32) -> Self {
        Self {
            rules: RuleSetCache::default(),
            sampler: Sampler::new(samples_per_minute),
            records: Vec::new(),
            checked: Vec::new(),
        }
    }

    fn count_checked(&mut self, def: &Arc<PipelineDefinition>) {
        match self.checked.iter_mut().find(|(d, _)| Arc::ptr_eq(d, def)) {
            Some((_, n)) => *n += 1,
            None => self.checked.push((def.clone(), 1)),
        }
    }
}

/// What the quality rules decided for one event.
#[derive(Default)]
struct Verdict {
    /// The first `dead_letter` rule broken: the event's dead-letter reason.
    dead: Option<String>,
    /// The `tag` rules broken.
    tags: Vec<Value>,
}

impl Verdict {
    /// Takes in one broken rule: a `dead_letter` one gives the reason unless one did already.
    fn note(
        &mut self,
        name: &str,
        action: QualityAction,
        severity: Severity,
        violation: &Violation,
    ) {
        match action {
            QualityAction::DeadLetter if self.dead.is_none() => {
                // Bounded: the reason travels in a header and a log line, and a huge value
                // would push the dead letter over the broker's message size.
                let value = instream_quality::bounded_value(violation.value.clone())
                    .map_or_else(String::new, |v| format!(" (value {v})"));
                self.dead = Some(format!(
                    "quality rule `{name}` ({}): {}{value}",
                    severity.as_str(),
                    violation.message
                ));
            }
            QualityAction::Tag => self.tags.push(Value::String(name.to_owned())),
            _ => {}
        }
    }
}

/// Judges one enriched event by its pipeline's rules and records each violation. `enrichment`
/// is the event's enrichment object so far (unclosed, as the writer leaves it).
fn check_quality(
    quality: &mut Quality,
    def: &Arc<PipelineDefinition>,
    record: &Record,
    enrichment: &[u8],
    found: &[bool],
    violations: &mut Vec<Violation>,
) -> Result<Verdict, instream_event::DecodeError> {
    let Some(rules) = quality.rules.get(def) else {
        return Ok(Verdict::default());
    };
    quality.count_checked(def);
    let event = instream_event::view(&record.payload)?;
    let payload: Option<Value> = if rules.needs_payload() {
        Some(serde_json::from_str(event.payload.get())?)
    } else {
        None
    };
    let enrichment: Option<Value> = if rules.needs_enrichment() {
        let mut text = enrichment.to_vec();
        text.extend_from_slice(if text.is_empty() { b"{}" } else { b"}" });
        serde_json::from_slice(&text).ok()
    } else {
        None
    };
    violations.clear();
    rules.evaluate(
        &EventFacts {
            key: &event.key,
            payload: payload.as_ref(),
            enrichment: enrichment.as_ref(),
            event_time: event.event_time,
            ingest_time: event.ingest_time,
            found,
        },
        violations,
    );
    let mut verdict = Verdict::default();
    if violations.is_empty() {
        return Ok(verdict);
    }
    let now = instream_event::now_millis();
    for violation in violations.drain(..) {
        let name = rules.name(violation.rule);
        let action = rules.action(violation.rule);
        let severity = rules.severity(violation.rule);
        verdict.note(name, action, severity, &violation);
        let sample = (record.payload.len() <= instream_quality::MAX_SAMPLE_BYTES
            && quality.sampler.take(&def.name, name, now))
        .then(|| serde_json::value::RawValue::from_string(event.payload.get().to_owned()).ok())
        .flatten();
        quality.records.push(ViolationRecord {
            pipeline: def.name.clone(),
            version: def.version,
            rule: name.to_owned(),
            severity,
            action,
            event_id: event.event_id.to_string(),
            key: event.key.to_string(),
            event_time: event.event_time,
            ingest_time: event.ingest_time,
            value: instream_quality::bounded_value(violation.value),
            message: violation.message,
            raw_partition: record.partition,
            raw_offset: record.offset,
            sample,
        });
    }
    Ok(verdict)
}

/// Counts of one batch's lookup outcomes by (pipeline, rule index, outcome), for metrics
/// emitted once per batch rather than once per event.
#[derive(Default)]
pub struct Outcomes {
    counts: Vec<(Arc<PipelineDefinition>, usize, &'static str, u64)>,
}

impl Outcomes {
    fn add(&mut self, def: &Arc<PipelineDefinition>, rule: usize, outcome: &'static str) {
        match self
            .counts
            .iter_mut()
            .find(|(d, r, o, _)| *r == rule && *o == outcome && Arc::ptr_eq(d, def))
        {
            Some((.., n)) => *n += 1,
            None => self.counts.push((def.clone(), rule, outcome, 1)),
        }
    }

    /// (pipeline, rule, outcome, count) of every outcome seen.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &'static str, u64)> {
        self.counts.iter().map(|(def, rule, outcome, n)| {
            (
                def.name.as_str(),
                def.enrichments[*rule].name.as_str(),
                *outcome,
                *n,
            )
        })
    }

    pub fn get(&self, pipeline: &str, rule: &str, outcome: &str) -> u64 {
        self.iter()
            .filter(|(p, r, o, _)| *p == pipeline && *r == rule && *o == outcome)
            .map(|(.., n)| n)
            .sum()
    }
}

/// Plans every record of `batch`. `version` names the current version of a rule's data.
pub fn plan<'r>(
    catalog: &Catalog,
    version: &dyn Fn(&str, &str) -> Option<u64>,
    batch: &'r [Record],
) -> Plans<'r> {
    let mut out = Plans {
        plans: Vec::with_capacity(batch.len()),
        lookups: Vec::new(),
        retries: Vec::new(),
        rule_lookups: Vec::with_capacity(batch.len()),
    };
    let mut keys = KeyIndex {
        index: HashMap::with_capacity_and_hasher(batch.len(), Default::default()),
        key: String::new(),
        full: String::new(),
    };
    let mut values: Vec<Scalar<'r>> = Vec::new();
    let prepared = prepare(catalog, version);
    let paths_for = |pipeline: &str| prepared.get(pipeline).map(|(paths, _)| paths);
    for record in batch {
        let envelope = match instream_event::pick(&record.payload, &paths_for, &mut values) {
            Ok(v) => v,
            Err(e) => {
                out.plans.push(Plan::Dead {
                    code: DeadLetterCode::DecodeError,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        let Some(def) = catalog.get(&envelope.pipeline).cloned() else {
            out.plans.push(Plan::Dead {
                code: DeadLetterCode::UnknownPipeline,
                reason: format!("no definition for pipeline `{}`", envelope.pipeline),
            });
            continue;
        };
        let first = out.rule_lookups.len();
        if let Some((_, prefixes)) = prepared.get(def.name.as_str()) {
            keys.plan_rules(&mut out, &def, prefixes, &values);
        }
        let lookups = first..out.rule_lookups.len();
        out.plans.push(Plan::Enrich {
            envelope,
            def,
            lookups,
        });
    }
    out
}

/// Per pipeline, once a batch: the payload fields its key templates read, and per rule the
/// key prefix of its current reference-data version.
fn prepare<'c>(
    catalog: &'c Catalog,
    version: &dyn Fn(&str, &str) -> Option<u64>,
) -> HashMap<&'c str, (Paths<'c>, Vec<String>)> {
    catalog
        .iter()
        .map(|def| {
            let paths: Vec<&FieldPath> = def
                .enrichments
                .iter()
                .flat_map(|r| r.key_template.fields())
                .collect();
            let prefixes = def
                .enrichments
                .iter()
                .map(|rule| {
                    // Data loaded by `instream refdata load` lives under its version's prefix.
                    version(&def.name, &rule.name).map_or_else(String::new, |v| {
                        instream_refdata::versions::version_prefix(&def.name, &rule.name, v)
                    })
                })
                .collect();
            (def.name.as_str(), (Paths::new(&paths), prefixes))
        })
        .collect()
}

/// The batch's distinct lookups by full key, and the buffers keys are rendered in.
struct KeyIndex {
    // foldhash, not SipHash: one lookup per event of the batch, keys from this process's own
    // rendering of templates.
    index: HashMap<String, usize, foldhash::fast::RandomState>,
    key: String,
    full: String,
}

impl KeyIndex {
    /// Adds to `out` the lookup of each rule of `def` for one event, from `values` (the event's
    /// fields its pipeline's key templates read, in their order) and the rules' `prefixes`.
    fn plan_rules(
        &mut self,
        out: &mut Plans<'_>,
        def: &PipelineDefinition,
        prefixes: &[String],
        values: &[Scalar<'_>],
    ) {
        let mut at = 0;
        for (rule, prefix) in def.enrichments.iter().zip(prefixes) {
            let n = rule.key_template.fields().count();
            // The picker fills one value per path of this pipeline; `None` cannot happen,
            // and is a missing field if it ever does.
            let Some(mine) = values.get(at..at + n) else {
                out.rule_lookups.push(None);
                at += n;
                continue;
            };
            at += n;
            if mine.iter().any(Option::is_none) {
                out.rule_lookups.push(None);
                continue;
            }
            rule.key_template.render_iter(
                mine.iter().map(|v| v.as_deref().unwrap_or_default()),
                &mut self.key,
            );
            self.full.clear();
            self.full.push_str(prefix);
            self.full.push_str(&self.key);
            let retry = (rule.on_miss == MissPolicy::Retry)
                .then_some((rule.retry_attempts, rule.retry_backoff));
            let i = match self.index.get(self.full.as_str()) {
                Some(&i) => i,
                None => {
                    let i = out.lookups.len();
                    self.index.insert(self.full.clone(), i);
                    out.lookups.push((self.full.clone(), rule.shape));
                    out.retries.push(None);
                    i
                }
            };
            if let Some(retry) = retry {
                let slot = &mut out.retries[i];
                *slot = Some(slot.map_or(retry, |(a, b)| (a.max(retry.0), b.max(retry.1))));
            }
            out.rule_lookups.push(Some(i));
        }
    }
}

/// The enrichment object of one event, written straight as JSON. When two rules write the
/// same output field, the first one's value is kept.
struct Writer<'b, 'n> {
    buf: &'b mut Vec<u8>,
    /// The names written, kept only when several rules could write the same one (within a
    /// rule, output names are unique: validation sees to it).
    names: Option<Vec<&'n str>>,
    empty: bool,
}

impl<'n> Writer<'_, 'n> {
    fn field(&mut self, name: &'n str, value: &Value) {
        if let Some(names) = &mut self.names {
            if names.contains(&name) {
                return;
            }
            names.push(name);
        }
        self.buf.push(if self.empty { b'{' } else { b',' });
        self.empty = false;
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.buf, name);
        self.buf.push(b':');
        let _ = serde_json::to_writer(&mut *self.buf, value);
    }

    fn finish(self) {
        if self.empty {
            self.buf.push(b'{');
        }
        self.buf.push(b'}');
    }

    /// Finishes the object with the names of the rules `missed` (and let pass) and the `tag`
    /// quality rules broken; returns the latter comma-separated.
    fn close(mut self, missed: Vec<Value>, tags: Vec<Value>) -> Option<String> {
        let missed = Value::Array(missed);
        if missed.as_array().is_some_and(|m| !m.is_empty()) {
            self.field("_missed", &missed);
        }
        let joined = (!tags.is_empty()).then(|| {
            tags.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        });
        let tag_list = Value::Array(tags);
        if joined.is_some() {
            self.field(instream_quality::TAG_FIELD, &tag_list);
        }
        self.finish();
        joined
    }
}

fn apply<'n>(rule: &'n EnrichmentRule, found: Option<&'n RefRecord>, w: &mut Writer<'_, 'n>) {
    match found {
        Some(record) if rule.fields.is_empty() => {
            for (k, v) in record {
                w.field(k, v);
            }
        }
        Some(record) => {
            for (from, to) in &rule.fields {
                if let Some(v) = record.get(from).or_else(|| rule.defaults.get(to)) {
                    w.field(to, v);
                }
            }
        }
        None => {
            for (to, v) in &rule.defaults {
                w.field(to, v);
            }
        }
    }
}

/// Writes each planned record's output from the lookups' answers; the bytes of every
/// enriched record (and its key) go into `arena`, one allocation for the batch. A record
/// whose lookup is still missing under a `retry` rule is dead-lettered: retries happen before
/// this. Then the pipeline's quality rules judge the enriched event (see [`Quality`]).
pub fn render(
    plans: Plans<'_>,
    batch: &[Record],
    answers: &[Arc<Found>],
    outcomes: &mut Outcomes,
    quality: &mut Quality,
    arena: &mut Vec<u8>,
) -> Vec<Output> {
    arena.clear();
    quality.records.clear();
    quality.checked.clear();
    let mut renderer = Renderer {
        answers,
        outcomes,
        quality,
        arena,
        found_flags: Vec::new(),
        violations: Vec::new(),
        enrichment: Vec::with_capacity(256),
        reencoded: Vec::new(),
    };
    let mut outputs = Vec::with_capacity(plans.plans.len());
    let rule_lookups = plans.rule_lookups;
    for (record, plan) in batch.iter().zip(plans.plans) {
        outputs.push(match plan {
            Plan::Dead { code, reason } => Output::Dead { code, reason },
            Plan::Enrich {
                envelope,
                def,
                lookups,
            } => renderer
                .event(record, &envelope, def, &rule_lookups[lookups])
                .unwrap_or_else(|(code, reason)| Output::Dead { code, reason }),
        });
    }
    outputs
}

/// What [`render`] writes each event with: the batch's answers, tallies and arena, and
/// buffers reused from event to event.
struct Renderer<'a> {
    answers: &'a [Arc<Found>],
    outcomes: &'a mut Outcomes,
    quality: &'a mut Quality,
    arena: &'a mut Vec<u8>,
    found_flags: Vec<bool>,
    violations: Vec<Violation>,
    enrichment: Vec<u8>,
    reencoded: Vec<u8>,
}

impl Renderer<'_> {
    /// The enriched record of one planned event, `lookups` the indices of its rules' answers;
    /// `Err`: why it is dead-lettered.
    fn event(
        &mut self,
        record: &Record,
        envelope: &Envelope<'_>,
        def: Arc<PipelineDefinition>,
        lookups: &[Option<usize>],
    ) -> Result<Output, (DeadLetterCode, String)> {
        self.enrichment.clear();
        let several = def.enrichments.len() > 1;
        let mut writer = Writer {
            buf: &mut self.enrichment,
            names: several.then(Vec::new),
            empty: true,
        };
        let missed = apply_rules(
            &def,
            lookups,
            self.answers,
            self.outcomes,
            &mut self.found_flags,
            &mut writer,
        )?;
        let recorded = self.quality.records.len();
        let verdict = check_quality(
            self.quality,
            &def,
            record,
            writer.buf,
            &self.found_flags,
            &mut self.violations,
        )
        .map_err(|e| (DeadLetterCode::DecodeError, e.to_string()))?;
        if let Some(reason) = verdict.dead {
            return Err((DeadLetterCode::Quality, reason));
        }
        let tags = writer.close(missed, verdict.tags);
        let (key, bytes) = write_enriched(
            self.arena,
            record,
            envelope,
            &self.enrichment,
            &mut self.reencoded,
        )
        .map_err(|e| {
            // Not the event the rules judged after all: no violation of it stands.
            self.quality.records.truncate(recorded);
            (DeadLetterCode::DecodeError, e.to_string())
        })?;
        Ok(Output::Enriched {
            pipeline: def,
            key,
            bytes,
            ingest_time: envelope.ingest_time,
            tags,
        })
    }
}

/// Writes what each rule of `def` found to `writer`, counts each rule's outcome and flags its
/// hits in `found_flags`. `Ok`: the names of the rules that missed and let the event pass;
/// `Err`: the dead letter of the first rule that stops it.
fn apply_rules<'n>(
    def: &'n Arc<PipelineDefinition>,
    lookups: &[Option<usize>],
    answers: &'n [Arc<Found>],
    outcomes: &mut Outcomes,
    found_flags: &mut Vec<bool>,
    writer: &mut Writer<'_, 'n>,
) -> Result<Vec<Value>, (DeadLetterCode, String)> {
    let mut missed: Vec<Value> = Vec::new();
    let mut dead: Option<(DeadLetterCode, String)> = None;
    found_flags.clear();
    for (rule_index, (rule, lookup)) in def.enrichments.iter().zip(lookups).enumerate() {
        let found = lookup.and_then(|i| answers.get(i)).map(|f| &**f);
        let outcome = match found {
            Some(Found::Record(_)) => "hit",
            Some(Found::Malformed(_)) => "malformed",
            _ => "miss",
        };
        outcomes.add(def, rule_index, outcome);
        found_flags.push(outcome == "hit");
        match (found, rule.on_miss) {
            (Some(Found::Record(r)), _) => apply(rule, Some(r), writer),
            (Some(Found::Malformed(why)), _) => {
                dead.get_or_insert_with(|| {
                    (
                        DeadLetterCode::RefdataMalformed,
                        format!("rule `{}`: the reference record {why}", rule.name),
                    )
                });
            }
            (_, MissPolicy::Pass) => {
                missed.push(Value::String(rule.name.clone()));
                apply(rule, None, writer);
            }
            (_, MissPolicy::DeadLetter | MissPolicy::Retry) => {
                dead.get_or_insert_with(|| {
                    let why = match lookup {
                        None => "the event lacks a field of its key template".to_owned(),
                        Some(_) if rule.on_miss == MissPolicy::Retry => {
                            format!("no reference record after {} retries", rule.retry_attempts)
                        }
                        Some(_) => "no reference record".to_owned(),
                    };
                    (
                        DeadLetterCode::EnrichMiss,
                        format!("rule `{}`: {why}", rule.name),
                    )
                });
            }
        }
    }
    match dead {
        Some(letter) => Err(letter),
        None => Ok(missed),
    }
}

/// Appends the event's key, then the record with its `enrichment`, to `arena`; returns where
/// each is.
fn write_enriched(
    arena: &mut Vec<u8>,
    record: &Record,
    envelope: &Envelope<'_>,
    enrichment: &[u8],
    reencoded: &mut Vec<u8>,
) -> Result<(std::ops::Range<usize>, std::ops::Range<usize>), instream_event::DecodeError> {
    let key_start = arena.len();
    arena.extend_from_slice(envelope.key.as_bytes());
    let start = arena.len();
    let spliced = !envelope.enriched
        && instream_event::with_enrichment(&record.payload, enrichment, arena).is_some();
    if !spliced {
        // Already enriched once (a replayed record): re-encode with the new enrichment.
        let mut event = instream_event::decode(&record.payload)?;
        event.enrichment = serde_json::from_slice(enrichment).ok();
        instream_event::encode_into(&event, reencoded);
        arena.extend_from_slice(reencoded);
    }
    Ok((key_start..start, start..arena.len()))
}

#[cfg(test)]
#[path = "transform_tests.rs"]
mod tests;
