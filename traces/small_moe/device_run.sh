#!/bin/bash
# The one device call: train the small MoE (time-boxed), record a trace, bring results back in $OUT.
# Needs build/small_moe (python -m traces.small_moe.corpus) carried; on a machine without pydantic, install .whl first.
# Committed trace:  BUDGET=420 bash traces/small_moe/device_run.sh
# Balanced variant: BUDGET=200 BALANCE=per-layer NAME=small-moe-qwen3moe-e32k4-balanced HIDDEN= \
#                   bash traces/small_moe/device_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-420}
BALANCE=${BALANCE:-pooled}
NAME=${NAME:-small-moe-qwen3moe-e32k4}
HIDDEN=${HIDDEN---hidden-states}
python3 -m traces.small_moe.train --data build/small_moe --out /tmp/small-moe --time-budget $BUDGET --balance $BALANCE 2>&1 \
  | grep -v -e "^Writing" -e "Loading weights" | tee $OUT/train.log || exit 1
python3 -m traces.record --model /tmp/small-moe --prompts data/small_moe/prompts.jsonl --max-prompts 64 \
  --max-prompt-tokens 24 --max-new-tokens 128 --batch-size 64 --temperature 0.8 --seed 0 \
  $HIDDEN --router-weights --device cuda --name $NAME \
  --license "model weights: trained here, same terms as the corpus (PSF-2.0, GPL-1+/Artistic, PostgreSQL, BSD-3-Clause, GPL-2.0); see docs/small-moe.md" \
  --attribution "small MoE trained by this project on Debian documentation packages (python3.11-doc, perl-doc, postgresql-doc-15, python-django-doc, git-doc)" \
  --out /tmp/$NAME --json 2>&1 | grep -v "Loading weights" | tee $OUT/record.log || exit 1
python3 -m traces.check /tmp/$NAME && du -sh /tmp/$NAME/* /tmp/$NAME
cp /tmp/small-moe/train_report.json /tmp/small-moe/config.json $OUT/
tar cf - -C /tmp $NAME | split -b 15m - $OUT/trace.tar.part-
ls -la $OUT
