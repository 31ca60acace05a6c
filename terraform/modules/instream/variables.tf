variable "namespace" {
  description = "Kubernetes namespace instream runs in."
  type        = string
  default     = "instream"
}

variable "create_namespace" {
  description = "Create the namespace (false: it exists already, as most platform teams manage namespaces themselves)."
  type        = bool
  default     = false
}

variable "release_name" {
  description = "Helm release name; prefixes every object."
  type        = string
  default     = "instream"
}

variable "chart_path" {
  description = "Path of the instream Helm chart; default: the chart in this repository."
  type        = string
  default     = null
}

variable "image" {
  description = "Image holding the instream binaries (the repository's Dockerfile). A digest (sha256:…) pins it."
  type = object({
    repository = string
    tag        = string
    digest     = optional(string, "")
  })
}

variable "existing_credentials_secret" {
  description = "A Secret made outside Terraform holding the credentials as files (keys: kafka-sasl-password, kafka-ca.pem, kafka-client.pem, kafka-client.key, kafka-key-password, kafka-oauthbearer-secret, zookeeper-auth, zookeeper-ca.pem, zookeeper-client.pem, zookeeper-client.key, redis-password, scylla-password, scylla-ca.pem — those the other variables say are used); the password variables then only say which are used (any non-empty value). Empty: the module makes the Secret from the variables, and their values are in the Terraform state."
  type        = string
  default     = ""
}

variable "kafka" {
  description = "The Kafka cluster and how to reach it. protocol: plaintext, ssl, sasl_plaintext or sasl_ssl; sasl_mechanism: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (with sasl_username and the sasl_password variable); ca_pem: the brokers' CA when it is not a public one."
  type = object({
    bootstrap_servers  = string
    protocol           = optional(string, "plaintext")
    sasl_mechanism     = optional(string, "SCRAM-SHA-512")
    sasl_username      = optional(string, "")
    ca_pem             = optional(string, "")
    replication_factor = optional(number, 3)
  })

  validation {
    condition     = contains(["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"], var.kafka.protocol)
    error_message = "kafka.protocol must be plaintext, ssl, sasl_plaintext or sasl_ssl."
  }
}

variable "kafka_sasl_password" {
  description = "SASL password of kafka.sasl_username; mounted as a file (kafka.sasl_password_file), never in the config."
  type        = string
  default     = ""
  sensitive   = true
}

variable "kafka_client_certificate" {
  description = "Mutual TLS to Kafka: the client certificate and its private key (PEM), and the key's password when it is encrypted. Empty: no client certificate."
  type = object({
    cert_pem     = string
    key_pem      = string
    key_password = optional(string, "")
  })
  default   = null
  sensitive = true
}

variable "kafka_oauthbearer_client_secret" {
  description = "OAUTHBEARER OIDC client secret (with sasl.oauthbearer.* settings in var.config.kafka.properties); empty for none."
  type        = string
  default     = ""
  sensitive   = true
}

variable "zookeeper_connect" {
  description = "host:port list of the ZooKeeper ensemble."
  type        = string
}

variable "zookeeper_root" {
  description = "Root znode of this deployment (several deployments can share an ensemble)."
  type        = string
  default     = "/instream"
}

variable "zookeeper_auth" {
  description = "user:password for ZooKeeper's digest scheme (every znode instream creates is then that identity's only); empty for none."
  type        = string
  default     = ""
  sensitive   = true
}

variable "redis" {
  description = "Reference data in Redis: the URL without a password (rediss:// for TLS), and the mode (standalone, sentinel with sentinel_urls and master, or cluster with node_urls)."
  type = object({
    url           = string
    mode          = optional(string, "standalone")
    nodes         = optional(list(string), [])
    sentinel_name = optional(string, "mymaster")
  })
}

variable "redis_password" {
  description = "Redis password (refdata.redis_password); empty for none."
  type        = string
  default     = ""
  sensitive   = true
}

variable "redis_sentinel_password" {
  description = "Sentinel mode: the sentinels' password when it differs from redis_password (refdata.sentinel_password); empty: redis_password."
  type        = string
  default     = ""
  sensitive   = true
}

variable "scylla" {
  description = "ScyllaDB/Cassandra: contact points (host:port), keyspace replication, the local data centre, and the user (with scylla_password)."
  type = object({
    nodes              = list(string)
    replication_factor = optional(number, 3)
    local_dc           = optional(string, "")
    username           = optional(string, "")
  })
}

variable "zookeeper_tls" {
  description = "TLS to ZooKeeper (zookeeper_connect then names its secureClientPort): the authority of the ensemble's certificates (PEM), and for mutual TLS — what ZooKeeper's TLS port asks by default — a client certificate and its unencrypted key (PEM). Null: plain."
  type = object({
    ca_pem   = string
    cert_pem = optional(string, "")
    key_pem  = optional(string, "")
  })
  default   = null
  sensitive = true
}

variable "scylla_ca_pem" {
  description = "TLS to ScyllaDB: the authority of the nodes' certificates (PEM); empty: plain CQL."
  type        = string
  default     = ""
}

variable "scylla_password" {
  description = "Password of scylla.username; empty for none."
  type        = string
  default     = ""
  sensitive   = true
}

variable "hdfs_url" {
  description = "hdfs://namenode:port or hdfs://nameservice of the archive."
  type        = string
}

variable "ingest_api_key_sha256" {
  description = "Producers' API keys as SHA-256 digests (printf %s \"$KEY\" | sha256sum), by producer name. Empty: the chart generates one key (kept in the Secret <release_name>-ingest-key)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for d in values(var.ingest_api_key_sha256) : can(regex("^[0-9a-f]{64}$", d))])
    error_message = "Each ingest key digest is 64 lowercase hex digits."
  }
}

variable "query_api_key_sha256" {
  description = "Digests of the keys query-api accepts; query-api runs only when this is not empty."
  type        = list(string)
  default     = []
}

variable "pipelines" {
  description = "Pipeline definitions (TOML, [[pipelines]] tables) the chart's hook Job applies after each install and upgrade; empty: none."
  type        = string
  default     = ""
}

variable "replicas" {
  description = "Replicas per service; each scales on its own. 0 turns a service off."
  type = object({
    ingest     = optional(number, 2)
    enricher   = optional(number, 2)
    aggregator = optional(number, 2)
    archiver   = optional(number, 1)
    query_api  = optional(number, 2)
    db_source  = optional(number, 0)
  })
  default = {}

  validation {
    condition     = alltrue([for n in values(var.replicas) : n >= 0])
    error_message = "Replica counts must not be negative."
  }
}

variable "config" {
  description = "More of instream's config (docs/configuration.md), merged over what the module sets, section by section (kafka.properties key by key). Never secrets: those have variables of their own and reach the services as files."
  type        = any
  default     = {}
}

variable "extra_values" {
  description = "More chart values (YAML documents), applied last."
  type        = list(string)
  default     = []
}
