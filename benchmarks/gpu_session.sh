#!/usr/bin/env bash
# One device call that measures what the GPU issues ask for, everything written under $OUT (the
# device tool brings back at most 8 files: here session.log, lora.json/.png, full.json/.png,
# qlora.json, profile-full.json, profile-lora.json; the profiles' tables are in the log; qlora.png
# is deleted to stay within 8).
#
#   bash ../shared/tools/gpu-prepare.sh                      # here, once: fills the git-ignored .gpu/
#   bash benchmarks/gpu_add_bitsandbytes.sh                  # and bitsandbytes, for the qlora step
#   bash benchmarks/gpu_add_novels.sh                        # and the shared novels, for the recipes step
#   run(command=". .gpu/env.sh && COMMIT=<git rev-parse --short HEAD here> bash benchmarks/gpu_session.sh",
#       carry=[".gpu"], timeout_s=480)
#
# Steps, in order of what matters most: the GPU tests, LoRA against TRL best, the full figure,
# QLoRA against TRL best on the same 4-bit base, where a full step's time goes, where a LoRA
# step's time goes. Each has its own time limit, so
# one that hangs cannot eat the others' time, and all of them share BUDGET seconds (a step starts
# with what is left of it, and is skipped under 30 s); a failed step is logged and the next one
# runs. PHASES picks a subset.
#
# The GPT-J-6B-shaped model (random init, 12 GB in bf16) is built once in /tmp and reused by every
# step (--model-dir), then deleted; each benchmark keeps final/ only (no 48 GB checkpoint), so the
# device's 64 GiB disk holds it all. torch.compile's caches stay in /tmp for the whole call: the
# blocks are compiled once, later steps reuse the kernels.
#
# Not among the default PHASES (the 8 files above are all that come back), each group a call of
# its own, in this order of priority:
# - the shipped recipes as users run them (alpaca-lora at 8 x 512 with its accumulation,
#   novel-domain at 2 x 2048 with gradient checkpointing, LoRA r64; benchmarks/recipe_throughput.py)
#   on the 6B shape, and the optimizer's step at the 6B shape (KahanAdamW's update per weight,
#   batched and chunked; benchmarks/optimizer_step.py, ~60 GB of GPU memory):
#   PHASES="build-model recipes optimizer" COMMIT=<hash> bash benchmarks/gpu_session.sh
#   (session.log, recipes.json, optimizer.json)
# - the GPT-Neo-2.7B shape (random init, 5.4 GB in bf16), LoRA against TRL best:
#   PHASES="build-neo neo" COMMIT=<hash> bash benchmarks/gpu_session.sh      (session.log, neo.json, neo.png)
#
# A CPU dry run of the same steps on the tiny shape (what the suite's smoke test runs):
#   OUT=/tmp/gpu-dry DEVICE=cpu SHAPE=tiny LORA_STEPS=2 FULL_STEPS=2 PROFILE_STEPS=2 MAX_LENGTH=256 DATA=../shared/data \
#     bash benchmarks/gpu_session.sh
# (RECIPE_STEPS and RECIPE_SET, e.g. "--set train.grad_accum=1", shorten the recipes step.)
set -uo pipefail
OUT=${OUT:?OUT must name the folder to write into (the device tool sets it)}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-gptj-6b}
DATA=${DATA:-.gpu/data}
MAX_LENGTH=${MAX_LENGTH:-2048}
LORA_STEPS=${LORA_STEPS:-80}    # the padded engines' optimizer steps: 640 records, ~35 packed 2048-token steps
FULL_STEPS=${FULL_STEPS:-40}
MODEL=${MODEL:-/tmp/gptj-tune-bench-$SHAPE}
NEO_SHAPE=${NEO_SHAPE:-gpt-neo-2.7b}
NEO_MODEL=${NEO_MODEL:-/tmp/gptj-tune-bench-$NEO_SHAPE}
PHASES=${PHASES:-gpu-tests build-model lora full qlora profile-full profile-lora}
# bitsandbytes for the qlora step (benchmarks/gpu_add_bitsandbytes.sh puts a slim copy in .gpu/site)
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${BUDGET:-450}
LOG=$OUT/session.log
mkdir -p "$OUT"
failed=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output appended to the log
  local name=$1 limit=$2
  shift 2
  case " $PHASES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left} s of the budget left" | tee -a "$LOG"
    failed=$((failed + 1))
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit} s): $*" | tee -a "$LOG"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local code=$?
  echo "== $name: exit $code after $((SECONDS - started)) s" | tee -a "$LOG"
  [ "$code" -eq 0 ] || failed=$((failed + 1))
}

{
  # COMMIT: pass it in the command (COMMIT=abc1234 bash ...): the device's copy of .git can be older than the tree
  echo "commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, $(date -u +%FT%TZ)"
  python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  df -h /tmp | tail -1
} >>"$LOG" 2>&1

if [ "$DEVICE" = cuda ]; then
  step gpu-tests 120 python -m pytest -q -p no:cacheprovider tests/model/test_attention.py tests/train/test_optim.py tests/test_plan.py tests/train/test_memory.py -k "gpu or cuda"
fi
step build-model 60 python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from rich.console import Console
from workload import model_for; model_for('$SHAPE', Path('$MODEL'), Console())"  # built once here, outside the timed steps
shape=(--device "$DEVICE" --shape "$SHAPE" --max-length "$MAX_LENGTH" --model-dir "$MODEL" --data-dir "$DATA")
step lora 170 python benchmarks/train_throughput.py "${shape[@]}" --batch-size 8 --method lora --steps "$LORA_STEPS" \
  --engines gptj-tune,trl-best --out "$OUT/lora.json"
step full 130 python benchmarks/train_throughput.py "${shape[@]}" --batch-size 8 --method full --steps "$FULL_STEPS" \
  --engines gptj-tune --out "$OUT/full.json"
step qlora 120 python benchmarks/train_throughput.py "${shape[@]}" --batch-size 8 --method qlora --steps "$LORA_STEPS" \
  --engines gptj-tune,trl-best --out "$OUT/qlora.json"
step profile-full 90 python benchmarks/profile_step.py "${shape[@]}" --method full --rows 1 --warmup 3 \
  --steps "${PROFILE_STEPS:-5}" --out "$OUT/profile-full.json"  # its table goes to the log, and to a .txt left out below
step profile-lora 90 python benchmarks/profile_step.py "${shape[@]}" --method lora --rows 1 --warmup 3 \
  --steps "${PROFILE_STEPS:-5}" --out "$OUT/profile-lora.json"
step build-neo 60 python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; from rich.console import Console
from workload import model_for; model_for('$NEO_SHAPE', Path('$NEO_MODEL'), Console())"
step neo 170 python benchmarks/train_throughput.py --device "$DEVICE" --shape "$NEO_SHAPE" --max-length "$MAX_LENGTH" \
  --model-dir "$NEO_MODEL" --data-dir "$DATA" --batch-size 8 --method lora --steps "$LORA_STEPS" --engines gptj-tune,trl-best \
  --out "$OUT/neo.json"
step recipes 240 python benchmarks/recipe_throughput.py --device "$DEVICE" --shape "$SHAPE" --model-dir "$MODEL" \
  --data-dir "$DATA" --recipe alpaca-lora --recipe novel-domain \
  --steps "${RECIPE_STEPS:-8}" --warmup-steps 3 ${RECIPE_SET:-} --out "$OUT/recipes.json"
step optimizer 120 python benchmarks/optimizer_step.py --device "$DEVICE" --shape "$SHAPE" --out "$OUT/optimizer.json"
rm -rf "$MODEL" "$NEO_MODEL" "$OUT"/profile-*.txt "$OUT"/qlora.png
echo "== done: $failed step(s) failed or skipped" | tee -a "$LOG"
exit "$failed"
