"""The device and precision policy: where a run computes, in which arithmetic, how often it syncs."""
from __future__ import annotations

import itertools
import os
import platform
from pathlib import Path

import torch

from .errors import UserError, as_setting
from .recipe import Recipe

# How often (in steps) the loop reads the running loss back from the device, for the progress bar,
# the divergence check and (under torchrun) the ranks' agreement on a stop signal. On a GPU each read
# is a host sync that drains the queue, so there the loop reads once, at the epoch's end; on a CPU a
# read costs nothing, and every 10 steps catches a diverged loss within 10 steps.
CPU_SYNC_EVERY = 10


def sync_every(device: torch.device, steps_per_epoch: int) -> int:
    return CPU_SYNC_EVERY if device.type == "cpu" else steps_per_epoch


# How many training images a GPU augments at once (a CPU: one batch, and keeps its memory). Each
# batch's augmentation is a dozen small kernels whose launches cost more than their work; 16,384
# images hold about 200 MB of fp32 batches. Measured: benchmarks/results/README.md, the defaults.
GPU_AUGMENT_IMAGES = 16_384


def augment_at_once(device: torch.device, batch_size: int, images: int | None = None) -> int:
    """How many batches the training loop augments together on ``device``: ``images`` at once on a
    GPU (None: ``GPU_AUGMENT_IMAGES``; fewer than a batch: one batch at a time)."""
    images = GPU_AUGMENT_IMAGES if images is None else images
    return 1 if device.type == "cpu" else max(1, images // batch_size)


# How many images an evaluation scores at once when the recipe leaves it to the device
# (``eval_batch_size`` 0). A GPU wants large batches. A CPU scores small ones faster: their
# activations stay in the cache (a batch of 1000 holds 131 MB of bf16 at the first layer, one of 64
# holds 8 MB). Measured on 2 cores of an AMD EPYC with AVX512-BF16 (benchmarks/eval_batch.py,
# medians of 3): bf16 581 images/s at 64 against 430 at 1000; fp32 268 against 207 (287 at 32);
# fp32 with oneDNN held to AVX2 270 against 209 (benchmarks/results/eval-batch-cpu-*.json).
CPU_EVAL_BATCH = 64
GPU_EVAL_BATCH = 1000


def eval_batch(batch_size: int, device: torch.device) -> int:
    """``batch_size``, or with 0 the device's own (``CPU_EVAL_BATCH``, ``GPU_EVAL_BATCH``)."""
    if batch_size:
        return batch_size
    return CPU_EVAL_BATCH if device.type == "cpu" else GPU_EVAL_BATCH


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. Asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{as_setting('device')} cuda: no CUDA device is available; use cpu or auto")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively (AVX512-BF16 or AMX). Without it bf16 is emulated and
    far slower than fp32: measured 166 s against 12.5 s per 512-image step on an AVX2-only EPYC."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# Where Linux lists the CPU's features, for a torch without an AMX probe.
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_amx() -> bool:
    """True when the CPU has AMX (Intel Xeon since Sapphire Rapids) and oneDNN may use it (no
    ``ONEDNN_MAX_CPU_ISA`` holding it below). Asks torch's private probe; a torch without it (2.4
    has none), Linux's list of the CPU's features; elsewhere False."""
    held = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if held and held.upper() not in ("ALL", "DEFAULT") and "AMX" not in held.upper():
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is None:
        return "amx_tile" in linux_cpu_flags()
    try:
        return bool(probe())
    except RuntimeError:
        return False


def linux_cpu_flags() -> set[str]:
    """The features the first CPU's ``flags`` line names in ``CPUINFO``; none where it cannot be read."""
    try:
        with CPUINFO.open(errors="replace") as lines:
            for line in itertools.islice(lines, 10_000):  # one CPU's block is about 30 lines
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


def conv_by_matmul_pays(device: torch.device, precision: str) -> bool:
    """Whether the convolutions on small images are faster as matrix products (``conv3x3``): in
    bf16 on a CPU with AMX only; oneDNN's own kernels won everywhere else measured."""
    return device.type == "cpu" and precision == "bf16" and cpu_has_amx()


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA with bf16 and on CPUs with native bf16, fp16 on older GPUs, else fp32."""
    if name != "auto":
        if name == "fp16" and device.type != "cuda":
            raise UserError(f"{as_setting('precision')} fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_placement(recipe: Recipe) -> tuple[torch.device, str]:
    """The device and arithmetic ``recipe`` runs with on this machine; refuses what it lacks."""
    device = resolve_device(recipe.device)
    return device, resolve_precision(recipe.precision, device)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queue: a host clock read before it would stop while the GPU still works."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
