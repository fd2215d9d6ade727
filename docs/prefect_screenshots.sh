#!/usr/bin/env bash
# The README's Prefect UI screenshots: a real Prefect server with its UI, one recipe run
# against it (four demo zoo models; `make run` or `glue zoo build` first), and Chromium
# (Debian's `chromium`) screenshots of the run page and its artifacts under /tmp/ui.
set -u
cd "$(dirname "$0")/.."  # the project root
mkdir -p /tmp/ui
export PREFECT_HOME=/tmp/ui/ph PREFECT_UI_ENABLED=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_API_URL=http://127.0.0.1:4299/api  # the UI asks this address, not 4200
.venv/bin/prefect server start --port 4299 > /tmp/ui/server.log 2>&1 &
SERVER=$!
for i in $(seq 60); do curl -sf http://127.0.0.1:4299/api/health >/dev/null && break; sleep 2; done
export PREFECT_API_URL=http://127.0.0.1:4299/api
.venv/bin/python - <<'PY'
import sys; sys.path.insert(0, ".")
from pathlib import Path
from tests.test_reliability import _small_zoo
_small_zoo(Path(".glue/zoo").absolute(), Path("/tmp/ui"), "nightly")
PY
GLUE_HOME=/tmp/ui/home .venv/bin/glue run /tmp/ui/nightly.yaml > /tmp/ui/run.log 2>&1
echo "glue run exit $?"
RUN=$(grep -o "flow run [0-9a-f-]\{36\}" /tmp/ui/run.log | tail -1 | awk '{print $3}')
echo "run $RUN"
for tab in "" "?tab=Artifacts"; do
  out=/tmp/ui/page$( [ -n "$tab" ] && echo -artifacts ).png
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --virtual-time-budget=20000 \
    --window-size=1400,1000 --screenshot=$out "http://127.0.0.1:4299/runs/flow-run/$RUN$tab" 2>/dev/null
done
kill $SERVER
