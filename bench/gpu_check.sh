#!/usr/bin/env bash
# Everything a lent GPU should run, as ONE command (an H200 lease is 15 minutes of device time, all
# tries together; this script stays under 8 minutes however the steps go):
#
#   bash bench/gpu_check.sh              # on the device: tables and logs to $OUT (default $TMPDIR/gpu_check_out)
#   bash bench/gpu_check.sh --cpu-smoke  # on a CPU: every step's entry point with tiny sizes (numbers meaningless)
#
# Steps, each under its own timeout; a failed or timed-out step does not stop the next:
#   1 env        nvidia-smi, python/jax versions, devices; where asura.kernels is imported from
#   2 tests      compiled kernels vs the fp32 reference: tests/test_kernels_hw.py and the gpu-marked
#                tests of tests/test_attention_dispatch.py (the other test files need grain/tensorboardX)
#   3 attention  bench/attention.py: pallas vs cudnn vs xla, T 1k-8k, d 64/128, bf16, causal, fwd and fwd+bwd
#   4 mfu        bench/mfu.py: configs/presets/looped_350m.yaml at batch 32 (synthetic data), 10 timed steps
#   5 skip       bench/skip_cost.py: what skipped iterations cost under remat none/block (S = 16 vs S = 2),
#                where lax.empty allocates without the CPU's zero-fill (issue #18's open ratio)
#   6 halting    bench/halting_engine.py: decode wall time when every token exits after 2 of 4
#                iterations, against depth 4 and fixed depth 2, batch 1 and 8 (issue #29's wall time)
# Files in $OUT (at most 8 come back): env.txt tests.txt attention.txt mfu.txt mfu.json skip.txt halting.txt
# summary.txt
#
# The device image (python3, jax 0.11.2, no grain, no asura install) is used as it is. asura is put
# on the path through a view in $TMPDIR: asura/* linked, bench/ and tests/ copied so their repo-root
# lookups land in it.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=device
case "${1:-}" in
  "") ;;
  --cpu-smoke) MODE=smoke ;;
  *) echo "usage: bash bench/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
OUT="${OUT:-${TMPDIR:-/tmp}/gpu_check_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"  # absolute: the steps run from the view
if [ "$MODE" = smoke ] && [ -x "$REPO/.venv/bin/python" ]; then PY="${PY:-$REPO/.venv/bin/python}"; else PY="${PY:-python3}"; fi

# Per-step limits (s): 15 + 85 + 135 + 150 + 55 + 40 = 480 s = 8 min at worst. Compiles dominate every step (72 jit
# compiles in the attention table, one 350M train step in mfu); output is unbuffered, so a step cut
# short by its limit still leaves the rows it finished in $OUT.
T_ENV=15 T_TESTS=85 T_ATTN=135 T_MFU=150 T_SKIP=55 T_HALT=40
TEST_ARGS=(-m gpu)  # on a CPU they all skip: the smoke checks that the files import and collect
if [ "$MODE" = device ]; then
  ATTN_ARGS=(--T 1024,2048,4096,8192 --d 64,128 --heads 16 --dtype bfloat16 --impls pallas,cudnn,xla --reps 30)
  MFU_ARGS=(--config configs/presets/looped_350m.yaml train.batch_size=32 --steps 10)
  SKIP_ARGS=(--d-model 512 --seq 512 --batch 8 --pairs 2:16 --policies none,block --loops while --reps 7)
  HALT_ARGS=(--d-model 2048 --heads 16 --layers 2 --depth 4 --exits 2 --batches 1,8 --prompt 128 --new 64 --reps 3)
else  # the same entry points, tiny; Pallas runs in interpret mode
  ATTN_ARGS=(--cpu-smoke)
  MFU_ARGS=(--cpu-smoke)
  SKIP_ARGS=(--d-model 32 --seq 16 --batch 2 --pairs 1:2 --policies none --loops while --reps 1)
  HALT_ARGS=(--d-model 32 --heads 2 --layers 1 --depth 2 --exits 1 --batches 1,2 --prompt 4 --new 2 --reps 1)
fi

VIEW="${TMPDIR:-/tmp}/asura_view.$$"
rm -rf "$VIEW" && mkdir -p "$VIEW/asura"
for f in "$REPO"/asura/*; do ln -s "$f" "$VIEW/asura/"; done
ln -s "$REPO/configs" "$VIEW/configs"
cp -r "$REPO/bench" "$REPO/tests" "$REPO/pyproject.toml" "$VIEW/"
rm -rf "$VIEW/tests/__pycache__" "$VIEW/bench/__pycache__"
trap 'rm -rf "$VIEW"' EXIT
cd "$VIEW"
export PYTHONPATH="$VIEW" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

SUMMARY=()
step() {  # step NAME LIMIT_S OUTFILE CMD...: run with a timeout, tee to $OUT, record status and seconds
  local name=$1 limit=$2 file=$3; shift 3
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$file"
  rc=${PIPESTATUS[0]}
  local how="ok"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then how="TIMEOUT"; elif [ "$rc" != 0 ]; then how="FAILED (exit $rc)"; fi
  SUMMARY+=("$(printf '%-10s %-16s %4ss  %s' "$name" "$how" "$((SECONDS - t0))" "$OUT/$file")")
}

ENV_PY='
import shutil, subprocess, sys
import jax, flax, optax
import asura.kernels
if shutil.which("nvidia-smi"):
    q = "name,memory.total,driver_version,clocks.sm,clocks.max.sm"
    print(subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], capture_output=True, text=True).stdout)
print("python", sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)
print("devices", jax.devices())
print("asura.kernels from", asura.kernels.__file__)
'
step env "$T_ENV" env.txt "$PY" -c "$ENV_PY"
step tests "$T_TESTS" tests.txt "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_hw.py \
  tests/test_attention_dispatch.py "${TEST_ARGS[@]}"
step attention "$T_ATTN" attention.txt "$PY" bench/attention.py "${ATTN_ARGS[@]}"
step mfu "$T_MFU" mfu.txt "$PY" bench/mfu.py "${MFU_ARGS[@]}" --json "$OUT/mfu.json"
step skip "$T_SKIP" skip.txt "$PY" bench/skip_cost.py "${SKIP_ARGS[@]}"
step halting "$T_HALT" halting.txt "$PY" bench/halting_engine.py "${HALT_ARGS[@]}"

{
  echo "=== gpu_check ($MODE) summary: step, status, seconds, output"
  printf '%s\n' "${SUMMARY[@]}"
  echo "--- tests:"; tail -n 3 "$OUT/tests.txt"
  echo "--- attention:"; grep -E '^(impl|pallas|cudnn|xla) ' "$OUT/attention.txt" || echo "(no rows)"
  echo "--- mfu:"; grep -E '^[|#]' "$OUT/mfu.txt" || echo "(no rows)"
  echo "--- skip:"; grep -E '^\|' "$OUT/skip.txt" || echo "(no rows)"
  echo "--- halting:"; grep -E '^ *(batch|[0-9]+ )' "$OUT/halting.txt" || echo "(no rows)"
} | tee "$OUT/summary.txt"

for line in "${SUMMARY[@]}"; do case "$line" in *" ok "*) ;; *) exit 1 ;; esac; done
