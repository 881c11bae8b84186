#!/bin/bash
# The GPU session's device calls, in order (each well under the 10-minute limit of one call). Outputs in $OUT.
#   1. bash executor/device_run.sh smoke        # ~1 min: CUDA backend, invariants, outputs = reference
#      (or `quick`: the smoke test's summary and the copy backends side by side on a 12-layer Qwen3 replay)
#   2. bash executor/device_run.sh calibrate    # ~2-4 min: profiles/h200.yaml (measured) -> $OUT/h200.yaml
#   3. bash executor/device_run.sh validate     # the suite, resumable: rerun until every run is in the Parquet
#   or 2+3 as `session` (calibrate once into /tmp, validate into /tmp/val; rerun on the warm machine to resume)
#   `copyapi` (~1.5 min): the smoke test and the two chunk-issue paths side by side
#   `copybound` (~5-6 min): calibrate the copy-bound geometry and run executor/suites/h200-copybound.yaml
# run tool: carry [".whl"] (pydantic and simpy wheels: the GPU image lacks them; pandas, pyarrow, yaml,
# matplotlib, transformers are there). results/validation/h200 travels as untracked files, so a second validate
# call resumes from its results.parquet once the first call's $OUT/h200 is copied back there.
# At most 8 files come back: gpu.txt, the step's log, and for validate h200/{summary.md,results.parquet,meta.json,
# plots/*.png}.
set -o pipefail
if ! python3 -c "import pydantic, simpy" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
export PYTHONUNBUFFERED=1
T0=$(date +%s)
STEP=${1:-smoke}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
free -g | tee -a "$OUT/gpu.txt"
# where the GPU sits (NUMA, CPU affinity) and what the host is: context for the runs' noise
{ nvidia-smi topo -m; lscpu | grep -E "Model name|^CPU\(s\)|NUMA|MHz"; } >> "$OUT/gpu.txt" 2>/dev/null
# A 12-layer Qwen3-30B-A3B decode replay (2 sequences, cache rate 0.25 per layer) for each VARIANT (executor.replay
# arguments) x {reactive LRU, the ProMoE-style switches}: one line each with the metrics KEYS and the host time
# per chunk group issued. Used by `quick` and `copyapi`.
qwen3_replays() {  # LOG TOKENS KEYS VARIANT...
  local log=$1 tokens=$2 keys=$3 variant cfg sets
  shift 3
  for variant in "$@"; do
    for cfg in "prefetch.predictor=none" "prefetch.predictor=previous_token prefetch.distance=2 chunked_prefetch=true early_preemption=true reordered_inference=true"; do
      sets=$(for kv in $cfg; do printf -- "--set %s " "$kv"; done)
      python3 -m executor.replay configs/examples/qwen3-decode-lru.yaml --geometry qwen3-30b-a3b --layers 12 $variant \
        --set phase=decode --set max_decode_tokens=$tokens --set max_sequences=2 --set cache.scope=per_layer \
        --set cache.cache_rate=0.25 --set prefetch.chunks=3 $sets --json 2>&1 | python3 -c "
import json,sys
for l in sys.stdin:
    if l.startswith('{'):
        m=json.loads(l)['metrics']; n=max(m.get('copy_issues') or 0, 1)
        print('$variant | $cfg |', {k: m.get(k) for k in '$keys'.split(',')},
              'us/group %.1f' % (1e3 * (m.get('host_copy_issue_ms') or 0) / n))
    else: print(l.rstrip()[-300:])" | tee -a "$log"
    done
  done
}
case "$STEP" in
  smoke)
    python3 -m executor.smoke --device cuda 2>&1 | tee "$OUT/smoke.log"
    python3 -m executor.smoke --device cuda --geometry flame-moe-290m --lookahead 2 2>&1 | tee -a "$OUT/smoke.log"
    ;;
  quick)
    # the new main-thread copy issue vs the copy thread, and the smoke test, in a couple of minutes
    python3 -m executor.smoke --device cuda 2>&1 | tail -n 3 | tee "$OUT/quick.log"
    qwen3_replays "$OUT/quick.log" 32 tpot_ms,hit_rate,stall_ms,pcie_busy_frac,prefetches,n_prefetch_late \
      "--backend cuda-thread --lookahead 1" "--backend cuda --lookahead 1" "--backend cuda --lookahead 2"
    ;;
  copyapi)
    # ~1.5 min: the smoke test (outputs = reference with every check, the driver copy path), then the two ways of
    # issuing a chunk (executor.transfer: the driver's cuMemcpyHtoDAsync against Tensor.copy_) side by side,
    # alternating, REPS rounds
    python3 -m executor.smoke --device cuda 2>&1 | tail -n 3 | tee "$OUT/copyapi.log" || exit 3
    for rep in $(seq ${REPS:-1}); do
      qwen3_replays "$OUT/copyapi.log" 48 \
        copy_api,tpot_ms,hit_rate,stall_ms,prefetches,host_copy_issue_ms,copy_issues,host_demand_issue_ms,host_prefetch_issue_ms \
        "--copy-api torch" "--copy-api driver"
    done
    ;;
  calibrate)
    python3 -m executor.calibrate --out "$OUT/h200.yaml" --machine "H200 GPU machine" 2>&1 | tee "$OUT/calibrate.log"
    ;;
  copybound)
    # ~5-6 min: the copy-bound suite (executor/suites/h200-copybound.yaml, docs/executor.md Status session 12), its
    # geometry calibrated on this instance first; the report comes back in $OUT/copybound (plus the profile)
    timeout 180 python3 -m executor.calibrate --out "$OUT/h200-copybound.yaml" --machine "H200 GPU machine" \
      --geometries small-moe-qwen2-57b-widths > "$OUT/calibrate.log" 2>&1 || exit 3
    timeout $(( ${DEADLINE:-570} - ($(date +%s) - T0) )) python3 -m executor.validate \
      executor/suites/h200-copybound.yaml --profile "$OUT/h200-copybound.yaml" --out "$OUT/copybound" --resume \
      --machine "H200 GPU machine" 2>&1 | tee "$OUT/validate.log" | tail -n 3
    rm -f "$OUT"/copybound/plots/ttft*   # (at most 8 files come back)
    (cd "$OUT" && tar cf logs.tar --remove-files gpu.txt calibrate.log validate.log)
    ;;
  validate)
    PROFILE=${PROFILE:-profiles/h200.yaml}
    timeout 560 python3 -m executor.validate executor/suites/h200.yaml --profile "$PROFILE" \
      --out results/validation/h200 --resume --machine "H200 GPU machine" 2>&1 | tee "$OUT/validate.log"
    mkdir -p "$OUT/h200" && cp results/validation/h200/summary.md results/validation/h200/results.parquet \
      results/validation/h200/meta.json "$OUT/h200/" 2>/dev/null
    cp -r results/validation/h200/plots "$OUT/h200/" 2>/dev/null
    ;;
  session)
    # calibrate, then validate into a directory that outlives the call (/tmp/val on a warm machine): a later
    # `session` call on the same machine skips the calibration (its profile is kept in /tmp) and resumes.
    # The small model's re-recorded trace and weights come from traces/small_moe/device_predictors.sh run
    # earlier on the same machine (/tmp/small-moe-qwen3moe-e32k4, build/small_moe_model).
    if [ -d /tmp/small-moe-qwen3moe-e32k4 ]; then
      rm -rf data/traces/small-moe-qwen3moe-e32k4 && cp -r /tmp/small-moe-qwen3moe-e32k4 data/traces/
    fi
    # the corpus travels compressed when the tree would pass the 64 MiB a call carries (tar cJf build/small_moe.tar.xz
    # -C build small_moe; carry ["build/small_moe.tar.xz", ".whl"])
    [ ! -d build/small_moe ] && [ -f build/small_moe.tar.xz ] && tar xJf build/small_moe.tar.xz -C build
    if [ ! -d build/small_moe_model ] && [ -d build/small_moe ] && [ "${TRAIN_MODEL_S:-180}" -gt 0 ]; then
      # the live runs' model: the embedded trace's recipe (traces/small_moe/device_predictors.sh step 1), retrained
      # here (GPU training is not bit-reproducible: its routing differs a little from the embedded trace's model;
      # a live run is compared with the simulator replaying the live run's own routing). The simulator's speed
      # benchmark runs beside it on a free core (CPU time of one process: the GPU job does not change it).
      [ -n "$SIM_BENCH" ] && { python3 -m sim.bench --json > "$OUT/sim_bench.json" 2> "$OUT/sim_bench.err" & BENCH_PID=$!; }
      # the live learned predictor's training prompts (reserved training documents: text the model does not train
      # on, disjoint from the held-out prompts), made on a CPU core meanwhile
      python3 -m traces.small_moe.train_prompts --data build/small_moe --n ${LIVE_PROMPTS:-2048} --per-doc 64 \
        --reserve-docs 8 --out /tmp/live_prompts.jsonl > "$OUT/live_prompts.log" 2>&1 & PROMPTS_PID=$!
      python3 -m traces.small_moe.train --data build/small_moe --out build/small_moe_model \
        --time-budget ${TRAIN_MODEL_S:-180} --balance pooled --reserve-docs 8 --device cuda 2>&1 \
        | grep --line-buffered -v -e "^Writing" -e "Loading weights" | tail -n 5 | tee "$OUT/train_model.log"
      cp build/small_moe_model/train_report.json "$OUT/" 2>/dev/null
      [ -n "$BENCH_PID" ] && wait $BENCH_PID
      # the live ProMoE label's learned_mlp (d = 2), fit on a trace of this very model (executor.live.live_artifact
      # reads it from the model's directory), with the small MoE's GPU fit settings (MLP_SETS)
      if wait $PROMPTS_PID; then
        python3 -m traces.record --model build/small_moe_model --prompts /tmp/live_prompts.jsonl \
          --max-prompts ${LIVE_PROMPTS:-2048} --max-prompt-tokens 24 --max-new-tokens 64 --batch-size 1024 \
          --temperature 0.8 --seed 1 --hidden-states --router-weights --device cuda --name small-moe-live-train --out /tmp/live-train \
          --json 2>&1 | grep -v "Loading weights" | tail -n 2 | tee "$OUT/live_fit.log"
        mkdir -p build/small_moe_model/predictors
        . traces/small_moe/fit_settings.sh
        python3 -m predictors.train /tmp/live-train --predictor learned_mlp --distance 2 --split 1.0 --set device=cuda \
          $MLP_SETS --out build/small_moe_model/predictors/learned_mlp_d2.npz 2>&1 | tail -n 2 | tee -a "$OUT/live_fit.log"
      fi
    fi
    [ -d build/small_moe_model ] && export SMALL_MOE_DIR=${SMALL_MOE_DIR:-build/small_moe_model}
    [ -n "$PROFILE" ] && cp "$PROFILE" /tmp/h200.yaml   # a profile measured in an earlier call
    if [ ! -s /tmp/h200.yaml ]; then
      # CALIBRATE_ARGS: e.g. "--geometries qwen3-30b-a3b" for a short call that validates one geometry.
      # CALIBRATE_S: session 6's calibration took about 140 s; since then it also measures the transfer host costs
      # of every geometry (not only the first) and the predictors' costs in decode and prefill replays, not yet
      # timed on the H200, hence the longer default
      timeout ${CALIBRATE_S:-450} python3 -m executor.calibrate --out /tmp/h200.yaml --machine "H200 GPU machine" \
        $CALIBRATE_ARGS 2>&1 | tee "$OUT/calibrate.log"
    fi
    cp /tmp/h200.yaml "$OUT/h200.yaml"
    # GEOMETRIES=a,b: only those runs now (the rest in a later call; PROFILE=profiles/h200.yaml skips calibrating)
    # CPUS=2: pin the validation process to that core (an experiment on the host's run-to-run noise)
    # VALIDATE_S: the validation's time limit; default: what is left of DEADLINE (s since the script began, 560)
    VALIDATE_S=${VALIDATE_S:-$(( ${DEADLINE:-560} - ($(date +%s) - T0) ))}
    timeout $VALIDATE_S python3 -m executor.validate executor/suites/h200.yaml --profile /tmp/h200.yaml \
      --out /tmp/val --resume --machine "H200 GPU machine" ${GEOMETRIES:+--geometries $GEOMETRIES} \
      ${CPUS:+--cpus $CPUS} 2>&1 \
      | tee "$OUT/validate.log"
    mkdir -p "$OUT/h200" && cp /tmp/val/summary.md /tmp/val/results.parquet /tmp/val/meta.json "$OUT/h200/" 2>/dev/null
    cp -r /tmp/val/live-predictors "$OUT/h200/" 2>/dev/null   # the live learned predictor (validate --resimulate)
    # CALIBRATE_AFTER=1: calibrate again right after the suite, within what is left of DEADLINE, into
    # $OUT/h200_after.yaml (session 9: two calibrations 20 min apart differed by 10-50 % in host costs; simulate
    # the suite with both: validate --report-only --resimulate)
    LEFT=$(( ${DEADLINE:-560} - ($(date +%s) - T0) ))
    if [ -n "$CALIBRATE_AFTER" ] && [ "$LEFT" -gt 60 ]; then
      timeout $LEFT python3 -m executor.calibrate --out "$OUT/h200_after.yaml" --machine "H200 GPU machine" \
        $CALIBRATE_ARGS 2>&1 | tail -n 3 | tee "$OUT/calibrate_after.log"
    fi
    # at most 8 files come back: the logs travel as one tar (h200.yaml and the three report files beside it)
    (cd "$OUT" && tar cf logs.tar --remove-files $(ls gpu.txt ./*.log train_report.json sim_bench.* 2>/dev/null))
    ;;
  *) echo "unknown step $STEP (smoke | quick | copyapi | calibrate | copybound | validate | session)"; exit 2 ;;
esac
