#!/usr/bin/env bash
# The platform's main job on one machine: installs the build dependencies, builds instream,
# and runs `instream demo` — every service in one process with an embedded Kafka-protocol
# broker, in-memory reference data, the embedded aggregate store and a local archive — driven
# by a generated auction stream. Extra arguments go to `instream demo` (e.g. --duration 2m).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "demo: building instream (the first build takes about 5 minutes on 2 cores)" >&2
cargo build -p instream
# `instream demo` sends for 30 s unless told otherwise (--duration 2m).
exec target/debug/instream demo "$@"
