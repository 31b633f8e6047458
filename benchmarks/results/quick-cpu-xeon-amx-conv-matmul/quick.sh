#!/bin/bash
# quick recipe, the code before (029ecb1: the weight gradient alone as a product) and after (51d712d:
# forward and both gradients as products) alternating, seeds 0 to 3 (paired); wall seconds and the run's numbers
cd /tmp
PY=/work/main/.venv/bin/python
for seed in 0 1 2 3; do
  if [ $((seed % 2)) = 0 ]; then order="old new"; else order="new old"; fi
  for side in $order; do
    out=/tmp/quickc-$side-$seed; rm -rf $out
    if [ $side = old ]; then pp=/tmp/wt-old/src; else pp=/tmp/wt-new/src; fi
    PYTHONPATH=$pp /usr/bin/time -f "%e s wall, %M KB peak" $PY -m cifar_onecycle train --recipe quick --seed $seed --data-dir /tmp/proxy --no-download --out $out --quiet > /tmp/quickc-$side-$seed.log 2>&1
    echo "$side $seed rc=$? $(tail -1 /tmp/quickc-$side-$seed.log) $(python3 -c "import json;s=json.load(open('$out/summary.json'));print(s['total_seconds'], s['final_test_acc'], s.get('final_test_acc_tta'), s.get('git_commit','')[:7])")"
  done
done
