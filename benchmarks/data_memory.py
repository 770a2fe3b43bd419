"""Memory the data costs during `fit`: `model.fit` against `SafeTrainer.fit`, arrays in RAM and memory-mapped.

    python benchmarks/data_memory.py                        # 1, 2 and 4 GiB, in RAM and memory-mapped
    python benchmarks/data_memory.py --sizes 1 2 --big 28   # + one SafeTrainer epoch over a 28 GiB memory map
    python benchmarks/data_memory.py --sizes 0.25 --runners safetrain --json results/data_memory.json
    python benchmarks/data_memory.py --images                 # images: float32 and uint8, batch 64-256
    python benchmarks/data_memory.py --images uint8:224:2048:128   # one image case: DTYPE:SIDE:SAMPLES:BATCH

Each case runs in a fresh process: float32 rows of 1024 features (4 KiB), a Dense 1024-64-1 model, batch 256,
shuffled, `steps_per_epoch=300`, 2 epochs. Anonymous resident memory (RssAnon from /proc, not RSS, so a
memory map's page cache does not count) is sampled every 10 ms from just before `fit` to its end; the table
shows the peak growth, and steps/s of the second epoch. `--big` runs SafeTrainer over one whole epoch of a
memory-mapped file larger than this machine's memory (`model.fit` would need the whole file in memory, twice).
Memory-mapped files are written to `--dir` (default: the temporary directory) and removed afterwards.
`--images` runs image cases instead (in RAM, 2 whole epochs, a 4x4 stride-4 Conv2D(16), global pooling and one
Dense; uint8 images are scaled in the model). The target column: 5% of the data + 256 MiB + 4 batches, and no
more than `model.fit` in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

FEATURES = 1024
BATCH = 256
STEPS = 300

# What every case runs after building `x`, `y`, `model`, `batch` and `steps` (None: whole epochs).
MEASURE = r"""
times = []
class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.t = time.perf_counter()
    def on_epoch_end(self, epoch, logs=None):
        times.append(time.perf_counter() - self.t)
peak, done = [anon_mb()], threading.Event()
def sample():
    while not done.wait(0.01):
        peak.append(anon_mb())
before = anon_mb()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
kwargs = dict(batch_size=batch, epochs=1 if whole_epoch else 2, verbose=0, callbacks=[Timer()])
if steps:
    kwargs["steps_per_epoch"] = steps
api = model if runner == "model.fit" else SafeTrainer(model)
api.fit(x, y, **kwargs)
done.set(); thread.join()
steps_done = steps or (len(x) + batch - 1) // batch
print(json.dumps({"growth_mb": max(peak) - before, "steps_per_s": steps_done / times[-1], "seconds": sum(times),
                  "path": getattr(getattr(api, "train_batches", None), "path", "keras")}))
"""

CHILD = (
    rf"""
import json, os, sys, threading, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, keras
from safetrain import SafeTrainer
from safetrain.memory import anon_mb

runner, kind, gib, path, whole_epoch = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
features, batch = {FEATURES}, {BATCH}
steps = None if whole_epoch else {STEPS}
rows = int(gib * 2**30) // (features * 4)
if kind == "memmap":
    x = np.load(path, mmap_mode="r")
else:
    x = np.empty((rows, features), "float32")
    for i in range(0, rows, 65536):  # written in pieces: no temporary as big as the array
        x[i:i + 65536] = np.float32(i % 13) / 13
y = np.zeros((rows, 1), "float32")
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((features,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
"""
    + MEASURE
)

# Images in RAM, two whole epochs: a small Conv2D model (a 4x4 stride-4 stem, global pooling, one Dense; uint8
# images scaled in the model, as users do).
IMAGE_CHILD = (
    r"""
import json, os, sys, threading, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np, keras
from safetrain import SafeTrainer
from safetrain.memory import anon_mb

runner, dtype, side, samples, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
whole_epoch, steps = False, None
x = np.empty((samples, side, side, 3), dtype)
for i in range(0, samples, 256):  # written in pieces: no temporary as big as the array
    x[i:i + 256] = i % 251
y = np.zeros((samples, 1), "float32")
keras.utils.set_random_seed(0)
scale = [keras.layers.Rescaling(1 / 255)] if dtype == "uint8" else []
model = keras.Sequential([keras.Input((side, side, 3), dtype=dtype), *scale,
                          keras.layers.Conv2D(16, 4, strides=4, activation="relu"),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
"""
    + MEASURE
)

#: (dtype, side, samples, batch) of the `--images` cases.
IMAGES = [
    ("float32", 128, 2048, 256),
    ("float32", 128, 8192, 64),
    ("uint8", 224, 2048, 128),
    ("float32", 224, 2048, 256),
]


def write_memmap(path: str, gib: float) -> None:
    import numpy as np

    rows = int(gib * 2**30) // (FEATURES * 4)
    x = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(rows, FEATURES))
    for i in range(0, rows, 65536):
        x[i : i + 65536] = np.float32(i % 13) / 13
    x.flush()
    del x


def run_case(runner: str, kind: str, gib: float, path: str, whole_epoch: bool = False) -> dict:
    return run_child(CHILD, runner, kind, str(gib), path, "1" if whole_epoch else "0")


def run_child(child: str, *args: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def image_case(spec: str) -> tuple[str, int, int, int]:
    """`DTYPE:SIDE:SAMPLES:BATCH` (e.g. `uint8:224:2048:128`) as a tuple."""
    dtype, side, samples, batch = spec.split(":")
    return dtype, int(side), int(samples), int(batch)


def run_images(cases, runners) -> list[dict]:
    rows = []
    for dtype, side, samples, batch in cases:
        row_mb = side * side * 3 * (1 if dtype == "uint8" else 4) / 2**20
        case = {"gib": samples * row_mb / 1024, "kind": f"batch {batch} ({batch * row_mb:.1f} MiB)"}
        case["data"] = f"{dtype} {side}x{side}x3, {samples} samples ({samples * row_mb:.0f} MiB)"
        for runner in runners:
            r = run_child(IMAGE_CHILD, runner, dtype, str(side), str(samples), str(batch))
            rows.append({**case, "runner": runner, "batch_mb": batch * row_mb, **r})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4], help="GiB of data per case")
    p.add_argument("--runners", nargs="+", default=["model.fit", "safetrain"], choices=["model.fit", "safetrain"])
    p.add_argument("--big", type=float, default=0, help="GiB of a memory map bigger than memory (0: skip)")
    p.add_argument("--dir", default=None, help="where memory-mapped files are written")
    p.add_argument(
        "--images", type=image_case, nargs="*", default=None, metavar="DTYPE:SIDE:SAMPLES:BATCH",
        help="image cases instead of rows (no value: the cases of IMAGES)",
    )  # fmt: skip
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = []
    workdir = tempfile.mkdtemp(prefix="safetrain-data-memory-", dir=a.dir)
    try:
        for gib in a.sizes if a.images is None else []:
            path = os.path.join(workdir, f"x_{gib:g}.npy")
            write_memmap(path, gib)
            for kind in ("in RAM", "memmap"):
                for runner in a.runners:
                    r = run_case(runner, "memmap" if kind == "memmap" else "ram", gib, path)
                    rows.append(
                        {"gib": gib, "kind": kind, "runner": runner, "batch_mb": BATCH * FEATURES * 4 / 2**20, **r}
                    )
                    print(rows[-1], file=sys.stderr, flush=True)
            os.remove(path)
        if a.images is not None:
            rows += run_images(a.images or IMAGES, a.runners)
        if a.big:
            path = os.path.join(workdir, "big.npy")
            write_memmap(path, a.big)
            r = run_case("safetrain", "memmap", a.big, path, whole_epoch=True)
            rows.append({"gib": a.big, "kind": "memmap, one whole epoch", "runner": "safetrain", **r})
            print(rows[-1], file=sys.stderr, flush=True)
            os.remove(path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    # The target: 5% of the data, 256 MiB (TensorFlow's own first-fit cost) and 4 batches; and no more than
    # model.fit's in the same run.
    print("| data | input | runner | anonymous memory added (MiB) | vs data | steps/s | target |")
    print("|---|---|---|---|---|---|---|")
    fit = {(r["gib"], r["kind"]): r.get("growth_mb") for r in rows if r["runner"] == "model.fit"}
    for r in rows:
        data_mb, data = r["gib"] * 1024, r.get("data", f"{r['gib']:g} GiB")
        if "error" in r:
            print(f"| {data} | {r['kind']} | {r['runner']} | failed: {r['error']} | | | |")
            continue
        target = data_mb * 0.05 + 256 + 4 * r.get("batch_mb", 1)
        verdict = ""
        if r["runner"] == "safetrain":
            ok = r["growth_mb"] <= min(target, fit.get((r["gib"], r["kind"])) or target)
            verdict = f"<= {target:.0f} {'yes' if ok else 'NO'}"
        print(
            f"| {data} | {r['kind']} | {r['runner']} | {r['growth_mb']:+.0f} | "
            f"{r['growth_mb'] / data_mb:.2f}x | {r['steps_per_s']:.0f} | {verdict} |"
        )
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
