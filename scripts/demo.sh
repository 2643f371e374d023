#!/usr/bin/env bash
# Run tlsedge on an embedded default: generated certificates, a demo backend and a
# local file store under ./tlsedge-demo. Prints the curl commands to try.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh run
exec .venv/bin/tlsedge demo --dir ./tlsedge-demo "$@"
