"""The training loop: `fit`, `evaluate` and `predict` as named stages, with one event dispatcher.

    fit ─► train_begin ─► for each epoch: epoch_begin ─► run_pass("train") ─► validate ─► epoch_end ─► train_end
    run_pass ─► run_chunk ... (each chunk is many compiled steps) until a `StopPass`

Callbacks, policies and the progress bar (an ordinary callback) all hear the same `Events`. How a pass, an
epoch or a run ends is an exception (`StopPass`, `StopTraining`) caught in one place, not flags threaded
through the loop. The trainer is read afresh after every stage: a policy may have re-hydrated its model.

Example (what `SafeTrainer.fit` does once its arguments are checked):
    >>> loop = Loop(trainer, callbacks, verbose=0, epochs=3, steps=train.num_batches, add_history=True)
    >>> history = loop.fit(train, val, epochs=3, initial_epoch=0, steps_per_epoch=None, validation_steps=None,
    ...                    validation_freq=1)
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterable, Iterator

import keras
import numpy as np
import tensorflow as tf
from keras import tree
from keras.callbacks import CallbackList

from safetrain import _compat, distributed, microbatch, preemption
from safetrain.data import Batches
from safetrain.epochs import EpochIterator
from safetrain.errors import StopPass, StopTraining, step_error
from safetrain.events import Events
from safetrain.graph_loops import ChunkSizer
from safetrain.progress import ProgressBar

__all__ = ["Loop", "catch_stop", "concat"]

# What a failing step raises when its data (or the model on that data) is at fault; named by `step_error`.
_STEP_FAILURES = (
    tf.errors.InvalidArgumentError,
    tf.errors.UnknownError,
    tf.errors.FailedPreconditionError,
    tf.errors.CancelledError,
)
_CALLS = {"train": "fit", "test": "evaluate", "predict": "predict"}


@contextlib.contextmanager
def catch_stop(kind: type[BaseException] = StopPass) -> Iterator[None]:
    """The one place a pass (or a run, with `StopTraining`) ends early: the stage raising it is done."""
    try:
        yield
    except kind:
        pass


def _all_finite(logs) -> bool:
    """True when every float scalar in a step's outputs is finite (one device read per chunk)."""
    values = [v for v in tree.flatten(logs) if hasattr(v, "dtype") and v.dtype.is_floating and v.shape.rank == 0]
    return bool(np.all(np.isfinite([float(v) for v in values]))) if values else True


class Loop:
    """Runs the trainer's compiled steps over batches, stage by stage. One per call of fit/evaluate/predict."""

    def __init__(
        self,
        trainer,
        callbacks: Iterable | None,
        *,
        verbose: int,
        epochs: int = 1,
        steps: int | None = None,
        add_history: bool = False,
    ) -> None:
        self.trainer = trainer
        callbacks, self._cleanup = distributed.callbacks_for_worker(trainer.strategy, callbacks)
        callbacks = list(callbacks or [])
        # One progress bar per run, the chief's; an ordinary callback, last so that it shows every key.
        self.bar = ProgressBar(verbose) if verbose and trainer.is_chief else None
        if self.bar is not None:
            callbacks.append(self.bar)
        self.callbacks = CallbackList(
            callbacks,
            add_history=add_history,
            add_progbar=False,
            verbose=verbose,
            epochs=epochs,
            steps=steps,
            model=trainer.model,
        )
        self.events = Events(trainer, self.callbacks)
        self.last_logs = None  # the last step's logs of the pass running (train and test)
        self._chunk_sizers: dict[str, ChunkSizer] = {}
        # A callback may call evaluate/predict inside a fit: that inner run must leave the fit's state alone.
        self._outer = (trainer.callbacks, trainer.progress.position)
        self._fitting = False
        self.signals = preemption.SignalWatch()  # active while `fit` runs (SIGTERM and SIGINT at step boundaries)

    # -- fit --------------------------------------------------------------------------------------------------
    def fit(
        self,
        train: Batches,
        val: Batches | None,
        *,
        epochs: int,
        initial_epoch: int,
        steps_per_epoch,
        validation_steps,
        validation_freq,
    ) -> keras.callbacks.History:
        trainer, events = self.trainer, self.events
        data = EpochIterator(train, self._in_executions(steps_per_epoch), trainer.strategy)
        self._fitting = True
        trainer.watch_nonfinite(trainer.policies.watches_nonfinite)
        trainer.model.stop_training = False
        trainer.progress.epochs_target = epochs
        trainer.callbacks = self.callbacks
        logs = None
        stopped: preemption.Interrupted | None = None
        saved = None
        try:
            try:
                self.signals.__enter__()
                events.train_begin()
                start, resume = self._starting_point(initial_epoch)
                trainer.progress.position = data.position
                with catch_stop(StopTraining):
                    try:
                        for epoch in range(start, epochs):
                            trainer.progress.epoch = epoch
                            if resume is None or resume.epoch_steps == 0:
                                trainer.model.reset_metrics()  # a resumed half epoch keeps its metric state
                            events.epoch_begin(epoch)
                            if resume is not None and resume.pass_batches:
                                data.resume(epoch, resume)
                            else:
                                data.start(epoch)
                            resume = None
                            logs = self.train_epoch(data, epoch, first=epoch == start)
                            if val is not None and _due(epoch, validation_freq):
                                logs.update({f"val_{k}": v for k, v in self.evaluate(val, validation_steps).items()})
                            logs = self.epoch_end(epoch, logs)
                            self.check_signals()
                            if trainer.model.stop_training:
                                raise StopTraining
                    except preemption.Interrupted as interrupted:
                        stopped, saved = interrupted, self.save_on_signal(interrupted.signum)
                model = trainer.model
                if isinstance(model.optimizer, keras.optimizers.Optimizer) and epochs > 0:
                    model.optimizer.finalize_variable_values(model.trainable_weights)
            finally:
                trainer.policies.on_train_end(trainer)  # also after an error: policies undo what they set
            self.callbacks.on_train_end(logs=logs)
        finally:
            self.close()
            self.signals.__exit__(None, None, None)  # the handlers the process had before, from here on
        if stopped is not None:
            self.signals.deliver(stopped.signum, saved)  # exits, unless the user's own handler says otherwise
        return trainer.model.history

    def check_signals(self) -> None:
        """At a step boundary of `fit`: raise `Interrupted` when a watched signal arrived (in a multi-worker
        run, on any worker: all stop at the same step)."""
        if not self.signals.active:
            return
        signum = preemption.agreed_signal(self.trainer.strategy, self.signals.pending())
        if signum is not None:
            raise preemption.Interrupted(signum)

    def save_on_signal(self, signum: int) -> str | None:
        """Training stopped for `signum` at a step boundary: write the checkpoint of that step (SIGTERM; SIGINT
        where `Checkpoint(save_on_interrupt=True)`); returns its path (None: no checkpoint, or not the chief)."""
        from safetrain.policies import Checkpoint

        policy = self.trainer.policies.find(Checkpoint)
        if not isinstance(policy, Checkpoint):
            return None
        if signum == signal.SIGINT and not policy.save_on_interrupt:
            return None
        return policy.save(self.trainer)

    def _in_executions(self, steps: int | None) -> int | None:
        """Keras counts a fixed `steps_per_execution` > 1 in whole executions: `steps` is rounded up to a
        multiple of it (each execution runs that many steps unless the data ends first)."""
        per_call = self.trainer.steps_per_execution
        if steps is None or not isinstance(per_call, int) or per_call <= 1:
            return steps
        return -(-steps // per_call) * per_call

    def _starting_point(self, initial_epoch: int):
        """The first epoch, and the data position to resume at when a checkpoint was loaded (else None)."""
        trainer = self.trainer
        resumed = trainer.take_resume()
        if resumed is None:
            return _compat.initial_epoch(trainer.model) or initial_epoch, None
        history = _compat.history_of(self.callbacks)
        if resumed.get("history") is not None and history is not None:
            history.epoch = list(resumed["history"]["epoch"])
            history.history = {k: list(v) for k, v in resumed["history"]["history"].items()}
        return trainer.progress.epoch, resumed["position"]

    def train_epoch(self, data: EpochIterator, epoch: int, first: bool) -> dict:
        logs = self.run_pass("train", data, self.chunk_sizer("train"))
        logs = self.call_past_end(data) or logs
        steps_done = data.steps_done
        data.finish(stopped=self.trainer.model.stop_training)
        if steps_done == 0 and first and data.num_batches in (None, 0):
            raise ValueError("fit: `x` yielded no batches; there is nothing to train on.")
        return dict(_epoch_logs(self.trainer.model, logs))

    def call_past_end(self, data: EpochIterator):
        """At the end of a pass over data of unknown length, the call `model.fit` makes on the exhausted iterator
        (with Keras's `steps_per_execution` of 1): `on_train_batch_begin` for it, and the state it leaves (see
        `CompiledStep.run_past_end`). Returns the logs when the data had one more batch after all, else None."""
        trainer = self.trainer
        if getattr(trainer.model, "steps_per_execution", 1) != 1:
            return None
        if not data.calls_past_end(trainer.model.stop_training):
            return None
        first = data.steps_done
        self.events.chunk_begin("train", first)
        ran, outputs = trainer.steps["train"].run_past_end(data.iterator)
        if not ran:
            # In Keras's train_step `iterations += 1` waits for nothing, so it runs before the missing batch stops
            # the call; ours waits for the gradients (a step that fails part-way changes nothing). A
            # LossScaleOptimizer applies (and counts) inside a cond on the gradients: nothing to add there.
            optimizer = trainer.model.optimizer
            if (
                not trainer.has_custom("train_step")
                and isinstance(optimizer, keras.optimizers.Optimizer)
                and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
            ):
                optimizer.iterations.assign_add(1)
            return None
        data.advance(1, 1)
        trainer.progress.global_step += 1
        self.events.chunk_end("train", first, outputs)
        return outputs

    def epoch_end(self, epoch: int, logs: dict) -> dict:
        trainer = self.trainer
        logs = _compat.pythonify_logs(logs)
        sample = trainer.sample_memory(epoch)
        trainer.memory.append(sample)
        if trainer.memory_logs:
            logs.update(sample.as_logs())
            if trainer.progress.microbatch_size is not None:
                logs["microbatch_size"] = trainer.progress.microbatch_size
        self.events.epoch_end(epoch, logs, sample)
        return logs

    def close(self) -> None:
        """After the run, also after an error: the bar is closed, worker-only folders removed."""
        if self.bar is not None:
            self.bar.close()
        if self._fitting:
            self.trainer.watch_nonfinite(False)  # on only while a fit whose policies watch runs
        self.trainer.callbacks, self.trainer.progress.position = self._outer
        self._cleanup()

    # -- evaluate and predict ------------------------------------------------------------------------------
    def evaluate(self, batches: Batches, steps: int | None) -> dict:
        """One evaluation pass (on its own, or validation inside fit); returns the logs as Python numbers."""
        trainer = self.trainer
        trainer.model.reset_metrics()
        trainer.model.stop_evaluating = False
        self.callbacks.on_test_begin()
        data = EpochIterator(batches, self._in_executions(steps), trainer.strategy, direct=True)
        data.start(0)
        try:
            logs = self.run_pass("test", data, self.chunk_sizer("test"))
        finally:
            data.finish(stopped=trainer.model.stop_evaluating)
        logs = _compat.pythonify_logs(_epoch_logs(trainer.model, logs))
        self.callbacks.on_test_end(logs)
        return logs

    def predict(self, batches: Batches, steps: int | None, out=None):
        """One prediction pass; returns the outputs (the structure the model gives, as NumPy; ragged and sparse
        outputs as tensors). With a known number of samples, dense outputs are written into one array per
        output as they come (or into `out`), not gathered in pieces and concatenated (two copies at the peak).
        """
        trainer = self.trainer
        collected = PredictOutputs(batches.num_samples if steps is None else None, out)
        keep = collected.add

        trainer.model.stop_predicting = False
        self.callbacks.on_predict_begin()
        data = EpochIterator(batches, self._in_executions(steps), trainer.strategy, direct=True)
        data.start(0)
        try:
            self.run_pass("predict", data, self.chunk_sizer("predict"), on_output=keep)
        finally:
            data.finish(stopped=trainer.model.stop_predicting)
        self.callbacks.on_predict_end()
        return collected.result()

    # -- one pass, chunk by chunk --------------------------------------------------------------------------
    def chunk_sizer(self, kind: str) -> ChunkSizer:
        """Steps per compiled call for passes of `kind`: one when a callback needs every step (as Keras).

        One sizer per kind for the whole run, so that "auto" keeps the size it learned from epoch to epoch.
        """
        sizer = self._chunk_sizers.get(kind)
        if sizer is not None:
            return sizer
        trainer = self.trainer
        agree = None
        if distributed.is_multi_worker(trainer.strategy):  # every worker must run the same chunks

            def agree(size: int) -> int:
                return int(distributed.min_across_workers(trainer.strategy, size))

        if self.events.per_step[kind] and trainer.steps_per_execution == "auto":
            sizer = ChunkSizer(1)
        else:
            sizer = ChunkSizer(trainer.steps_per_execution, agree=agree)
        self._chunk_sizers[kind] = sizer
        return sizer

    def run_pass(self, kind: str, data: EpochIterator, chunks: ChunkSizer, on_output: Callable | None = None):
        """Run chunks of `kind` until the data ends or something stops the pass; returns the last logs."""
        self.last_logs = None
        with catch_stop():
            while True:
                self.run_chunk(kind, data, chunks, on_output)
        return self.last_logs

    def run_chunk(self, kind: str, data: EpochIterator, chunks: ChunkSizer, on_output: Callable | None) -> None:
        """One compiled call of up to `chunks.next()` steps, then its events (`last_logs` holds the last
        step's logs); raises `StopPass` when the pass is done."""
        trainer, events = self.trainer, self.events
        remaining = data.remaining()
        if remaining == 0:
            raise StopPass
        counting = kind == "train" and trainer.model.optimizer is not None
        boundary = trainer.policies.steps_to_next_batch_hook(trainer.progress.global_step) if kind == "train" else None
        step = trainer.steps[kind]
        n = chunks.next(remaining, boundary)
        n = min(n, step.chunk_limit(data.element_spec, remaining is not None) or n)
        first = data.steps_done
        events.chunk_begin(kind, first)
        before = _iterations(trainer.model) if counting else None
        t0 = time.perf_counter()
        cut = False
        try:
            if data.batch is not None:  # one small batch: the step on it directly, no tf.data iterator
                ran, outputs = 1, step.run_step(data.batch, data.element_spec)
            else:
                ran, outputs = step.run(data.iterator, n, data.element_spec, remaining=remaining)
        except tf.errors.ResourceExhaustedError as error:
            if before is None or not trainer.oom_recovery:
                raise
            # The data is advanced past the completed steps and the retried batch by the recovery itself.
            ran, outputs = microbatch.recover_from_oom(
                trainer, data, ran_before_failure=(_iterations(trainer.model) - before), error=error
            )
            n = ran
            nonfinite = step.watch_nonfinite and not _all_finite(outputs)
        except _STEP_FAILURES as error:
            if isinstance(error, distributed.COLLECTIVE_ERRORS) and distributed.is_multi_worker(trainer.strategy):
                raise  # a peer failed, not this data: `fit` reports it as WorkerFailure
            raise self._step_error(kind, data, before, n, error) from error
        else:
            chunks.observe(ran, n, time.perf_counter() - t0)
            # A chunk cut short by a non-finite loss, or by a signal's stop request, did not run out of data.
            nonfinite = kind == "train" and step.watch_nonfinite and ran > 0 and not _all_finite(outputs)
            cut = ran < n and kind == "train" and step.stops_early and preemption.stop_requested()
            data.advance(ran, ran if nonfinite or cut else n)
        if ran:
            # With a fixed steps_per_execution, batch callbacks hear the step numbers Keras gives them: the
            # chunk's `begin + steps_per_execution - 1` even when the data ended earlier (Keras 3.11+), or
            # its first step (before).
            fixed = trainer.steps_per_execution
            if not isinstance(fixed, int):
                last = first + ran - 1
            else:
                last = first + fixed - 1 if _compat.BATCH_END_IS_LAST_STEP else first
            if kind == "predict":
                if on_output is not None:
                    on_output(outputs)
                events.chunk_end(kind, last, {"outputs": outputs})
            else:
                logs = self.last_logs = outputs
                events.chunk_end(kind, last, logs)
            if kind == "train":
                trainer.progress.global_step += ran
                if nonfinite:
                    events.nonfinite(trainer.progress.epoch, last, logs)
                events.train_steps_done()
        ended = ran < n and not cut or data.remaining() == 0  # the pass is over: stop after its epoch's end
        if kind == "train" and self._fitting and not ended:
            self.check_signals()  # every step that ran is counted: stop here, at this exact step
        if ran < n or _stopped(trainer.model, kind):
            raise StopPass

    def _step_error(
        self, kind: str, data: EpochIterator, iterations_before: int | None, n: int, error: Exception
    ) -> Exception:
        """A step failed on its data: say where (epoch, batch) and why, keeping the original's class."""
        start = data.steps_done
        if iterations_before is not None:
            where = f"batch {start + _iterations(self.trainer.model) - iterations_before}"
        else:
            where = f"batch {start}" if n == 1 else f"batches {start}-{start + n - 1}"
        cause = _error_line(str(getattr(error, "message", error))) or type(error).__name__
        epoch = f"epoch index {self.trainer.progress.epoch}, " if kind == "train" else ""
        return step_error(error, f"{_CALLS[kind]}: {epoch}{where} failed: {cause}")


def _iterations(model) -> int:
    # `.numpy()`: under a distribution strategy the variable is a MirroredVariable, which int() refuses.
    return int(model.optimizer.iterations.numpy())


def _epoch_logs(model, logs) -> dict:
    """Epoch logs: the model's metric results when the step returned them (as Keras does), else the last
    step's logs (custom steps returning other keys)."""
    metric_logs = model.get_metrics_result()
    if isinstance(logs, dict) and set(logs) == set(metric_logs):
        return metric_logs
    return logs if logs is not None else {}


class PredictOutputs:
    """Where `predict` puts its outputs, chunk by chunk.

    With `total` samples known and dense outputs, each output leaf is one array of `total` rows (allocated at
    the first chunk, or the caller's `out`: a NumPy array or memmap, or a structure of them), filled as chunks
    come. Otherwise (ragged or sparse outputs, an unknown count) chunks are kept and concatenated at the end.
    """

    def __init__(self, total: int | None, out=None) -> None:
        self.total, self.out = total, out
        self.buffers: list[np.ndarray] | None = None
        self.structure = None
        self.pieces: list = []
        self.rows = 0

    def add(self, outputs) -> None:
        leaves = tree.flatten(outputs)
        dense = all(isinstance(t, tf.Tensor) and t.shape.rank for t in leaves)
        if self.pieces or self.total is None or not dense:
            if self.out is not None:
                raise ValueError("predict: `out=` needs an input with a known number of samples and dense outputs.")
            self.pieces.append(
                tree.map_structure(
                    lambda t: t if isinstance(t, (tf.RaggedTensor, tf.SparseTensor)) else t.numpy(), outputs
                )
            )
            return
        if self.buffers is None:
            self.structure = outputs
            self.buffers = self._allocate(leaves)
        n = int(leaves[0].shape[0])
        for buffer, leaf in zip(self.buffers, leaves):
            buffer[self.rows : self.rows + n] = leaf.numpy()
        self.rows += n

    def _allocate(self, leaves) -> list[np.ndarray]:
        assert self.total is not None
        if self.out is None:
            return [np.empty((self.total, *t.shape[1:]), t.dtype.as_numpy_dtype) for t in leaves]
        given = tree.flatten(self.out)
        if len(given) != len(leaves):
            raise ValueError(f"predict: `out=` has {len(given)} array(s) but the model gives {len(leaves)} output(s).")
        for g, t in zip(given, leaves):
            want = (self.total, *t.shape[1:])
            if not isinstance(g, np.ndarray) or tuple(g.shape) != want:
                raise ValueError(
                    f"predict: `out=` must hold NumPy arrays (or memmaps) of shape {want} for this input, got "
                    f"{type(g).__name__} of shape {getattr(g, 'shape', None)}."
                )
        return list(given)

    def result(self):
        if self.buffers is not None:
            views = [b if self.rows == len(b) else b[: self.rows] for b in self.buffers]
            return tree.pack_sequence_as(self.structure, views)
        if not self.pieces:
            return None
        return tree.map_structure_up_to(self.pieces[0], lambda *parts: concat(list(parts)), *self.pieces)


def concat(parts: list):
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        if all(p.shape[1:] == parts[0].shape[1:] for p in parts):
            return np.concatenate(parts, axis=0)
        out = _compat.potentially_ragged_concat([tf.convert_to_tensor(p) for p in parts])
        return out.numpy() if hasattr(out, "numpy") and not isinstance(out, tf.RaggedTensor) else out
    return _compat.potentially_ragged_concat(
        [tf.convert_to_tensor(p) if isinstance(p, np.ndarray) else p for p in parts]
    )


def _stopped(model, kind: str) -> bool:
    flag = {"train": "stop_training", "test": "stop_evaluating", "predict": "stop_predicting"}[kind]
    return bool(getattr(model, flag, False))


def _due(epoch: int, validation_freq) -> bool:
    if isinstance(validation_freq, int):
        return (epoch + 1) % validation_freq == 0
    return (epoch + 1) in validation_freq


def _error_line(message: str) -> str:
    """The line of a TensorFlow error that says what went wrong (not its traceback or node names)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    skip = ("File ", "[[", "Detected at node", "Graph execution error", "Traceback (most recent", "[Op:")
    useful = [ln for ln in lines if not ln.startswith(skip) and "(most recent call last)" not in ln]
    line = useful[-1] if useful else (lines[0] if lines else "")
    return line.split("[[")[0].strip()
