#!/usr/bin/env bash
# The README's test command: set up, lint, type-check, then the whole pytest suite (slow benchmarks excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev,export
.venv/bin/ruff check .
.venv/bin/mypy  # [tool.mypy] in pyproject.toml; incremental cache in .mypy_cache/
# the docs site, reference pages generated from openapi/asyncapi (scripts/mkdocs_hooks.py); any warning fails
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
exec .venv/bin/python -m pytest "$@"
