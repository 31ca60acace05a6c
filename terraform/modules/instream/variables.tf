variable "namespace" {
  description = "Kubernetes namespace instream runs in (created by this module)."
  type        = string
  default     = "instream"
}

variable "release_name" {
  description = "Helm release name; prefixes every object."
  type        = string
  default     = "instream"
}

variable "chart_path" {
  description = "Path to the instream Helm chart."
  type        = string
  default     = "../../helm/instream"
}

variable "image" {
  description = "Image holding the instream binaries."
  type = object({
    repository = string
    tag        = string
  })
}

variable "kafka_bootstrap_servers" {
  description = "host:port list of the Kafka cluster."
  type        = string
}

variable "zookeeper_connect" {
  description = "host:port list of the ZooKeeper ensemble."
  type        = string
}

variable "scylla_nodes" {
  description = "ScyllaDB/Cassandra contact points, host:port."
  type        = list(string)
}

variable "hdfs_url" {
  description = "hdfs://namenode:port or hdfs://nameservice of the archive."
  type        = string
}

variable "redis_url" {
  description = "Redis URL of the reference data, possibly with a password; kept in a Secret."
  type        = string
  sensitive   = true
}

variable "scylla_password" {
  description = "Password for the store (with scylla_username); empty for none. Kept in a Secret."
  type        = string
  default     = ""
  sensitive   = true
}

variable "scylla_username" {
  description = "User for the store; empty for none."
  type        = string
  default     = ""
}

variable "replicas" {
  description = "Replicas per service; each scales on its own."
  type = object({
    ingest     = number
    enricher   = number
    aggregator = number
    archiver   = number
  })
  default = {
    ingest     = 2
    enricher   = 2
    aggregator = 2
    archiver   = 1
  }

  validation {
    condition     = alltrue([for n in values(var.replicas) : n >= 0])
    error_message = "Replica counts must not be negative."
  }
}
