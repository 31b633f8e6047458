# 3 alternating pairs of `quick` runs, products off then on, in a venv of the oldest versions
# (benchmarks/oldest-versions.txt: torch 2.4.0), on 2 cores of an Intel Xeon with AMX.
mkdir -p /tmp/q24
for i in 1 2 3; do for m in off on; do python one.py $m /tmp/q24/run-$m 2>/dev/null | tail -1; done; done | tee pairs.txt
