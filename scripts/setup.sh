#!/usr/bin/env bash
# Set up alexcli in ./.venv: torch, torchvision, webdataset, safetensors, typer, rich and
# pillow-simd as the PIL in use (built from source with AVX2 where the CPU has it).
#   bash scripts/setup.sh          the tool, its built-in plugins and the example plugin packages
#   bash scripts/setup.sh --dev    the same plus the test tools
# Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

# torch/torchvision first and pinned to what this kind of machine keeps on disk (the project
# admits torch 2.11..2.14: see pyproject.toml).
"$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null || pip install -q "torch==2.14.1" "torchvision==0.29.1"
pip install -q -e ".$extras"
for p in plugins/*/; do [ -f "$p/pyproject.toml" ] && pip install -q --no-deps -e "$p"; done

# torchvision depends on Pillow, so the line above may have put Pillow's PIL in place.
# pillow-simd installs the same PIL package: remove Pillow, then build pillow-simd.
if ! "$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md, sys
try:
    md.distribution("pillow")
    sys.exit(1)
except md.PackageNotFoundError:
    pass
md.distribution("pillow-simd")
import PIL.Image
PYEOF
then
    # Built once into .venv/wheels, so a rerun reinstalls in a second instead of compiling.
    if ! ls "$VENV"/wheels/pillow_simd-*.whl >/dev/null 2>&1; then
        cflags=""
        grep -qw avx2 /proc/cpuinfo 2>/dev/null && cflags="-mavx2"
        CC="cc $cflags" pip wheel -q --no-deps --no-cache-dir --no-binary pillow-simd -w "$VENV/wheels" "pillow-simd>=9"
    fi
    pip uninstall -q -y pillow pillow-simd >/dev/null 2>&1 || true
    pip install -q --no-deps "$VENV"/wheels/pillow_simd-*.whl
fi
# An editable install leaves alexcli's own modules uncompiled (pip compiles only what it copies):
# compiled once here, so no command compiles them on every start where bytecode is not written
# (PYTHONDONTWRITEBYTECODE, a read-only checkout): 0.1 s of each start, measured.
"$VENV/bin/python" -m compileall -q alexcli plugins >/dev/null
"$VENV/bin/alexcli" doctor --brief
