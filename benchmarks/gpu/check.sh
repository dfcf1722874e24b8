#!/usr/bin/env bash
# The GPU check in one call: run from the repository root on the GPU machine as
#
#   bash benchmarks/gpu/check.sh --out $OUT          # wheels from benchmarks/gpu/prepare.sh, <= 7 min
#   bash benchmarks/gpu/check.sh --only a,c          # some parts again
#   bash benchmarks/gpu/check.sh --dry-run           # the same parts on this machine's CPU, tiny sizes
#
# Parts (each under its own `timeout`, logged to OUT/part-X.log; a failing part is reported and the
# others still run):
#   a  python -m dcgan_dist.bench at batch 128 and 2048, every variant: img/s, TFLOP/s, share of bf16 peak
#   b  python -m dcgan_dist.train --use-gpu through Ray Train on WebDataset shards packed here, bf16,
#      the fastest --compile that part a saw work, evaluation on, then a resume to more steps;
#      benchmarks/gpu/verify_run.py checks metrics, registered models, system/gpu_* metrics, img/s
#   c  --bn-sync on the GPU (SyncBatchNorm over NCCL, 1 worker) and the RNG resume: an interrupted
#      and resumed run against an uninterrupted one (and a second one, the run-to-run noise), on digits
#   d  benchmarks/gpu/decode.py: JPEG decode on the GPU (batched) against the CPU cores; shards bench --decode cpu|gpu
#   e  benchmarks/probe_svm.py: the probe's torch L2-SVM on the GPU at Table 1's size, 45,000 x 28,672
#      synthetic float16 features (2.6 GB), one C: fit time, Newton iterations, GPU memory
# It ends with one table (part | status | key figures), also written to OUT/summary.md.
#
# Options: --out DIR (default ./gpu-results), --only a,b,c,d,e, --dry-run, --wheels DIR (default
# benchmarks/gpu/wheels; installed unless --dry-run, or when given with --dry-run), --keep-scratch.
# PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/../.."

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
fail_args() { echo "check.sh: error: $1 (see --help)" >&2; exit 2; }

out=./gpu-results
only=a,b,c,d,e
dry=0
wheels=benchmarks/gpu/wheels
wheels_given=0
keep_scratch=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || fail_args "--out needs a folder"; out="$2"; shift 2 ;;
    --only) [ $# -ge 2 ] || fail_args "--only needs parts, e.g. a,c"; only="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --wheels) [ $# -ge 2 ] || fail_args "--wheels needs a folder"; wheels="$2"; wheels_given=1; shift 2 ;;
    --keep-scratch) keep_scratch=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) fail_args "unknown argument: $1" ;;
  esac
done
parts=$(echo "$only" | tr ',' ' ')
[ -n "$parts" ] || fail_args "--only: no parts given"
for part in $parts; do
  case "$part" in a|b|c|d|e) ;; *) fail_args "--only: unknown part '$part' (parts: a, b, c, d, e)" ;; esac
done

export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS=0 TOKENIZERS_PARALLELISM=false
export MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL=1  # short runs: sample the GPU every second
PY=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd)
scratch="$out/scratch"
rm -rf "$scratch" "$out"/part-*.log "$out"/bench-*.json "$out"/summary.md
mkdir -p "$scratch"
started=$(date +%s)

# Sizes and time budgets (seconds). The GPU run's parts add up to the 7 minutes it may take (part e: the probe SVM, 60 s).
if [ "$dry" = 1 ]; then
  total_budget=630
  declare -A budget=([a]=100 [b]=180 [c]=220 [d]=60 [e]=60)
  device=cpu px=32 batch=16 precision=fp32 use_gpu=""
  bench_runs="8:35 16:35"; bench_opts="--steps 1 --repeats 2 --warmup 1 --variant-budget-s 20"  # BATCH:TOTAL_BUDGET_S
  b_steps=12 b_more=8 b_log=4 b_eval=12 eval_samples=200
  c_steps=6 c_log=3 c_control=0 loaders=1 decode_images=256
  probe_size=2000x1024
else
  total_budget=420
  declare -A budget=([a]=140 [b]=100 [c]=75 [d]=30 [e]=60)
  device=cuda px=64 batch=128 precision=bf16 use_gpu="--use-gpu"
  # each bench run is time-boxed as a whole and per variant (a cold torch.compile takes tens of seconds)
  bench_runs="128:80 2048:55"; bench_opts="--variant-budget-s 35"
  b_steps=240 b_more=120 b_log=20 b_eval=240 eval_samples=500
  c_steps=30 c_log=10 c_control=1 loaders=6 decode_images=4096
  probe_size=45000x28672
fi

# ---------------------------------------------------------------- the environment
# dcgan_dist runs from this source tree; what the image lacks comes from the wheels.
site=""
if [ "$dry" = 0 ] || [ "$wheels_given" = 1 ]; then
  site=/tmp/site
  if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "check.sh: error: no wheels in $wheels: run benchmarks/gpu/prepare.sh first, and carry the folder" >&2
    exit 2
  fi
  rm -rf "$site"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl >"$scratch/install.log" 2>&1; then
    echo "check.sh: error: installing $wheels failed: $(tail -1 "$scratch/install.log")" >&2
    exit 1
  fi
  export PATH="$site/bin:$PATH"
fi
export PYTHONPATH="${site:+$site:}$PWD"
# The digits classifier evaluation scores with: prepare.sh's copy, so no run trains it here.
if ls "$wheels"/cache/digits-cnn-*.pt >/dev/null 2>&1 && [ -z "${DCGAN_DIST_CACHE:-}" ]; then
  mkdir -p "$scratch/cache" && cp "$wheels"/cache/digits-cnn-*.pt "$scratch/cache/"
  export DCGAN_DIST_CACHE="$scratch/cache"
fi

# ---------------------------------------------------------------- the parts

bench_json() { echo "$out/bench-$1.json"; }

part_a() {
  local run b
  for run in $bench_runs; do
    b=${run%%:*}
    echo "== python -m dcgan_dist.bench --device $device --batch-size $b --total-budget-s ${run##*:} $bench_opts"
    # shellcheck disable=SC2086
    "$PY" -m dcgan_dist.bench --device "$device" --image-size "$px" --batch-size "$b" $bench_opts \
      --total-budget-s "${run##*:}" --output-json "$(bench_json "$b")" || return 1
  done
  # shellcheck disable=SC2086
  "$PY" - "$out" $(echo "$bench_runs" | sed 's/:[0-9]*//g') <<'PY'
import json, sys
out, batches = sys.argv[1], sys.argv[2:]
for batch in batches:
    report = json.load(open(f"{out}/bench-{batch}.json"))
    ok = [v for v in report["variants"] if v["status"] == "ok"]
    if not ok:
        sys.exit(f"figures batch {batch}: no variant finished a timed block: " + "; ".join(
            f"{v['name']}: {v['why']}" for v in report["variants"]))
    best = max(ok, key=lambda v: v["img_per_s"])
    peak = report["bf16_peak_tflops"]
    share = f", {best['tflops'] / peak:.1%} of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
    counts = {s: sum(v["status"] == s for v in report["variants"]) for s in ("ok", "skipped", "failed")}
    print(f"figures batch {batch}: best {best['name']} {best['img_per_s']:,.0f} img/s, {best['tflops']:.2f} TFLOP/s{share} "
          f"({counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed)")
PY
}

# The fastest variant of part a that training can run (this precision, a --compile setting), and its img/s.
pick_compile() {
  "$PY" - "$(bench_json "$batch")" "$precision" <<'PY'
import json, sys
from dcgan_dist.config import COMPILE_MODES
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("off 0 no-bench-result"); sys.exit()
ok = [v for v in report["variants"] if v["status"] == "ok" and v["precision"] == sys.argv[2]
      and v["train_compile"] in COMPILE_MODES]
best = max(ok, key=lambda v: v["img_per_s"], default=None)
print(f"{best['train_compile']} {best['img_per_s']:.1f} {best['name'].replace(' ', '_')}" if best else "off 0 none-ran")
PY
}

train() {  # RUN_NAME EXPERIMENT MAX_STEPS EXTRA_ARGS...
  local name=$1 experiment=$2 steps=$3; shift 3
  echo "== python -m dcgan_dist.train --run-name $name --max-steps $steps $*"
  # shellcheck disable=SC2086
  "$PY" -m dcgan_dist.train --data "$scratch/shards/manifest.json" --image-size "$px" --batch-size "$batch" \
    --max-steps "$steps" --sample-every 100000 --eval-samples "$eval_samples" --loader-workers "$loaders" \
    --tracking-uri "sqlite:///$scratch/mlflow.db" --experiment "$experiment" --storage-path "$scratch/ray_results" \
    --run-name "$name" --precision "$precision" $use_gpu "$@"
}

pack_shards() {
  [ -f "$scratch/shards/manifest.json" ] && return 0
  echo "== python -m dcgan_dist.shards pack digits at $px px"
  "$PY" -m dcgan_dist.shards pack --source digits --out "$scratch/shards" --image-size "$px" --shard-size 300 --no-progress
}

part_b() {
  pack_shards || return 1
  read -r compile bare variant <<<"$(pick_compile)"
  echo "== --compile $compile, from part a's fastest $precision variant that training can run: $variant ($bare img/s)"
  local common=(--log-every "$b_log" --checkpoint-every "$b_steps" --eval-every "$b_eval" --compile "$compile")
  train b gpu-check-b "$b_steps" "${common[@]}" || return 1
  train b gpu-check-b "$(( b_steps + b_more ))" "${common[@]}" || return 1
  local gpu_metrics=""
  [ "$dry" = 1 ] || gpu_metrics="--gpu-metrics"
  # shellcheck disable=SC2086
  "$PY" benchmarks/gpu/verify_run.py run --tracking-uri "sqlite:///$scratch/mlflow.db" --experiment gpu-check-b \
    --steps "$(( b_steps + b_more ))" --resumed-at "$b_steps" --log-every "$b_log" --registered 2 $gpu_metrics \
    --bare-img-per-s "$bare" || return 1
  echo "figures --compile $compile"
}

part_c() {
  # the bundled digits in memory, as tests/test_train.py's resume test: the RNG and the update, not the shard reader
  local common=(--data digits --bn-sync --log-every "$c_log" --checkpoint-every "$c_steps" --eval-every 0 --no-register-models)
  train c-split gpu-check-c-split "$c_steps" "${common[@]}" || return 1
  train c-split gpu-check-c-split "$(( 2 * c_steps ))" "${common[@]}" || return 1
  train c-straight gpu-check-c-straight "$(( 2 * c_steps ))" "${common[@]}" || return 1
  local control=()
  if [ "$c_control" = 1 ]; then
    train c-control gpu-check-c-control "$(( 2 * c_steps ))" "${common[@]}" || return 1
    control=(--control "$scratch/ray_results/c-control")
  fi
  "$PY" benchmarks/gpu/verify_run.py run --tracking-uri "sqlite:///$scratch/mlflow.db" --experiment gpu-check-c-split \
    --steps "$(( 2 * c_steps ))" --resumed-at "$c_steps" --log-every "$c_log" || return 1
  "$PY" benchmarks/gpu/verify_run.py same-weights "$scratch/ray_results/c-split" "$scratch/ray_results/c-straight" \
    "${control[@]}" || return 1
  echo "figures --bn-sync ${use_gpu:+--use-gpu }ran"
}

part_d() {
  local target
  target=$("$PY" -c 'import json, sys
try:
    print(max((v["img_per_s"] for v in json.load(open(sys.argv[1]))["variants"] if v["status"] == "ok"), default=0))
except (OSError, ValueError):
    print(0)' "$(bench_json "$batch")")
  "$PY" benchmarks/gpu/decode.py --device "$device" --image-size 64 --images "$decode_images" --target-img-per-s "$target"
  # training's own reader on JPEG shards, decoding in the loader processes and (on a GPU) on the GPU
  pack_shards || return 1
  local decoders="cpu" rates="" line step=()
  [ "$device" = cuda ] && decoders="cpu gpu"
  awk -v t="$target" 'BEGIN { exit !(t > 0) }' && step=(--step-img-s "$target")
  for decoder in $decoders; do
    echo "== python -m dcgan_dist.shards bench --decode $decoder --loader-workers $loaders"
    "$PY" -m dcgan_dist.shards bench "$scratch/shards/manifest.json" --decode "$decoder" --loader-workers "$loaders" \
      --batch-size "$batch" --seconds 3 "${step[@]}" >"$scratch/reader-$decoder.txt" || { cat "$scratch/reader-$decoder.txt"; return 1; }
    cat "$scratch/reader-$decoder.txt"
    line=$(tail -1 "$scratch/reader-$decoder.txt")
    rates="${rates:+$rates, }--decode $decoder ${line#shards bench: }"
  done
  echo "figures reader: $rates"
}

part_e() {
  echo "== benchmarks/probe_svm.py --sizes $probe_size --solvers torch --device $device"
  "$PY" benchmarks/probe_svm.py --sizes "$probe_size" --solvers torch --device "$device" --c 1e-3 >"$scratch/probe-svm.txt" \
    || { cat "$scratch/probe-svm.txt"; return 1; }
  cat "$scratch/probe-svm.txt"
  grep -q '| torch |.*| True |' "$scratch/probe-svm.txt" || { echo "check.sh: the torch L2-SVM failed or did not converge"; return 1; }
  awk -F'|' '/\| torch \|/ { gsub(/ /, ""); printf "figures probe SVM %s on %s: %s s, %s Newton iterations, peak RSS +%s GB, CUDA peak %s GB\n", $2, $4, $6, $8, $7, $12 }' \
    "$scratch/probe-svm.txt"
}

# One Ray instance for every training run of parts b and c (benchmarks/gpu/ray_head.py), started
# before the first and stopped at the end (or when the check is stopped).
ray_head_pid=""
start_ray() {
  [ -n "$ray_head_pid" ] && return 0
  rm -f "$scratch/ray-address"
  # Ray's token authentication stays on: a fresh token, which the runs joining inherit.
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$("$PY" -c 'import secrets; print(secrets.token_hex(32))')
  export RAY_AUTH_MODE RAY_AUTH_TOKEN
  "$PY" benchmarks/gpu/ray_head.py "$scratch/ray-address" >"$out/ray-head.log" 2>&1 &
  ray_head_pid=$!
  for _ in $(seq 120); do
    [ -s "$scratch/ray-address" ] && break
    kill -0 "$ray_head_pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ -s "$scratch/ray-address" ]; then
    RAY_ADDRESS=$(cat "$scratch/ray-address"); export RAY_ADDRESS
  else
    echo "check.sh: the shared Ray instance did not start ($(tail -1 "$out/ray-head.log")); each run starts its own" >&2
  fi
}
stop_ray() {
  [ -n "$ray_head_pid" ] || return 0
  kill "$ray_head_pid" 2>/dev/null && wait "$ray_head_pid" 2>/dev/null
  ray_head_pid=""
  unset RAY_ADDRESS
}
trap stop_ray EXIT

export -f part_a part_b part_c part_d part_e pick_compile train pack_shards bench_json
export out scratch dry device px batch precision use_gpu bench_runs bench_opts b_steps b_more b_log b_eval
export eval_samples c_steps c_log c_control loaders decode_images probe_size PY
declare -A status figures
for part in $parts; do
  log="$out/part-$part.log"
  left=$(( total_budget - ($(date +%s) - started) ))
  limit=$(( ${budget[$part]} < left ? ${budget[$part]} : left ))
  if [ "$limit" -lt 10 ]; then
    status[$part]="SKIPPED"; figures[$part]="no time left of the ${total_budget} s"
    continue
  fi
  echo "-- part $part (up to $limit s): $log"
  part_start=$(date +%s)
  if [ "$part" = b ] || [ "$part" = c ]; then start_ray; fi
  timeout --kill-after=10 "$limit" bash -c "part_$part" >"$log" 2>&1
  rc=$?
  took=$(( $(date +%s) - part_start ))
  found=$(grep '^figures ' "$log" | sed 's/^figures //' | awk 'NR > 1 { printf " / " } { printf "%s", $0 }')
  if [ "$rc" = 0 ]; then
    status[$part]="ok (${took} s)"; figures[$part]="$found"
  else
    plain=$(sed 's/\x1b\[[0-9;]*m//g' "$log")  # without the colours of Ray's log lines
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      why="ran past its $limit s"
      error="stopped in: $(echo "$plain" | grep '^== ' | tail -1 | cut -c4-200)"
    else
      why="exit $rc"
      error=$(echo "$plain" | grep -E 'Error|error:|^FAIL|Traceback|Exception' | tail -1 | cut -c1-200)
      [ -n "$error" ] || error=$(echo "$plain" | grep -v '^\s*$' | tail -1 | cut -c1-200)
      error="last error: $error"
    fi
    status[$part]="FAILED (${why}, ${took} s)"; figures[$part]="${found:+$found / }${error//|/\\|}"
  fi
done

stop_ray
[ "$keep_scratch" = 1 ] || rm -rf "$scratch"
total=$(( $(date +%s) - started ))
{
  echo "GPU check$([ "$dry" = 1 ] && echo ' (dry run: CPU, tiny sizes)'), $(date -u +%Y-%m-%dT%H:%MZ), total wall time ${total} s"
  echo
  echo "| part | status | key figures |"
  echo "|---|---|---|"
  for part in $parts; do
    echo "| $part | ${status[$part]} | ${figures[$part]} |"
  done
} | tee "$out/summary.md"
for part in $parts; do
  case "${status[$part]}" in ok*) ;; *) exit 1 ;; esac
done
