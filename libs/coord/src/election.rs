use instream_core::config::ZooKeeperConfig;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
use zookeeper_client as zk;

use crate::session::{acls, connect, persistent, session_ended, CoordError, ELECTIONS};

/// This instance's standing in one duty's election. Dropping it withdraws (and hands the
/// duty over at once if it was leading).
pub struct Leadership {
    term: watch::Receiver<Option<u64>>,
    _stop: DropGuard,
}

impl Leadership {
    pub(crate) fn new(term: watch::Receiver<Option<u64>>, stop: CancellationToken) -> Self {
        Self {
            term,
            _stop: stop.drop_guard(),
        }
    }

    /// `Some(term)` while this instance leads (the election node's sequence number plus one,
    /// so the first term is 1). Terms only grow, so a duty can stamp its writes
    /// with the term and a store can refuse a deposed leader's late ones.
    pub fn term(&self) -> Option<u64> {
        *self.term.borrow()
    }

    pub fn is_leader(&self) -> bool {
        self.term().is_some()
    }

    /// Waits until this instance leads; returns the term. An error when the election ended
    /// under it (its task is gone: a panic, logged where it happened): waiting on would be
    /// waiting for ever.
    pub async fn acquired(&mut self) -> Result<u64, CoordError> {
        loop {
            if let Some(term) = *self.term.borrow_and_update() {
                return Ok(term);
            }
            if self.term.changed().await.is_err() {
                return Err(CoordError::ElectionEnded);
            }
        }
    }

    /// Waits until this instance no longer leads. A duty must stop at once: a standby may
    /// take over as soon as the session is gone.
    pub async fn lost(&mut self) {
        while self.term.borrow_and_update().is_some() {
            if self.term.changed().await.is_err() {
                return;
            }
        }
    }

    /// Follows the leadership from elsewhere.
    pub fn watch(&self) -> watch::Receiver<Option<u64>> {
        self.term.clone()
    }
}

/// Joins the election for `duty` (ephemeral sequential nodes under `elections/<duty>`; the
/// lowest leads; each contender watches the one before it, so a leader's death wakes one
/// standby, not the herd). Leadership is given up as soon as the connection is lost, before
/// the session can expire and a standby take over, so two instances never lead at once; it
/// comes back if the same session reconnects and its node is still there.
pub async fn campaign(
    cfg: &ZooKeeperConfig,
    duty: &str,
    instance: &str,
) -> Result<Leadership, CoordError> {
    if duty.is_empty() || duty.contains('/') {
        return Err(CoordError::Op {
            op: "campaign",
            path: duty.to_owned(),
            source: zk::Error::BadArguments(&"a duty is one path segment"),
        });
    }
    let client = connect(cfg).await?;
    let (tx, rx) = watch::channel(None);
    let stop = CancellationToken::new();
    instream_core::spawn_watched(
        "election",
        contend(
            cfg.clone(),
            client,
            duty.to_owned(),
            instance.to_owned(),
            tx,
            stop.clone(),
        ),
    );
    Ok(Leadership::new(rx, stop))
}

enum Held {
    /// Withdrawn (shutdown or the `Leadership` dropped).
    Stopped,
    /// The session ended or the lock node vanished: contend again with a new session.
    Lost,
}

/// Leads until the session ends or `stop`.
async fn hold(
    client: &zk::Client,
    lock_path: &str,
    term: u64,
    duty: &str,
    tx: &watch::Sender<Option<u64>>,
    stop: &CancellationToken,
) -> Held {
    // The watcher first, then the state it starts from: a connection lost between the lock
    // and here must not be announced as leadership.
    let mut states = client.state_watcher();
    match states.peek_state() {
        zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
            tx.send_replace(Some(term));
            metrics::gauge!("instream_leader", "duty" => duty.to_owned()).set(1.0);
            tracing::info!(duty, term, "leadership acquired");
        }
        state if state.is_terminated() => return Held::Lost,
        _ => tracing::warn!(
            duty,
            term,
            "won the election while disconnected; waiting for the connection"
        ),
    }
    let held = loop {
        tokio::select! {
            _ = stop.cancelled() => break Held::Stopped,
            state = states.changed() => match state {
                zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                    if matches!(client.check_stat(lock_path).await, Ok(Some(_))) {
                        tracing::info!(duty, term, "connected; leading");
                        metrics::gauge!("instream_leader", "duty" => duty.to_owned()).set(1.0);
                        tx.send_replace(Some(term));
                    } else {
                        break Held::Lost;
                    }
                }
                zk::SessionState::Disconnected => {
                    tracing::warn!(duty, term, "zookeeper connection lost; leadership suspended");
                    metrics::gauge!("instream_leader", "duty" => duty.to_owned()).set(0.0);
                    tx.send_replace(None);
                }
                _ => break Held::Lost,
            }
        }
    };
    tx.send_replace(None);
    metrics::gauge!("instream_leader", "duty" => duty.to_owned()).set(0.0);
    tracing::info!(duty, term, "leadership given up");
    held
}

async fn contend(
    cfg: ZooKeeperConfig,
    mut client: zk::Client,
    duty: String,
    instance: String,
    tx: watch::Sender<Option<u64>>,
    stop: CancellationToken,
) {
    let dir = format!("{ELECTIONS}/{duty}");
    let mut pauses = crate::session::ZK_BACKOFF.pauses();
    loop {
        let held = {
            let outcome = async {
                client
                    .mkdir(&dir, &persistent(&cfg))
                    .await
                    .map_err(CoordError::op("mkdir", &dir))?;
                let prefix = zk::LockPrefix::new_curator(&dir, "latch-")
                    .map_err(CoordError::op("campaign", &dir))?;
                client
                    .lock(
                        prefix,
                        instance.as_bytes(),
                        zk::LockOptions::new(acls(&cfg)),
                    )
                    .await
                    .map_err(CoordError::op("campaign", &dir))
            };
            tokio::select! {
                // Cancelling `lock` is safe: the crate deletes a half-made contender node.
                _ = stop.cancelled() => return,
                state = session_ended(&client) => {
                    tracing::warn!(%duty, ?state, "zookeeper session ended while waiting to lead");
                    Held::Lost
                }
                locked = outcome => match locked {
                    Ok(lock) => {
                        pauses.reset();
                        let path = lock.lock_path().to_owned();
                        let term = path
                            .rsplit('-')
                            .next()
                            .and_then(|seq| seq.parse::<u64>().ok())
                            .map_or(0, |seq| seq + 1);
                        let held = hold(&client, &path, term, &duty, &tx, &stop).await;
                        // Dropping the lock deletes its node; a standby is woken at once.
                        drop(lock);
                        held
                    }
                    Err(error) => {
                        tracing::warn!(%duty, %error, "contending for leadership failed");
                        Held::Lost
                    }
                },
            }
        };
        if matches!(held, Held::Stopped) {
            return;
        }
        if !client.state().is_terminated() {
            // Same session: wait a little, then contend again with it.
            if !pauses.sleep(&stop).await {
                return;
            }
            continue;
        }
        crate::session::count_session_lost("election");
        loop {
            match stop.run_until_cancelled(connect(&cfg)).await {
                None => return,
                Some(Ok(fresh)) => {
                    client = fresh;
                    break;
                }
                Some(Err(error)) => {
                    let pause = pauses.next_pause();
                    tracing::warn!(%duty, %error, retry_in = ?pause, "reconnecting to contend failed");
                    if stop
                        .run_until_cancelled(tokio::time::sleep(pause))
                        .await
                        .is_none()
                    {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiter_is_told_when_the_election_task_is_gone() {
        let (tx, rx) = watch::channel(None);
        let mut leadership = Leadership::new(rx, CancellationToken::new());
        drop(tx); // the contending task ended (a panic)
        let waited = tokio::time::timeout(Duration::from_secs(5), leadership.acquired()).await;
        assert!(
            matches!(waited, Ok(Err(CoordError::ElectionEnded))),
            "{waited:?}"
        );
    }
}
