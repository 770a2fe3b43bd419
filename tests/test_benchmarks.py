"""The benchmark scripts run end to end (tiny sizes: this checks that they work, not their numbers)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> <args>` from the repository root; fails the test on a non-zero exit."""
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_throughput_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "t.json"
    result = run_benchmark(
        "throughput.py", "--problems", "mlp", "--reps", "1", "--epochs", "2", "--samples", "320",
        "--variants", "fit,safe,floor", "--json", str(out),
    )  # fmt: skip
    assert "| mlp | safe/fit |" in result.stdout and "| mlp | safe/floor |" in result.stdout
    data = json.loads(out.read_text())
    assert set(data["results"][0]["median"]) == {"fit", "safe", "floor"}


def test_memory_benchmark_times_rehydration(tmp_path):
    result = run_benchmark("memory.py", "--only", "r", "--json", str(tmp_path / "m.json"), "--png", "")
    assert "Re-hydration of a 1,050,625-parameter model: median" in result.stdout


def test_soak_benchmark_runs(tmp_path):
    out = tmp_path / "s.json"
    run_benchmark("soak.py", "--epochs", "12", "--overhead-runs", "0", "--trials", "0", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["soak"]["epochs"] == 12 and data["soak"]["rehydrations"] == 1
    assert data["soak"]["most_folders"] <= 2


def test_on_batch_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "b.json"
    result = run_benchmark("on_batch.py", "--calls", "5", "--rounds", "1", "--memory-calls", "50", "--json", str(out))
    assert "| train_on_batch |" in result.stdout and "| predict_on_batch |" in result.stdout
    data = json.loads(out.read_text())
    assert data["traces"] == {"train": 1, "test": 1, "predict": 1}


def test_data_memory_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "d.json"
    result = run_benchmark(
        "data_memory.py", "--sizes", "0.02", "--runners", "model.fit", "safetrain", "--dir", str(tmp_path),
        "--json", str(out),
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kind"], r["runner"]) for r in rows] == [
        ("in RAM", "model.fit"), ("in RAM", "safetrain"), ("memmap", "model.fit"), ("memmap", "safetrain")
    ]  # fmt: skip
    assert all("error" not in r and r["steps_per_s"] > 0 for r in rows), rows
    assert {r["path"] for r in rows if r["runner"] == "safetrain"} == {"stream"}
    assert "| 0.02 GiB | memmap | safetrain |" in result.stdout
    assert list(tmp_path.iterdir()) == [out]  # its memory-mapped files are removed


def test_data_memory_benchmark_runs_its_image_cases(tmp_path):
    out = tmp_path / "i.json"
    result = run_benchmark(
        "data_memory.py", "--images", "float32:32:96:32", "uint8:32:64:16", "--dir", str(tmp_path),
        "--json", str(out),
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["data"].split(",")[0], r["runner"]) for r in rows] == [
        ("float32 32x32x3", "model.fit"), ("float32 32x32x3", "safetrain"),
        ("uint8 32x32x3", "model.fit"), ("uint8 32x32x3", "safetrain"),
    ]  # fmt: skip
    assert all("error" not in r and r["steps_per_s"] > 0 for r in rows), rows
    assert {r["path"] for r in rows if r["runner"] == "safetrain"} == {"stream"}
    assert "| uint8 32x32x3, 64 samples (0 MiB) | batch 16 (0.0 MiB) | safetrain |" in result.stdout


def test_doctor_benchmark_runs_and_prints_its_tables():
    # --reps 0 --only none: no script run (the corpus test runs the verdicts); the tables and arguments work.
    result = run_benchmark("doctor.py", "--reps", "0", "--only", "none")
    assert "| script | known answer | doctor's verdict | correct | names an expected line |" in result.stdout
    assert "0 of 0 correct" in result.stdout


def test_short_fits_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "s.json"
    result = run_benchmark(
        "short_fits.py",
        "--steps",
        "1",
        "--rounds",
        "1",
        "--block",
        "2",
        "--warmup",
        "0",
        "--models",
        "3",
        "--json",
        str(out),
    )
    assert "| 1 |" in result.stdout and "MiB per model" in result.stdout
    (row,) = json.loads(out.read_text())
    assert set(row["median"]["fresh"]) == {"fit", "safe"} and len(row["memory"]["safe"]["series"]) == 3
    assert len(row["fresh"]["safe"]) == 2 and row["collections"]["trainers"] == 2
