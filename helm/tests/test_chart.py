"""Checks of the Helm chart, offline: lint, schema, rendered manifests, and that the config the
chart ships is one instream itself accepts. Run by scripts/test.sh (needs helm-python-sdk and
a built `instream` binary). Prints one "N passed, N failed" line."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "instream"
INSTREAM = Path(os.environ.get("INSTREAM_BIN", ROOT / "target" / "debug" / "instream"))
SERVICES = ["aggregator", "archiver", "enricher", "ingest"]


def render(values=None):
    chart = helm_python.Chart.load(str(CHART))
    out = chart.render(values or {}, name="rel", namespace="data")
    docs = []
    for text in out.values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def test_lint_has_no_errors():
    report = helm_python.lint(str(CHART))
    assert report["errors"] == [], report
    assert all(m["severity"] < 3 for m in report["messages"]), report["messages"]


def test_one_deployment_per_service_with_probes():
    docs = render()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert sorted(deployments) == [f"rel-{s}" for s in SERVICES]
    for service in SERVICES:
        container = deployments[f"rel-{service}"]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][0] == f"instream-{service}"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_services_scale_independently_and_can_be_disabled():
    docs = render({"services": {"enricher": {"enabled": True, "replicas": 7},
                                "archiver": {"enabled": False, "replicas": 1}}})
    names = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert names["rel-enricher"]["spec"]["replicas"] == 7
    assert "rel-archiver" not in names


def test_query_api_gets_a_deployment_and_a_service_when_enabled():
    docs = render({"services": {"query-api": {"enabled": True, "replicas": 3, "httpPort": 8081}}})
    deployment = next(d for d in docs if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "rel-query-api")
    assert deployment["spec"]["replicas"] == 3
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][0] == "instream-query-api"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["INSTREAM__QUERY_API__LISTEN"] == "0.0.0.0:8081"
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert services == {"rel-ingest", "rel-query-api"}


def test_db_source_runs_a_standby_and_no_service_when_enabled():
    docs = render({"services": {"db-source": {"enabled": True, "replicas": 2}}})
    deployment = next(d for d in docs if d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "rel-db-source")
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][0] == "instream-db-source"
    assert "http" not in {p["name"] for p in container["ports"]}
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert "rel-db-source" not in services


def test_ingest_serves_https_from_a_tls_secret():
    docs = render({"services": {"ingest": {"enabled": True, "replicas": 1, "httpPort": 8443,
                                           "tlsSecret": "ingest-cert"}}})
    pod = next(d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["name"] == "rel-ingest")["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["INSTREAM__INGEST__TLS__CERT_FILE"] == "/etc/instream-tls/tls.crt"
    assert env["INSTREAM__INGEST__TLS__KEY_FILE"] == "/etc/instream-tls/tls.key"
    secrets = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
    assert secrets == ["ingest-cert"]
    plain = render()
    pod = next(d for d in plain if d["kind"] == "Deployment"
               and d["metadata"]["name"] == "rel-ingest")["spec"]["template"]["spec"]
    assert all("secret" not in v for v in pod["volumes"])


def test_schema_refuses_bad_values():
    chart = helm_python.Chart.load(str(CHART))
    try:
        chart.render({"services": {"ingest": {"enabled": True, "replicas": -1}}},
                     name="rel", namespace="data")
    except helm_python.HelmError:
        return
    raise AssertionError("replicas -1 must be refused by values.schema.json")


def test_alert_rules_ship_as_a_prometheus_rule_only_when_enabled():
    assert not [d for d in render() if d["kind"] == "PrometheusRule"]
    docs = render({"prometheusRule": {"enabled": True, "labels": {"release": "kube-prom"}}})
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prom"
    shipped = yaml.safe_load((CHART / "alerts" / "instream-rules.yaml").read_text())
    assert rule["spec"] == shipped
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    for alert in alerts:
        # Every alert links to its runbook section, and the section exists.
        assert f"### {alert}" in runbook, f"docs/runbook.md has no section for {alert}"


def test_shipped_config_is_valid_for_instream():
    config = next(d for d in render() if d["kind"] == "ConfigMap")["data"]["instream.toml"]
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(config)
    result = subprocess.run([str(INSTREAM), "check-config", "--config", f.name],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


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
