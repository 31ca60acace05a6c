# A whole deployment on one Kubernetes cluster: the services instream needs, each through its
# own chart (versions below, current when written), then instream through its module. Kafka
# runs with SASL/SCRAM; every password is generated here and handed over as a variable.
#
#   terraform init && terraform apply -var kubeconfig=~/.kube/config
#
# Charts and versions (pin them; upgrade one at a time):
#   Kafka      bitnami/kafka      32.2.x (Kafka 4.0, KRaft, SASL_PLAINTEXT SCRAM-SHA-512)
#   ZooKeeper  bitnami/zookeeper  13.8.x (ZooKeeper 3.9; instream's control plane only)
#   Redis      bitnami/redis      21.1.x (Redis 8.0, with replicas and Sentinel)
#   ScyllaDB   scylla/scylla-operator 1.17.x and scylla/scylla 1.17.x (ScyllaDB 2025.1)
# HDFS is expected outside the cluster (hdfs_url).

terraform {
  required_version = ">= 1.6"
  required_providers {
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.36"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 3.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.7"
    }
  }
}

variable "kubeconfig" {
  description = "Path of the kubeconfig of the target cluster."
  type        = string
}

variable "namespace" {
  description = "Namespace of the whole deployment."
  type        = string
  default     = "streaming"
}

variable "image" {
  description = "instream's image."
  type = object({
    repository = string
    tag        = string
  })
  default = {
    repository = "registry.example.com/data/instream"
    tag        = "0.1.0"
  }
}

variable "hdfs_url" {
  description = "The archive's HDFS (outside the cluster)."
  type        = string
  default     = "hdfs://namenode.example.com:8020"
}

provider "kubernetes" {
  config_path = var.kubeconfig
}

provider "helm" {
  kubernetes = {
    config_path = var.kubeconfig
  }
}

resource "kubernetes_namespace_v1" "streaming" {
  metadata {
    name = var.namespace
  }
}

resource "random_password" "kafka" {
  length  = 32
  special = false
}

resource "random_password" "redis" {
  length  = 32
  special = false
}

resource "helm_release" "kafka" {
  name       = "kafka"
  namespace  = kubernetes_namespace_v1.streaming.metadata[0].name
  repository = "oci://registry-1.docker.io/bitnamicharts"
  chart      = "kafka"
  version    = "32.2.18"
  values = [yamlencode({
    controller = { replicaCount = 3 }
    listeners = {
      client = { protocol = "SASL_PLAINTEXT" }
    }
    sasl = {
      enabledMechanisms = "SCRAM-SHA-512"
      client = {
        users     = ["instream"]
        passwords = random_password.kafka.result
      }
    }
  })]
}

resource "helm_release" "zookeeper" {
  name       = "zookeeper"
  namespace  = kubernetes_namespace_v1.streaming.metadata[0].name
  repository = "oci://registry-1.docker.io/bitnamicharts"
  chart      = "zookeeper"
  version    = "13.8.7"
  values     = [yamlencode({ replicaCount = 3 })]
}

resource "helm_release" "redis" {
  name       = "redis"
  namespace  = kubernetes_namespace_v1.streaming.metadata[0].name
  repository = "oci://registry-1.docker.io/bitnamicharts"
  chart      = "redis"
  version    = "21.1.11"
  values = [yamlencode({
    architecture = "replication"
    sentinel     = { enabled = true }
    auth         = { password = random_password.redis.result }
  })]
}

resource "helm_release" "scylla_operator" {
  name             = "scylla-operator"
  namespace        = "scylla-operator"
  create_namespace = true
  repository       = "https://scylla-operator-charts.storage.googleapis.com/stable"
  chart            = "scylla-operator"
  version          = "1.17.1"
}

resource "helm_release" "scylla" {
  name       = "scylla"
  namespace  = kubernetes_namespace_v1.streaming.metadata[0].name
  repository = "https://scylla-operator-charts.storage.googleapis.com/stable"
  chart      = "scylla"
  version    = "1.17.1"
  values = [yamlencode({
    datacenter = "dc1"
    racks = [{
      name    = "rack1"
      members = 3
      storage = { capacity = "100Gi" }
      resources = {
        requests = { cpu = 2, memory = "8Gi" }
        limits   = { cpu = 2, memory = "8Gi" }
      }
    }]
  })]
  depends_on = [helm_release.scylla_operator]
}

module "instream" {
  source = "../../modules/instream"

  namespace = kubernetes_namespace_v1.streaming.metadata[0].name
  image     = var.image

  kafka = {
    bootstrap_servers = "kafka.${var.namespace}.svc:9092"
    protocol          = "sasl_plaintext"
    sasl_mechanism    = "SCRAM-SHA-512"
    sasl_username     = "instream"
  }
  kafka_sasl_password = random_password.kafka.result

  zookeeper_connect = "zookeeper.${var.namespace}.svc:2181"

  redis = {
    url   = "redis://redis.${var.namespace}.svc:6379"
    mode  = "sentinel"
    nodes = ["redis://redis.${var.namespace}.svc:26379"]
  }
  redis_password = random_password.redis.result

  scylla = {
    nodes    = ["scylla-client.${var.namespace}.svc:9042"]
    local_dc = "dc1"
  }

  hdfs_url = var.hdfs_url

  pipelines = file("${path.module}/../../../examples/definitions.toml")

  depends_on = [helm_release.kafka, helm_release.zookeeper, helm_release.redis, helm_release.scylla]
}

output "ingest_url" {
  description = "In-cluster address of ingest."
  value       = module.instream.ingest_url
}

output "ingest_key" {
  description = "How to read the generated producer key."
  value       = "kubectl -n ${var.namespace} get secret ${module.instream.ingest_key_secret} -o jsonpath='{.data.api-key}' | base64 -d"
}
