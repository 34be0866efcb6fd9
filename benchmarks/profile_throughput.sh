#!/bin/bash
# py-spy top-N profiles (raw collapsed stacks + a .top.json summary) of the embed pipeline and the
# train loop (issue 16), Ray workers included (--subprocesses). Run it under the shared lock:
#   flock /tmp/thinkfast-heavy.lock benchmarks/profile_throughput.sh
cd "$(dirname "$0")/.." && source .venv/bin/activate
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 RAY_DEDUP_LOGS=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P=benchmarks/results/profiles; mkdir -p $P
cat /proc/loadavg
timeout 300 py-spy record --subprocesses --nonblocking -r 20 --format raw -o $P/embed_quick.txt -- \
  python benchmarks/throughput.py --quick --only embed --no-photo --settle 0 --out /tmp/tp_prof_embed.json > /tmp/tp_prof_embed.log 2>&1
echo "embed rc=$?"; cat /proc/loadavg
timeout 300 py-spy record --subprocesses --nonblocking -r 20 --format raw -o $P/train_quick.txt -- \
  python benchmarks/throughput.py --quick --only train --settle 0 --out /tmp/tp_prof_train.json > /tmp/tp_prof_train.log 2>&1
echo "train rc=$?"; cat /proc/loadavg
python benchmarks/throughput.py --summarize $P/embed_quick.txt $P/train_quick.txt > /dev/null
ls -la $P
