"""Every point of a GPU sweep plan trained for one step the way the GPU will train it, on the CPU.

A GPU runs bf16 autocast and fused SGD (fused on CUDA only: ``step.make_optimizer``); the suite, on
CPUs without native bf16, runs fp32 and the for-each SGD. Before a plan spends a lent GPU's minutes,
this trains each of its points for one step of 128 images with ``--precision bf16`` and fused SGD,
through ``cifar-onecycle sweep`` itself, on 300 random training images (20 held out) and 20 test
images: it checks that no point's code fails on bf16 activations or the fused update, nothing about
accuracy. Points that set ``epochs`` or ``peak_epoch`` are left out (a one-epoch run refuses them);
an ``auto`` LR needs a range test longer than one step allows (device_run.py's dry runs cover it).
bf16 is emulated on an AVX2-only CPU: about 45 s a point there.

    PYTHONPATH=src python benchmarks/gpu_path_check.py --out /tmp/gpu-path [--plan benchmarks/sweeps/best-stage1.txt]
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar_onecycle.run_setup as run_setup  # noqa: E402
from cifar_onecycle import step  # noqa: E402
from cifar_onecycle.cli import main  # noqa: E402
from cifar_onecycle.sweep_plan import parse_point  # noqa: E402
from device_run import read_sweep_plan  # noqa: E402

ONE_STEP = ["--seeds", "1", "--holdout", "20", "--epochs", "1", "--peak-epoch", "0.5", "--train-subset", "128",
            "--batch-size", "128", "--eval-batch-size", "20", "--precision", "bf16", "--no-download", "--quiet",
            "--no-checkpoint"]


def write_random_cifar(root: Path, train: int = 300, test: int = 20) -> Path:
    """``root/cifar-10-batches-py`` in the official layout, random pixels, labels cycling 0..9."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def batch(n: int) -> bytes:
        return pickle.dumps({b"labels": [i % 10 for i in range(n)],
                             b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)})

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(batch(train // 5))
    (folder / "test_batch").write_bytes(batch(test))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def without_schedule_points(flags: list[str]) -> tuple[list[str], list[str]]:
    """The sweep's flags less its ``--point``s that change the epochs or the peak, and those left out."""
    kept, dropped = [], []
    i = 0
    while i < len(flags):
        if flags[i] == "--point" and i + 1 < len(flags):
            if {"epochs", "peak_epoch"} & parse_point(flags[i + 1], "point").keys():
                dropped.append(flags[i + 1])
            else:
                kept += flags[i:i + 2]
            i += 2
        else:
            kept.append(flags[i])
            i += 1
    return kept, dropped


def main_check() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", type=Path, default=Path(__file__).parent / "sweeps" / "best-stage1.txt")
    parser.add_argument("--out", type=Path, required=True, help="a new folder: the data and one sweep a plan line")
    args = parser.parse_args()

    optimizers: set[tuple[bool, int]] = set()

    def fused_optimizer(model, recipe, device, fused=None):
        optimizer = step.make_optimizer(model, recipe, device, fused=True)
        optimizers.add((bool(optimizer.defaults["fused"]), len(optimizer.param_groups)))
        return optimizer

    run_setup.make_optimizer = fused_optimizer  # the name run_setup calls
    data = write_random_cifar(args.out / "data")
    failed = 0
    for name, flags in read_sweep_plan(args.plan):
        kept, dropped = without_schedule_points(flags)
        if dropped:
            print(f"{name}: left out {', '.join(dropped)}")
        code = main(["sweep", *kept, *ONE_STEP, "--data-dir", str(data), "--out", str(args.out / name)])
        print(f"{name}: exit code {code}")
        failed += code != 0
    print("optimizers (fused, parameter groups):", sorted(optimizers))
    return 1 if failed or not all(fused for fused, _ in optimizers) else 0


if __name__ == "__main__":
    sys.exit(main_check())
