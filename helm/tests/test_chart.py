"""Checks of the Helm chart, offline, with real Helm v4 (helm-python-sdk): lint, the values
schema, and three renders (default, values-production.yaml, every option on), each checked
against the Kubernetes 1.30 schemas (kubernetes-validate), its custom resources against the
openAPIV3Schema of their CRDs stored in helm/tests/crds (crd_schemas.py), and its config against the start-up
checks of every service it runs (`instream check-config --service …`). checkov runs over the
rendered manifests. Run by scripts/test.sh; prints one "N passed, N failed" line."""

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

import crd_schemas

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "instream"
TESTS = ROOT / "helm" / "tests"
INSTREAM = Path(os.environ.get("INSTREAM_BIN", ROOT / "target" / "debug" / "instream"))
KUBERNETES = "1.30.0"
DEFAULT_SERVICES = ["aggregator", "archiver", "enricher", "ingest"]
CUSTOM_KINDS = {"PrometheusRule", "PodMonitor", "ScaledObject"}


def production_values():
    return yaml.safe_load((CHART / "values-production.yaml").read_text())


def everything_on():
    """Every option of the chart switched on at once."""
    values = production_values()
    values["fullnameOverride"] = "analytics"
    values["imagePullSecrets"] = [{"name": "registry"}]
    values["serviceAccount"] = {"create": True, "name": "instream-sa",
                                "annotations": {"team": "data"}}
    values["commonLabels"] = {"cost-center": "data"}
    values["image"]["digest"] = "sha256:" + "a" * 64
    for name in ["enricher", "aggregator", "archiver"]:
        values["services"].setdefault(name, {})["keda"] = {
            "enabled": True, "minReplicas": 1, "maxReplicas": 6, "lagThreshold": 5000,
            "authenticationRef": "kafka-keda-auth"}
    values["services"]["db-source"] = {"enabled": True, "replicas": 2,
                                       "pdb": {"enabled": True, "minAvailable": 1}}
    values["services"]["query-api"]["tlsSecret"] = "query-tls"
    values["services"]["query-api"]["ingress"] = {
        "enabled": True, "className": "nginx", "hosts": [{"host": "query.example.com"}]}
    values["services"]["ingest"]["nodeSelector"] = {"pool": "edge"}
    values["services"]["ingest"]["tolerations"] = [
        {"key": "edge", "operator": "Exists", "effect": "NoSchedule"}]
    values["services"]["ingest"]["affinity"] = {"podAntiAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "ingest"}}}}]}}
    values["services"]["ingest"]["podLabels"] = {"tier": "edge"}
    values["services"]["ingest"]["podAnnotations"] = {"example.com/owner": "data"}
    values["services"]["ingest"]["extraEnv"] = [
        {"name": "INSTREAM__KAFKA__SSL_KEY_PASSWORD",
         "valueFrom": {"secretKeyRef": {"name": "instream-kafka", "key": "key-password"}}}]
    values["services"]["ingest"]["extraEnvFrom"] = [{"secretRef": {"name": "ingest-extra"}}]
    values["config"]["db_source"] = {
        "url": "postgres://reader@db:5432/shop",
        "password_file": "/var/run/secrets/instream/instream-stores/scylla-password",
        "tables": [{"name": "orders", "table": "orders", "pipeline": "orders",
                    "mode": "incrementing", "incrementing_column": "id"}]}
    values["networkPolicy"]["httpFrom"] = [{"namespaceSelector": {}}]
    values["services"]["aggregator"]["webhookSecret"] = "instream-webhooks"
    values["services"]["aggregator"]["webhookEgress"] = [
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]
    values["prometheusRule"]["runbookBaseUrl"] = "https://git.example.com/instream/blob/v1/"
    return values


def render(values=None, name="rel"):
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values or {}, name=name, namespace="data", is_install=True)
    docs, notes = [], ""
    for template, text in out.items():
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs, notes


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def named(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def pod_spec(docs, name):
    return named(docs, "Deployment", name)["spec"]["template"]["spec"]


def config_of(docs):
    data = next(d for d in docs if d["kind"] == "ConfigMap"
                and d["metadata"]["name"].endswith("-config"))["data"]
    return data


def container_env(docs, service):
    """The plain environment variables the chart gives `service`'s container."""
    for d in of_kind(docs, "Deployment"):
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == service:
            env = d["spec"]["template"]["spec"]["containers"][0].get("env", [])
            return {e["name"]: e["value"] for e in env if "value" in e}
    return {}


def check_config(docs, services, secret_dir):
    """Runs `instream check-config --service S` for each service on the rendered config, with
    the environment the chart gives that service's container, and every file under
    /var/run/secrets/instream (mounted Secrets) made in `secret_dir`."""
    data = config_of(docs)

    def local(value):
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        if isinstance(value, list):
            return [local(v) for v in value]
        if isinstance(value, str) and value.startswith("/var/run/secrets/instream/"):
            path = Path(secret_dir) / value.removeprefix("/var/run/secrets/instream/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("instream:s3cret\n")
            return str(path)
        return value

    if "instream.json" in data:
        config = json.loads(data["instream.json"])
        text, suffix = json.dumps(local(config)), ".json"
    else:
        text, suffix = data["instream.toml"], ".toml"
    path = Path(secret_dir) / f"instream{suffix}"
    path.write_text(text)
    result = None
    for service in services:
        env = {"PATH": os.environ["PATH"], **local(container_env(docs, service))}
        result = subprocess.run([str(INSTREAM), "check-config", "--config", str(path),
                                 "--service", service],
                                capture_output=True, text=True, env=env)
        if result.returncode != 0:
            return result
    return result


def enabled_services(docs):
    return sorted(d["metadata"]["labels"]["app.kubernetes.io/component"]
                  for d in of_kind(docs, "Deployment"))


# ---------------------------------------------------------------------------------------

def test_lint_has_no_errors_for_default_and_production_values():
    for values in [None, production_values()]:
        report = helm_python.lint(str(CHART), values, strict=True, kube_version=KUBERNETES)
        assert report["errors"] == [], report
        assert all(m["severity"] < 3 for m in report["messages"]), report["messages"]


def test_default_install_starts_every_service_with_the_config_it_renders():
    docs, notes = render()
    assert enabled_services(docs) == DEFAULT_SERVICES
    with tempfile.TemporaryDirectory() as secrets:
        result = check_config(docs, DEFAULT_SERVICES, secrets)
    assert result.returncode == 0, result.stderr
    # The generated producer key: kept in a Secret, its digest in ingest's config, its use in
    # the notes.
    secret = named(docs, "Secret", "rel-instream-ingest-key")
    key = secret["data"]["api-key"]
    import base64
    digest = hashlib.sha256(base64.b64decode(key)).hexdigest()
    config = json.loads(config_of(docs)["instream.json"])
    assert config["ingest"]["api_keys"] == [{"name": "generated", "sha256": digest}]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "rel-instream-ingest-key" in notes and "base64 -d" in notes
    # No custom resource (no CRD needed) by default.
    assert not [d for d in docs if d["kind"] in CUSTOM_KINDS]


def test_the_same_checks_refuse_a_config_a_service_would_refuse():
    values = {"ingestApiKey": {"generate": False},
              "config": {"ingest": {"allow_anonymous": True}}}
    docs, _ = render(values)
    with tempfile.TemporaryDirectory() as secrets:
        assert check_config(docs, ["ingest"], secrets).returncode == 0
        # query-api without a key (rendered as raw TOML, which the chart does not inspect).
        toml = "[kafka]\nbootstrap_servers = \"kafka:9092\"\n"
        docs, _ = render({"configToml": toml})
        result = check_config(docs, ["query-api"], secrets)
    assert result.returncode == 2, result
    assert "query_api.api_key_sha256" in result.stderr, result.stderr


def test_without_a_key_and_without_generation_the_render_is_refused():
    try:
        render({"ingestApiKey": {"generate": False}})
    except helm_python.HelmError as e:
        assert "ingest needs a producer key" in str(e), e
        return
    raise AssertionError("a render without any ingest key must be refused")


def test_every_render_passes_the_kubernetes_schemas_and_the_services_checks():
    for label, values in [("default", None), ("production", production_values()),
                          ("everything", everything_on())]:
        docs, _ = render(values)
        for doc in docs:
            if doc["kind"] in CUSTOM_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as e:
                raise AssertionError(f"{label}: {doc['kind']} {doc['metadata']['name']}: {e}")
        with tempfile.TemporaryDirectory() as secrets:
            result = check_config(docs, enabled_services(docs), secrets)
        assert result.returncode == 0, f"{label}: {result.stderr}"


def test_custom_resources_pass_their_crd_schemas():
    docs, _ = render(everything_on())
    custom = [d for d in docs if d["kind"] in CUSTOM_KINDS]
    assert {d["kind"] for d in custom} == CUSTOM_KINDS
    found = [f"{d['kind']} {d['metadata']['name']}: {p}"
             for d in custom for p in crd_schemas.problems(d)]
    assert not found, "\n".join(found)


def test_the_crd_check_refuses_what_an_api_server_would():
    docs, _ = render(everything_on())
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    typo = copy.deepcopy(rule)
    typo["spec"]["groups"][0]["rules"][0]["expresion"] = "up == 0"
    assert any("expresion" in p for p in crd_schemas.problems(typo)), "an unknown field passes"
    scaled = copy.deepcopy(next(d for d in docs if d["kind"] == "ScaledObject"))
    scaled["spec"]["minReplicaCount"] = "two"
    assert any("minReplicaCount" in p for p in crd_schemas.problems(scaled))
    monitor = copy.deepcopy(next(d for d in docs if d["kind"] == "PodMonitor"))
    del monitor["spec"]["selector"]
    assert any("selector" in p for p in crd_schemas.problems(monitor)), "a required field"
    assert crd_schemas.problems({"apiVersion": "example.com/v1", "kind": "Unknown"})
    # RE2's inline flag mid-pattern (Python's re takes it only in front).
    group = rule["spec"]["groups"][0]
    for strategy, valid in [("Abort", True), ("bogus", False)]:
        strategic = copy.deepcopy(rule)
        strategic["spec"]["groups"][0] = dict(group, partial_response_strategy=strategy)
        assert bool(crd_schemas.problems(strategic)) != valid, strategy
    # A null the API server would prune is no error; a label that is not a string is.
    labelled = copy.deepcopy(monitor)
    labelled["spec"]["selector"] = {"matchLabels": None}
    labelled["metadata"]["labels"]["replicas"] = 3
    assert [p for p in crd_schemas.problems(labelled)] == \
        ["metadata.labels.replicas: 3 is not a string"]


def test_standard_names_labels_service_account_and_pull_secrets():
    docs, _ = render(everything_on())
    for doc in docs:
        labels = doc["metadata"]["labels"]
        for key in ["app.kubernetes.io/name", "app.kubernetes.io/instance",
                    "app.kubernetes.io/version", "app.kubernetes.io/managed-by"]:
            assert key in labels, f"{doc['kind']} {doc['metadata']['name']} lacks {key}"
        assert labels["cost-center"] == "data"
        if doc["kind"] != "ServiceAccount":  # named explicitly below
            assert doc["metadata"]["name"].startswith("analytics"), doc["metadata"]["name"]
    deployment = named(docs, "Deployment", "analytics-ingest")
    assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "ingest"
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "instream-sa"
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert spec["containers"][0]["image"] == "registry.example.com/data/instream@sha256:" + "a" * 64
    assert named(docs, "ServiceAccount", "instream-sa")["automountServiceAccountToken"] is False


def test_pods_run_restricted_with_a_pause_before_stopping():
    docs, _ = render()
    for name in DEFAULT_SERVICES:
        spec = pod_spec(docs, f"rel-instream-{name}")
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        container = spec["containers"][0]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
        assert spec["terminationGracePeriodSeconds"] > 5 + 20
        assert container["command"] == [f"instream-{name}", "--config",
                                        "/etc/instream/instream.json"]
    strategies = {d["metadata"]["name"]: d["spec"]["strategy"]["type"]
                  for d in of_kind(docs, "Deployment")}
    assert strategies["rel-instream-aggregator"] == "Recreate"
    assert strategies["rel-instream-enricher"] == "RollingUpdate"


def test_per_service_scheduling_env_and_volumes():
    docs, _ = render(everything_on())
    spec = pod_spec(docs, "analytics-ingest")
    assert spec["nodeSelector"] == {"pool": "edge"}
    assert spec["tolerations"][0]["key"] == "edge"
    assert "podAntiAffinity" in spec["affinity"]
    # The defaults' zone spreading reaches every service; ingest's own keys add to it.
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert pod_spec(docs, "analytics-enricher")["topologySpreadConstraints"]
    container = spec["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["INSTREAM__INGEST__TLS__CERT_FILE"]["value"] == "/etc/instream-tls/tls.crt"
    assert env["INSTREAM__KAFKA__SSL_KEY_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "instream-kafka"
    # A service's own extras add to the defaults' (its extraEnv above; the defaults' volumes).
    assert container["envFrom"] == [{"secretRef": {"name": "ingest-extra"}}]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/hadoop/conf", "/etc/instream-ca", "/var/run/secrets/instream/instream-kafka",
            "/etc/instream-tls"} <= mounts
    template = named(docs, "Deployment", "analytics-ingest")["spec"]["template"]["metadata"]
    assert template["labels"]["tier"] == "edge"
    assert template["annotations"]["example.com/owner"] == "data"
    # The webhook signing secret, mounted where its _file variable says.
    aggregator = pod_spec(docs, "analytics-aggregator")["containers"][0]
    secret_file = {e["name"]: e.get("value") for e in aggregator["env"]}[
        "INSTREAM__AGGREGATOR__WEBHOOK_SECRET_FILE"]
    assert any(secret_file == m["mountPath"] + "/secret" for m in aggregator["volumeMounts"])
    query = pod_spec(docs, "analytics-query-api")["containers"][0]
    query_env = {e["name"]: e.get("value") for e in query["env"]}
    assert query_env["INSTREAM__QUERY_API__TLS__KEY_FILE"] == "/etc/instream-tls/tls.key"


def test_scaling_disruption_monitoring_and_network_objects():
    docs, _ = render(everything_on())
    hpas = {d["metadata"]["name"] for d in of_kind(docs, "HorizontalPodAutoscaler")}
    assert hpas == {"analytics-ingest", "analytics-query-api"}
    scaled = {d["metadata"]["name"]: d for d in of_kind(docs, "ScaledObject")}
    assert set(scaled) == {"analytics-enricher", "analytics-aggregator", "analytics-archiver"}
    trigger = scaled["analytics-aggregator"]["spec"]["triggers"][0]
    assert trigger["metadata"]["consumerGroup"] == "instream-aggregator"
    assert trigger["authenticationRef"] == {"name": "kafka-keda-auth"}
    # An autoscaled Deployment leaves its replica count to the autoscaler.
    assert "replicas" not in named(docs, "Deployment", "analytics-enricher")["spec"]
    pdbs = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "PodDisruptionBudget")}
    assert pdbs["analytics-db-source"] == {"minAvailable": 1, "selector": pdbs["analytics-db-source"]["selector"]}
    assert pdbs["analytics-ingest"]["maxUnavailable"] == 1
    assert of_kind(docs, "PodMonitor")[0]["spec"]["podMetricsEndpoints"][0]["port"] == "admin"
    policies = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "NetworkPolicy")}
    assert len(policies) == len(of_kind(docs, "Deployment"))
    egress_ports = {p["port"] for rule in policies["analytics-enricher"]["egress"]
                    for p in rule.get("ports", [])}
    assert {53, 9093, 6379} <= egress_ports
    # Webhook receivers are reachable from the aggregator only.
    assert 443 not in egress_ports
    assert 443 in {p["port"] for rule in policies["analytics-aggregator"]["egress"]
                   for p in rule.get("ports", [])}
    ingresses = {d["metadata"]["name"] for d in of_kind(docs, "Ingress")}
    assert ingresses == {"analytics-ingest", "analytics-query-api"}
    dashboard = named(docs, "ConfigMap", "analytics-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["instream.json"])["panels"]
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ["throughput", "lag", "dead letters", "records lost", "window close",
                  "hit ratio", "latency", "idle partitions", "webhook"]:
        assert topic in titles, f"the dashboard has no {topic} panel"


def test_hook_job_applies_schema_and_definitions_and_helm_test_checks_status():
    docs, _ = render(production_values())
    job = named(docs, "Job", "rel-instream-setup")
    assert "post-install" in job["metadata"]["annotations"]["helm.sh/hook"]
    spec = job["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["command"][:3] == ["instream", "schema", "apply"]
    assert spec["containers"][0]["command"][:3] == ["instream", "pipeline", "apply"]
    definitions = named(docs, "ConfigMap", "rel-instream-pipelines")["data"]["pipelines.toml"]
    with tempfile.TemporaryDirectory() as out:
        path = Path(out, "pipelines.toml")
        path.write_text(definitions)
        # The shipped definitions are ones instream accepts.
        result = subprocess.run([str(INSTREAM), "pipeline", "validate", str(path)],
                                capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    test_pod = next(d for d in docs if d["kind"] == "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["command"][:2] == ["instream", "status"]


def config_paths(value):
    """The file and directory paths a config names (CA files, secret files, Hadoop conf)."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in config_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in config_paths(v)]
    if isinstance(value, str) and value.startswith(("/etc/", "/var/run/")):
        return [value]
    return []


def test_every_path_the_config_names_is_mounted_in_every_pod_that_reads_it():
    for values in [production_values(), everything_on()]:
        docs, _ = render(values)
        paths = config_paths(json.loads(config_of(docs)["instream.json"]))
        assert paths, "the production config names CA, secret and Hadoop files"
        pods = [(d["kind"], d["metadata"]["name"], d["spec"]["template"]["spec"])
                for d in docs if d["kind"] in ("Deployment", "Job")]
        pods += [("Pod", d["metadata"]["name"], d["spec"]) for d in of_kind(docs, "Pod")]
        for kind, name, spec in pods:
            volumes = {v["name"] for v in spec.get("volumes", [])}
            for container in spec.get("initContainers", []) + spec["containers"]:
                mounts = container.get("volumeMounts", [])
                for mount in mounts:
                    assert mount["name"] in volumes, f"{kind} {name}: no volume {mount['name']}"
                for path in paths:
                    assert any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
                               for m in mounts), f"{kind} {name}/{container['name']}: {path} not mounted"


def test_yaml_config_keeps_integers_and_one_key_overrides_one_key():
    docs, _ = render({"config": {"kafka": {"replication_factor": 2,
                                           "max_record_bytes": 2000000}}})
    config = json.loads(config_of(docs)["instream.json"])
    assert config["kafka"]["replication_factor"] == 2
    assert config["kafka"]["max_record_bytes"] == 2000000
    # The other keys of the section stay as the chart's defaults give them.
    assert config["kafka"]["bootstrap_servers"] == "kafka:9092"
    docs, _ = render({"configToml": "[kafka]\nbootstrap_servers = \"k:9092\"\n"
                                    "[ingest]\nallow_anonymous = true\n"})
    assert config_of(docs) == {"instream.toml": "[kafka]\nbootstrap_servers = \"k:9092\"\n"
                                                "[ingest]\nallow_anonymous = true\n"}
    assert pod_spec(docs, "rel-instream-ingest")["containers"][0]["command"][-1] == \
        "/etc/instream/instream.toml"


def test_schema_refuses_unknown_keys_and_bad_values():
    chart = helm_python.Chart.load(str(CHART))
    for bad in [{"services": {"ingest": {"enabled": True, "replicas": -1}}},
                {"servces": {}},
                {"services": {"ingest": {"enabled": True, "replicas": 1, "replica": 2}}},
                {"image": {"repository": "x", "digest": "latest"}}]:
        try:
            chart.render(bad, name="rel", namespace="data")
        except helm_python.HelmError:
            continue
        raise AssertionError(f"{bad} must be refused by values.schema.json")


def test_alert_rules_ship_as_a_prometheus_rule_with_runbook_urls():
    docs, _ = render()
    assert not of_kind(docs, "PrometheusRule")
    docs, _ = render(everything_on())
    rule = of_kind(docs, "PrometheusRule")[0]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    shipped = yaml.safe_load((CHART / "alerts" / "instream-rules.yaml").read_text())
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) == sum(len(g["rules"]) for g in shipped["groups"])
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url == ("https://git.example.com/instream/blob/v1/docs/runbook.md#"
                       + alert["alert"].lower()), url
        assert f"### {alert['alert']}" in runbook, f"docs/runbook.md has no {alert['alert']}"


def test_checkov_finds_nothing_unwaived():
    checkov = shutil.which("checkov", path=str(Path(sys.executable).parent))
    if checkov is None:
        raise AssertionError("checkov is not installed next to this Python")
    with tempfile.TemporaryDirectory() as out:
        for label, values in [("default", None), ("production", production_values()),
                              ("everything", everything_on())]:
            docs, _ = render(values)
            Path(out, f"{label}.yaml").write_text(yaml.safe_dump_all(docs))
        result = subprocess.run([checkov, "-d", out, "--framework", "kubernetes",
                                 "--skip-download", "--config-file", str(TESTS / "checkov.yaml")],
                                capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


if __name__ == "__main__":
    tests = [(n, f) for n, f in sorted(globals().items()) if n.startswith("test_")]
    failed = 0
    for name, fn in tests:
        try:
            fn()
            print(f"test {name} ... ok")
        except Exception as e:  # report every failure, then exit non-zero
            failed += 1
            print(f"test {name} ... FAILED: {e!r}")
    print(f"chart: {len(tests) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
