"""Crafted files of every kind the program reads, each handed to the CLI as an attacker would, in a
child process under a memory limit (2 GiB of address space above what the child holds after its
imports) and a time limit (30 s a case, 300 s in all).

Each case must end in exactly one line on stderr that says what it expects (the file or setting, and
why), exit code 2, no traceback, and nothing made outside the case's own folder. The child prints
its progress before each case, so one that hangs or dies names the case. The counts by kind are
printed as the loader's fuzz test prints its own.
"""
import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from cifar_onecycle import Recipe, ResNet9, train
from cifar_onecycle.checkpoint import load_checkpoint, save_checkpoint, save_weights
from cifar_onecycle.errors import Interrupted
from cifar_onecycle.results import EpochMetrics
from cifar_onecycle.run_folder import RunFolder
from cifar_onecycle.sweep import SweepFolder
from cifar_onecycle.sweep_plan import Plan
from conftest import ROOT, write_cifar

CHILD = r"""
import contextlib, io, json, resource, signal, sys, time, traceback

from cifar_onecycle.cli import main

vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), vm + (2 << 30)))


def timed_out(signum, frame):
    raise TimeoutError("case ran past 30 s")


signal.signal(signal.SIGALRM, timed_out)
for case in json.load(open(sys.argv[1])):
    print("START", case["name"], flush=True)
    err, out = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    signal.alarm(30)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(case["argv"])
    except BaseException as e:
        code, err = f"raised {type(e).__name__}", io.StringIO(traceback.format_exc()[-1500:])
    finally:
        signal.alarm(0)
    print("RESULT " + json.dumps({"name": case["name"], "code": code, "stderr": err.getvalue(),
                                  "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
print("DONE", flush=True)
"""

TINY = Recipe(epochs=3, peak_epoch=1, batch_size=10, train_subset=40, eval_batch_size=16, device="cpu",
              precision="fp32", lr_max=0.02, logit_scale=0.125)


# ---- what the cases are built from ----------------------------------------------------------------

def weights_bytes(recipe=None, model=None) -> bytes:
    buf = io.BytesIO()
    tensors = {k: v.contiguous() for k, v in (model or ResNet9()).state_dict().items()}
    meta = {"recipe": json.dumps((recipe or Recipe()).to_dict()), "format": "cifar-onecycle/1"}
    buf.write(st_save(tensors, metadata=meta))
    return buf.getvalue()


def safetensors_with_metadata(recipe_json: str) -> bytes:
    tensors = {k: v.contiguous() for k, v in ResNet9().state_dict().items()}
    return st_save(tensors, metadata={"recipe": recipe_json, "format": "cifar-onecycle/1"})


def tar_header(name: str, size: int, kind: bytes) -> bytes:
    """A ustar header block; ``size`` beyond 11 octal digits in GNU base-256."""
    field = (b"%011o\0" % size) if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    head = bytearray(512)
    head[0:100] = name.encode().ljust(100, b"\0")
    head[100:108], head[108:116], head[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    head[124:136], head[136:148], head[156:157] = field, b"00000000000\0", kind
    head[257:265] = b"ustar  \0"
    head[148:156] = b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    return bytes(head)


def tar_gz(members: list[tuple[str, bytes]] = (), raw: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(raw + buf.getvalue() if raw else buf.getvalue())


def png_declaring(width: int, height: int) -> bytes:
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def checkpoint_with(path: Path, base: dict, **changes) -> None:
    save_checkpoint(path, {**base, **changes})


def zip_with_member_compressed(raw: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            dst.writestr(item.filename, src.read(item.filename))
    return out.getvalue()


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """Synthetic data and a run of ``TINY`` stopped by SIGTERM in its second epoch (its checkpoint
    holds the epoch's order and draws), with the checkpoint's contents."""
    root = tmp_path_factory.mktemp("crafted")
    data = write_cifar(root / "data").parent
    run = root / "stopped"
    os.environ["CIFAR_ONECYCLE_TEST_SIGNALS"] = "SIGTERM@6"
    try:
        with pytest.raises(Interrupted):
            train(TINY, data_dir=data, download=False, out=run, progress=False)
    finally:
        del os.environ["CIFAR_ONECYCLE_TEST_SIGNALS"]
    checkpoint, _ = load_checkpoint(run / "checkpoint.pt")
    return data, run, checkpoint


class Cases:
    """The cases, each in a folder of its own under ``root``."""

    def __init__(self, root: Path, data: Path, stopped: Path, checkpoint: dict) -> None:
        self.root, self.data, self.stopped, self.checkpoint = root, data, stopped, checkpoint
        self.list: list[dict] = []

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True)
        return path

    def add(self, kind: str, name: str, argv: list[str], expect: str, code: int = 2) -> None:
        self.list.append({"kind": kind, "name": f"{kind}/{name}", "argv": argv, "expect": expect, "code": code})

    # recipe.toml, given with --recipe
    def recipe(self, name: str, text: bytes | None, expect: str, fifo: bool = False) -> None:
        here = self.folder(f"recipe-{name}")
        path = here / "recipe.toml"
        os.mkfifo(path) if fifo else path.write_bytes(text)
        self.add("recipe", name, ["train", "--recipe", str(path), "--data-dir", str(self.data), "--no-download",
                                  "--out", str(here / "run"), "--quiet"], expect)

    # model.safetensors, given to evaluate
    def weights(self, name: str, raw: bytes | None, expect: str) -> None:
        here = self.folder(f"weights-{name}")
        path = here / "run" / "model.safetensors"
        path.parent.mkdir()
        os.mkfifo(path) if raw is None else path.write_bytes(raw)
        self.add("weights", name, ["evaluate", str(here / "run"), "--data-dir", str(self.data), "--no-download",
                                   "--device", "cpu"], expect)

    def _copy_stopped(self, here: Path) -> Path:
        run = here / "run"
        run.mkdir()
        for item in self.stopped.iterdir():
            (run / item.name).write_bytes(item.read_bytes())
        return run

    # checkpoint.pt, resumed
    def checkpoint_case(self, name: str, expect: str, raw: bytes | None = None, **changes) -> None:
        here = self.folder(f"checkpoint-{name}")
        run = self._copy_stopped(here)
        if raw is not None:
            (run / "checkpoint.pt").write_bytes(raw)
        else:
            checkpoint_with(run / "checkpoint.pt", self.checkpoint, **changes)
        self.add("checkpoint", name, ["train", "--resume", str(run), "--data-dir", str(self.data), "--quiet"], expect)

    # summary.json and metrics.csv, read by report
    def report_case(self, kind: str, name: str, expect: str, summary: bytes | None = None,
                    metrics: bytes | None = None) -> None:
        here = self.folder(f"{kind}-{name}")
        run = RunFolder(here / "run")
        run.path.mkdir()
        save_weights(ResNet9(), run.path / "model.safetensors", TINY)
        run.write_recipe(TINY)
        run.write_summary({"steps_per_epoch": 4, "final_test_acc": 0.5, "total_seconds": 1.0,
                           "data_dir": str(self.data)})
        run.write_metrics([EpochMetrics(1, 0.01, 2.0, 0.3, 1.9, 0.35, 1.0, 10.0)])
        if summary is not None:
            (run.path / "summary.json").write_bytes(summary)
        if metrics is not None:
            (run.path / "metrics.csv").write_bytes(metrics)
        self.add(kind, name, ["report", str(run.path), "--device", "cpu"], expect)

    # a sweep's run's metrics.csv, read for sweep_curves.png by --collect
    def sweep_case(self, name: str, expect: str, metrics: bytes) -> None:
        here = self.folder(f"sweep-{name}")
        plan = Plan({"lr_max": [0.01]}, 0, 1)
        folder = SweepFolder(here / "sweep")
        folder.open(plan, TINY)
        run = RunFolder(folder.run(plan.points[0], 0).path)
        run.path.mkdir(parents=True)
        run.write_summary({"steps_per_epoch": 4, "final_test_acc": 0.5, "total_seconds": 1.0})
        (run.path / "metrics.csv").write_bytes(metrics)
        self.add("sweep", name, ["sweep", "--collect", str(folder.path)], expect)

    # a sweep's run folder a link to a folder outside it (holding a file named like the temporary file
    # of an interrupted write, which a resumed run removes from its folder), the sweep run again
    def sweep_link_case(self, name: str, expect: str, link: str) -> None:
        here = self.folder(f"link-{name}")
        plan = Plan({"lr_max": [0.01]}, 0, 1)
        folder = SweepFolder(here / "sweep")
        folder.open(plan, TINY)
        target = self.outside(here)
        (folder.path / link).parent.mkdir(exist_ok=True)
        os.symlink(target, folder.path / link)
        self.add("link", name, ["sweep", "--recipe", str(folder.path / "recipe.toml"), "--vary", "lr_max=0.01",
                                "--out", str(folder.path), "--data-dir", str(self.data), "--no-download", "--quiet"],
                 expect)

    @staticmethod
    def outside(here: Path) -> Path:
        """A folder that no run may write to or remove from: checked to hold only ``.metrics.csv.x.tmp``."""
        target = here / "elsewhere"
        target.mkdir()
        (target / ".metrics.csv.x.tmp").write_bytes(b"not ours")
        return target

    # seeds.json and the seeds' summaries, resumed
    def seeds_case(self, name: str, expect: str, seeds: bytes | None = None, seed_summary: bytes | None = None,
                   link_seed0: bool = False) -> None:
        here = self.folder(f"seeds-{name}")
        folder = RunFolder.create(here / "seeds")
        folder.write_recipe(TINY)
        folder.write_seeds(0, 2, str(self.data))
        if seeds is not None:
            (folder.path / "seeds.json").write_bytes(seeds)
        if seed_summary is not None:
            (folder.path / "seed0").mkdir()
            (folder.path / "seed0" / "summary.json").write_bytes(seed_summary)
        if link_seed0:
            os.symlink(self.outside(here), folder.path / "seed0")
        self.add("seeds", name, ["train", "--resume", str(folder.path), "--quiet"], expect)

    # cifar-10-python.tar.gz, or a batch file, in --data-dir
    def data_case(self, kind: str, name: str, expect: str, archive: bytes | None = None,
                  batch: bytes | None = None) -> None:
        here = self.folder(f"{kind}-{name}")
        data = here / "data"
        if archive is not None:
            data.mkdir()
            (data / "cifar-10-python.tar.gz").write_bytes(archive)
        else:
            write_cifar(data)
            (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(batch)
        self.add(kind, name, ["train", "--data-dir", str(data), "--no-download", "--out", str(here / "run"),
                              "--quiet", "--device", "cpu"], expect)

    # an image in a folder data set, and the folder's cache
    def folder_case(self, name: str, expect: str, image: bytes | None = None, cache: bytes | None = None,
                    code: int = 2) -> None:
        here = self.folder(f"folder-{name}")
        data = here / "data"
        for split in ("train", "test"):
            for label in ("a", "b"):
                (data / split / label).mkdir(parents=True)
                Image.new("RGB", (32, 32), (9, 99, 199)).save(data / split / label / "0.png")
        if image is None and cache is None:
            os.mkfifo(data / "train" / "a" / "x.png")
        elif image is not None:
            (data / "train" / "a" / "x.png").write_bytes(image)
        if cache is not None:
            (data / ".cifar-onecycle-cache.safetensors").write_bytes(cache)
        self.add("folder", name, ["train", "--dataset", "folder", "--data-dir", str(data), "--out", str(here / "run"),
                                  "--quiet", "--batch-size", "2", "--eval-batch-size", "2", "--epochs", "1",
                                  "--peak-epoch", "1", "--device", "cpu"], expect, code)

    # an image given to predict
    def image(self, name: str, raw: bytes | None, expect: str, folder: bool = False) -> None:
        here = self.folder(f"image-{name}")
        path = here / "photo.png"
        if folder:
            path.mkdir()
        elif raw is None:
            os.mkfifo(path)
        else:
            path.write_bytes(raw)
        run = here / "run"
        run.mkdir()
        (run / "model.safetensors").write_bytes(self.weights_raw)
        self.add("image", name, ["predict", str(run), str(path), "--device", "cpu"], expect)

    weights_raw = b""


def build_cases(root: Path, data: Path, stopped: Path, checkpoint: dict) -> list[dict]:
    c = Cases(root, data, stopped, checkpoint)
    good = Recipe().to_dict()

    c.recipe("dotted-key", b"a" + b".a" * 100_000 + b" = 1\n", "not valid TOML for a recipe")
    c.recipe("nested-inline-tables", b"a = " + b"{a = " * 10_000 + b"1" + b"}" * 10_000 + b"\n",
             "not valid TOML for a recipe")
    c.recipe("17MB", b"# " + b"x" * (17 << 20) + b"\n", "larger than any")
    c.recipe("long-integer", b"epochs = " + b"9" * 900 + b"\n", "epochs")
    c.recipe("nan", b"lr_max = nan\n", "lr_max")
    c.recipe("array-of-a-5000-digit-number", b"mean = [" + b"9" * 5000 + b", 0, 0]\n", "not valid TOML for a recipe")
    c.recipe("array-of-7-million-numbers", b"mean = [" + b"1," * 7_000_000 + b"x]\n", "not valid TOML for a recipe")
    c.recipe("array-of-a-14MB-string", b'classes = ["' + b"a" * (14 << 20) + b'" "b"]\n', "not valid TOML for a recipe")
    c.recipe("array-of-20000-classes", b"classes = [" + b", ".join([b'"c"'] * 20_000) + b"]\n", "classes must be")
    c.recipe("huge-eval-batch", b"eval_batch_size = 1000000000\n", "eval_batch_size")
    c.recipe("not-utf8", b"epochs = 3 # \xff\xfe\n", "cannot read recipe file")
    c.recipe("many-lines", b"# \n" * 5000, "a recipe holds one setting a line")
    c.recipe("fifo", None, "not a regular file but a FIFO", fifo=True)

    c.weights("fifo", None, "not a regular file but a FIFO")
    c.weights("garbage", b"\x00" * 1000, "not a safetensors weights file")
    c.weights("header-length-2**62", (2**62).to_bytes(8, "little") + b"{}", "not a safetensors weights file")
    c.weights("header-nested", (20_000).to_bytes(8, "little") + b"[" * 10_000 + b"]" * 10_000,
              "not a safetensors weights file")
    c.weights("recipe-nested", safetensors_with_metadata("[" * 100_000 + "]" * 100_000), "no cifar-onecycle recipe")
    c.weights("recipe-long-integer", safetensors_with_metadata(json.dumps(good)[:-1] + ', "seed": ' + "7" * 5000 + "}"),
              "no cifar-onecycle recipe")
    c.weights("recipe-huge-eval-batch", safetensors_with_metadata(json.dumps({**good, "eval_batch_size": 10**9})),
              "eval_batch_size")
    c.weights("other-shapes", st_save({"fc.weight": torch.zeros(3, 3)}, metadata={"recipe": json.dumps(good)}),
              "weights do not fit")
    c.weights("65MB", b"\0" * (65 << 20), "larger than any")

    ck = checkpoint
    pad = [set() for _ in range(1_100_000)]
    c.checkpoint_case("a-million-objects", "checkpoint.pt", pad=pad)
    c.checkpoint_case("order-stride-0", "does not fit", order=torch.zeros(1, dtype=torch.int64).expand(10**12))
    c.checkpoint_case("correct-2**70", "does not fit", correct=2**70)
    c.checkpoint_case("history-a-string", "does not fit", history="abc")
    c.checkpoint_case("history-row-string", "does not fit", history=[{**ck["history"][0], "lr": "x"}])
    c.checkpoint_case("history-row-nan", "does not fit", history=[{**ck["history"][0], "train_loss": float("nan")}])
    c.checkpoint_case("loss-sum-nan", "does not fit", loss_sum=float("nan"))
    c.checkpoint_case("elapsed-minus-inf", "does not fit", elapsed=float("-inf"))
    state = {k: dict(v) for k, v in ck["optimizer"]["state"].items()}
    first = next(iter(state))
    state[first]["momentum_buffer"] = torch.zeros(5)
    c.checkpoint_case("momentum-shape", "does not fit", optimizer={**ck["optimizer"], "state": state})
    groups = [{**g, "momentum": "abc"} for g in ck["optimizer"]["param_groups"]]
    c.checkpoint_case("momentum-a-string", "does not fit", optimizer={**ck["optimizer"], "param_groups": groups})
    c.checkpoint_case("weights-nan", "does not fit",
                      model={k: (v.float() * float("nan") if v.is_floating_point() else v)
                             for k, v in ck["model"].items()})
    c.checkpoint_case("lr-found-a-tensor", "does not fit", lr_found={"lr_max": torch.zeros(3)})
    saved = io.BytesIO()
    torch.save({"format": "cifar-onecycle-checkpoint/1", **ck}, saved)
    c.checkpoint_case("compressed", "compressed or oversized members", raw=zip_with_member_compressed(saved.getvalue()))

    summary = {"steps_per_epoch": 4, "final_test_acc": 0.5, "total_seconds": 1.0, "data_dir": str(data)}
    for name, change, expect in [("steps-per-epoch-0", {"steps_per_epoch": 0}, "steps_per_epoch 0"),
                                 ("accuracy-a-string", {"final_test_acc": "x"}, "final_test_acc x"),
                                 ("accuracy-nan", {"final_test_acc": float("nan")}, "final_test_acc nan"),
                                 ("lr-found-a-list", {"lr_found": [1, 2]}, "lr_found"),
                                 ("data-dir-a-number", {"data_dir": 7}, "data_dir 7")]:
        c.report_case("summary", name, expect, summary=json.dumps({**summary, **change}).encode())
    c.report_case("summary", "nested", "not a finished run's summary", summary=b"[" * 100_000 + b"]" * 100_000)
    c.report_case("summary", "long-integer", "not a finished run's summary",
                  summary=b'{"steps_per_epoch": ' + b"4" * 5000 + b"}")
    header = b"epoch,lr,train_loss,train_acc,test_loss,test_acc,train_seconds,images_per_second\n"
    c.report_case("metrics", "field-of-200KB", "metrics",
                  metrics=header + b'1,"' + b"9" * 200_000 + b'",2,0.3,1.9,0.35,1,10\n')
    c.report_case("metrics", "epoch-10**400", "epoch",
                  metrics=header + b"1" + b"0" * 400 + b",0.01,2,0.3,1.9,0.35,1,10\n")
    c.report_case("metrics", "loss-nan", "train_loss", metrics=header + b"1,0.01,nan,0.3,1.9,0.35,1,10\n")
    c.report_case("metrics", "a-million-rows", "metrics", metrics=header + b"1,0.01,2,0.3,1.9,0.35,1,10\n" * 1_000_000)
    c.report_case("metrics", "not-utf8", "metrics", metrics=header + b"1,0.01,2,0.3,1.9,0.35,1,\xff\n")
    c.sweep_case("metrics-loss-nan", "metrics.csv", header + b"1,0.01,nan,0.3,1.9,0.35,1,10\n")
    c.sweep_case("metrics-a-million-rows", "metrics.csv", header + b"1,0.01,2,0.3,1.9,0.35,1,10\n" * 1_000_000)

    c.seeds_case("seeds-10**12", "not a multi-seed run folder", seeds=b'{"first_seed": 0, "seeds": 1000000000000}')
    c.seeds_case("nested", "not a multi-seed run folder", seeds=b"[" * 100_000 + b"]" * 100_000)
    finished = {"final_test_acc": 0.5, "final_test_acc_tta": 0.5, "steps_per_epoch": 4}
    c.seeds_case("summary-without-total-seconds", "total_seconds", seed_summary=json.dumps(finished).encode())
    c.seeds_case("summary-accuracy-a-list", "final_test_acc",
                 seed_summary=json.dumps({**finished, "total_seconds": 1, "final_test_acc": [1]}).encode())
    c.seeds_case("seed-folder-a-link", "seed0: a link, not a folder of the runs", link_seed0=True)
    c.sweep_link_case("point-folder", "lr_max=0.01: a link, not a folder of the runs", "lr_max=0.01")
    c.sweep_link_case("seed-folder", "seed0: a link, not a folder of the runs", "lr_max=0.01/seed0")

    c.data_case("archive", "long-name-of-8GB", "refusing to extract",
                archive=gzip.compress(tar_header("././@LongLink", 8 << 30, b"L") + b"\0" * 4096))
    c.data_case("archive", "pax-header-of-8GB", "refusing to extract",
                archive=gzip.compress(tar_header("./PaxHeaders/x", 8 << 30, b"x") + b"\0" * 4096))
    c.data_case("archive", "damaged-deflate", "cannot extract",
                archive=gzip.compress(b"\0" * 100_000)[:20] + bytes(range(256)) * 40)
    c.data_case("archive", "truncated", "cifar-10-python.tar.gz",
                archive=tar_gz([("cifar-10-batches-py/a", b"x" * 9999)])[:200])
    c.data_case("archive", "17-members", "more than 16 members",
                archive=tar_gz([(f"cifar-10-batches-py/m{i}", b"") for i in range(17)]))
    link = io.BytesIO()
    with tarfile.open(fileobj=link, mode="w") as tf:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    c.data_case("archive", "symlink-member", "unsafe member", archive=gzip.compress(link.getvalue()))

    def batch(labels):
        import numpy as np
        return pickle.dumps({b"data": np.zeros((len(labels), 3072), np.uint8), b"labels": labels}, protocol=4)
    c.data_case("batch", "label-2**70", "labels must lie in 0..9", batch=batch([0] * 19 + [2**70]))
    c.data_case("batch", "label-minus-1", "labels must lie in 0..9", batch=batch([0] * 19 + [-1]))

    Cases.weights_raw = weights_bytes()
    c.image("fifo", None, "not a regular file but a FIFO")
    c.image("not-an-image", b"hello" * 100, "photo.png")
    c.image("bomb", png_declaring(100_000, 100_000), "photo.png: over 179 million pixels")
    c.image("large-and-truncated", png_declaring(10_000, 9_000), "photo.png: cannot read the image")  # no warning
    c.image("truncated", png_declaring(32, 32)[:60], "photo.png")
    c.image("a-folder", None, "photo.png", folder=True)

    c.folder_case("fifo-image", "x.png: cannot read the image (not a regular file but a FIFO)")
    c.folder_case("bomb-image", "x.png: over 179 million pixels, Pillow's limit",
                  image=png_declaring(100_000, 100_000))
    c.folder_case("cache-header-of-2**62", "", cache=(2**62).to_bytes(8, "little") + b"{}", code=0)
    header = b'{"__metadata__": [1]}'
    c.folder_case("cache-metadata-a-list", "", cache=len(header).to_bytes(8, "little") + header, code=0)
    c.folder_case("cache-nested", "", cache=(200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000,
                  code=0)

    long_name = c.folder("out-long-name") / ("x" * 300)
    small = ["--batch-size", "25", "--eval-batch-size", "16"]
    c.add("out", "name-of-300-characters", ["train", "--data-dir", str(data), "--no-download", "--out",
                                             str(long_name), "--quiet", *small], "File name too long")
    here = c.folder("out-tmp-folder")
    run = c._copy_stopped(here)
    (run / ".checkpoint.pt.abc.tmp").mkdir()
    (run / ".checkpoint.pt.abc.tmp" / "keep").write_bytes(b"not ours")
    c.add("out", "tmp-named-folder-on-resume", ["train", "--resume", str(run), "--data-dir", str(data), "--quiet"],
          "", code=0)
    here = c.folder("out-overwrite-folder")
    (here / "run" / "metrics.csv").mkdir(parents=True)
    c.add("out", "overwrite-over-a-folder", ["train", "--data-dir", str(data), "--no-download", "--out",
                                             str(here / "run"), "--overwrite", "--quiet", *small], "metrics.csv")
    return c.list


@pytest.mark.slow
def test_crafted_files_of_every_kind_end_in_one_line_within_bounds(stopped_run, tmp_path):
    data, stopped, checkpoint = stopped_run
    cases = build_cases(tmp_path / "cases", data, stopped, checkpoint)
    plan = tmp_path / "cases.json"
    plan.write_text(json.dumps(cases))
    before = sorted(os.listdir(stopped))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(plan)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdin=subprocess.DEVNULL,
                          cwd=tmp_path)
    lines = proc.stdout.splitlines()
    results = {r["name"]: r for r in (json.loads(line[7:]) for line in lines if line.startswith("RESULT "))}
    started = [line[6:] for line in lines if line.startswith("START ")]
    assert lines and lines[-1] == "DONE", f"child exited {proc.returncode} in {started[-1:]}: {proc.stderr[-2000:]}"
    wrong = []
    for case in cases:
        r = results[case["name"]]
        text = r["stderr"].strip()
        if r["code"] != case["code"] or case["code"] and (
                len(text.splitlines()) != 1 or case["expect"] not in text or "Traceback" in text):
            wrong.append(f"{case['name']}: exit {r['code']}, {r['seconds']} s: {text[-600:]!r}")
    counts: dict[str, list[int]] = {}
    for case in cases:
        counts.setdefault(case["kind"], [0, 0])[case["name"] not in {w.split(':')[0] for w in wrong}] += 1
    print("\ncrafted files: " + ", ".join(f"{kind} {ok} of {bad + ok}" for kind, (bad, ok) in counts.items())
          + f"; {len(cases) - len(wrong)} of {len(cases)} one line, exit 2")
    assert wrong == [], "\n".join(wrong)
    assert sorted(os.listdir(tmp_path)) == ["cases", "cases.json"]  # the child's working folder: no runs/ made
    assert sorted(os.listdir(stopped)) == before
    for case in (tmp_path / "cases").glob("sweep-*"):  # a damaged run's metrics: no table written
        assert sorted(p.name for p in (case / "sweep").iterdir()) == ["lr_max=0.01", "recipe.toml", "sweep_plan.json"]
    for target in (tmp_path / "cases").glob("*/elsewhere"):  # a link's target: nothing written or removed
        assert [p.name for p in target.iterdir()] == [".metrics.csv.x.tmp"], target
    kept = tmp_path / "cases" / "out-tmp-folder" / "run" / ".checkpoint.pt.abc.tmp" / "keep"
    assert kept.read_bytes() == b"not ours"  # a folder named like a temporary file is not the run's to remove
