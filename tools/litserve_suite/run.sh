#!/usr/bin/env bash
# Run LitServe's own unit and integration tests against servekit, with `import litserve` mapped to
# servekit (shim/), as a LitServe user's code would run after changing its import.
#   tools/litserve_suite/run.sh [pytest args...]      (from the repository root, after `make install`)
# Downloads the LitServe sdist (its tests) and the test-only plugins into a scratch directory; nothing
# is installed into the project's venv. Prints pytest's summary; the full log is in $WORK/log.txt.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VERSION="${LITSERVE_VERSION:-0.2.17}"
WORK="${LITSERVE_SUITE_DIR:-/tmp/servekit-litserve-suite}"
PY="$ROOT/.venv/bin/python"
mkdir -p "$WORK"
if [ ! -d "$WORK/litserve-$VERSION/tests" ]; then
  "$PY" -m pip download "litserve==$VERSION" --no-deps --no-binary :all: -d "$WORK" -q
  tar -xzf "$WORK/litserve-$VERSION.tar.gz" -C "$WORK"
fi
if [ ! -d "$WORK/plugins" ]; then
  "$PY" -m pip install -q --no-deps --target "$WORK/plugins" asgi-lifespan sniffio pytest-asyncio pytest-rerunfailures psutil
fi
cd "$WORK/litserve-$VERSION"
PYTHONPATH="$ROOT/tools/litserve_suite/shim:$ROOT/src:$WORK/plugins" SERVEKIT_LOG_LEVEL=warning \
  timeout 3000 "$PY" -m pytest -p no:cacheprovider -q -c pytest.ini --rootdir . --timeout 90 \
  --continue-on-collection-errors -o asyncio_mode=strict "$@" tests/unit tests/integration \
  > "$WORK/log.txt" 2>&1 || true
tail -3 "$WORK/log.txt"
