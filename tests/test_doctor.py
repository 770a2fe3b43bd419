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
EXPECTED = {  # (causes, warnings)
    "retracing.py": (["retracing"], []),
    "models_in_loop.py": (["models_in_loop"], []),
    "predict_in_loop.py": (["predict_in_loop"], []),
    "stateful_not_reset.py": ([], ["stateful_not_reset"]),
    "python_accumulation.py": (["python_accumulation"], []),
    "allocator_growth.py": (["allocator_growth"], []),
    "clean.py": ([], []),
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
    assert report["exit_code"] == 0, report["text"]  # the text names the script's error
    found = [c["cause"] for c in report["diagnosis"]["causes"]]
    warned = [w["cause"] for w in report["diagnosis"]["warnings"]]
    assert (found, warned) == EXPECTED[name], report["text"]
    for cause in report["diagnosis"]["causes"] + report["diagnosis"]["warnings"]:
        assert cause["evidence"] and cause["fix"]


def test_a_retrace_names_the_function_and_the_argument_whose_shape_varied(reports):
    report = reports["retracing.py"]
    assert report["exit_code"] == 0, report["text"]
    (cause,) = report["diagnosis"]["causes"]
    # 20 lengths; TensorFlow's variable-free second trace is left out.
    assert cause["function"] == "train_step" and cause["traces"] == 20
    assert set(cause["varied"]) == {"x"} and "float32[8x10x4]" in cause["varied"]["x"]
    assert "SafeTrainer(model).fit" in cause["fix"]
    assert cause["growth_mb"] > 20


def _lines(cause):
    return [
        (site["file"].rsplit("/", 1)[-1], site["line"], site.get("role"), site.get("count")) for site in cause["lines"]
    ]


def test_each_cause_names_the_line_of_the_script_to_change(reports):
    (models,) = reports["models_in_loop.py"]["diagnosis"]["causes"]
    assert _lines(models) == [("models_in_loop.py", 15, "constructed", 8)]
    assert models["lines"][0]["source"].startswith("model = keras.Sequential(")
    (predicts,) = reports["predict_in_loop.py"]["diagnosis"]["causes"]
    assert _lines(predicts) == [("predict_in_loop.py", 17, "predict", 100)]
    (retrace,) = reports["retracing.py"]["diagnosis"]["causes"]
    call, definition = retrace["lines"]
    assert (call["line"], call["role"], definition["line"], definition["role"]) == (30, "call", 18, "definition")
    assert call["source"] == "loss = train_step(x, y)" and definition["source"].startswith("def train_step(")
    text = reports["retracing.py"]["text"]
    assert "retracing.py:30  loss = train_step(x, y)" in text and "retracing.py:18  def train_step(" in text


def test_the_report_counts_what_ran(reports):
    clean = reports["clean.py"]
    counts = clean["diagnosis"]["counts"]
    assert counts == dict(
        models=1, compiles=1, predicts=1, epochs=10, fits=1, batches=0, gradients=0, calls=0, model_calls=0
    )
    assert "no leak found" in clean["text"]
    # TensorFlow's second trace of a step whose first trace made variables is not a retrace (nor printed as one).
    assert clean["diagnosis"]["retraced"] == {} and "traced for more than one" not in clean["text"]
    # The end reading comes before the last census, and the peak is the highest of all readings.
    assert clean["diagnosis"]["mem_peak_mb"] >= clean["diagnosis"]["mem_end_mb"]
    models = reports["models_in_loop.py"]["diagnosis"]["causes"][0]
    assert models["models"] == 8 and models["slope_mb_per_model"] > 1
    accumulation = reports["python_accumulation.py"]["diagnosis"]["causes"][0]
    assert "list" in accumulation["types"] or "ndarray" in accumulation["types"]


def test_the_json_report_is_written(reports, tmp_path_factory):
    path = reports["clean.py"]["script"]
    assert path.endswith("clean.py")
    written = [p for p in pathlib.Path(tmp_path_factory.getbasetemp()).rglob("clean.py.json")]
    assert written and json.loads(written[0].read_text())["diagnosis"]["leak"] is False


def test_cli_plot_and_fail_on_leak_counts_causes_not_warnings(tmp_path):
    plot = tmp_path / "doctor.png"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "safetrain", "doctor", "--plot", str(plot), "--fail-on-leak"]
    done = subprocess.run(
        cmd + [str(LEAKY / "stateful_not_reset.py")], capture_output=True, text=True, env=env, timeout=300
    )
    # A stateful layer never reset is a warning: memory does not grow with it, so --fail-on-leak passes.
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "warning: stateful layer never reset" in done.stdout and "ResetStates()" in done.stdout
    assert "0 cause(s) counted, 1 warning(s) not counted" in done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Native memory that grows (no TensorFlow at all: a fast script) is a cause: exit 1.
    native = tmp_path / "native.py"
    native.write_text(NATIVE_GROWTH)
    done = subprocess.run(cmd + [str(native)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "allocator growth" in done.stdout and "1 cause(s) counted" in done.stdout


NATIVE_GROWTH = """
import ctypes, ctypes.util, time
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
held = []
for _ in range(8):
    address = libc.malloc(16 * 2**20)
    ctypes.memset(address, 1, 16 * 2**20)
    held.append(address)
    time.sleep(0.05)
"""


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


def diagnosis(data):
    return doctor.diagnose(dict(data, samples=[]))


def warm(events, at):
    """A record whose warm-up ended at time `at` (its first census), with memory `events`."""
    data = record(events)
    m = max((e for e in events if e["t"] <= at), key=lambda e: e["t"])["rss_mb"]
    data["census"] = {"first": dict(stats={}, rss_mb=m, seconds=0.1, t=at)}
    return data


def test_retracing_that_stops_with_warm_up_is_a_warning_not_a_leak():
    # Five traces in the first epoch (a Python flag), none after, memory flat from then on.
    fn = dict(name="step", traces=[dict(t=0.1 * i, args={"flag": str(i)}) for i in range(5)])
    events = [dict(t=0.1 * i, kind="trace", function="step", rss_mb=500 + 5 * i) for i in range(5)]
    events += [dict(t=1.0 + i, kind="epoch", rss_mb=520 + 0.01 * i) for i in range(20)]
    found = diagnosis(dict(warm(events, at=1.0), functions=[fn]))
    assert found["causes"] == [] and [w["cause"] for w in found["warnings"]] == ["retraced"]
    assert found["retraced"] == {"step": 5}


def test_tensorflows_variable_free_second_trace_is_not_a_retrace():
    traces = [dict(t=0.0, args={"data": "float32[?x4]"}), dict(t=0.1, args={"data": "float32[?x4]"}, lifted=True)]
    found = diagnosis(record(functions=[dict(name="one_step_on_data", traces=traces)]))
    assert found["retraced"] == {} and found["warnings"] == []


def test_retracing_after_warm_up_with_growth_is_a_leak():
    fn = dict(name="step", traces=[dict(t=float(i), args={"x": f"float32[8x{i}]"}) for i in range(20)])
    events = [dict(t=float(i), kind="trace", function="step", rss_mb=500 + 5 * i) for i in range(20)]
    found = diagnosis(dict(warm(events, at=4.0), functions=[fn]))
    (cause,) = found["causes"]
    assert cause["cause"] == "retracing" and cause["traces_after_warmup"] == 15 and cause["growth_mb"] == 75


def test_compiling_one_model_again_and_again_is_recompiling_not_models_in_loop():
    events = [dict(t=0.0, kind="model", model="m#0", rss_mb=500)]
    events += [dict(t=1.0 + i, kind="compile", model="m#0", rss_mb=500 + 8 * i) for i in range(12)]
    fns = [dict(name="one_step_on_data", traces=[dict(t=1.5 + i, args={})]) for i in range(12)]
    found = diagnosis(dict(warm(events, at=2.0), functions=fns))
    assert [c["cause"] for c in found["causes"]] == ["recompiling"]
    assert found["causes"][0]["compiles"] == 12 and found["causes"][0]["functions"] == 12


def test_new_models_each_compiled_once_are_not_recompiling():
    events = []
    for i in range(8):
        events += [dict(t=2.0 * i, kind="model", model=f"m#{i}", rss_mb=500 + 6 * i)]
        events += [dict(t=2.0 * i + 1, kind="compile", model=f"m#{i}", rss_mb=500 + 6 * i)]
    found = diagnosis(warm(events, at=2.0))
    assert [c["cause"] for c in found["causes"]] == ["models_in_loop"]


def test_predictions_kept_by_a_callback_are_accumulation_not_predict_in_loop():
    events = [dict(t=float(i), kind="predict", rows=2000, rss_mb=500 + 3 * i) for i in range(30)]
    data = warm(events, at=4.0)
    data["census"]["first"]["stats"] = {"ndarray": [10, 12 * 2**20]}
    data["census"]["last"] = dict(stats={"ndarray": [35, 87 * 2**20]}, rss_mb=587, t=30.0)
    assert [c["cause"] for c in diagnosis(data)["causes"]] == ["python_accumulation"]


def test_predict_is_not_blamed_when_the_script_keeps_what_each_call_returns():
    # Issue 24's case: a callback predicts 2000 rows per epoch and keeps every result. Live arrays grew 60 MiB,
    # memory 2.7 MiB per call: a residue of 0.3 MiB per call that no live object holds, enough for the bytes-only rule.
    where = [["train.py", 30]]
    events = [dict(t=float(i), kind="predict", rows=2000, rss_mb=500 + 2.7 * i, where=where) for i in range(30)]
    data = warm(events, at=4.0)
    data["census"]["first"]["stats"] = {"ndarray": [10, 12 * 2**20]}
    data["census"]["last"] = dict(stats={"ndarray": [35, 72 * 2**20]}, rss_mb=578, t=30.0)
    assert {c["cause"] for c in diagnosis(data)["causes"]} == {"predict_in_loop", "python_accumulation"}
    # Who holds the arrays: a callback's list, made of what predict returned (2.4 MiB a call, 30 calls).
    kept = dict(holder="KeepScores.scores", kind="attribute", name="scores", bytes=72 * 2**20, objects=30)
    data["holders"] = [dict(kept, watched_bytes=72 * 2**20, lines=[["train.py", 30]])]
    (cause,) = diagnosis(data)["causes"]
    assert cause["cause"] == "python_accumulation"
    assert [(s["line"], s["role"]) for s in cause["lines"]] == [(30, "adds to KeepScores.scores")]
    assert "KeepScores.scores holds 72.0 MiB in 30 objects" in cause["evidence"]
    # The same list filled with arrays predict did not return: predict in a loop stays a cause.
    data["holders"][0]["watched_bytes"] = 0
    assert {c["cause"] for c in diagnosis(data)["causes"]} == {"predict_in_loop", "python_accumulation"}


def test_growth_with_no_fit_is_diagnosed_from_warm_up_on():
    # A custom loop: no epochs, no fit; warm-up ended at the 5th gradient; tensors kept in a list.
    events = [dict(t=0.0, kind="model", rss_mb=400)]
    events += [dict(t=1.0 + i, kind="end" if i == 99 else "sample", rss_mb=450 + 3 * i) for i in range(100)]
    data = warm(events, at=5.0)
    data["census"]["first"]["stats"] = {"EagerTensor": [100, 10 * 2**20]}
    data["census"]["last"] = dict(stats={"EagerTensor": [9000, 290 * 2**20]}, rss_mb=747, t=101.0)
    found = diagnosis(data)
    assert [c["cause"] for c in found["causes"]] == ["python_accumulation"]
    assert found["causes"][0]["types"] == ["EagerTensor"] and "per epoch" not in found["causes"][0]["evidence"]


def test_warm_up_is_not_growth():
    # The first train_on_batch costs 18 MiB; then 0.011 MiB per call: nothing to report.
    events = [dict(t=0.0, kind="model", rss_mb=400), dict(t=1.0, kind="sample", rss_mb=418)]
    events += [dict(t=2.0 + i, kind="sample", rss_mb=418 + 0.011 * i) for i in range(220)]
    assert diagnosis(warm(events, at=1.5))["causes"] == []


def test_arrays_held_several_times_are_data_copies():
    mib = 2**20
    events = [dict(t=0.0, kind="model", rss_mb=400)]
    events += [dict(t=1.0, kind="data", nbytes=200 * mib, rss_mb=600, source="Model.fit")]
    events += [dict(t=2.0, kind="sample", rss_mb=1050), dict(t=3.0, kind="epoch", rss_mb=1040)]
    found = diagnosis(warm(events, at=3.0))  # warm-up ends with the first epoch
    (cause,) = found["causes"]
    assert cause["cause"] == "data_copies" and round(cause["copies"], 2) == 2.25
    # One copy's worth of warm-up is not a copy of the data; neither are small arrays.
    events[2]["rss_mb"] = events[3]["rss_mb"] = 700
    assert diagnosis(warm(events, at=3.0))["causes"] == []
    events[1]["nbytes"], events[2]["rss_mb"], events[3]["rss_mb"] = 10 * mib, 1050, 1040
    assert diagnosis(warm(events, at=3.0))["causes"] == []


def test_a_step_up_in_the_first_passes_then_flat_is_not_a_leak():
    # New models each trial with clear_session(): memory steps up over the first trials, then stays flat.
    levels = [215, 231, 234.7, 245.4, 245.4, 245.4, 245.4, 245.4, 245.4]
    events = [dict(t=float(i), kind="model", model=f"m#{i}", rss_mb=m) for i, m in enumerate(levels)]
    assert diagnosis(warm(events, at=1.0))["causes"] == []
    # The same slope kept up to the end is a leak.
    events = [dict(t=float(i), kind="model", model=f"m#{i}", rss_mb=215 + 4 * i) for i in range(9)]
    assert [c["cause"] for c in diagnosis(warm(events, at=1.0))["causes"]] == ["models_in_loop"]
