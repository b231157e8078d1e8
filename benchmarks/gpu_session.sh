#!/usr/bin/env bash
# One device call that measures what the GPU issues ask for, everything written under $OUT (the
# device tool brings back at most 8 files: here session.log, profile-lora.json, profile-full.json,
# lora.json/.png, full.json/.png; the profiles' tables are in the log).
#
#   bash ../shared/tools/gpu-prepare.sh                      # here, once: fills the git-ignored .gpu/
#   run(command=". .gpu/env.sh && bash benchmarks/gpu_session.sh", carry=[".gpu"], timeout_s=600)
#
# The steps' limits add up to 510 s, in order of what matters most: the GPU tests, where a LoRA
# step's time goes, LoRA against TRL best, where a full step's time goes, the full figure.
#
# The GPT-J-6B-shaped model (random init, 12 GB in bf16) is built once in /tmp and reused by both
# benchmarks (--model-dir), then deleted; each benchmark keeps final/ only (no 48 GB checkpoint),
# so the device's 64 GiB disk holds it all. Each step has its own time limit, so one that hangs
# cannot eat the others' time; a failed step is logged and the next one runs.
#
# A CPU dry run of the same steps on the tiny shape (what the suite's smoke test runs):
#   OUT=/tmp/gpu-dry DEVICE=cpu SHAPE=tiny LORA_STEPS=2 FULL_STEPS=2 PROFILE_STEPS=2 MAX_LENGTH=256 DATA=../shared/data \
#     bash benchmarks/gpu_session.sh
set -uo pipefail
OUT=${OUT:?OUT must name the folder to write into (the device tool sets it)}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-gptj-6b}
DATA=${DATA:-.gpu/data}
MAX_LENGTH=${MAX_LENGTH:-2048}
LORA_STEPS=${LORA_STEPS:-80}    # the padded engines' optimizer steps: 640 records, ~35 packed 2048-token steps
FULL_STEPS=${FULL_STEPS:-40}
MODEL=${MODEL:-/tmp/gptj-tune-bench-$SHAPE}
LOG=$OUT/session.log
mkdir -p "$OUT"
failed=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output appended to the log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local code=$?
  echo "== $name: exit $code after $((SECONDS - started)) s" | tee -a "$LOG"
  [ "$code" -eq 0 ] || failed=$((failed + 1))
}

{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
  python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  df -h /tmp | tail -1
} >>"$LOG" 2>&1

if [ "$DEVICE" = cuda ]; then
  step gpu-tests 60 python -m pytest -q -p no:cacheprovider tests/model/test_attention.py -k gpu
fi
shape=(--device "$DEVICE" --shape "$SHAPE" --max-length "$MAX_LENGTH" --model-dir "$MODEL" --data-dir "$DATA")
step profile-lora 90 python benchmarks/profile_step.py "${shape[@]}" --method lora --rows 1 --warmup 3 \
  --steps "${PROFILE_STEPS:-10}" --out /tmp/profile-lora.json  # its table goes to the log; the JSON to $OUT below
cp /tmp/profile-lora.json "$OUT/" 2>/dev/null
step lora 180 python benchmarks/train_throughput.py "${shape[@]}" --batch-size 8 --method lora --steps "$LORA_STEPS" \
  --engines gptj-tune,trl-best --out "$OUT/lora.json"
step profile-full 90 python benchmarks/profile_step.py "${shape[@]}" --method full --rows 1 --warmup 3 \
  --steps "${PROFILE_STEPS:-10}" --out /tmp/profile-full.json
cp /tmp/profile-full.json "$OUT/" 2>/dev/null
step full 90 python benchmarks/train_throughput.py "${shape[@]}" --batch-size 8 --method full --steps "$FULL_STEPS" \
  --engines gptj-tune --out "$OUT/full.json"
rm -rf "$MODEL" /tmp/profile-lora.* /tmp/profile-full.*
echo "== done: $failed step(s) failed" | tee -a "$LOG"
exit "$failed"
