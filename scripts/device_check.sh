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
# On the device (the `run` tool), at most $BUDGET seconds (400 by default; never run there yet):
#   command: bash scripts/device_check.sh     carry: [".whl", "shards/imagenet-sample"]   timeout_s: 420
# Locally, a dry run of the same steps on the CPU (about 8 minutes on 2 cores: batch 2, tiny step counts):
#   DEVICE=cpu BUDGET=900 PY=.venv/bin/python bash scripts/device_check.sh
#
# Everything goes to $OUT (the files that come back, at most 8): log.txt, step.json, decode.json,
# train.json (the trainer's summaries: --gpus 1 and two ranks on one GPU), eval.json, evalbench.json,
# profile.json, step-512.json. The steps run in priority order, each with its own time limit, cut to
# what is left of $BUDGET (a step with under 20 s left is skipped and counted as failed); a failed
# step does not stop the others; the script's exit code is the number of failed steps.
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
BUDGET=${BUDGET:-400}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
failed=0
step() {  # step SECONDS NAME COMMAND...: run with a limit (cut to what is left of BUDGET), log its time and status
    local limit=$1 name=$2; shift 2
    local left=$((BUDGET - SECONDS))
    (( limit > left )) && limit=$left
    echo; echo "=== $name (limit ${limit}s, $((SECONDS))s into the run) ==="
    if (( limit < 20 )); then echo "=== $name: SKIPPED, the run's budget is spent ==="; failed=$((failed + 1)); return; fi
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
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    cores=$(nproc)
    BENCH=(--device cuda --workers $((cores - 2 < 14 ? cores - 2 : 14)) --steps 50 --step-repeat 2)
    BENCH512=(--device cuda --workers 8 --batch 512 --steps 20 --step-repeat 2)
    PROFILE=(--device cuda)
    DECODE=(--device cuda)
    EVALB=(--device cuda --width 1 --amp bf16 --workers 4 --repeat 2)
    TRAIN=(--schedule steps --lr-steps 100 --gpus 1 --amp bf16 --channels-last --batch 128 --epochs 3)
    TRAIN2=(--schedule constant --gpus 2 --rank-devices cuda:0,cuda:0 --amp bf16 --channels-last --batch 128 --epochs 1)
    GPU_TESTS=(tests/test_columns.py tests/test_ranks.py "tests/test_loader.py::test_gpu_decode_of_the_same_batch_is_identical_while_the_stream_is_busy"
               tests/test_loader.py::test_mixed_decode_packs_the_first_share_of_every_batch)
else
    PY=${PY:-python3}
    # batch 2: a bf16 step of the full net takes about 2 s per image on a CPU without bf16 units, and
    # train.py --all --compile --cudagraphs runs about fifteen of them
    BENCH=(--device cpu --all --batch 2 --steps 1 --step-repeat 1 --warmup 1 --workers 1)
    BENCH512=(--device cpu --all --batch 4 --steps 1 --step-repeat 1 --warmup 1 --workers 1)
    PROFILE=(--device cpu --batch 2 --steps 1 --warmup 1)
    DECODE=(--device cpu --repeat 1 --images 128)
    EVALB=(--device cpu --width 0.125 --repeat 1 --train-steps 2)
    TRAIN=(--schedule steps --lr-steps 100 --device cpu --width 0.25 --crop 128 --init kaiming --batch 32 --epochs 1)
    TRAIN2=(--schedule constant --device cpu --gpus 2 --width 0.25 --crop 128 --init kaiming --batch 32 --epochs 1)
    GPU_TESTS=(tests/test_ranks.py tests/test_loader.py::test_mixed_decode_packs_the_first_share_of_every_batch)
fi
"$PY" -m alexcli --version

# 1. the tests that need a GPU: the columns on one GPU and on the GPU and the CPU; two DDP ranks on one
#    GPU over gloo against one process; nvJPEG decoding the same batch while the stream is busy; mixed decode
step 90 "pytest (the GPU tests)" "$PY" -m pytest -q -rs -p no:cacheprovider "${GPU_TESTS[@]}"
# 2. the training step at batch 128, ours and torchvision's alexnet: fp32 (TF32 default and strict), bf16+CL,
#    compiled, CUDA graphs (with and without the SGD step compiled), TFLOP/s and the share of the bf16 peak;
#    then the fastest of ours fed by the loader: PIL in the workers, nvJPEG, and half of each batch on each
step 220 "benchmarks/train.py step and loader-fed step" bash -c \
    "\"$PY\" benchmarks/train.py ${BENCH[*]} --compile --cudagraphs --skip-loader --decode cpu,device,mixed:0.5 \
     --shards $DATA --json > \"$OUT/step.json\""
# 3. decoding alone: PIL ms/image in 1 and N processes, nvJPEG batched, their pixels' differences
step 60 "benchmarks/decode.py" bash -c \
    "\"$PY\" benchmarks/decode.py ${DECODE[*]} --shards $DATA --json > \"$OUT/decode.json\""
# 4. the trainer end to end on the device, then eval of its checkpoint (the sample has one photo per
#    class, so no val split: a fixed schedule, and eval scores the training images)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/alexcli-device.XXXXXX")  # the runs' folders: this script's own
step 120 "alexcli train (smoke, 3 epochs)" bash -c \
    "\"$PY\" -m alexcli train --data $DATA --out $WORK/run ${TRAIN[*]} --json > $WORK/train1.json"
ckpt=$(ls $WORK/run/ckpt-e*.safetensors 2>/dev/null | tail -1)
step 60 "alexcli eval (ten patches)" bash -c \
    "\"$PY\" -m alexcli eval \"$ckpt\" --data $DATA --split train --crops ten --json > \"$OUT/eval.json\""
# 5. --gpus 2 as two ranks sharing the one GPU (gloo, CUDA tensors), end to end
step 90 "alexcli train --gpus 2 --rank-devices cuda:0,cuda:0" bash -c \
    "\"$PY\" -m alexcli train --data $DATA --out $WORK/run2 ${TRAIN2[*]} --json > $WORK/train2.json"
"$PY" - "$OUT/train.json" "$WORK" <<'PYEOF'  # the two summaries and the metrics of the 3-epoch run in one file (8 come back)
import json, pathlib, sys
def load(p):
    try:
        return json.loads(pathlib.Path(p).read_text())
    except Exception as exc:
        return {"missing": f"{p}: {exc}"}
work = pathlib.Path(sys.argv[2])
metrics = work / "run" / "metrics.jsonl"
rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
pathlib.Path(sys.argv[1]).write_text(json.dumps({"gpus1": load(work / "train1.json"), "gpus1_metrics": rows,
                                                 "gpus2_shared": load(work / "train2.json")}, indent=1))
PYEOF
rm -rf "$WORK"
# 6. eval and ensemble images/s against the training step
step 60 "benchmarks/eval.py" bash -c \
    "\"$PY\" benchmarks/eval.py ${EVALB[*]} --shards $DATA --json > \"$OUT/evalbench.json\""
# 7. where the step's device time goes: fp32, strict fp32, bf16+CL, one column, no LRN
step 90 "benchmarks/profile_step.py" bash -c \
    "\"$PY\" benchmarks/profile_step.py ${PROFILE[*]} --json > \"$OUT/profile.json\""
# 8. the step configurations at batch 512, eager (last: the lowest priority)
step 90 "benchmarks/train.py step at batch 512" bash -c \
    "\"$PY\" benchmarks/train.py ${BENCH512[*]} --skip-loader --no-loader-fed --shards $DATA --json > \"$OUT/step-512.json\""

echo; echo "device_check: $failed step(s) failed, $SECONDS s in all"
exit $failed
