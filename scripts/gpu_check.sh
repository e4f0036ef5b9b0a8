#!/usr/bin/env bash
# Every GPU check in one command, sized for one H100/H200-class GPU (README: "Scale-out and the
# GPU check"): the CUDA tests, then the GPU benchmarks with reduced repetitions, then
# BENCHMARKS.md and the README goals table. Each step has a time budget in seconds and is
# stopped when it runs over; the budgets add up to 9 min, inside the 10 minutes a device command may run (installing .venv not included).
# Without a GPU it says so in one line and exits 1 at once.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi finds none); nothing checked" >&2
    exit 1
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh  # the repo's environment (scripts/setup.sh)
PY=.venv/bin/python
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: torch in .venv sees no CUDA device (a CPU-only build?); nothing checked" >&2
    exit 1
fi
nvidia-smi -L

verdicts=()
failed=0
step() {  # step NAME BUDGET_SECONDS COMMAND...: run it, stop it at its budget, note a verdict
    local name=$1 budget=$2 start=$SECONDS rc verdict
    shift 2
    echo "== gpu_check: $name (budget $budget s)"
    timeout --signal=INT --kill-after=10 "$budget" "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then verdict="ok"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="OVER BUDGET (stopped at $budget s)"
    else verdict="FAILED (exit $rc)"; fi
    [ "$rc" -eq 0 ] || failed=1
    verdicts+=("$name: $verdict after $((SECONDS - start)) s")
}

step "CUDA tests (pytest -m cuda)" 120 "$PY" -m pytest -m cuda -q
step "bench/train_step.py (vs HF eager, MFU)" 60 "$PY" bench/train_step.py --reps 3
step "bench/packing.py (packed vs unpacked vs transformers padding-free)" 45 "$PY" bench/packing.py --reps 2
step "bench/decode.py (batch 1 and 32 vs HF generate, dynamic and static compiled)" 90 \
    "$PY" bench/decode.py --reps 2
step "bench/hinted_decode.py (vs the authors' design)" 45 "$PY" bench/hinted_decode.py --reps 1
step "bench/prefill_memory.py (long-prompt prefill memory, before and after)" 30 "$PY" bench/prefill_memory.py
step "bench/loss_memory.py (lean vs full-logits loss)" 35 "$PY" bench/loss_memory.py --reps 2
step "scripts/memory_plan.py --measure (Qwen2.5-1.5B-shaped, 4,096 tokens, FSDP2, checkpointing, compiled)" 100 \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 scripts/memory_plan.py --model qwen2.5-1.5b \
    --seq-len 4096 --gpus 1 --fsdp --activation-checkpointing --measure --steps 4
step "bench/report.py (BENCHMARKS.md, README goals)" 15 "$PY" bench/report.py --print-goals gpu

echo "== gpu_check: steps"
printf '  %s\n' "${verdicts[@]}"
exit "$failed"
