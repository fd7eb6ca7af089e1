#!/usr/bin/env bash
# docs/dashboard.png: the screenshot the dashboard's browser test takes (tests/test_dashboard_browser.py:
# a real orion serve, gemma3-270m and minilm loaded, headless Chromium). Needs chromium and chromedriver
# ('make browser' installs them as root on Debian/Ubuntu) and the test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DASHBOARD_SCREENSHOT="$PWD/docs/dashboard.png" "$PY" -m pytest -q -p no:cacheprovider tests/test_dashboard_browser.py
echo "wrote docs/dashboard.png"
