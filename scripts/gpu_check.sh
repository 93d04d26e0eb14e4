#!/usr/bin/env bash
# GPU checks for the fast attention paths: the CUDA correctness tests, then bench_attention,
# bench_train and bench_sample on CUDA. Logs and tables land in $OUT (default scratch/gpu_out);
# each step has a time limit, about 8 minutes in all on an H100.
#
# The peer (gwinndr/MusicTransformer-Pytorch) is never part of this repository: copy it into an
# ignored folder just for the run and carry it, with the pure-Python MIDI packages bench_sample
# imports (the GPU image lacks them), e.g. from the repository root:
#   cp -r /work/scratch_peer scratch/peer
#   mkdir -p scratch/gpu_site
#   for d in pretty_midi mido importlib_resources; do
#       cp -r .venv/lib/python3.*/site-packages/$d scratch/gpu_site/; done
#   run: bash scripts/gpu_check.sh   (carry scratch/peer and scratch/gpu_site, timeout_s 600)
# Without them the peer rows read "peer not found" and bench_sample is skipped.
set -u
OUT=${OUT:-scratch/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PEER_PATH=${PEER_PATH:-scratch/peer}
export PYTHONPATH="$PWD:$PWD/scratch/gpu_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start))s"
    tail -n 60 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The CUDA tests live here (test_model.py is CPU-only and runs everywhere else); --noconftest:
# this file needs none of conftest's MIDI fixtures (nor pretty_midi).
step tests 90 $PY -m pytest -q -rs --noconftest -p no:cacheprovider tests/test_fast_attention.py

step bench_attention 240 $PY scripts/bench_attention.py --device cuda --preset base --dtype bf16 \
    --seq-lens 1024,2048,4096,8192 --peer-path "$PEER_PATH" --steps 3 --warmup 1 \
    --sample-tokens 512 --timeout 110 \
    --out "$OUT/bench_attention.md" --json "$OUT/bench_attention.json"

# dropout 0: "auto" then takes FlexAttention for the relative model (no attention dropout there).
step bench_train 90 $PY scripts/bench_train.py --preset base --dtype bf16 --device cuda \
    --seq-lens 2048 --steps 3 --warmup 1 --dropout 0

if [ -f scripts/bench_sample.py ] && $PY -c "import pretty_midi" 2>/dev/null; then
    step bench_sample 50 $PY scripts/bench_sample.py --preset base --device cuda --batch 1 \
        --lengths 1024 --repeats 1 --recompute-steps 5
else
    echo "== bench_sample skipped: no scripts/bench_sample.py or no pretty_midi (scratch/gpu_site)"
fi
