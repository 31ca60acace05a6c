//! The webhook notifications a partition owes: made from the window values it writes, kept
//! in its checkpoint until their receiver (or the dead-letter topic) has them, so a crash
//! loses none (a restart sends them again, with the same id).

use std::collections::HashSet;

use instream_pipeline::{NotifyOn, PipelineDefinition};
use instream_store::WindowAggregate;
use serde::{Deserialize, Serialize};

use super::{window_hash, PartitionState};
use crate::notify::{self, Notification};

/// What a partition keeps of its notifications.
#[derive(Debug, Default)]
pub(super) struct Outbox {
    /// Made and not yet acknowledged (checkpointed).
    pending: Vec<Notification>,
    /// (window, webhook) pairs already notified while the window is open, so each fires once
    /// per window (checkpointed; pruned as windows close).
    notified: HashSet<(u128, u128)>,
    /// Whether `pending` has been handed to the sender since the state was restored.
    handed_over: bool,
}

/// The checkpointed part of an [`Outbox`].
#[derive(Serialize, Deserialize, Default)]
pub(super) struct OutboxSnapshot {
    pub(super) pending: Vec<Notification>,
    pub(super) notified: Vec<(u128, u128)>,
}

impl Outbox {
    pub(super) fn snapshot(&self) -> OutboxSnapshot {
        OutboxSnapshot {
            pending: self.pending.clone(),
            notified: self.notified.iter().copied().collect(),
        }
    }

    pub(super) fn restore(snapshot: OutboxSnapshot) -> Self {
        Self {
            pending: snapshot.pending,
            notified: snapshot.notified.into_iter().collect(),
            handed_over: false,
        }
    }

    /// Forgets the pairs of windows no longer kept.
    pub(super) fn retain_windows(&mut self, kept: impl Fn(&u128) -> bool) {
        self.notified.retain(|(window, _)| kept(window));
    }
}

impl PartitionState {
    /// The notifications the webhooks of `rows`' aggregations owe for them (rows this
    /// partition wrote), under the definition version that made each window: each (window,
    /// webhook) once, when the value it judges (final, or any with `on = "early"`) meets its
    /// condition. They are kept until [`Self::notifications_done`] and returned to be sent;
    /// those beyond `max_pending` kept are returned apart, to be dead-lettered before the
    /// next checkpoint (which holds them as notified).
    pub fn notify<'d>(
        &mut self,
        rows: &[WindowAggregate],
        def_of: impl Fn(&str) -> Option<&'d PipelineDefinition>,
        max_pending: usize,
    ) -> (Vec<Notification>, Vec<Notification>) {
        let mut made = Vec::new();
        let mut refused = Vec::new();
        for row in rows {
            let Some(def) = def_of(&row.pipeline) else {
                continue;
            };
            let made_by = u64::try_from(row.definition_version)
                .ok()
                .and_then(|v| def.version_def(v))
                .unwrap_or(def);
            for hook in made_by.webhooks_of(&row.aggregation) {
                if hook.on == NotifyOn::Final && !row.is_final {
                    continue;
                }
                if hook
                    .when
                    .as_ref()
                    .is_some_and(|when| !when.holds(row.count, &row.values))
                {
                    continue;
                }
                let window = window_hash(
                    &row.pipeline,
                    &row.aggregation,
                    &row.group_key,
                    row.window_start,
                );
                if !self
                    .outbox
                    .notified
                    .insert((window, notify::hook_hash(hook)))
                {
                    continue;
                }
                let notification = notify::make(row, hook);
                self.changed = true;
                if self.outbox.pending.len() >= max_pending {
                    refused.push(notification);
                    continue;
                }
                self.outbox.pending.push(notification.clone());
                made.push(notification);
            }
        }
        (made, refused)
    }

    /// Notifications restored from the checkpoint and not handed to the sender yet (once).
    pub fn owed_notifications(&mut self) -> Vec<Notification> {
        if std::mem::replace(&mut self.outbox.handed_over, true) {
            return Vec::new();
        }
        self.outbox.pending.clone()
    }

    /// Drops the notifications whose receiver (or the dead-letter topic) has them.
    pub fn notifications_done(&mut self, done: &HashSet<String>) {
        let before = self.outbox.pending.len();
        self.outbox.pending.retain(|n| !done.contains(&n.id));
        if self.outbox.pending.len() != before {
            self.changed = true;
        }
    }

    pub fn pending_notifications(&self) -> usize {
        self.outbox.pending.len()
    }
}
