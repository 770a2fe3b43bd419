"""The diagnostics core shared by the doctor and LeakDetector: memory readings, the census by bytes held, the
import hook that patches modules whatever order they are imported in, and that none of it imports TensorFlow."""

import importlib
import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from safetrain import diagnostics, memory
from safetrain.scripts import _AfterImport


def test_census_counts_tensors_variables_and_arrays_by_the_bytes_they_hold():
    before = diagnostics.census()
    kept = [tf.random.normal((256, 1024)) for _ in range(8)]  # 8 MiB of EagerTensor buffers
    variables = [tf.Variable(tf.zeros((512, 1024))) for _ in range(2)]  # 4 MiB of variable buffers
    arrays = [np.ones((1024, 1024), "float32") for _ in range(3)]  # 12 MiB of NumPy data
    views = [a[::2] for a in arrays]  # views hold nothing of their own
    after = diagnostics.census()
    grew = {name: (size, count) for size, count, name in diagnostics.census_growth(before, after)}
    assert grew["EagerTensor"][0] >= 8 * 2**20 and grew["EagerTensor"][1] >= 8
    assert grew["ResourceVariable"][0] >= 4 * 2**20
    assert 12 * 2**20 <= grew["ndarray"][0] < 13 * 2**20  # the views add no bytes
    del kept, variables, arrays, views


def test_one_reader_and_one_slope():
    rss, anon = diagnostics.read_memory()
    assert 0 < anon <= rss
    assert memory.rss_mb() == pytest.approx(rss, abs=64) and memory.anon_mb() == pytest.approx(anon, abs=64)
    assert diagnostics.slope([500, 502, 504]) == pytest.approx(2.0)
    assert memory.slope([1, 3], xs=[0, 2]) == pytest.approx(1.0)
    assert diagnostics.slope([1.0]) != diagnostics.slope([1.0])  # NaN with one point


def test_the_diagnostics_and_the_doctors_parent_do_not_import_tensorflow():
    code = (
        "import sys, safetrain.diagnostics, safetrain.doctor.report, safetrain.doctor; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')], sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.fixture
def package(tmp_path, monkeypatch):
    (tmp_path / "lookedup").mkdir()
    (tmp_path / "lookedup" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "lookedup"
    sys.modules.pop("lookedup", None)


@pytest.mark.parametrize("looked_up_first", [False, True])
def test_the_import_hook_patches_after_the_real_import_even_after_a_look_up(package, looked_up_first):
    # TensorFlow's import looks keras up (importlib.util.find_spec) before anyone imports it: the hook must
    # still patch the module when the real import comes.
    ran = []
    hook = _AfterImport(package, lambda: ran.append(sys.modules[package].VALUE))
    sys.meta_path.insert(0, hook)
    try:
        if looked_up_first:
            assert importlib.util.find_spec(package) is not None
            assert ran == [] and hook in sys.meta_path
        importlib.import_module(package)
        assert ran == [1] and hook not in sys.meta_path
    finally:
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)


IMPORT_ORDERS = {
    "keras first": "import keras\nimport tensorflow as tf\n",
    "tensorflow first": "import tensorflow as tf\nimport keras\n",
    "from tensorflow import keras": "import tensorflow as tf\nfrom tensorflow import keras\n",
    "tf.keras only": "import tensorflow as tf\nkeras = tf.keras\n",
    "safetrain first": "from safetrain import SafeTrainer\nimport keras\nimport tensorflow as tf\n",
}


def test_the_instrumentation_sees_keras_whatever_is_imported_first(tmp_path):
    """One child per import order (in parallel): each must count its model, compile, fit, epochs and predict."""
    from concurrent.futures import ThreadPoolExecutor

    from safetrain import doctor

    body = textwrap.dedent(
        """
        import numpy as np
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        x = np.zeros((64, 4), "float32")
        model.fit(x, x[:, :1], epochs=2, verbose=0)
        model.predict(x, verbose=0)
        """
    )

    def one(item):
        name, header = item
        path = tmp_path / f"order_{len(name)}_{name.split()[0]}.py"
        path.write_text(header + body)
        return name, doctor.run(str(path), echo=False, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        reports = dict(pool.map(one, IMPORT_ORDERS.items()))
    for name, report in reports.items():
        counts = report["diagnosis"]["counts"]
        assert report["exit_code"] == 0, name
        assert (counts["models"], counts["compiles"], counts["fits"], counts["epochs"], counts["predicts"]) == (
            1,
            1,
            1,
            2,
            1,
        ), (name, counts)
        assert report["diagnosis"]["causes"] == [], (name, report["text"])


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGRTMIN"), reason="the census signal needs real-time signals")
def test_a_census_the_sampler_asks_for_is_taken_in_the_scripts_thread(tmp_path):
    # A census from another thread holds a reference (gc.get_objects()) to a tuple the script's thread may be
    # building, and CPython then fails to grow it (SystemError in tape.gradient, seen in CI): the sampler asks
    # the script's thread instead, which takes the census between two of its bytecodes.
    import threading
    import time

    from safetrain.doctor.recorder import Recorder

    rec = Recorder(str(tmp_path / "record.json"))
    taken_in = []
    take = rec.take_census
    rec.take_census = lambda when: (taken_in.append(threading.current_thread()), take(when))
    try:
        rec.census_due = 0.0
        sampler = threading.Thread(target=rec._request_census)
        sampler.start()
        sampler.join()
        deadline = time.monotonic() + 5
        while "first" not in rec.census and time.monotonic() < deadline:
            sum(range(1000))  # bytecodes of the script's thread: the handler runs between two of them
        assert taken_in == [threading.main_thread()] and "first" in rec.census
    finally:
        rec.stop()
    import signal

    assert signal.getsignal(signal.SIGRTMIN + 3) == signal.SIG_IGN  # a late request is ignored, never fatal
