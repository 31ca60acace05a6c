//! The names of instream's services.

/// The services of instream: the names their binaries, metrics, consumer groups and
/// registry entries carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Ingest,
    Enricher,
    Aggregator,
    Archiver,
    DbSource,
    QueryApi,
}

impl Service {
    pub const ALL: [Service; 6] = [
        Service::Ingest,
        Service::Enricher,
        Service::Aggregator,
        Service::Archiver,
        Service::DbSource,
        Service::QueryApi,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Service::Ingest => "ingest",
            Service::Enricher => "enricher",
            Service::Aggregator => "aggregator",
            Service::Archiver => "archiver",
            Service::DbSource => "db-source",
            Service::QueryApi => "query-api",
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Service> for &'static str {
    fn from(service: Service) -> Self {
        service.as_str()
    }
}
