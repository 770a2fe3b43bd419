"""Arrays read batch by batch (`array_path="stream"`): the same batches, order and numbers as the in-graph
path and as `model.fit`, with memory that does not grow with the data."""

import gc
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp, regression_data

from safetrain import ConfigurationError, MemoryBudget, SafeTrainer
from safetrain.data import as_batches


def flat_batches(batches, epoch=0):
    return [[t.numpy() for t in tf.nest.flatten(b)] for b in batches.dataset(epoch)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for xa, xb in zip(a, b):
        assert len(xa) == len(xb)
        for ta, tb in zip(xa, xb):
            assert ta.dtype == tb.dtype
            np.testing.assert_array_equal(ta, tb)


RNG = np.random.default_rng(0)
INPUTS = {
    "float64 x, int y": (RNG.standard_normal((203, 5)), RNG.integers(0, 3, (203,)), None),
    "dict x, sample_weight": (
        {"a": RNG.random((203, 2), dtype=np.float32), "b": RNG.integers(0, 9, (203, 3))},
        RNG.random((203, 1), dtype=np.float32),
        RNG.random((203,)),
    ),
    "list x, 3-d rows": ([RNG.random((203, 4, 2)), RNG.random((203, 1))], RNG.random((203, 2)), None),
}


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("shuffle, keras_order", [(False, False), (True, False), ("batch", False), (True, True)])
def test_streamed_batches_are_the_graph_path_batches_in_the_same_order(name, shuffle, keras_order):
    x, y, sw = INPUTS[name]
    kwargs = dict(batch_size=16, shuffle=shuffle, seed=7, keras_order=keras_order)
    graph = as_batches(x, y, sw, array_path="graph", **kwargs)
    stream = as_batches(x, y, sw, array_path="stream", **kwargs)
    assert (graph.path, stream.path) == ("graph", "stream")
    assert stream.element_spec == graph.element_spec and stream.num_batches == graph.num_batches == 13
    for epoch in (0, 3):
        assert_same_batches(flat_batches(stream, epoch), flat_batches(graph, epoch))


def test_class_weight_and_validation_split_stream_as_well():
    x, y = regression_data(n=120)
    labels = (y[:, 0] > 0).astype("int64")
    graph = as_batches(x, labels, class_weight={0: 1.0, 1: 3.0}, batch_size=32, array_path="graph")
    stream = as_batches(x, labels, class_weight={0: 1.0, 1: 3.0}, batch_size=32, array_path="stream")
    assert_same_batches(flat_batches(stream), flat_batches(graph))


def test_a_streamed_fit_gives_model_fit_numbers_with_default_shuffle():
    x, y = regression_data(n=300)
    expected = make_mlp(dropout=0.1).fit(x, y, batch_size=16, epochs=3, validation_split=0.2, verbose=0).history
    trainer = SafeTrainer(make_mlp(dropout=0.1), array_path="stream")
    history = trainer.fit(x, y, batch_size=16, epochs=3, validation_split=0.2, verbose=0).history
    assert trainer.train_batches.path == "stream" and "streamed from" in trainer.train_batches.describe()
    assert history.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(history[key], expected[key], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(trainer.predict(x, verbose=0), trainer.model.predict(x, verbose=0), rtol=1e-6)


def test_rehydration_mid_epoch_stays_bit_identical_when_streaming():
    x, y = regression_data(n=160)

    def run(policies):
        trainer = SafeTrainer(make_mlp(dropout=0.2), policies=policies, array_path="stream")
        history = trainer.fit(x, y, batch_size=16, epochs=2, verbose=0).history
        return trainer, history

    plain, plain_history = run([])
    rehydrated, history = run([MemoryBudget(1.0, action="rehydrate", check_every=3)])  # always over: every 3 steps
    assert rehydrated.rehydrations > 4
    assert history == plain_history
    for a, b in zip(plain.model.get_weights(), rehydrated.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_auto_streams_numpy_arrays_and_memory_maps_and_keeps_tensors_in_graph(tmp_path):
    x, y = regression_data(n=64)
    assert as_batches(x, y).path == "stream"
    assert as_batches(x.astype(str), y).path == "graph"  # strings: Keras's conversion
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype="float32", shape=x.shape)
    mapped[:] = x
    assert as_batches(mapped, y).path == "stream"
    assert as_batches(tf.constant(x), y).path == "graph"  # tensors stay in TensorFlow
    with pytest.raises(ConfigurationError, match=r"array_path='stream' reads numeric NumPy arrays"):
        as_batches(tf.constant(x), y, array_path="stream")
    with pytest.raises(ValueError, match=r"`array_path` must be one of"):
        SafeTrainer(make_mlp(), array_path="disk")


def test_graph_path_refuses_a_copy_bigger_than_available_memory(monkeypatch):
    import psutil

    class Tiny:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    x, y = regression_data(n=64)
    with pytest.raises(ConfigurationError, match=r"needs about .* GiB at its peak .* is available"):
        as_batches(x, y, array_path="graph")
    assert as_batches(x, y, array_path="stream").path == "stream"  # nothing to copy


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, keras
    from safetrain import SafeTrainer
    from safetrain.memory import anon_mb
    path, rows = sys.argv[1], int(sys.argv[2])
    x = np.lib.format.open_memmap(path, mode="w+", dtype="float32", shape=(rows, 256))
    for i in range(0, rows, 65536):
        x[i:i + 65536] = np.float32(i % 7)
    x.flush(); del x
    x = np.load(path, mmap_mode="r")
    y = np.zeros((rows, 1), "float32")
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    trainer = SafeTrainer(model)
    # A first short fit pays for what any first fit costs (the trace, TensorFlow's thread pools and runtime),
    # which is no part of the data: measured, 30-60 MiB here, at times over the bound below on its own.
    trainer.fit(x[:4096], y[:4096], batch_size=256, epochs=1, verbose=0)
    peak = [anon_mb()]
    class Peak(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            peak.append(anon_mb())
    before = anon_mb()
    trainer.fit(x, y, batch_size=256, epochs=1, steps_per_epoch=100, verbose=0, callbacks=[Peak()])
    print(json.dumps({"growth": max(peak) - before, "path": trainer.train_batches.path}))
    """
)


def test_a_memory_mapped_input_is_not_read_into_memory(tmp_path):
    """256 MiB on disk; the in-graph path would add 512 MiB at its peak (measured in a fresh process)."""
    script = tmp_path / "mapped.py"
    script.write_text(MEMORY_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    rows = 256 * 2**20 // (256 * 4)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "x.npy"), str(rows)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["path"] == "stream"
    assert result["growth"] < 64, result  # MiB of anonymous memory added during fit


def test_keras_sequence_of_inputs_kinds_still_take_their_own_paths():
    x, y = regression_data(n=40)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    assert as_batches(ds).path == "adapter"
    assert as_batches([keras.ops.convert_to_numpy(x)], y, array_path="stream").path == "stream"


def test_predict_writes_into_one_array_per_output_or_into_out(tmp_path):
    x, _ = regression_data(n=101)
    model = make_mlp()
    trainer = SafeTrainer(model)
    expected = model.predict(x, batch_size=8, verbose=0)
    got = trainer.predict(x, batch_size=8, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.shape == (101, 1) and got.base is None  # one allocation, not a concatenation's view
    out = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype="float32", shape=(101, 1))
    assert trainer.predict(x, batch_size=8, verbose=0, out=out) is out
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"`out=` must hold NumPy arrays \(or memmaps\) of shape \(101, 1\)"):
        trainer.predict(x, batch_size=8, verbose=0, out=np.zeros((100, 1), "float32"))


def test_validation_split_takes_views_not_copies(tmp_path):
    from safetrain.data import split_validation

    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype="float32", shape=(100, 4))
    y = np.zeros((100, 1), "float32")
    (tx, ty, _), (vx, vy, _) = split_validation(mapped, y, None, 0.2)
    assert (tx.shape, vx.shape) == ((80, 4), (20, 4))
    assert np.shares_memory(tx, mapped) and np.shares_memory(vx, mapped) and np.shares_memory(vy, y)
    assert as_batches(tx, ty).path == "stream"


class H5Like:
    """What an `h5py.Dataset` offers: shape, dtype, len, and rows by a slice or a sorted index array."""

    def __init__(self, array):
        self._array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads = []

    def __len__(self):
        return len(self._array)

    def __getitem__(self, index):
        if not isinstance(index, slice):
            assert np.all(np.diff(index) > 0), "h5py needs increasing indices"
        self.reads.append(index)
        return self._array[index]


def test_an_h5py_style_array_is_streamed_in_sorted_reads():
    x, y = regression_data(n=100)
    h5 = H5Like(x)
    graph = as_batches(x, y, batch_size=16, shuffle=True, seed=3, array_path="graph")
    stream = as_batches(h5, y, batch_size=16, shuffle=True, seed=3)
    assert stream.path == "stream"
    assert_same_batches(flat_batches(stream), flat_batches(graph))
    assert h5.reads  # read from the object itself, batch by batch


def test_pandas_frames_and_series_are_streamed_as_their_numpy_views():
    # pandas is not in the test extras: with it installed, Keras's predict-in-a-loop stops growing, and the
    # doctor's known-answer script for that leak (examples/leaky/predict_in_loop.py) has nothing to find.
    pd = pytest.importorskip("pandas")
    x, y = regression_data(n=90)
    frame, series = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])]), pd.Series(y[:, 0])
    stream = as_batches(frame, series, batch_size=16, shuffle=True, seed=5)
    graph = as_batches(x, y[:, 0], batch_size=16, shuffle=True, seed=5, array_path="graph")
    assert stream.path == "stream"
    assert_same_batches(flat_batches(stream), flat_batches(graph))
    expected = make_mlp().fit(x, y[:, 0], batch_size=16, epochs=2, verbose=0).history["loss"]
    got = SafeTrainer(make_mlp()).fit(frame, series, batch_size=16, epochs=2, verbose=0).history["loss"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_read_ahead_is_bounded_in_bytes_and_small_rows_keep_16_batches_per_call():
    from safetrain.data.streaming import GROUP, READ_AHEAD_BYTES, read_ahead

    assert read_ahead(256 * 4096) == (GROUP, 2, 2)  # 4 KiB rows, batch 256: as before
    assert read_ahead(32 * 128) == (GROUP, 2, 2)
    for batch_bytes in [1, 2**10, 2**20, 3 * 2**20, 12 * 2**20, 48 * 2**20, 147 * 2**20, 2**33]:
        group, calls, waiting = read_ahead(batch_bytes)
        assert 1 <= group <= GROUP and calls >= 1 and waiting >= 0
        held = group * batch_bytes * (calls + waiting)
        assert held <= max(READ_AHEAD_BYTES, batch_bytes), (batch_bytes, group, calls, waiting)


def test_a_pipeline_of_huge_rows_reads_one_batch_per_call_and_no_further_ahead(monkeypatch):
    from safetrain.data import streaming

    x = np.broadcast_to(np.float32(1), (48, 1024, 1024))  # 4 MiB rows (no memory: every row is the same)
    y = np.arange(48, dtype="float32")
    reader = streaming.ArrayReader.of((x, y, None))
    group, calls, waiting = streaming.read_ahead(16 * 4 * 2**20)  # batches of 16 rows: 64 MiB
    assert (group, calls, waiting) == (1, 1, 0)
    reads = []
    monkeypatch.setattr(
        reader, "read", lambda indices: reads.append(len(indices)) or reader.read_slice(0, len(indices))
    )
    ahead = []
    for consumed, batch in enumerate(reader.dataset(np.arange(48)[::-1].copy(), 16), start=1):
        assert batch[0].shape == (16, 1024, 1024)
        ahead.append(len(reads) - consumed)
    assert reads == [16] * 3  # one batch per Python call
    assert max(ahead) <= calls + waiting  # never more than that read beyond the batch in hand


FIT_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np, keras
    from safetrain import SafeTrainer
    from safetrain.memory import anon_mb
    rows, batch = 4096, 256
    x = np.empty((rows, 96, 96, 3), "float32")  # 108 KiB rows: 432 MiB, 27 MiB a batch
    x[:] = 0.5
    y = np.zeros((rows, 1), "float32")
    model = keras.Sequential([keras.Input((96, 96, 3)), keras.layers.Conv2D(4, 8, strides=8),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    trainer = SafeTrainer(model)
    trainer.fit(x[: 2 * batch], y[: 2 * batch], batch_size=batch, epochs=1, verbose=0)  # first-fit costs
    peak = [anon_mb()]
    class Peak(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            peak.append(anon_mb())
    before = anon_mb()
    trainer.fit(x, y, batch_size=batch, epochs=2, verbose=0, callbacks=[Peak()])
    print(json.dumps({"growth": max(peak) - before, "path": trainer.train_batches.path}))
    """
)


def test_a_fit_over_image_sized_rows_adds_a_few_batches_not_groups_of_16(tmp_path):
    """Measured in fresh processes: +453 MiB when 16 batches were read per call whatever they weighed (the whole
    432 MiB at once); read by bytes, +168 to +303 MiB over 10 runs (median +202: glibc's heaps vary). The bound
    is the target of the streamed path: 5% of the data, 4 batches and 256 MiB."""
    script = tmp_path / "fit_memory.py"
    script.write_text(FIT_MEMORY_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["path"] == "stream"
    assert result["growth"] < 0.05 * 432 + 4 * 27 + 256, result  # MiB of anonymous memory added during fit


def test_batches_are_read_into_arrays_that_tf_data_takes_without_a_copy():
    # Reads go into 64-byte-aligned arrays, which a tf.numpy_function in a tf.data pipeline hands on as they
    # are (an unaligned array is copied): a batch is held once. If a TensorFlow upgrade changes this, the
    # streamed path holds each batch twice again and this fails.
    from safetrain.data.streaming import ArrayReader

    x = np.arange(64 * 1000, dtype="float32").reshape(64, 1000)
    reader = ArrayReader((x, None, None))
    for rows in (reader.read(np.array([5, 1, 9])), reader.read_slice(2, 6)):
        assert rows[0].ctypes.data % 64 == 0
    kept = {}

    def read(i):
        kept["rows"] = reader.read(np.array([3, 0]))[0]
        return kept["rows"]

    ds = tf.data.Dataset.range(1).map(lambda i: tf.numpy_function(read, [i], tf.float32))
    batch = next(iter(ds))
    kept["rows"][0, 0] = -1.0  # written after TensorFlow took the array: seen in the tensor only if shared
    assert float(batch.numpy()[0, 0]) == -1.0


def test_streamed_fits_keep_neither_their_epochs_orders_nor_earlier_fits_arrays():
    # TensorFlow ties a pipeline's Python functions to the global graph; each pass's reader held the pass's
    # order (8 bytes per sample) and the arrays: a shuffled fit over 2M rows grew 16 MiB per epoch. (TensorFlow
    # still holds the last pipeline's function until the next one: the last fit's arrays, never more.)
    import weakref

    graph = tf.compat.v1.get_default_graph()
    held_before = len(getattr(graph, "_py_funcs_used_in_graph", []))
    model = make_mlp(4)
    refs = []
    for seed in range(3):
        x, y = regression_data(n=256, d=4, seed=seed)
        refs.append((weakref.ref(x), weakref.ref(y)))
        trainer = SafeTrainer(model, array_path="stream")
        trainer.fit(x, y, batch_size=32, epochs=3, validation_split=0.25, verbose=0)
        assert trainer.train_batches.path == "stream"
        del trainer, x, y
        gc.collect()
        assert len(getattr(graph, "_py_funcs_used_in_graph", [])) == held_before
    assert [r() is None for pair in refs[:-1] for r in pair] == [True] * 4
