"""Every private Keras/TensorFlow name safetrain uses still exists and does what safetrain relies on.

An upgrade that moves one fails here, naming it, rather than somewhere inside a training run.
"""

import gc
import os
import subprocess
import sys
import weakref

import keras
import numpy as np
import tensorflow as tf
from conftest import make_mlp

from safetrain import _compat


def test_every_private_name_is_importable():
    missing = [name for name in _compat.__all__ if not hasattr(_compat, name)]
    assert missing == []
    for name in (
        "TensorFlowTrainer",
        "potentially_ragged_concat",
        "reduce_per_replica",
        "unscale_loss_for_distribution",
        "get_data_adapter",
        "can_convert_arrays",
        "pythonify_logs",
    ):
        assert getattr(_compat, name) is not None, name
    assert callable(_compat.array_slicing.convert_to_sliceable)
    assert callable(_compat.data_adapter_utils.pack_x_y_sample_weight)


def test_private_attributes_of_a_compiled_model_are_where_safetrain_reads_them():
    model = make_mlp()
    assert _compat.compile_config(model)["loss"] == "mse"
    assert _compat.compiled_loss(model) is not None
    assert _compat.loss_tracker(model) is not None
    assert _compat.call_has_training_arg(model) in (True, False)
    assert _compat.model_strategy(model) is None
    assert _compat.initial_epoch(model) is None
    assert model in list(_compat.flatten_layers(model))
    assert _compat.model_inputs(model) is not None
    x = np.zeros((4, 8), "float32")
    _compat.symbolic_build(model, (tf.TensorSpec([None, 8]), tf.TensorSpec([None, 1])))
    assert model.built and len(model.metrics_variables) > 0  # the loss tracker's (and metrics') variables
    loss = _compat.compute_loss(model, x, np.zeros((4, 1), "float32"), model(x), None, training=False)
    assert float(loss) >= 0
    callbacks = keras.callbacks.CallbackList([], add_history=True, model=model)
    assert isinstance(_compat.history_of(callbacks), keras.callbacks.History)
    assert _compat.flatten_metrics_in_order(model, {"loss": 1.0}) == 1.0


def test_tensorflow_internals_safetrain_uses():
    assert isinstance(_compat.gradient_registry(), dict)
    _compat.clear_kernel_cache()
    keras.random.normal((2,))  # draws from the global seed generator, creating it
    assert _compat.global_seed_state() is not None and _compat.make_global_seed_state() is not None
    function = tf.function(lambda t: t + 1)
    _compat.omit_retracing_warning(function)
    assert getattr(function, "_omit_frequent_tracing_warning", None) is True


def test_importing_safetrain_changes_no_environment_variable():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = (
        "import os, safetrain; from safetrain import SafeTrainer, ProgressBar; "
        "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "None"


def _keras_adapter_order(n, batch_size, shuffle):
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    adapter = ArrayDataAdapter(np.arange(n, dtype="int64"), batch_size=batch_size, shuffle=shuffle)
    return np.concatenate([b.numpy() for b in adapter.get_tf_dataset()])


def test_keras_shuffle_order_is_the_order_of_keras_array_adapter_under_a_global_seed():
    """safetrain derives Keras's shuffle order from TensorFlow's op-seed rule (first unseeded op of a
    function graph gets op seed 0); if TensorFlow or Keras changes either, this fails."""
    from safetrain.data import keras_shuffle_order

    for seed in (0, 1, 1234, 2**31 + 7):
        for n, batch_size in ((10, 4), (97, 16), (64, 64)):
            for shuffle in (True, "batch"):
                keras.utils.set_random_seed(seed)
                expected = _keras_adapter_order(n, batch_size, shuffle)
                assert _compat.tf_global_seed() == seed
                np.testing.assert_array_equal(keras_shuffle_order(n, batch_size, shuffle, seed), expected)


def test_reading_the_global_seed_moves_no_random_state():
    tf.random.set_seed(3)
    reference = float(tf.random.uniform(()))
    tf.random.set_seed(3)
    assert _compat.tf_global_seed() == 3
    assert float(tf.random.uniform(())) == reference
    tf.random.set_seed(None)
    assert _compat.tf_global_seed() is None


def test_memory_maps_can_be_advised_for_random_reads(tmp_path):
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype="float32", shape=(64, 4))
    assert _compat.advise_random_access(mapped) is True  # Linux: NumPy's mmap object takes the advice
    assert _compat.advise_random_access(mapped[8:16]) is True  # a view finds its memory map
    assert _compat.advise_random_access(np.zeros(3)) is False


def test_python_functions_of_a_pipeline_built_eagerly_are_taken_off_the_global_graph():
    def graph():
        g = tf.compat.v1.get_default_graph()
        return getattr(g, "_py_funcs_used_in_graph", [])

    before = len(graph())
    with _compat.python_functions_made() as made:
        ds = tf.data.Dataset.range(3).map(lambda i: tf.numpy_function(lambda v: v * 2, [i], tf.int64))
    # TensorFlow put the function on the global graph (the private list still exists) and it was taken off.
    assert len(made) == 1 and len(graph()) == before
    assert hasattr(tf.compat.v1.get_default_graph(), "_py_funcs_used_in_graph")
    holder = weakref.ref(made[0])
    from safetrain.data.streaming import keep_with

    ds = keep_with(ds, made)
    del made
    assert [int(v) for v in ds] == [0, 2, 4]  # the dataset holds what it calls
    del ds
    gc.collect()
    assert holder() is None  # ...and no longer


def test_the_global_seed_generator_can_be_dropped_and_made_again():
    state = _compat.make_global_seed_state()
    assert _compat.global_seed_state() is state
    _compat.drop_global_seed_state()
    assert _compat.global_seed_state() is None
    assert _compat.make_global_seed_state() is not None  # Keras makes a new one on next use
