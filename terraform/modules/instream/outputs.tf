output "namespace" {
  description = "Namespace the services run in."
  value       = kubernetes_namespace.instream.metadata[0].name
}

output "ingest_service" {
  description = "In-cluster address of the ingest HTTP endpoint."
  value       = "http://${var.release_name}-ingest.${var.namespace}.svc"
}
