#!/usr/bin/env bash
# Renders a page of an explanation report (tools/explain.py) to PNG with headless Chromium,
# e.g. for the README screenshot:
#
#   tools/screenshot_report.sh demo_run/explain/report/queries.html docs/report.png [1400x1800]
#
# Needs Debian's chromium (apt-get install -y chromium). Nothing is fetched from the network:
# the report folder is self-contained.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 PAGE.html OUT.png [WIDTHxHEIGHT (default 1400x1800)]" >&2
  exit 2
fi
page=$(realpath "$1")
out=$2
size=${3:-1400x1800}
if [[ ! -f "$page" ]]; then
  echo "$0: report page not found: $page" >&2
  exit 1
fi
browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z "$browser" ]]; then
  echo "$0: chromium not found; install it with: apt-get install -y chromium" >&2
  exit 1
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
mkdir -p "$(dirname "$out")"
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$profile" --screenshot="$(realpath -m "$out")" \
  --window-size="${size/x/,}" "file://$page" 2>/dev/null
echo "wrote $out ($size) from $page"
