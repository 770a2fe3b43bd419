"""The doctor: known answers on examples/leaky/ (real scripts in real child processes) and its rules on
recorded runs built by hand."""

import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from safetrain import doctor

LEAKY = pathlib.Path(__file__).parent.parent / "examples" / "leaky"
EXPECTED = {
    "retracing.py": ["retracing"],
    "models_in_loop.py": ["models_in_loop"],
    "predict_in_loop.py": ["predict_in_loop"],
    "stateful_not_reset.py": ["stateful_not_reset"],
    "python_accumulation.py": ["python_accumulation"],
    "allocator_growth.py": ["allocator_growth"],
    "clean.py": [],
}


def test_every_leaky_example_has_a_known_answer():
    assert {p.name for p in LEAKY.glob("*.py")} == set(EXPECTED)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Every leaky example under the doctor, two at a time (each in its own child process)."""
    folder = tmp_path_factory.mktemp("doctor")

    def one(name):
        return name, doctor.run(str(LEAKY / name), json_path=str(folder / f"{name}.json"), echo=False, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, sorted(EXPECTED)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_doctor_names_the_right_cause(reports, name):
    report = reports[name]
    assert report["exit_code"] == 0
    found = [c["cause"] for c in report["diagnosis"]["causes"]]
    assert found == EXPECTED[name], report["text"]
    for cause in report["diagnosis"]["causes"]:
        assert cause["evidence"] and cause["fix"]


def test_a_retrace_names_the_function_and_the_argument_whose_shape_varied(reports):
    (cause,) = reports["retracing.py"]["diagnosis"]["causes"]
    assert cause["function"] == "train_step" and cause["traces"] >= 20  # 20 lengths (+1: variables made)
    assert set(cause["varied"]) == {"x"} and "float32[8x10x4]" in cause["varied"]["x"]
    assert "SafeTrainer(model).fit" in cause["fix"]
    assert cause["growth_mb"] > 20


def test_the_report_counts_what_ran(reports):
    clean = reports["clean.py"]
    counts = clean["diagnosis"]["counts"]
    assert counts == {"models": 1, "predicts": 1, "epochs": 10, "fits": 1}
    assert "no leak found" in clean["text"]
    models = reports["models_in_loop.py"]["diagnosis"]["causes"][0]
    assert models["models"] == 8 and models["slope_mb_per_model"] > 1
    accumulation = reports["python_accumulation.py"]["diagnosis"]["causes"][0]
    assert "list" in accumulation["types"] or "ndarray" in accumulation["types"]


def test_the_json_report_is_written(reports, tmp_path_factory):
    path = reports["clean.py"]["script"]
    assert path.endswith("clean.py")
    written = [p for p in pathlib.Path(tmp_path_factory.getbasetemp()).rglob("clean.py.json")]
    assert written and json.loads(written[0].read_text())["diagnosis"]["leak"] is False


def test_cli_plot_and_fail_on_leak(tmp_path):
    plot = tmp_path / "doctor.png"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "safetrain",
            "doctor",
            "--plot",
            str(plot),
            "--fail-on-leak",
            str(LEAKY / "stateful_not_reset.py"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "stateful layer never reset" in done.stdout and "ResetStates()" in done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_arguments_pass_through_and_its_exit_code_comes_back(tmp_path):
    script = tmp_path / "args.py"
    script.write_text("import sys\nprint('ARGS', sys.argv[1:])\nsys.exit(int(sys.argv[2]))\n")
    done = subprocess.run(
        [sys.executable, "-m", "safetrain", "doctor", str(script), "--flag", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "ARGS ['--flag', '3']" in done.stdout
    assert done.returncode == 3


def test_a_missing_script_is_refused_by_name():
    with pytest.raises(ValueError, match="`script`: no such file"):
        doctor.run("no/such/script.py")


# -- the rules, on recorded runs ------------------------------------------------------------------------


def record(events=(), functions=(), stateful=None, census=None, counts=None):
    return dict(
        events=list(events),
        functions=list(functions),
        stateful=stateful or {},
        census=census or {},
        counts=counts or {"models": 0, "predicts": 0, "epochs": 0, "fits": 0},
        exit_code=0,
        error=None,
        wall_s=1.0,
    )


def epochs(rss_values):
    return [dict(t=i, kind="epoch", rss_mb=r) for i, r in enumerate(rss_values)]


def census(first_mb, last_mb, name="list"):
    return {
        "first": dict(stats={name: [10, int(first_mb * 2**20)]}, rss_mb=first_mb + 500, seconds=0.1, t=0),
        "last": dict(stats={name: [20, int(last_mb * 2**20)]}, rss_mb=last_mb + 500, seconds=0.1, t=9),
    }


def causes(data):
    return [c["cause"] for c in doctor.diagnose(data)["causes"]]


def test_flat_memory_is_no_leak():
    assert causes(record(epochs([500 + 0.01 * i for i in range(20)]), census=census(1, 1))) == []


def test_two_traces_of_a_function_are_not_retracing():
    fn = dict(name="step", traces=[{"x": "float32[?x4]"}, {"x": "float32[?x?]"}])
    assert causes(record(functions=[fn])) == []


def test_many_models_with_flat_memory_are_not_a_leak():
    models = [dict(t=i, kind="model", rss_mb=500 + 0.1 * (i % 2)) for i in range(10)]
    assert causes(record(models)) == []


def test_a_stateful_layer_reset_every_epoch_is_fine():
    stateful = {"m/lstm": dict(layer="lstm", epochs=5, resets=5)}
    assert causes(record(stateful=stateful)) == []


def test_growth_explained_by_live_objects_is_accumulation_not_allocator():
    data = record(epochs([500 + 10 * i for i in range(10)]), census=census(0, 90, name="ndarray"))
    assert causes(data) == ["python_accumulation"]


def test_growth_with_no_live_objects_is_allocator_growth():
    data = record(epochs([500 + 10 * i for i in range(10)]), census=census(1, 1))
    data["census"]["last"]["rss_mb"] = data["census"]["first"]["rss_mb"] + 90
    assert causes(data) == ["allocator_growth"]
