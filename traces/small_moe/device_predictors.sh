#!/bin/bash
# One device call for the learned predictors (issue 4), within DEADLINE seconds (default 540):
#  1. train the small MoE (pooled balance, BUDGET s of steps) into $MODEL_DIR (HF directory, kept for live mode),
#     leaving out the RESERVE_PCT % reserved training documents (--reserve-docs; every round(100/PCT)-th one);
#  2. re-record the embedded eval trace from that model exactly like the committed one (64 held-out prompts,
#     hidden states + router weights) and pack it as $OUT/trace.tar.part-*;
#  3. record a large training trace (hidden states) from prompts of the reserved documents of the corpus'
#     TRAINING split, text the model was NOT trained on (traces.small_moe.train_prompts --reserve-docs, same
#     rule, made during step 1; no overlap with the held-out prompts), time-boxed, into /tmp (not returned);
#  4. fit learned_mlp (+ learned_mlp_gate: the same networks), learned_history and cross_layer on the WHOLE
#     training trace at d = 1, 2, 3 (--split 1.0, on $DEVICE; all layers of a distance as one batched network,
#     early stopping on the last tenth of the training trace's rows), score every artifact on ALL sequences of the eval
#     trace; $OUT/predictors.json (accuracies, fit sizes, timings) and $OUT/artifacts.tar.part-* (artifacts,
#     logs, reports).
# STAGE (default all): `record` stops after step 3, leaving the model and both traces in /tmp on the machine;
# `fit` runs step 4 on them (the next call on the same warm machine: /tmp persists while it is held), so the fits
# get a whole call's time. Both return the logs and artifacts so far; `record` returns the eval trace.
# Needs build/small_moe (python -m traces.small_moe.corpus) carried; on a machine without pydantic, install .whl
# first (see docs/small-moe.md). Device call (carry ["build/small_moe", ".whl"]):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
#   bash traces/small_moe/device_predictors.sh
# CPU dry run, as tested (tiny sizes; 6-20 min on two cores):
#   OUT=/tmp/dry DEVICE=cpu BUDGET=5 N_TRAIN=48 TRAIN_BATCH=16 TRAIN_NEW_TOKENS=8 EVAL_NEW_TOKENS=8 \
#   TRAIN_EXTRA="--max-steps 2 --batch-size 4 --seq-len 64 --eval-tokens 2048 --eval-every 1000 --test-tokens 2048" \
#   PROMPTS=/tmp/dry_prompts.jsonl MODEL_DIR=/tmp/dry_model PY=.venv/bin/python EVAL_JOBS=2 DEADLINE=3000 \
#   RESERVE=600 bash traces/small_moe/device_predictors.sh
set -o pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
PY=${PY:-python3}
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-540}          # seconds for the whole call
RESERVE=${RESERVE:-200}            # seconds kept after the large recording: fits (<= RESERVE - 90), scoring, packing
RESERVE_PCT=${RESERVE_PCT:-8}      # % of training documents the model does not see; the training prompts' source
PER_DOC=${PER_DOC:-64}             # at most this many prompts per reserved document
BUDGET=${BUDGET:-200}              # seconds of training steps for the model
TRAIN_EXTRA=${TRAIN_EXTRA:-}
MODEL_DIR=${MODEL_DIR:-build/small_moe_model}
NAME=small-moe-qwen3moe-e32k4
EVAL_NEW_TOKENS=${EVAL_NEW_TOKENS:-128}
N_TRAIN=${N_TRAIN:-8192}           # training prompts offered (the recording stops earlier if time runs out)
TRAIN_BATCH=${TRAIN_BATCH:-1024}   # sequences per recording batch
TRAIN_NEW_TOKENS=${TRAIN_NEW_TOKENS:-128}
PROMPTS=${PROMPTS:-/tmp/train_prompts.jsonl}   # made beside the model's training (CPU), unless it exists
STAGE=${STAGE:-all}                # all | record (steps 1-3) | fit (step 4, on what a record call left in /tmp)
case $STAGE in all|record|fit) ;; *) echo "STAGE must be all, record or fit, not '$STAGE'"; exit 2;; esac
. traces/small_moe/fit_settings.sh   # MLP_SETS, HIST_SETS
case "$MLP_SETS" in *past_input=true*) V="+past_input";; *) V="";; esac   # artifacts named after the variant
TRAIN_TRACE=/tmp/train-trace
EVAL_TRACE=/tmp/$NAME
ART=/tmp/artifacts/$NAME           # predictors.report --artifacts /tmp/artifacts layout
LOGS=/tmp/device-logs
if [ $STAGE = fit ]; then   # keep the record call's traces and logs
  for f in $TRAIN_TRACE/meta.json $EVAL_TRACE/meta.json $LOGS/train_report.json; do
    [ -s $f ] || { echo "STAGE=fit needs $f from a STAGE=record call on this machine"; exit 2; }
  done
  rm -rf $ART /tmp/evals
else
  rm -rf $ART $LOGS $TRAIN_TRACE $EVAL_TRACE /tmp/evals
fi
mkdir -p $ART $LOGS /tmp/evals $OUT
# whatever happens, bring back the artifacts and logs written so far (trace parts are written in step 2);
# learned_mlp_gate's artifacts hold the same networks as learned_mlp's and stay behind (the returned files are
# limited to 64 MiB): rebuild them with
#   python -m predictors.train --reshare ARTS/learned_mlp${V}_dD.npz --predictor learned_mlp_gate --out ARTS/learned_mlp_gate${V}_dD.npz
# (V = +past_input when MLP_SETS sets past_input=true, as fit_settings.sh does: the names predictors.report's rows
# of that variant read)
trap 'tar cf - -C /tmp --exclude="learned_mlp_gate*_d*.npz" artifacts device-logs | split -b 15m - $OUT/artifacts.tar.part-;
  ls -la $OUT; echo "returned: $(ls $OUT | wc -l) files, $(du -cm $OUT/* | tail -n 1 | cut -f1) MiB (limit 8 files, 64 MiB)"' EXIT
stamp() { echo "$1 $(( $(date +%s) - T0 ))" >> $LOGS/timings.txt; echo "== $1 at $(( $(date +%s) - T0 )) s"; }
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
stamp start_$STAGE

if [ $STAGE != fit ]; then
# training prompts on a CPU core while the GPU trains the model (the file is not carried: the tree's 64 MiB)
if [ ! -s $PROMPTS ]; then
  $PY -m traces.small_moe.train_prompts --data build/small_moe --n $N_TRAIN --per-doc $PER_DOC \
    --reserve-docs $RESERVE_PCT --out $PROMPTS \
    > $LOGS/train_prompts.json 2> $LOGS/train_prompts.err &
  PROMPTS_PID=$!
fi

# 1. the model
$PY -m traces.small_moe.train --data build/small_moe --out $MODEL_DIR --time-budget $BUDGET --balance pooled \
  --reserve-docs $RESERVE_PCT --device $DEVICE $TRAIN_EXTRA 2>&1 | grep --line-buffered -v -e "^Writing" -e "Loading weights" | tee $LOGS/train.log || exit 1
cp $MODEL_DIR/train_report.json $MODEL_DIR/config.json $LOGS/
stamp trained

# 2. the eval trace, as committed (same prompts, flags and seed; only --model and --device name this run)
$PY -m traces.record --model $MODEL_DIR --prompts data/small_moe/prompts.jsonl --max-prompts 64 \
  --max-prompt-tokens 24 --max-new-tokens $EVAL_NEW_TOKENS --batch-size 64 --temperature 0.8 --seed 0 \
  --hidden-states --router-weights --device $DEVICE --name $NAME \
  --license "model weights: trained here, same terms as the corpus (PSF-2.0, GPL-1+/Artistic, PostgreSQL, BSD-3-Clause, GPL-2.0); see docs/small-moe.md" \
  --attribution "small MoE trained by this project on Debian documentation packages (python3.11-doc, perl-doc, postgresql-doc-15, python-django-doc, git-doc)" \
  --out $EVAL_TRACE --json 2>&1 | grep --line-buffered -v "Loading weights" | tee $LOGS/record.log || exit 1
$PY -m traces.check $EVAL_TRACE || exit 1
du -sh $EVAL_TRACE
tar cf - -C /tmp $NAME | split -b 15m - $OUT/trace.tar.part-
stamp eval_trace

# 3. the training trace: prompts from the reserved training documents (made here unless carried), checked against
#    the held-out prompts and against the model's reservation (every prompt's document is one it did not train on)
if [ -n "$PROMPTS_PID" ]; then
  wait $PROMPTS_PID || { cat $LOGS/train_prompts.err; exit 1; }
  cat $LOGS/train_prompts.json
fi
$PY - $PROMPTS $MODEL_DIR/train_report.json $RESERVE_PCT <<'EOF' | tee $LOGS/prompt_overlap.json || exit 1
import json, sys
held = [json.loads(l)["ids"][:24] for l in open("data/small_moe/prompts.jsonl") if l.strip()]
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r["ids"][:24] for r in rows]
h16 = {tuple(h[:16]) for h in held}
same = sum(tuple(t[:16]) in h16 for t in train)
res = json.load(open(sys.argv[2]))["reserved_documents"]
k = res["stride"]
seen = sum(1 for r in rows if not k or r["doc"] % k != k - 1)  # prompts from documents the model trained on
print(json.dumps({"training_prompts": len(train), "distinct_training_prompts": len({tuple(t) for t in train}),
                  "held_out_prompts": len(held), "equal_first_16_tokens": same, "reserve_pct": float(sys.argv[3]),
                  "model_reservation": res, "prompts_from_trained_documents": seen}))
sys.exit(1 if same or seen or res["pct"] != float(sys.argv[3]) else 0)
EOF
RB=$(( $(left) - RESERVE ))
echo "recording budget $RB s"
[ $RB -gt 20 ] || { echo "no time left to record a training trace"; exit 1; }
$PY -m traces.record --time-budget $RB --model $MODEL_DIR --prompts $PROMPTS --max-prompts $N_TRAIN \
  --max-prompt-tokens 24 --max-new-tokens $TRAIN_NEW_TOKENS --batch-size $TRAIN_BATCH --temperature 0.8 --seed 1 \
  --hidden-states --router-weights --device $DEVICE --name $NAME \
  --license "model weights: trained here; see docs/small-moe.md" \
  --attribution "small MoE trained by this project; prompts from reserved training-split documents it did not train on (traces.small_moe.train_prompts --reserve-docs $RESERVE_PCT)" \
  --out $TRAIN_TRACE --json 2>&1 | grep --line-buffered -v "Loading weights" | tee $LOGS/record_train.log || exit 1
$PY -m traces.check $TRAIN_TRACE > $LOGS/train_trace_check.txt 2>&1 &   # off the critical path (beside the fits)
cp $TRAIN_TRACE/meta.json $LOGS/train_trace_meta.json
du -sh $TRAIN_TRACE
stamp train_trace
fi
[ $STAGE = record ] && { stamp done_record; exit 0; }

# 4. fit on the whole training trace (one process per predictor and distance, in parallel), then score
FT=$(( $(left) - 90 ))              # a fit process is killed after FT s (its artifact then missing) ...
FL=$(( FT - 45 ))                   # ... so its training starts no new epoch after FL s (time_limit, a safety net;
                                    # counted from the training's start, after the trace is read)
echo "fit timeout $FT s, time_limit $FL s"
pids=()
for d in 1 2 3; do
  timeout $FT $PY -m predictors.train $TRAIN_TRACE --predictor learned_mlp --distance $d --split 1.0 \
    --set device=$DEVICE $MLP_SETS --set time_limit=$FL --share-as learned_mlp_gate:$ART/learned_mlp_gate${V}_d$d.npz \
    --out $ART/learned_mlp${V}_d$d.npz --json > $LOGS/fit_learned_mlp_d$d.json 2> $LOGS/fit_learned_mlp_d$d.err &
  pids+=($!)
  timeout $FT $PY -m predictors.train $TRAIN_TRACE --predictor learned_history --distance $d --split 1.0 \
    --set device=$DEVICE $HIST_SETS --set time_limit=$FL --out $ART/learned_history_d$d.npz --json \
    > $LOGS/fit_learned_history_d$d.json 2> $LOGS/fit_learned_history_d$d.err &
  pids+=($!)
done
for d in 1 2 3; do
  $PY -m predictors.train $TRAIN_TRACE --predictor cross_layer --distance $d --split 1.0 \
    --out $ART/cross_layer_d$d.npz --json > $LOGS/fit_cross_layer_d$d.json 2> $LOGS/fit_cross_layer_d$d.err
done
for p in "${pids[@]}"; do wait $p || echo "a fit failed (exit $?)"; done
cat $LOGS/fit_*.json; tail -n 3 $LOGS/fit_*.err
ls -la $ART
stamp fitted

ET=$(( $(left) - 20 ))
ls $ART/learned_mlp*_d*.npz $ART/learned_history_d*.npz $ART/cross_layer_d*.npz \
  2>/dev/null | xargs -P ${EVAL_JOBS:-12} -I{} sh -c 'b=$(basename {} .npz); d=${b##*_d}; p=${b%_d*}; p=${p%%+*};
  OMP_NUM_THREADS=1 timeout '$ET' '$PY' -m predictors.evaluate '$EVAL_TRACE' --predictor $p --distance $d --artifact {} --budget 8 --json \
    > /tmp/evals/$b.json 2> /tmp/evals/$b.err || echo "evaluation of $b failed"'
cp /tmp/evals/* $LOGS/
stamp scored

$PY - $LOGS $OUT/predictors.json <<'EOF'
import json, pathlib, sys
logs, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = []
for f in sorted(logs.glob("*.json")):
    if f.name.startswith(("learned_", "cross_layer_")) and f.stat().st_size:
        r = json.loads(f.read_text())
        fit = {}
        fj = logs / f"fit_{r['predictor'] if r['predictor'] != 'learned_mlp_gate' else 'learned_mlp'}_d{r['distance']}.json"
        if fj.exists() and fj.stat().st_size:
            fit = json.loads(fj.read_text())
        rows.append({"predictor": r["predictor"], "artifact": f.stem, "distance": r["distance"], "accuracy": r["accuracy"],
                     "recall@8": r["budgets"].get("8", {}).get("recall"), "n_eval": r["n_eval"],
                     "eval_sequences": len(r["split"]["eval_sequences"]), "fit": r.get("fit"),
                     "fit_seconds": fit.get("fit_seconds"), "fit_report": fit.get("fit_report"),
                     "per_layer": r["per_layer"]})
timings = dict(l.split() for l in (logs / "timings.txt").read_text().splitlines())
res = {"rows": rows, "timings_s": {k: int(v) for k, v in timings.items()},
       "train_report": json.loads((logs / "train_report.json").read_text()).get("held_out")}
out.write_text(json.dumps(res, indent=1))
print("| predictor | d | accuracy | recall@8 | n_eval | fit tokens | fit s |")
for r in sorted(rows, key=lambda r: (r["artifact"], r["distance"])):
    print(f"| {r['artifact'].rsplit('_d', 1)[0]} | {r['distance']} | {r['accuracy']:.3f} | {r['recall@8']:.3f} | {r['n_eval']} | "
          f"{(r['fit'] or {}).get('tokens')} | {r['fit_seconds']} |")
print(res["timings_s"])
EOF
stamp done
