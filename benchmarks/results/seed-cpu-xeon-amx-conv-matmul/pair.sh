#!/bin/bash
# old (029ecb1) and new (51d712d) alternating, 5 rounds, the first side turning with the round
for r in 1 2 3 4 5; do
  if [ $((r % 2)) = 1 ]; then order="old new"; else order="new old"; fi
  for side in $order; do
    echo "round $r $side $(PYTHONPATH=/tmp/wt-$side/src /work/main/.venv/bin/python /tmp/s3/pair_one.py /tmp/wt-$side 2>&1 | tail -1)"
  done
done
