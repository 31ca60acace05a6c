output "namespace" {
  description = "Namespace the services run in."
  value       = local.namespace
}

output "ingest_url" {
  description = "In-cluster address of the ingest HTTP endpoint."
  value       = "http://${var.release_name}-ingest.${local.namespace}.svc"
}

output "ingest_key_secret" {
  description = "Secret holding the generated producer key (api-key) when ingest_api_key_sha256 is empty."
  value       = length(var.ingest_api_key_sha256) == 0 ? "${var.release_name}-ingest-key" : null
}
