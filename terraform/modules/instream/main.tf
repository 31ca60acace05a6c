# The six instream services on an existing Kubernetes cluster, through the repository's Helm
# chart, wired to the Kafka, ZooKeeper, Redis, ScyllaDB and HDFS given as variables. Secrets
# travel in a Kubernetes Secret mounted as files (the config names the files); none is in the
# ConfigMap or the Helm values.

locals {
  chart_path  = coalesce(var.chart_path, "${path.module}/../../../helm/instream")
  namespace   = var.create_namespace ? kubernetes_namespace_v1.instream[0].metadata[0].name : var.namespace
  secret_name = var.existing_credentials_secret != "" ? var.existing_credentials_secret : "${var.release_name}-credentials"
  secret_dir  = "/var/run/secrets/instream/${local.secret_name}"
  sasl        = startswith(var.kafka.protocol, "sasl_")
  tls         = endswith(var.kafka.protocol, "ssl")

  client_cert = var.kafka_client_certificate

  secret_files = merge(
    nonsensitive(var.kafka_sasl_password == "") ? {} : { "kafka-sasl-password" = var.kafka_sasl_password },
    var.kafka.ca_pem == "" ? {} : { "kafka-ca.pem" = var.kafka.ca_pem },
    nonsensitive(local.client_cert == null) ? {} : {
      "kafka-client.pem" = local.client_cert.cert_pem
      "kafka-client.key" = local.client_cert.key_pem
    },
    nonsensitive(try(local.client_cert.key_password, "") == "") ? {} : { "kafka-key-password" = local.client_cert.key_password },
    nonsensitive(var.kafka_oauthbearer_client_secret == "") ? {} : { "kafka-oauthbearer-secret" = var.kafka_oauthbearer_client_secret },
    nonsensitive(var.zookeeper_auth == "") ? {} : { "zookeeper-auth" = var.zookeeper_auth },
    nonsensitive(var.redis_password == "") ? {} : { "redis-password" = var.redis_password },
    nonsensitive(var.redis_sentinel_password == "") ? {} : { "redis-sentinel-password" = var.redis_sentinel_password },
    nonsensitive(var.scylla_password == "") ? {} : { "scylla-password" = var.scylla_password },
    var.scylla_ca_pem == "" ? {} : { "scylla-ca.pem" = var.scylla_ca_pem },
    nonsensitive(var.zookeeper_tls == null) ? {} : { "zookeeper-ca.pem" = var.zookeeper_tls.ca_pem },
    nonsensitive(try(var.zookeeper_tls.cert_pem, "") == "") ? {} : {
      "zookeeper-client.pem" = var.zookeeper_tls.cert_pem
      "zookeeper-client.key" = var.zookeeper_tls.key_pem
    },
  )

  kafka_properties = merge(
    { "security.protocol" = var.kafka.protocol },
    local.sasl ? { "sasl.mechanism" = var.kafka.sasl_mechanism, "sasl.username" = var.kafka.sasl_username } : {},
    local.tls && var.kafka.ca_pem != "" ? { "ssl.ca.location" = "${local.secret_dir}/kafka-ca.pem" } : {},
    nonsensitive(local.client_cert == null) ? {} : {
      "ssl.certificate.location" = "${local.secret_dir}/kafka-client.pem"
      "ssl.key.location"         = "${local.secret_dir}/kafka-client.key"
    },
    try(var.config.kafka.properties, {}),
  )

  base_config = {
    telemetry = { log_format = "json" }
    kafka = merge(
      {
        bootstrap_servers  = var.kafka.bootstrap_servers
        replication_factor = var.kafka.replication_factor
        properties         = local.kafka_properties
      },
      nonsensitive(var.kafka_sasl_password == "") ? {} : { sasl_password_file = "${local.secret_dir}/kafka-sasl-password" },
      nonsensitive(try(local.client_cert.key_password, "") == "") ? {} : { ssl_key_password_file = "${local.secret_dir}/kafka-key-password" },
      nonsensitive(var.kafka_oauthbearer_client_secret == "") ? {} : { sasl_oauthbearer_client_secret_file = "${local.secret_dir}/kafka-oauthbearer-secret" },
    )
    zookeeper = merge(
      { connect = var.zookeeper_connect, root = var.zookeeper_root },
      nonsensitive(var.zookeeper_auth == "") ? {} : { auth_file = "${local.secret_dir}/zookeeper-auth" },
      nonsensitive(var.zookeeper_tls == null) ? {} : {
        tls = merge(
          { ca_file = "${local.secret_dir}/zookeeper-ca.pem" },
          nonsensitive(try(var.zookeeper_tls.cert_pem, "") == "") ? {} : {
            cert_file = "${local.secret_dir}/zookeeper-client.pem"
            key_file  = "${local.secret_dir}/zookeeper-client.key"
          },
        )
      },
    )
    definitions = { source = "zookeeper" }
    refdata = merge(
      {
        backend         = "redis"
        redis_url       = var.redis.url
        redis_mode      = var.redis.mode
        redis_nodes     = var.redis.nodes
        sentinel_master = var.redis.sentinel_name
      },
      nonsensitive(var.redis_password == "") ? {} : { redis_password_file = "${local.secret_dir}/redis-password" },
      nonsensitive(var.redis_sentinel_password == "") ? {} : { sentinel_password_file = "${local.secret_dir}/redis-sentinel-password" },
    )
    store = merge(
      {
        backend            = "scylla"
        scylla_nodes       = var.scylla.nodes
        replication_factor = var.scylla.replication_factor
      },
      var.scylla.local_dc == "" ? {} : { local_dc = var.scylla.local_dc },
      var.scylla.username == "" ? {} : {
        username      = var.scylla.username
        password_file = "${local.secret_dir}/scylla-password"
      },
      var.scylla_ca_pem == "" ? {} : { tls = { ca_file = "${local.secret_dir}/scylla-ca.pem" } },
    )
    archive = { backend = "hdfs", hdfs_url = var.hdfs_url }
    ingest = length(var.ingest_api_key_sha256) == 0 ? {} : {
      api_keys = [for name, digest in var.ingest_api_key_sha256 : { name = name, sha256 = digest }]
    }
    query_api = { api_key_sha256 = var.query_api_key_sha256 }
  }

  # Section by section: a section given in var.config replaces keys of the module's one
  # (kafka.properties were merged key by key above).
  config = merge(local.base_config, {
    for section, keys in var.config : section => merge(
      lookup(local.base_config, section, {}),
      keys,
      section == "kafka" ? { properties = local.kafka_properties } : {},
    )
  })

  services = {
    ingest     = { enabled = var.replicas.ingest > 0, replicas = var.replicas.ingest }
    enricher   = { enabled = var.replicas.enricher > 0, replicas = var.replicas.enricher }
    aggregator = { enabled = var.replicas.aggregator > 0, replicas = var.replicas.aggregator }
    archiver   = { enabled = var.replicas.archiver > 0, replicas = var.replicas.archiver }
    query-api = {
      enabled  = var.replicas.query_api > 0 && length(var.query_api_key_sha256) > 0
      replicas = var.replicas.query_api
    }
    db-source = { enabled = var.replicas.db_source > 0, replicas = var.replicas.db_source }
  }
}

resource "kubernetes_namespace_v1" "instream" {
  count = var.create_namespace ? 1 : 0
  metadata {
    name = var.namespace
    labels = {
      "pod-security.kubernetes.io/enforce" = "restricted"
    }
  }
}

resource "kubernetes_secret_v1" "credentials" {
  count = var.existing_credentials_secret == "" ? 1 : 0
  metadata {
    name      = local.secret_name
    namespace = local.namespace
  }
  data = local.secret_files
}

resource "helm_release" "instream" {
  name       = var.release_name
  namespace  = local.namespace
  chart      = local.chart_path
  depends_on = [kubernetes_secret_v1.credentials]

  # The hook Job (schema, definitions) must finish for the release to succeed.
  wait    = true
  timeout = 900

  lifecycle {
    precondition {
      condition     = var.scylla.username == "" || nonsensitive(var.scylla_password != "")
      error_message = "scylla.username needs scylla_password."
    }
    precondition {
      condition     = !(var.create_namespace && var.existing_credentials_secret != "")
      error_message = "existing_credentials_secret must already be in the namespace, which create_namespace would make."
    }
  }

  values = concat([yamlencode({
    fullnameOverride = var.release_name
    image = {
      repository = var.image.repository
      tag        = var.image.tag
      digest     = var.image.digest
    }
    config      = local.config
    secretFiles = [{ secret = local.secret_name }]
    pipelines   = var.pipelines
    schemaJob   = { enabled = true }
    services    = local.services
  })], var.extra_values)
}
