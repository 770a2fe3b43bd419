"""`python -m safetrain plan script.py`: a script run up to its first fit, that fit planned instead of run."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

from safetrain import SafeTrainer
from safetrain.plan_script import plan_script

SCRIPT = """\
    import sys
    import numpy as np
    import keras
    from safetrain import SafeTrainer

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 32), dtype="float32")
    y = x[:, :1] * 2
    model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    try:
        {fit}  # FIT
    except Exception as e:  # a script's own handler must not catch the stop and train on
        print("caught", e)
    print("TRAINED")
    open(sys.argv[1], "w").write("trained")
"""


def write(tmp_path, fit: str, name: str = "train.py") -> tuple[str, int]:
    text = textwrap.dedent(SCRIPT).format(fit=fit)
    path = tmp_path / name
    path.write_text(text)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.endswith("# FIT"))
    return str(path), line


def test_model_fit_is_planned_at_its_line_and_nothing_trains(tmp_path):
    script, line = write(tmp_path, "model.fit(x, y, batch_size=128, epochs=3, verbose=0)")
    flag = tmp_path / "trained.flag"
    argv, fit = list(sys.argv), keras.Model.fit
    result = plan_script(script, [str(flag)])
    plan = result["plan"]
    assert result["api"] == "Model.fit" and result["where"] == f"{script}:{line}"
    assert plan.batch_size == 128 and plan.kind == "train" and [b for b, _ in plan.probes][-1] == 128
    assert plan.peak_mb > plan.base_mb and plan.activation_mb_per_sample > 0
    assert result["budget_mb"] is None
    assert not flag.exists()  # the script stopped at its fit
    # Everything is put back: argv, the patched fit, no import hook left.
    assert sys.argv == argv and keras.Model.fit is fit and "fit" not in keras.Model.__dict__
    assert not [hook for hook in sys.meta_path if type(hook).__name__ == "_AfterImport"]


def test_safetrainer_fit_with_its_budget_and_another_batch_size(tmp_path):
    script, _ = write(tmp_path, "SafeTrainer(model, memory_budget_mb=4096).fit(x, y, epochs=2, verbose=0)")
    fit = SafeTrainer.fit
    result = plan_script(script, [str(tmp_path / "flag")], batch_size=256)
    assert result["api"] == "SafeTrainer.fit" and result["budget_mb"] == 4096.0
    assert result["plan"].batch_size == 256
    assert SafeTrainer.fit is fit
    # The fit's default batch size, as model.fit's: 32.
    assert plan_script(script, [str(tmp_path / "flag")])["plan"].batch_size == 32


DATASETS = """\
import numpy as np
import keras
import tensorflow as tf

class Rows(keras.utils.PyDataset):
    def __len__(self):
        return 9

    def __getitem__(self, i):
        return np.ones((40, 32), "float32"), np.ones((40, 1), "float32")

x = np.ones((1000, 32), "float32")
ds = tf.data.Dataset.from_tensor_slices((x, x[:, :1])).shuffle(100).batch(48)  # a last partial batch
model = keras.Sequential([keras.Input((32,)), keras.layers.Dense(8), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
model.fit(ds if KIND == "dataset" else Rows(), epochs=2, verbose=0)
"""


@pytest.mark.parametrize("kind, batch", [("dataset", 48), ("pydataset", 40)])
def test_a_dataset_is_planned_at_the_size_of_its_batches(tmp_path, kind, batch):
    # Its spec leaves the batch dimension open: the size is read from its first batch (the script stops).
    script = tmp_path / "ds.py"
    script.write_text(f"KIND = {kind!r}\n" + DATASETS)
    assert plan_script(str(script))["plan"].batch_size == batch


def test_a_script_without_fit_plans_nothing_and_its_own_exit_propagates(tmp_path):
    script, _ = write(tmp_path, "model.predict(x, verbose=0)")
    flag = tmp_path / "flag"
    assert plan_script(script, [str(flag)]) is None
    assert flag.read_text() == "trained"  # it ran to its end
    exits = tmp_path / "exits.py"
    exits.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(SystemExit) as e:
        plan_script(str(exits))
    assert e.value.code == 3
    with pytest.raises(ValueError, match="`script`: no such file"):
        plan_script(str(tmp_path / "missing.py"))


def run(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "safetrain", "plan", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_command_prints_the_table_and_writes_json(tmp_path):
    script, line = write(tmp_path, "model.fit(x, y, batch_size=128, epochs=3, verbose=0)")
    out = tmp_path / "plan.json"
    result = run("--budget", "8000", "--json", str(out), script, str(tmp_path / "flag"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Memory plan for training batches of 128" in result.stdout
    assert "whole batches" in result.stdout and "largest batch in budget" in result.stdout
    assert f"Model.fit at {script}:{line}; the script stopped there, untrained" in result.stdout
    assert "TRAINED" not in result.stdout and "caught" not in result.stdout
    saved = json.loads(out.read_text())
    assert saved["batch_size"] == 128 and saved["budget_mb"] == 8000.0 and saved["microbatch_size"] == 128
    assert saved["peak_mb"] > saved["base_mb"] and saved["max_batch_size"] > 128
    # Bad arguments are usage errors that name the option; a script without fit exits 1 and says so.
    bad = run("--budget", "lots", script)
    assert bad.returncode == 2 and "--budget" in bad.stderr
    none, _ = write(tmp_path, "pass", name="nofit.py")
    result = run(none, str(tmp_path / "flag"))
    assert result.returncode == 1 and "ended without calling fit" in result.stderr
