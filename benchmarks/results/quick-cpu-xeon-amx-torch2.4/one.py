"""One `quick` run with this process's torch, Layer3's convolutions as products on or off.

    python one.py on|off OUT   # DIR: the proxy in /tmp/proxy

The switch forces ``cifar_onecycle.device.cpu_has_amx``, which the run's policy asks; prints the
run's training seconds (metrics.csv) and its last test accuracy. pairs.sh alternates them.
"""
import csv
import sys

import cifar_onecycle.device as device

on = sys.argv[1] == "on"
device.cpu_has_amx = lambda: on
from cifar_onecycle.cli import main  # noqa: E402 (after the switch, as a run would read it)

out = sys.argv[2]
code = main(["train", "--recipe", "quick", "--data-dir", "/tmp/proxy", "--no-download", "--out", out, "--no-report",
             "--quiet", "--overwrite"])
assert code == 0, code
with open(f"{out}/metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
print(sys.argv[1], round(sum(float(r["train_seconds"]) for r in rows), 1), rows[-1]["test_acc"], flush=True)
