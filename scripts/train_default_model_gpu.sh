#!/usr/bin/env bash
# Train a `medium` default model (13 M parameters, 2048-token context, 26 MB in fp16) on one GPU
# in one device call of about 7 minutes (H100 or H200, bf16), and export it for shipping.
#
#   bash scripts/train_default_model_gpu.sh        # from the repository root, on the GPU machine
#   (device tool: timeout_s 540; carry scratch/gpu_site if the machine lacks pretty_midi and mido,
#    see scripts/gpu_check.sh for how to fill it)
#
# 1. A 40-step probe with the real options measures this GPU's training tokens/s.
# 2. The run gets as many steps as fit in TRAIN_S seconds (default 330) at that speed: the same
#    data and tags as the CPU model (midi_data/, classical drawn 3 times as often), FIM 0.5, the
#    keyboard input (--sounding-notes),
#    batch 16 x 2048 tokens, AdamW at 6e-4 with cosine decay. A SIGINT guard at GUARD_S seconds
#    stops it cleanly (the `last` and `best` checkpoints are kept) if the probe was optimistic.
# 3. `best` is exported in fp16 to $OUT/default_model/ with metrics.jsonl, loss.png and the
#    held-out losses (classical and pop files neither model trained on), which come back to the
#    local session; that session compares it with scripts/compare_models.py before shipping it.
# On a 2-core CPU, `medium` samples about 20 times slower than the shipped `tiny` (BENCHMARKS.md,
# "What a bigger default would cost at sampling time"). Weigh that before it replaces the
# default: it could ship beside it instead.
set -euo pipefail
OUT=${OUT:-scratch/gpu_out}
TRAIN_S=${TRAIN_S:-330}
GUARD_S=${GUARD_S:-420}
PY=${PYTHON:-python3}
RUN=${RUN:-runs/gpu-medium}
# A dry run on a CPU: DEVICE=cpu PRESET=tiny SEQ_LEN=64 BATCH=2 PROBE_STEPS=25 TRAIN_S=5 bash ... (the probe needs
# steps past 10 in its log)
DEVICE=${DEVICE:-cuda} PRESET=${PRESET:-medium} SEQ_LEN=${SEQ_LEN:-2048} BATCH=${BATCH:-16}
PROBE_STEPS=${PROBE_STEPS:-40}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/scratch/gpu_site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PRECISION=bf16; [ "$DEVICE" = cuda ] || PRECISION=fp32
OPTIONS=(--preset "$PRESET" --device "$DEVICE" --precision "$PRECISION" --seq-len "$SEQ_LEN" --batch-size "$BATCH"
         --tag-weight classical=3 --sounding-notes --seed 17)

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  $PY -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT/env.txt"

# 1. Probe: tokens/s of the real training step (the median of the logged steps after warm-up).
$PY -m musicgpt train midi_data/ "${OPTIONS[@]}" --out runs/gpu-probe --max-steps "$PROBE_STEPS" --warmup 5 \
    --eval-interval 1000 > "$OUT/probe.log" 2>&1
STEPS=$($PY - "$TRAIN_S" "$(( BATCH * SEQ_LEN ))" <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open("runs/gpu-probe/metrics.jsonl")]
speeds = [r["tokens_per_s"] for r in rows if r.get("split") == "train" and r["step"] > 10]
print(max(20, int(float(sys.argv[1]) * statistics.median(speeds) / int(sys.argv[2]))))
EOF
)
echo "probe: $STEPS steps fit in ${TRAIN_S}s" | tee -a "$OUT/env.txt"

# 2. The run.
timeout -s INT -k 30 "$GUARD_S" $PY -m musicgpt train midi_data/ "${OPTIONS[@]}" --out "$RUN" \
    --max-steps "$STEPS" --lr 6e-4 --warmup 200 --eval-interval $(( STEPS / 8 > 50 ? STEPS / 8 : 50 )) \
    > "$OUT/train.log" 2>&1 || echo "train exited $? (130: stopped by the guard, checkpoints kept)"
tail -c 2000 "$OUT/train.log"

# 3. Export and held-out losses.
$PY - "$RUN" "$OUT" "$DEVICE" <<'EOF'
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, "scripts")
from compare_models import held_out_files, held_out_loss
from musicgpt.checkpoint import export_model

run, out = Path(sys.argv[1]), Path(sys.argv[2])
dest = out / "default_model"
dest.mkdir(parents=True, exist_ok=True)
model = export_model(run / "best.safetensors", dest / "model")
for name in ("metrics.jsonl", "loss.png"):
    shutil.copy2(run / name, dest / name)
held = held_out_files()
losses = {style: held_out_loss(model, files, device=sys.argv[3]) for style, files in held.items()}
(out / "held_out.json").write_text(json.dumps(losses, indent=2))
print(json.dumps(losses, indent=2))
EOF
