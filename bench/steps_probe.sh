#!/usr/bin/env bash
# On a GPU: the per-step times of a user-path run (`python -m training train` with the loss-curve harness's config for
# VARIANT, bench/loss_curves.py) and nvidia-smi sampled each second; prints the mean / min / max step time of every 20
# steps and keeps events.jsonl and the samples in $OUT (default: the current folder). Issue 12: the LoRA-save stalls.
#     bash bench/steps_probe.sh compiled 150          # as the benches: no resumable checkpoints
#     bash bench/steps_probe.sh compiled 150 state    # as a user's run: checkpoints too (run.save_state)
set -u
OUT=${OUT:-.}
V=${1:-compiled}; N=${2:-200}; STATE=${3:-}  # third argument "state": also save the resumable checkpoints
D=/tmp/probe; rm -rf $D; mkdir -p $D
python3 -c "
import sys; sys.path[:0]=['bench','.']
from loss_curves import VARIANTS; from bench_ours import train_config
import dataclasses
config = train_config(VARIANTS['$V'], '$D/run', $N)
if '$STATE' == 'state':
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, save_state=True))
config.save('$D/cfg.json')"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv,noheader -lms 1000 > $OUT/smi_$V${STATE:+-$STATE}.csv &
SMI=$!
NAME=$V${STATE:+-$STATE}
python3 bench/loss_curves.py --train-variant $V $D/cfg.json > $OUT/train_$NAME.log 2>&1
kill $SMI
grep -i "staging\|staged in\|frozen\|garbage" $OUT/train_$NAME.log | cut -c1-220
cp $D/run/events.jsonl $OUT/events_$NAME.jsonl
python3 - <<PY
import json
ev=[json.loads(l) for l in open('$D/run/events.jsonl') if '"step_s"' in l]
s=[e['step_s'] for e in ev]
for i in range(0,len(s),20): c=s[i:i+20]; print(i, round(sum(c)/len(c),4), round(min(c),4), round(max(c),4))
for e in ev[1:]:
    if e['step_s'] >= 2 * sorted(s)[len(s) // 2]:  # twice the median: a stall, with the collector's share
        print('slow step', e['step'], round(e['step_s'], 3), 'gc_s', round(e.get('gc_s', 0), 3), 'gen', e.get('gc_generation'))
PY
