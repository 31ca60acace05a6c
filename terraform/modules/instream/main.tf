# The instream services on an existing Kubernetes cluster, wired to the Kafka, ZooKeeper,
# Redis, ScyllaDB and HDFS given as variables. Secrets travel as INSTREAM__… environment
# variables from a Secret, never in the ConfigMap.

resource "kubernetes_namespace" "instream" {
  metadata {
    name = var.namespace
  }
}

resource "kubernetes_secret" "env" {
  metadata {
    name      = "${var.release_name}-env"
    namespace = kubernetes_namespace.instream.metadata[0].name
  }
  data = merge(
    { INSTREAM__REFDATA__REDIS_URL = var.redis_url },
    var.scylla_username == "" ? {} : {
      INSTREAM__STORE__USERNAME = var.scylla_username
      INSTREAM__STORE__PASSWORD = var.scylla_password
    },
  )
}

locals {
  config = <<-TOML
    [telemetry]
    log_format = "json"

    [kafka]
    bootstrap_servers = "${var.kafka_bootstrap_servers}"

    [zookeeper]
    connect = "${var.zookeeper_connect}"

    [definitions]
    source = "zookeeper"

    [refdata]
    backend = "redis"

    [store]
    backend = "scylla"
    scylla_nodes = ${jsonencode(var.scylla_nodes)}

    [archive]
    backend = "hdfs"
    hdfs_url = "${var.hdfs_url}"
  TOML
}

resource "helm_release" "instream" {
  name      = var.release_name
  namespace = kubernetes_namespace.instream.metadata[0].name
  chart     = var.chart_path

  values = [yamlencode({
    image     = { repository = var.image.repository, tag = var.image.tag }
    config    = local.config
    secretEnv = kubernetes_secret.env.metadata[0].name
    services = {
      ingest     = { enabled = var.replicas.ingest > 0, replicas = var.replicas.ingest, httpPort = 8080 }
      enricher   = { enabled = var.replicas.enricher > 0, replicas = var.replicas.enricher }
      aggregator = { enabled = var.replicas.aggregator > 0, replicas = var.replicas.aggregator }
      archiver   = { enabled = var.replicas.archiver > 0, replicas = var.replicas.archiver }
    }
  })]
}
