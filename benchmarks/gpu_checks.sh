#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run: tests/test_gpu.py, the quickstart recipe on the GPU (as written,
# deterministic: true included, and in bf16-mixed), and benchmarks/overhead.py in the GPU setting, eager and compiled.
# benchmarks/gpu_syncs.py lists any host-device synchronisation left in a training step. Each step has a time limit
# and its own log under $OUT (default runs/gpu); a failing step does not stop the rest. STEPS picks some by name.
#   bash benchmarks/gpu_checks.sh                       # from the repository root, with tlkit importable
#   STEPS="gpu_tests syncs overhead" bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND under a time limit, logs to $OUT/NAME.log, prints its tail
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - start)) s"
    grep -v -i "warn" "$OUT/$name.log" | tail -n "${TAIL:-8}" | sed 's/^/   /'
    return $rc
}
run() { [[ -z "${STEPS:-}" || " $STEPS " == *" $1 "* ]] && step "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, lightning, timm; print('torch', torch.__version__, '| lightning', lightning.__version__, '| timm', timm.__version__)"
TAIL=30 run gpu_tests 330 $PY -m pytest tests/test_gpu.py -q -p no:warnings -p no:cacheprovider --durations=0
run quickstart 150 $PY -m tlkit.cli fit --config recipes/quickstart.yaml --trainer.accelerator gpu \
    --trainer.default_root_dir "$OUT/quickstart" --trainer.logger.init_args.save_dir "$OUT/quickstart"
run quickstart_bf16 150 $PY -m tlkit.cli fit --config recipes/quickstart.yaml --trainer.accelerator gpu \
    --trainer.precision bf16-mixed --trainer.deterministic warn --model.init_args.channels_last true \
    --trainer.default_root_dir "$OUT/quickstart_bf16" --trainer.logger.init_args.save_dir "$OUT/quickstart_bf16"
GPU_SETTING=(--device cuda --model resnet50 --image-size 224 --batch-size 256 --precision bf16-mixed --channels-last)
TAIL=20 run syncs 120 $PY benchmarks/gpu_syncs.py "${GPU_SETTING[@]}" --strict
TAIL=20 run syncs_cli 120 $PY benchmarks/gpu_syncs.py "${GPU_SETTING[@]}" --logger --progress-bar
run overhead 200 $PY benchmarks/overhead.py "${GPU_SETTING[@]}" --steps 60 --warmup 15 --rounds 3
run overhead_compile 240 $PY benchmarks/overhead.py "${GPU_SETTING[@]}" --steps 60 --warmup 20 --rounds 1 --compile
