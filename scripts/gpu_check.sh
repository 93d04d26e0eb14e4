#!/usr/bin/env bash
# GPU checks for the fast attention paths, in parts that each fit one device call:
#   bash scripts/gpu_check.sh 1   the CUDA correctness tests, bench_train (the product's training
#                                 step, base, bf16, L = 2048) and bench_sample (base, bf16, batch 1,
#                                 2048 tokens: CUDA graph vs KV cache vs recompute); about 5 minutes
#   bash scripts/gpu_check.sh 2   bench_attention: layer and whole model at L = 1024..8192 for the
#                                 eager skew, FlexAttention, plain causal SDPA and the peer, and
#                                 sampling 2048 tokens against the peer; about 5 minutes
#   bash scripts/gpu_check.sh 3   the fused Triton kernel: CUDA tests, training step (two-pass and
#                                 one-pass backward), kernel tables (64 and 32 tiles; 128 spills
#                                 kilobytes a thread: scripts/compile_triton_kernels.py) against
#                                 FlexAttention and flash, bench_sample; about 9 minutes
#                                 (run with timeout_s 600)
# Logs and tables land in $OUT (default scratch/gpu_out); each step has its own time limit.
#
# The peer (gwinndr/MusicTransformer-Pytorch) is never part of this repository: copy it into an
# ignored folder just for the run and carry it, with the pure-Python MIDI packages bench_sample
# imports (the GPU image lacks them), e.g. from the repository root:
#   cp -r PATH/TO/MusicTransformer-Pytorch scratch/peer
#   mkdir -p scratch/gpu_site
#   for d in pretty_midi mido importlib_resources; do
#       cp -r .venv/lib/python3.*/site-packages/$d scratch/gpu_site/; done
#   run: bash scripts/gpu_check.sh 1   (carry scratch/peer and scratch/gpu_site, timeout_s 360)
# Without them the peer rows read "peer not found" and the tests and bench_sample fail to import.
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

PART=${1:-1}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

case $PART in
1)  step tests 120 $PY -m pytest -q -rs -p no:cacheprovider tests/test_attention_flex.py tests/test_steppers.py tests/test_keyboard.py
    # The training step as `musicgpt train` runs it on CUDA, base preset, bf16.
    step bench_train 130 $PY scripts/bench_train.py --preset base --dtype bf16 --device cuda \
        --seq-lens 2048 --batch-size 4 --steps 5 --warmup 2
    step bench_sample 110 $PY scripts/bench_sample.py --preset base --dtype bf16 --device cuda \
        --batch 1 --lengths 2048 --repeats 1 --recompute-steps 3 ;;
2)  step tests_fused 60 $PY -m pytest -q -rs -p no:cacheprovider tests/test_attention_flex.py tests/test_steppers.py \
        -k "fused or replay or generate"
    step bench_sample 110 $PY scripts/bench_sample.py --preset base --dtype bf16 --device cuda \
        --batch 1 --lengths 2048 --repeats 1 --recompute-steps 3
    step bench_attention 280 $PY scripts/bench_attention.py --device cuda --preset base --dtype bf16 \
        --seq-lens 1024,2048,4096,8192 --batch-size 2 --peer-path "$PEER_PATH" --steps 3 --warmup 1 \
        --variants eager,flex,sdpa,peer --scopes ${SCOPES:-model,layer} --sample-tokens 2048 \
        --timeout 120 --out "$OUT/bench_attention.md" --json "$OUT/bench_attention.json" ;;
3)  # The fused Triton kernel (written after parts 1 and 2 ran; not yet run on a GPU): its CUDA
    # tests, the training step with it (two-pass and one-pass backward), the kernel tables
    # against FlexAttention and flash, and bench_sample again (KV-cache steps now kept off cuDNN
    # SDPA; the sampler's rules now on the host).
    step tests_triton 140 $PY -m pytest -q -rs -p no:cacheprovider tests/test_attention_triton.py \
        tests/test_attention_flex.py tests/test_steppers.py -k "not cpu"
    step bench_train_triton 90 $PY scripts/bench_train.py --preset base --dtype bf16 --device cuda \
        --seq-lens 2048,8192 --batch-size 2 --steps 5 --warmup 2 --attn-impl triton
    step bench_train_triton_1p 90 $PY scripts/bench_train.py --preset base --dtype bf16 --device cuda \
        --seq-lens 2048,8192 --batch-size 2 --steps 5 --warmup 2 --attn-impl triton --triton-one-pass
    step bench_attention 190 $PY scripts/bench_attention.py --device cuda --preset base --dtype bf16 \
        --seq-lens 1024,2048,4096,8192 --batch-size 2 --steps 3 --warmup 1 \
        --variants sdpa,triton,triton-1p,triton32,triton32-1p,flex,eager --scopes model,layer \
        --sample-tokens 0 --timeout 100 --out "$OUT/bench_attention.md" --json "$OUT/bench_attention.json"
    step bench_sample 60 $PY scripts/bench_sample.py --preset base --dtype bf16 --device cuda \
        --batch 1 --lengths 2048 --repeats 1 --recompute-steps 3 ;;
esac
