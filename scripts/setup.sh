#!/usr/bin/env bash
# Installs the Debian packages instream needs to build and test: the C toolchain pieces
# librdkafka's build wants, and the real servers the tests start (Redis, ZooKeeper).
# Idempotent: does nothing when everything is present. Needs root (or sudo) only to install.
set -euo pipefail

packages=(build-essential cmake pkg-config libcurl4-openssl-dev libsasl2-dev libzstd-dev libssl-dev
          redis-server zookeeper default-jre-headless)
# The test command also checks the alerting rules with promtool (Debian's prometheus package).
# The Helm chart checks run in a Python virtualenv; the SQL source tests start PostgreSQL; the
# Kafka TLS tests put stunnel in front of the test broker.
[ "${1:-}" = "--for-tests" ] && packages+=(prometheus python3-venv postgresql stunnel4)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's packages start nothing here (no systemd); the tests start their own servers on free
# loopback ports, so a distro-started server on a default port would not disturb them.
command -v cargo >/dev/null || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
