use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{CoordError, Coordinator, Instance, InstanceInfo, Leadership, Registration};

/// Registry and elections inside one process, for standalone mode: the same behaviour as
/// ZooKeeper's (a dropped registration disappears, a dropped leader hands over to the next
/// contender in arrival order) with nothing to run.
#[derive(Clone, Default)]
pub struct LocalCoordinator {
    state: Arc<Mutex<LocalState>>,
}

/// A contender: its id (also its term once it leads) and where its standing is told.
type Contender = (u64, watch::Sender<Option<u64>>);

#[derive(Default)]
struct LocalState {
    instances: BTreeMap<(String, String), watch::Receiver<InstanceInfo>>,
    /// Per duty, the contenders in arrival order; the first leads.
    elections: HashMap<String, Vec<Contender>>,
    next_id: u64,
}

impl LocalCoordinator {
    fn state(&self) -> MutexGuard<'_, LocalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Coordinator for LocalCoordinator {
    async fn register(
        &self,
        service: &str,
        instance: &str,
        info: InstanceInfo,
    ) -> Result<Registration, CoordError> {
        let (tx, rx) = watch::channel(info);
        let key = (service.to_owned(), instance.to_owned());
        self.state().instances.insert(key.clone(), rx);
        let stop = CancellationToken::new();
        let this = self.clone();
        let stopped = stop.clone();
        instream_core::spawn_watched("local coordinator", async move {
            stopped.cancelled().await;
            this.state().instances.remove(&key);
        });
        Ok(Registration::new(
            tx,
            format!("/services/{service}/{instance}"),
            stop,
        ))
    }

    async fn campaign(&self, duty: &str, _instance: &str) -> Result<Leadership, CoordError> {
        let (tx, rx) = watch::channel(None);
        let id = {
            let mut state = self.state();
            state.next_id += 1;
            let id = state.next_id;
            let contenders = state.elections.entry(duty.to_owned()).or_default();
            if contenders.is_empty() {
                tx.send_replace(Some(id));
            }
            contenders.push((id, tx));
            id
        };
        let stop = CancellationToken::new();
        let this = self.clone();
        let stopped = stop.clone();
        let duty = duty.to_owned();
        instream_core::spawn_watched("local coordinator", async move {
            stopped.cancelled().await;
            let mut state = this.state();
            let contenders = state.elections.entry(duty).or_default();
            contenders.retain(|(other, _)| *other != id);
            if let Some((next, tx)) = contenders.first() {
                tx.send_if_modified(|term| {
                    let was = term.replace(*next);
                    was != Some(*next)
                });
            }
        });
        Ok(Leadership::new(rx, stop))
    }

    async fn instances(&self) -> Result<Vec<Instance>, CoordError> {
        Ok(self
            .state()
            .instances
            .iter()
            .map(|((service, instance), info)| Instance {
                service: service.clone(),
                instance: instance.clone(),
                info: serde_json::to_value(&*info.borrow()).unwrap_or_default(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn registrations_go_with_their_owner_and_updates_show() {
        let local = LocalCoordinator::default();
        let a = local
            .register("enricher", "a", InstanceInfo::default())
            .await
            .unwrap();
        let _b = local
            .register("archiver", "b", InstanceInfo::default())
            .await
            .unwrap();
        a.update(|info| info.partitions = vec!["x.raw/0".into()]);
        let listed = local.instances().await.unwrap();
        assert_eq!(listed.len(), 2);
        let enricher = listed.iter().find(|i| i.service == "enricher").unwrap();
        assert_eq!(enricher.info["partitions"][0], "x.raw/0");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), async {
            while local.instances().await.unwrap().len() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a dropped registration disappears");
    }

    #[tokio::test]
    async fn one_leader_per_duty_and_a_dropped_one_hands_over_in_order() {
        let local = LocalCoordinator::default();
        let mut first = local.campaign("retention", "a").await.unwrap();
        let mut second = local.campaign("retention", "b").await.unwrap();
        let third = local.campaign("retention", "c").await.unwrap();
        let other_duty = local.campaign("db-poll", "c").await.unwrap();
        let t1 = first.acquired().await.unwrap();
        assert!(!second.is_leader() && !third.is_leader());
        assert!(other_duty.is_leader());
        drop(first);
        let t2 = tokio::time::timeout(Duration::from_secs(5), second.acquired())
            .await
            .expect("the next contender leads")
            .unwrap();
        assert!(t2 > t1);
        assert!(!third.is_leader());
    }
}
