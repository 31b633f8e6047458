"""Over a thousand generated bad batch files through the real loader, in child processes.

Each child imports the package once and loads its share of the files; before each file it prints
the file's name, so a child that dies of a signal names the file that killed it. The test asserts
no signal death, no exception but the loader's one-line ``DatasetError``, no payload run, accepted
files with the documented shapes and dtypes, and a peak resident memory at most 200 MB above the
child's baseline after importing. Seeded; about 20 s on 2 cores.
"""
import json
import pickle
import pickletools
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import Payload, py2_pickle, synthetic_batch

CHILD = r"""
import json, resource, sys
from pathlib import Path
import numpy as np
from cifar_onecycle.data import DatasetError, read_batch

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

baseline = peak_mb()
counts = {"accepted": 0, "refused": 0, "wrong": []}
for name in sys.argv[1:]:
    print("START", name, flush=True)
    try:
        images, labels = read_batch(Path(name))
    except DatasetError as e:
        text = str(e)
        if "\n" in text or name not in text:
            counts["wrong"].append(f"{name}: error not one line naming the file: {text[:200]!r}")
        counts["refused"] += 1
        continue
    except BaseException as e:
        counts["wrong"].append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
        continue
    ok = (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
          and images.shape[1:] == (3, 32, 32) and labels.dtype == np.int64 and labels.shape == (len(images),)
          and int(labels.min()) >= 0 and int(labels.max()) <= 9)
    if not ok:
        counts["wrong"].append(f"{name}: accepted with shapes {getattr(images, 'shape', None)}")
    counts["accepted"] += 1
counts["peak_growth_mb"] = peak_mb() - baseline
print("RESULT " + json.dumps(counts), flush=True)
"""


class CalledNdarray:
    def __init__(self, shape, strides):
        self.shape, self.strides = shape, strides

    def __reduce__(self):
        return (np.ndarray, (self.shape, "u1", b"\x00", 0, self.strides))


def opcode_offsets(raw: bytes) -> list[int]:
    return [pos for _, _, pos in pickletools.genops(raw)]


def bad_files(rng: random.Random, marker: Path) -> dict[str, bytes]:
    """Name -> bytes of every generated file (at least 1,000)."""
    valid = {"py2": py2_pickle(synthetic_batch(100, 1)), "p4": pickle.dumps(synthetic_batch(100, 2), protocol=4)}
    files: dict[str, bytes] = {}
    for form, raw in valid.items():
        ops = opcode_offsets(raw)
        opcodes = [bytes([op.code.encode("latin1")[0]]) for op in pickletools.opcodes]
        for i in range(150):
            files[f"{form}-truncated-{i}"] = raw[:rng.randrange(len(raw))]
        for i in range(180):  # flips inside the pickle's structure, not the pixel bytes
            at, b = rng.choice(ops), bytearray(raw)
            b[at + rng.randrange(3) if at + 3 < len(b) else at] ^= 1 << rng.randrange(8)
            files[f"{form}-flip-{i}"] = bytes(b)
        for i in range(80):
            at = rng.choice(ops)
            files[f"{form}-insert-{i}"] = raw[:at] + rng.choice(opcodes) + raw[at:]
        for i in range(60):
            a, b = sorted(rng.sample(ops, 2))
            files[f"{form}-swap-{i}"] = raw[:a] + raw[b:b + 1] + raw[a + 1:b] + raw[a:a + 1] + raw[b + 1:]
        for i in range(30):
            at = rng.choice(ops)
            files[f"{form}-delete-{i}"] = raw[:at] + raw[at + 1:]
    good = synthetic_batch(100, 3)
    for i, rows in enumerate((10_001, 10**6, 10**9, 2**31 - 1, 2**40)):  # giant declared shapes, little data
        files[f"giant-shape-{i}"] = pickle.dumps({b"data": CalledNdarray((rows, 3072), (3072, 1)), b"labels": [0]}, 4)
        files[f"zero-stride-{i}"] = pickle.dumps({b"data": CalledNdarray((rows, 3072), (0, 0)), b"labels": [0]}, 4)
    for i, dtype in enumerate((object, np.float64, np.complex64, "U3", "V8")):
        array = np.zeros((2, 3072), dtype=dtype) if dtype != "U3" else np.array([["abc"] * 3072] * 2)
        files[f"dtype-{i}"] = pickle.dumps({b"data": array, b"labels": [0, 1]}, 4)
    for depth in (33, 100, 10_000, 1_000_000):  # nesting of every kind, no MARK needed for most
        files[f"deep-tuple1-{depth}"] = b"\x80\x04)" + b"\x85" * depth + b"."
        files[f"deep-tuple2-{depth}"] = b"\x80\x04)" + b"N\x86" * depth + b"."
        files[f"deep-list-{depth}"] = b"\x80\x04" + b"]" * depth + b"a" * (depth - 1) + b"."
        files[f"deep-dict-{depth}"] = b"\x80\x04" + b"(K\x01" * depth + b"}" + b"d" * depth + b"."
        files[f"deep-mark-{depth}"] = b"\x80\x04" + b"(" * depth + b"t" * depth + b"."
        files[f"deep-key-{depth}"] = b"\x80\x04}" + b")" + b"\x85" * depth + b"K\x01s."
        files[f"deep-frozenset-{depth}"] = b"\x80\x04" + b"(" * depth + b"\x91" * depth + b"."
    for i, index in enumerate((10**5 + 1, 10**6, 2**31 - 1, 2**32 - 1)):
        files[f"memo-put-{i}"] = b"\x80\x04Nr" + index.to_bytes(4, "little") + b"."
        files[f"memo-get-{i}"] = b"\x80\x04Nr\x00\x00\x00\x00j" + index.to_bytes(4, "little") + b"."
    for i, labels in enumerate(([0] * 99, [0] * 101, [10] * 100, [-1] * 100, [2**40] * 100, ["a"] * 100)):
        files[f"labels-{i}"] = pickle.dumps({b"data": good[b"data"], b"labels": labels}, 4)
    for i, thing in enumerate(([good[b"data"]], "data", 7, None, {b"data": good[b"data"]}, {b"labels": [0]},
                               {b"data": good[b"data"].reshape(-1), b"labels": good[b"labels"]},
                               {b"data": good[b"data"][:, :100], b"labels": good[b"labels"]},
                               {"data": good[b"data"][:0], "labels": []})):
        files[f"structure-{i}"] = pickle.dumps(thing, 4)
    for i, proto in enumerate((0, 2, 4, 5)):  # payloads that would run code
        files[f"payload-{i}"] = pickle.dumps({b"data": Payload(marker), b"labels": [0]}, proto)
    files["payload-system"] = b"cposix\nsystem\n(Vtouch " + str(marker).encode() + b"\ntR."
    return files


@pytest.mark.slow
def test_no_generated_file_crashes_hangs_or_exhausts_the_loader(tmp_path):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "files"
    folder.mkdir()
    files = bad_files(random.Random(0), marker)
    assert len(files) >= 1000
    names = []
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
        names.append(str(folder / name))
    results, crashed = [], []
    for share in (names[0::2], names[1::2]):
        proc = subprocess.run([sys.executable, "-c", CHILD, *share], capture_output=True, text=True, timeout=300)
        lines = proc.stdout.splitlines()
        if proc.returncode != 0 or not lines or not lines[-1].startswith("RESULT "):
            last = next((line[6:] for line in reversed(lines) if line.startswith("START ")), "before any file")
            crashed.append(f"child exited {proc.returncode} while loading {last}: {proc.stderr[-500:]}")
            continue
        results.append(json.loads(lines[-1][7:]))
    accepted = sum(r["accepted"] for r in results)
    refused = sum(r["refused"] for r in results)
    print(f"\nfuzz: tried {len(files)}, accepted {accepted}, refused {refused}, crashed {len(crashed)}")
    assert crashed == []
    assert [w for r in results for w in r["wrong"]] == []
    assert accepted + refused == len(files)
    assert not marker.exists()
    assert max(r["peak_growth_mb"] for r in results) <= 200
