"""Cost of the LR range test against the same number of plain training steps, in one run.

Both sides use the recipe's model, augmented batches, optimizer and precision (``setup_run``). The
plain side is the training loop's step (``RunSetup.step``: set LR, forward, backward, SGD); the
range-test side is ``find_lr`` (the same step inside; state saved once, loss read every step,
smoothing, restore at the end). Plain steps are timed before and after the range test and
averaged. Target: ratio <= 1.25.

    python benchmarks/lr_find_overhead.py [--iters 12] [--batch-size 128] [--device auto] [--precision auto]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cifar_onecycle import Cifar10, Recipe
from cifar_onecycle.device import device_name, synchronize
from cifar_onecycle.host_memory import freed_memory_kept
from cifar_onecycle.lr_finder import find_lr
from cifar_onecycle.run_setup import setup_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto", choices=Recipe.choices("device"))
    ap.add_argument("--precision", default="auto", choices=Recipe.choices("precision"))
    a = ap.parse_args()

    n = a.batch_size * a.iters
    g = torch.Generator().manual_seed(0)
    data = Cifar10(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n,), generator=g), torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
                   torch.zeros(1, dtype=torch.int64))
    recipe = Recipe(epochs=1, peak_epoch=1, batch_size=a.batch_size, device=a.device, precision=a.precision)
    with freed_memory_kept():  # as train() and lr_range_test() keep it
        s = setup_run(recipe, data)

        def plain() -> float:
            synchronize(s.device)
            t0 = time.perf_counter()
            for inputs, targets in s.epoch():
                s.step(inputs, targets, 1e-3)
            synchronize(s.device)
            return time.perf_counter() - t0

        plain()  # warm-up
        before = plain()
        t0 = time.perf_counter()
        r = find_lr(s.step_model, s.epoch, s.optimizer, mode="exp", start_lr=1e-5, end_lr=1e-2, num_iter=a.iters,
                    autocast=s.autocast, scaler=s.scaler, loss_fn=s.loss_fn)
        synchronize(s.device)
        finder = time.perf_counter() - t0
        after = plain()
        assert len(r.lrs) == a.iters, r.stopped
    ratio = finder / ((before + after) / 2)
    print(f"device {device_name(s.device)}, precision {s.precision}, batch {a.batch_size}, {a.iters} iterations")
    print(f"plain steps: {before:.2f} s before, {after:.2f} s after; range test: {finder:.2f} s")
    print(f"ratio range test / plain: {ratio:.3f} (target <= 1.25)")
    out = Path(__file__).parent / "results" / f"lr_find_overhead-{s.device.type}.json"
    out.write_text(json.dumps({
        "command": f"python benchmarks/lr_find_overhead.py --iters {a.iters} --batch-size {a.batch_size} "
                   f"--device {a.device} --precision {a.precision}",
        "device": device_name(s.device), "precision": s.precision, "torch": torch.__version__,
        "plain_seconds": [before, after], "range_test_seconds": finder, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
