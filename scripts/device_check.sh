#!/usr/bin/env bash
# Every check that needs a GPU, as one prepared run for a session lent the device machine
# (15 minutes of device time in all, a fresh machine per start: run it once, read, rerun at most once).
#
# Here, once (needs .venv from scripts/setup.sh and the ImageNet sample archive, imagenet-sample-dev.tar:
# train/<class>/<image>, 500 photos), given as the argument or by $ALEXCLI_SAMPLE_TAR:
#   bash scripts/device_check.sh --prepare PATH/TO/imagenet-sample-dev.tar
#   ALEXCLI_SAMPLE_TAR=PATH/TO/imagenet-sample-dev.tar bash scripts/device_check.sh --prepare
#     -> .whl/ (webdataset, braceexpand: the device's Python lacks them) and
#        shards/imagenet-sample (the 500 sample photos, one per class, at 256 in 16 shards; 14 MB)
#   (the archive is only read when shards/imagenet-sample is not there yet)
# On the device (the `run` tool), about 4-5 minutes (estimated; never run there yet):
#   command: bash scripts/device_check.sh     carry: [".whl", "shards/imagenet-sample"]   timeout_s: 420
# Locally, a dry run of the same steps on the CPU (3-4 minutes on 2 cores: batch 2, tiny step counts):
#   DEVICE=cpu PY=.venv/bin/python bash scripts/device_check.sh
#
# Everything goes to $OUT (the files that come back): log.txt, step.json, profile.json, step-nvjpeg.json,
# train/metrics.jsonl (the smoke run), eval.json, step-512.json. Each step has its own time limit and a failed step
# does not stop the others; the script's exit code is the number of failed steps.
set -uo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
DATA=shards/imagenet-sample

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    PY=${PY:-.venv/bin/python}
    sample=${2:-${ALEXCLI_SAMPLE_TAR:-}}
    if [[ ! -f $DATA/dataset.json ]]; then
        if [[ -z $sample ]]; then
            echo "error: --prepare needs the ImageNet sample archive: --prepare PATH/TO/imagenet-sample-dev.tar, or set ALEXCLI_SAMPLE_TAR" >&2
            exit 2
        fi
        [[ $sample == /* ]] || sample=$CALLER/$sample  # relative to where the caller stood
        [[ -f $sample ]] || { echo "error: $sample: no such file (the ImageNet sample archive)" >&2; exit 2; }
    fi
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl webdataset==1.0.2 braceexpand==0.1.7
    if [[ ! -f $DATA/dataset.json ]]; then
        src=$(mktemp -d)
        tar -xf "$sample" -C "$src"
        "$PY" -m alexcli prepare "$src" --out "$DATA" --shard-size 32  # 16 shards: one per loader worker
        rm -rf "$src"
    fi
    du -sh .whl "$DATA"
    exit 0
fi

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
failed=0
step() {  # step SECONDS NAME COMMAND...: run with a limit, log its time and status, go on after a failure
    local limit=$1 name=$2; shift 2
    echo; echo "=== $name (limit ${limit}s) ==="
    local t0=$SECONDS
    timeout "$limit" "$@"; local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s ==="
    [[ $rc -eq 0 ]] || failed=$((failed + 1))
}

if [[ $DEVICE == cuda ]]; then
    PY=${PY:-python3}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
            . plugins/alexcli-batchnorm plugins/alexcli-cutout || { echo "install failed"; exit 99; }
    export PYTHONPATH=/tmp/site
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    BENCH=(--device cuda --workers 12)
    BENCH512=(--device cuda --workers 12 --batch 512 --steps 20 --step-repeat 2)
    PROFILE=(--device cuda)
    TRAIN=(--schedule steps --lr-steps 100 --gpus 1 --amp bf16 --channels-last --batch 128 --epochs 3)
else
    PY=${PY:-python3}
    # batch 2: a bf16 step of the full net takes about 2 s per image on a CPU without bf16 units, and
    # train.py --all --compile runs about ten of them
    BENCH=(--device cpu --all --batch 2 --steps 1 --step-repeat 1 --warmup 1 --workers 1)
    BENCH512=(--device cpu --all --batch 4 --steps 1 --step-repeat 1 --warmup 1 --workers 1)
    PROFILE=(--device cpu --batch 2 --steps 1 --warmup 1)
    TRAIN=(--schedule steps --lr-steps 100 --device cpu --width 0.25 --crop 128 --init kaiming --batch 32 --epochs 1)
fi
"$PY" -m alexcli --version

# 1. the tests that need a GPU (columns on the GPU and the CPU; nvJPEG decoding the same batch while
#    the stream is busy), plus the model and layer tests there
step 90 "pytest (GPU-only tests and layers/model/columns on this machine)" \
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_columns.py tests/test_layers.py tests/test_model.py \
    "tests/test_loader.py::test_gpu_decode_of_the_same_batch_is_identical_while_the_stream_is_busy"
# 2. the training step, ours and torchvision's alexnet: fp32 (TF32 default and strict), bf16+CL,
#    compiled, with TFLOP/s and the share of the bf16 peak; loader-fed (PIL)
step 180 "benchmarks/train.py step, PIL loader" bash -c \
    "\"$PY\" benchmarks/train.py ${BENCH[*]} --compile --skip-loader --shards $DATA --json > \"$OUT/step.json\""
# 2b. where the step's device time goes: fp32, strict fp32, bf16+CL, one column, no LRN
step 90 "benchmarks/profile_step.py" bash -c \
    "\"$PY\" benchmarks/profile_step.py ${PROFILE[*]} --json > \"$OUT/profile.json\""
# 3. the loader-fed step with JPEGs decoded on the GPU (nvJPEG), bf16+CL without compile
step 90 "benchmarks/train.py loader-fed, decode on device" bash -c \
    "\"$PY\" benchmarks/train.py ${BENCH[*]} --skip-loader --decode device --shards $DATA --json > \"$OUT/step-nvjpeg.json\""
# 4. the trainer end to end on the device, then eval of its checkpoint (the sample has one photo per
#    class, so no val split: a fixed schedule, and eval scores the training images)
rm -rf /tmp/alexcli-run
step 120 "alexcli train (smoke)" "$PY" -m alexcli train --data $DATA --out /tmp/alexcli-run "${TRAIN[@]}"
mkdir -p "$OUT/train" && cp /tmp/alexcli-run/metrics.jsonl "$OUT/train/" 2>/dev/null  # 7 files back in all (the limit is 8)
ckpt=$(ls /tmp/alexcli-run/ckpt-e*.safetensors 2>/dev/null | tail -1)
step 60 "alexcli eval (ten patches)" bash -c \
    "\"$PY\" -m alexcli eval \"$ckpt\" --data $DATA --split train --crops ten --json > \"$OUT/eval.json\""
# 5. the step configurations again at batch 512 (ours and torchvision's; last: the lowest priority)
step 150 "benchmarks/train.py step at batch 512" bash -c \
    "\"$PY\" benchmarks/train.py ${BENCH512[*]} --compile --skip-loader --shards $DATA --json > \"$OUT/step-512.json\""

echo; echo "device_check: $failed step(s) failed"
exit $failed
