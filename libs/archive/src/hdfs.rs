use async_trait::async_trait;
use bytes::Bytes;
use hdfs_native::{Client, ClientBuilder, WriteOptions};
use instream_config::ArchiveConfig;

use crate::{
    check_path, completed, in_progress_name, is_leftover_of, Archive, ArchiveError, ArchivedFile,
};

/// The archive on HDFS, through the native RPC client (`hdfs-native`): no JVM, no libhdfs.
/// The rename is a single NameNode operation, so a file appears whole or not at all.
pub struct HdfsArchive {
    client: Client,
    root: String,
}

fn hdfs_err(path: &str) -> impl FnOnce(hdfs_native::HdfsError) -> ArchiveError + '_ {
    move |e| ArchiveError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(feature = "kerberos")]
fn kerberos(
    mut builder: ClientBuilder,
    config: &ArchiveConfig,
) -> Result<ClientBuilder, ArchiveError> {
    if let Some(principal) = &config.kerberos_principal {
        builder = builder.with_kerberos_principal(principal);
    }
    if let Some(keytab) = &config.kerberos_keytab {
        builder = builder.with_kerberos_keytab(keytab);
    }
    if let Some(cache) = &config.kerberos_cache {
        builder = builder.with_kerberos_cache(cache);
    }
    Ok(builder)
}

/// Without the feature, Kerberos settings are refused rather than silently ignored (the
/// client would then talk to a secured cluster without credentials).
#[cfg(not(feature = "kerberos"))]
fn kerberos(builder: ClientBuilder, config: &ArchiveConfig) -> Result<ClientBuilder, ArchiveError> {
    let set = config.kerberos_principal.is_some()
        || config.kerberos_keytab.is_some()
        || config.kerberos_cache.is_some();
    if set {
        return Err(ArchiveError::Unsupported(
            "archive.kerberos_* is set, but instream was built without the `kerberos` feature \
             (cargo build --features kerberos)"
                .into(),
        ));
    }
    Ok(builder)
}

impl HdfsArchive {
    /// Connects as `config` says: `hdfs_url` is `hdfs://namenode:port` or an HA nameservice
    /// (its namenodes from `hdfs_config` or the Hadoop configuration directory).
    pub fn connect(config: &ArchiveConfig) -> Result<HdfsArchive, ArchiveError> {
        let url = config.hdfs_url.as_str();
        let mut builder = ClientBuilder::new().with_url(url);
        if !config.hdfs_config.is_empty() {
            builder = builder.with_config(config.hdfs_config.clone());
        }
        if let Some(dir) = &config.hdfs_config_dir {
            builder = builder.with_config_dir(dir);
        }
        if let Some(user) = &config.hdfs_user {
            builder = builder.with_user(user);
        }
        builder = kerberos(builder, config)?;
        let client = builder.build().map_err(hdfs_err(url))?;
        Ok(HdfsArchive {
            client,
            root: config.root.trim_end_matches('/').to_owned(),
        })
    }

    fn full(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.root.clone()
        } else {
            format!("{}/{rel}", self.root)
        }
    }

    fn relative<'p>(&self, full: &'p str) -> &'p str {
        full.strip_prefix(&self.root)
            .map(|p| p.trim_start_matches('/'))
            .unwrap_or(full)
    }

    async fn list_all(&self, prefix: &str) -> Result<Vec<ArchivedFile>, ArchiveError> {
        if !prefix.is_empty() {
            check_path(prefix)?;
        }
        let dir = self.full(prefix);
        let statuses = match self.client.list_status(&dir, true).await {
            Ok(s) => s,
            Err(hdfs_native::HdfsError::FileNotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(hdfs_err(&dir)(e)),
        };
        Ok(statuses
            .into_iter()
            .filter(|s| !s.isdir)
            .map(|s| ArchivedFile {
                path: self.relative(&s.path).to_owned(),
                size: s.length as u64,
                modified_ms: s.modification_time as i64,
            })
            .collect())
    }
}

#[async_trait]
impl Archive for HdfsArchive {
    async fn put(&self, path: &str, data: Bytes) -> Result<(), ArchiveError> {
        check_path(path)?;
        let target = self.full(path);
        let temp = self.full(&in_progress_name(path));
        let options = WriteOptions::default().create_parent(true).overwrite(true);
        let mut writer = self
            .client
            .create(&temp, options)
            .await
            .map_err(hdfs_err(&temp))?;
        let size = data.len();
        let head = data.slice(..data.len() / 2);
        let tail = data.slice(data.len() / 2..);
        writer.write_bytes(head).await.map_err(hdfs_err(&temp))?;
        fail::fail_point!("archive-put-mid-write");
        writer.write_bytes(tail).await.map_err(hdfs_err(&temp))?;
        writer.close().await.map_err(hdfs_err(&temp))?;
        fail::fail_point!("archive-put-before-rename");
        if let Err(error) = self.client.rename(&temp, &target, false).await {
            // A rename whose answer was lost (a failover) leaves the target in place; a retry
            // must take that as done rather than fail forever on "exists".
            match self.client.get_file_info(&target).await {
                Ok(status) if status.length == size => {
                    let _ = self.client.delete(&temp, false).await;
                }
                _ => return Err(hdfs_err(&target)(error)),
            }
        }
        fail::fail_point!("archive-put-after-rename");
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ArchivedFile>, ArchiveError> {
        Ok(completed(self.list_all(prefix).await?))
    }

    async fn get(&self, path: &str) -> Result<Bytes, ArchiveError> {
        check_path(path)?;
        let full = self.full(path);
        let reader = self.client.read(&full).await.map_err(hdfs_err(&full))?;
        reader
            .read_range(0, reader.file_length())
            .await
            .map_err(hdfs_err(&full))
    }

    async fn remove_leftovers(
        &self,
        prefix: &str,
        name_prefix: &str,
    ) -> Result<usize, ArchiveError> {
        let mut removed = 0;
        for file in self.list_all(prefix).await? {
            if is_leftover_of(&file.path, name_prefix) {
                let full = self.full(&file.path);
                self.client
                    .delete(&full, false)
                    .await
                    .map_err(hdfs_err(&full))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn delete(&self, path: &str) -> Result<(), ArchiveError> {
        check_path(path)?;
        let full = self.full(path);
        match self.client.delete(&full, false).await {
            Ok(_) | Err(hdfs_native::HdfsError::FileNotFound(_)) => Ok(()),
            Err(e) => Err(hdfs_err(&full)(e)),
        }
    }

    async fn ping(&self) -> Result<(), ArchiveError> {
        self.client
            .get_file_info("/")
            .await
            .map(|_| ())
            .map_err(hdfs_err("/"))
    }
}
