#!/usr/bin/env bash
# Install napari-emseg with its test extras into .venv and run the test suite
# headless. This is the README's test command and what CI runs (.ci/run).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# Tests that need real EM read $EMSEG_DATA or ../shared/data; without it they skip
# (reasons printed, -rs) and, when CI is set, fail.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${EMSEG_TORCH:-torch==2.13.0}   # the CPU wheel on this machine; see README for CUDA

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "$TORCH_PIN"
.venv/bin/python -m pip install -q -e ".[test,bench]"

# GUI tests need an X server with OpenGL: Xvfb (installed with apt-get when missing)
if ! command -v xvfb-run >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  $SUDO apt-get install -y -qq --no-install-recommends xvfb xauth libxcb-icccm4 \
    libxcb-keysyms1 libxcb-xinerama0 libgl1 libglx-mesa0 libgl1-mesa-dri libdbus-1-3 \
    libfontconfig1 libxkbcommon-x11-0 libx11-xcb1 libxcb-image0 libxcb-randr0 \
    libxcb-render-util0 libxcb-shape0 libxcb-xfixes0 libxcb-cursor0 >/dev/null
fi

.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/npe2 validate napari-emseg

DATA=${EMSEG_DATA:-../shared/data}
if [ ! -d "$DATA/fixtures" ]; then
  echo "test.sh: no test data in $DATA (set EMSEG_DATA): tests that need it will skip" \
       "(or fail with CI set); see README, Tests" >&2
fi

export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set +e
if command -v xvfb-run >/dev/null 2>&1; then
  xvfb-run -a -s "-screen 0 1280x1024x24" env QT_QPA_PLATFORM=xcb \
    .venv/bin/python -m pytest -p no:cacheprovider -rs "$@"
else
  .venv/bin/python -m pytest -p no:cacheprovider -rs "$@"
fi
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: no tests were collected — treating as a failure" >&2
  exit 1
fi
exit "$rc"
