#!/usr/bin/env bash
# Install everything the tests need (pip and Debian packages), then run the whole
# suite: ruff, mypy --strict, the import-linter contracts, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
echo "== ruff";          .venv/bin/ruff check proxy tests benchmarks
echo "== mypy";          .venv/bin/mypy
echo "== import-linter"; .venv/bin/lint-imports --no-cache
echo "== promtool";      promtool check rules contrib/prometheus/tlsedge-alerts.yml
echo "== pytest";        .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
