#!/bin/bash
# Device smoke test: throughput of the expert implementations, and the GPU recording path, in a few minutes.
set -x
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())'
export PYTHONUNBUFFERED=1
for impl in grouped_mm batched_mm; do
  python3 -m traces.small_moe.train --data build/small_moe --out /tmp/smoe-$impl --max-steps 40 --warmup 10 \
    --eval-every 1000 --log-every 10 --experts-impl $impl 2>&1 | grep -v Writing | tail -8
done
timeout 200 python3 -m traces.small_moe.train --data build/small_moe --out /tmp/smoe-compile --max-steps 60 --warmup 10 \
    --eval-every 1000 --log-every 10 --experts-impl grouped_mm --compile 2>&1 | grep -v Writing | tail -10
python3 -m traces.record --model /tmp/smoe-grouped_mm --prompts data/small_moe/prompts.jsonl --max-prompts 8 \
  --max-new-tokens 16 --batch-size 8 --hidden-states --router-weights --router-logits --device cuda \
  --out /tmp/trace-smoke --json && python3 -m traces.check /tmp/trace-smoke && du -sh /tmp/trace-smoke
cp /tmp/smoe-grouped_mm/train_report.json $OUT/ 2>/dev/null
tar czf $OUT/trace-smoke.tgz -C /tmp trace-smoke
