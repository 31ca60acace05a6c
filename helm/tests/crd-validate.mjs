// Validates the chart's custom resources (a JSON array on stdin) with validators generated
// from their CRDs' openAPIV3Schema (kubernetes-models: Prometheus Operator, KEDA).
// Exits non-zero naming each resource that does not pass.
import { PodMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const kinds = { PodMonitor, PrometheusRule, ScaledObject };
let input = "";
for await (const chunk of process.stdin) input += chunk;
let failed = 0;
for (const resource of JSON.parse(input)) {
  const Model = kinds[resource.kind];
  const name = `${resource.kind} ${resource.metadata.name}`;
  if (!Model) {
    console.log(`${name}: no validator for this kind`);
    failed++;
    continue;
  }
  try {
    new Model(resource).validate();
    console.log(`${name}: valid`);
  } catch (e) {
    console.log(`${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
