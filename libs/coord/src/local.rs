use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::progress::{encode, Stored};
use crate::{
    CoordError, Coordinator, Instance, InstanceInfo, Leadership, Registration, SourceProgress,
};

/// Registry, elections and sources' progress inside one process, for standalone mode: the
/// same behaviour as ZooKeeper's (a dropped registration disappears, a dropped leader hands
/// over to the next contender in arrival order, a deposed leader's save is fenced) with
/// nothing to run. Progress lives in memory, or in files under a directory so that it
/// outlives the process.
#[derive(Clone, Default)]
pub struct LocalCoordinator {
    state: Arc<Mutex<LocalState>>,
    progress_dir: Option<Arc<PathBuf>>,
}

/// A contender: its id (also its term once it leads) and where its standing is told.
type Contender = (u64, watch::Sender<Option<u64>>);

#[derive(Default)]
struct LocalState {
    instances: BTreeMap<(String, String), watch::Receiver<InstanceInfo>>,
    /// Per duty, the contenders in arrival order; the first leads.
    elections: HashMap<String, Vec<Contender>>,
    next_id: u64,
    /// Sources' progress, when no directory keeps it.
    progress: HashMap<String, Stored>,
}

impl LocalCoordinator {
    /// One whose sources' progress is kept in `<dir>/<name>.json` (across restarts). Its
    /// election terms go on from the highest term stored there, so that a restarted process's
    /// leader is never fenced by its own predecessor.
    pub fn keeping_progress_in(dir: PathBuf) -> Self {
        let highest = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "json"))
            .filter_map(|entry| std::fs::read(entry.path()).ok())
            .filter_map(|bytes| serde_json::from_slice::<Stored>(&bytes).ok())
            .map(|stored| stored.term)
            .max()
            .unwrap_or(0);
        let coordinator = Self {
            state: Default::default(),
            progress_dir: Some(Arc::new(dir)),
        };
        coordinator.state().next_id = highest;
        coordinator
    }

    fn state(&self) -> MutexGuard<'_, LocalState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn progress_file(&self, name: &str) -> Option<PathBuf> {
        self.progress_dir
            .as_ref()
            .map(|dir| dir.join(format!("{name}.json")))
    }

    /// Claims `name` for `term` (keeping its position) or saves `position` under it, unless a
    /// later term holds it: the compare and the write under one hold of the state's lock, as
    /// ZooKeeper's versioned write. Returns the position now stored.
    fn write_progress(
        &self,
        name: &str,
        term: u64,
        position: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, CoordError> {
        let mut state = self.state();
        let held = match self.progress_file(name) {
            None => state.progress.get(name).cloned(),
            Some(path) => read_progress(&path)?,
        };
        if let Some(held) = &held {
            if held.term > term {
                let path = self
                    .progress_file(name)
                    .map_or_else(|| format!("sources/{name}"), |p| p.display().to_string());
                return Err(CoordError::Fenced { path, term });
            }
        }
        let stored = Stored {
            term,
            position: position
                .or_else(|| held.map(|h| h.position))
                .unwrap_or_default(),
        };
        match self.progress_file(name) {
            None => {
                state.progress.insert(name.to_owned(), stored.clone());
            }
            Some(path) => write_durably(&path, &encode(&stored))?,
        }
        Ok(stored.position)
    }
}

fn read_progress(path: &std::path::Path) -> Result<Option<Stored>, CoordError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| CoordError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(local_error(path, e)),
    }
}

/// Writes the file whole and on disk, then renames it over the old one (and syncs the
/// directory): a crash or a power loss leaves the old progress or the new, never a torn or
/// empty file.
fn write_durably(path: &std::path::Path, bytes: &[u8]) -> Result<(), CoordError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| local_error(dir, e))?;
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary).map_err(|e| local_error(&temporary, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| local_error(&temporary, e))?;
    std::fs::rename(&temporary, path).map_err(|e| local_error(path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| local_error(dir, e))
}

fn local_error(path: &std::path::Path, e: std::io::Error) -> CoordError {
    CoordError::Local {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// A source's progress claimed from a [`LocalCoordinator`].
struct LocalProgress {
    coordinator: LocalCoordinator,
    name: String,
    term: u64,
    position: serde_json::Value,
}

#[async_trait]
impl SourceProgress for LocalProgress {
    fn position(&self) -> &serde_json::Value {
        &self.position
    }

    async fn save(&mut self, position: serde_json::Value) -> Result<(), CoordError> {
        let (coordinator, name, term) = (self.coordinator.clone(), self.name.clone(), self.term);
        // File writes (with their syncs) off the async threads.
        self.position = tokio::task::spawn_blocking(move || {
            coordinator.write_progress(&name, term, Some(position))
        })
        .await
        .map_err(|e| CoordError::Local {
            path: format!("sources/{}", self.name),
            reason: e.to_string(),
        })??;
        Ok(())
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

    async fn claim_progress(
        &self,
        name: &str,
        term: u64,
    ) -> Result<Box<dyn SourceProgress>, CoordError> {
        // The claim writes this term, fencing any earlier leader's later save.
        let (coordinator, owned) = (self.clone(), name.to_owned());
        let position =
            tokio::task::spawn_blocking(move || coordinator.write_progress(&owned, term, None))
                .await
                .map_err(|e| CoordError::Local {
                    path: format!("sources/{name}"),
                    reason: e.to_string(),
                })??;
        Ok(Box::new(LocalProgress {
            coordinator: self.clone(),
            name: name.to_owned(),
            term,
            position,
        }))
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

    /// Progress outlives the process in its directory; a claim by a later term fences the
    /// earlier leader's saves, and an earlier term cannot claim it back.
    #[tokio::test]
    async fn a_sources_progress_is_kept_in_files_and_fenced_by_term() {
        let dir = tempfile::tempdir().unwrap();
        let first = LocalCoordinator::keeping_progress_in(dir.path().join("sources"));
        let mut one = first.claim_progress("orders", 1).await.unwrap();
        assert!(one.position().is_null());
        one.save(serde_json::json!({"id": 7})).await.unwrap();
        // A new process (a restart) reads it back.
        let second = LocalCoordinator::keeping_progress_in(dir.path().join("sources"));
        let mut two = second.claim_progress("orders", 2).await.unwrap();
        assert_eq!(two.position()["id"], 7);
        let fenced = one.save(serde_json::json!({"id": 9})).await.unwrap_err();
        assert!(
            matches!(fenced, CoordError::Fenced { term: 1, .. }),
            "{fenced}"
        );
        assert!(second.claim_progress("orders", 1).await.is_err());
        two.save(serde_json::json!({"id": 8})).await.unwrap();
        // A third process's terms go on after the highest stored: its leader is not fenced.
        let third = LocalCoordinator::keeping_progress_in(dir.path().join("sources"));
        let mut leading = third.campaign("db-source-orders", "c").await.unwrap();
        let term = leading.acquired().await.unwrap();
        assert!(term > 2, "{term}");
        assert_eq!(
            third
                .claim_progress("orders", term)
                .await
                .unwrap()
                .position()["id"],
            8
        );
        let in_memory = LocalCoordinator::default();
        let mut three = in_memory.claim_progress("orders", 1).await.unwrap();
        assert!(
            three.position().is_null(),
            "a coordinator without a directory starts empty"
        );
        three.save(serde_json::json!({"id": 1})).await.unwrap();
        let again = in_memory.claim_progress("orders", 2).await.unwrap();
        assert_eq!(again.position()["id"], 1);
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
