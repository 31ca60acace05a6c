//! The periodic audit (`query_api.audit_every`): the replica elected for it (the coordinator's
//! election `audit`: ZooKeeper's, or standalone's in-process one) audits every pipeline's hours
//! of ingest time that have settled, and sets `instream_audit_unbalanced_records{pipeline,
//! stage}` (docs/guarantees.md, "Auditing what happened"; alert `InstreamAuditUnbalanced`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use instream_audit::{AuditReport, HOUR_MS};
use instream_core::config::{BrokerMode, Config};
use instream_pipeline::{topics, Catalog, PipelineDefinition};
use instream_store::AggregateStore;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub(crate) const DUTY: &str = "audit";

/// Until `shutdown`: joins the election, and while leading audits every `audit_every`.
pub(crate) async fn run(
    config: Config,
    coordinator: Arc<dyn instream_coord::Coordinator>,
    store: Arc<dyn AggregateStore>,
    catalog: watch::Receiver<Arc<Catalog>>,
    shutdown: CancellationToken,
) -> Result<(), instream_coord::CoordError> {
    let every = config.query_api.audit_every;
    // The embedded broker starts empty with the process; a store file keeps the aggregator's
    // rows of earlier runs.
    let broker_started = (config.kafka.broker == BrokerMode::Embedded
        && config.store.backend != instream_core::config::StoreBackend::Embedded)
        .then(instream_event::now_millis);
    let mut exported = Exported::default();
    let instance = instream_coord::instance_name();
    let Some(mut leadership) = instream_core::Retry::new("joining the audit election", &shutdown)
        .run(|| coordinator.campaign(DUTY, &instance))
        .await
    else {
        return Ok(());
    };
    loop {
        // An election that ended under it stops the service, naming this task.
        let term = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            term = leadership.acquired() => term?,
        };
        tracing::info!(term, "leading the periodic audit");
        while leadership.is_leader() {
            // A check waits on reads of every topic: neither a stop nor the end of the
            // leadership waits for it.
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = leadership.lost() => break,
                _ = check_all(&config, &*store, &catalog, broker_started, &mut exported) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = leadership.lost() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
        if leadership.is_leader() {
            // `lost` returned while the term stands: the election's task is gone.
            return Err(instream_coord::CoordError::ElectionEnded);
        }
        // The new leader's verdicts count now: this replica's would stay on /metrics and,
        // taken with `max by`, keep an alert firing.
        exported.retire_all();
        tracing::info!(term, "no longer leading the periodic audit");
    }
}

/// The `(pipeline, stage)` series this replica set, so that it can put them back to 0 when
/// it stops leading, or a pipeline or stage is no longer audited.
#[derive(Default)]
struct Exported(BTreeSet<(String, &'static str)>);

impl Exported {
    fn set(&mut self, pipeline: &str, stage: &'static str, records: u64) {
        metrics::gauge!("instream_audit_unbalanced_records", "pipeline" => pipeline.to_owned(), "stage" => stage)
            .set(records as f64);
        self.0.insert((pipeline.to_owned(), stage));
    }

    /// Puts every series not in `current` back to 0.
    fn retire_others(&mut self, current: &BTreeSet<(String, &'static str)>) {
        for (pipeline, stage) in self.0.difference(current) {
            metrics::gauge!("instream_audit_unbalanced_records", "pipeline" => pipeline.clone(), "stage" => *stage)
                .set(0.0);
        }
        self.0.retain(|s| current.contains(s));
    }

    fn retire_all(&mut self) {
        self.retire_others(&BTreeSet::new());
    }
}

/// The hours checked now: whole hours that ended `settle` ago or earlier, `lookback` back.
fn hours_due(now: i64, settle: Duration, lookback: Duration) -> (i64, i64) {
    let to = (now - settle.as_millis() as i64).div_euclid(HOUR_MS) * HOUR_MS;
    let hours = (lookback.as_millis() as i64 + HOUR_MS - 1) / HOUR_MS;
    (to - hours * HOUR_MS, to)
}

async fn check_all(
    config: &Config,
    store: &dyn AggregateStore,
    catalog: &watch::Receiver<Arc<Catalog>>,
    broker_started: Option<i64>,
    exported: &mut Exported,
) {
    let cfg = &config.query_api;
    let (from, to) = hours_due(
        instream_event::now_millis(),
        cfg.audit_settle,
        cfg.audit_lookback,
    );
    let archive = match cfg
        .audit_archive
        .then(|| instream_archive::build(&config.archive))
    {
        Some(Ok(archive)) => Some(archive),
        Some(Err(error)) => {
            tracing::warn!(%error, "the periodic audit cannot open the archive; it checks without");
            None
        }
        None => None,
    };
    let pipelines: Vec<Arc<PipelineDefinition>> = catalog.borrow().iter().cloned().collect();
    let mut current = BTreeSet::new();
    for def in pipelines {
        let name = def.name.clone();
        let checked = check(
            config,
            store,
            archive.as_deref(),
            &def,
            from,
            to,
            broker_started,
        )
        .await;
        match checked {
            Ok(report) => {
                for (stage, records) in report.unbalanced_by_stage() {
                    exported.set(&name, stage, records);
                    current.insert((name.clone(), stage));
                }
                metrics::gauge!("instream_audit_checked_timestamp_seconds", "pipeline" => name.clone())
                    .set(instream_event::now_millis() as f64 / 1000.0);
                for d in &report.differences {
                    tracing::warn!(pipeline = %name, hour = %d.hour, stage = d.stage, records = d.size, what = %d.what, "the audit does not balance");
                }
            }
            Err(error) => {
                // Its last verdict stands (InstreamAuditNotChecking says it is getting old).
                current.extend(exported.0.iter().filter(|(p, _)| *p == name).cloned());
                metrics::counter!("instream_audit_check_failures_total", "pipeline" => name.clone())
                    .increment(1);
                tracing::warn!(pipeline = %name, %error, "the periodic audit could not check");
            }
        }
    }
    exported.retire_others(&current);
}

async fn check(
    config: &Config,
    store: &dyn AggregateStore,
    archive: Option<&dyn instream_archive::Archive>,
    def: &PipelineDefinition,
    from: i64,
    to: i64,
    broker_started: Option<i64>,
) -> Result<AuditReport, String> {
    let (mut ledger, notes) = instream_audit::read_topics(&config.kafka, &def.name, from, to)
        .await
        .map_err(|e| e.to_string())?;
    if let Some(start) = broker_started {
        ledger.broker_started(start);
    }
    if let Some(archive) = archive {
        instream_audit::archive_by_file_names(archive, &def.name, &mut ledger)
            .await
            .map_err(|e| e.to_string())?;
    }
    let aggregations = instream_audit::aggregations_of(def);
    if !aggregations.is_empty() {
        let (from, to) = ledger.range();
        let rows = store
            .load_ledger(&def.name, from, to)
            .await
            .map_err(|e| format!("reading the aggregator's ledger: {e}"))?;
        ledger.aggregator(&rows, aggregations, &topics::enriched(&def.name));
    }
    Ok(instream_audit::report(
        &def.name,
        &ledger,
        archive.is_some(),
        notes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hours_due_have_settled_and_reach_back_whole() {
        let h = 1_700_002_800_000;
        let (from, to) = hours_due(
            h + 10 * 60_000,
            Duration::from_secs(900),
            Duration::from_secs(3 * 3600),
        );
        assert_eq!(
            (from, to),
            (h - 4 * HOUR_MS, h - HOUR_MS),
            "the hour before ended 10 minutes ago: not settled"
        );
        let (from, to) = hours_due(
            h + 20 * 60_000,
            Duration::from_secs(900),
            Duration::from_secs(5400),
        );
        assert_eq!(
            (from, to),
            (h - 2 * HOUR_MS, h),
            "a lookback of 1.5h checks two hours"
        );
    }
}
