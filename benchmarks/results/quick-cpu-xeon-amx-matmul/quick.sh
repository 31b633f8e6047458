#!/bin/bash
# quick recipe, old code (282f9b7) and new alternating, seeds 0 to 3 (paired); wall seconds and the run's numbers
cd /tmp
PY=/work/main/.venv/bin/python
for seed in 0 1 2 3; do
  for side in old new; do
    out=/tmp/quick-$side-$seed; rm -rf $out
    if [ $side = old ]; then pp=/tmp/old/src; else pp=/work/main/src; fi
    PYTHONPATH=$pp /usr/bin/time -f "%e s wall, %M KB peak" $PY -m cifar_onecycle train --recipe quick --seed $seed --data-dir /tmp/proxy --no-download --out $out --quiet > /tmp/quick-$side-$seed.log 2>&1
    echo "$side $seed rc=$? $(tail -1 /tmp/quick-$side-$seed.log) $(python3 -c "import json;s=json.load(open('$out/summary.json'));print(s['total_seconds'], s['final_test_acc'], s.get('final_test_acc_tta'), s.get('git_commit','')[:7])")"
  done
done
