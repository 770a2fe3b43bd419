"""`python -m safetrain plan train.py`: the memory plan of a training script's first `fit`, made before any
step and without training.

    python -m safetrain plan train.py --epochs 20                  # the script's own arguments follow it
    python -m safetrain plan --budget 4096 train.py                # and what a budget of 4096 MiB allows
    python -m safetrain plan --batch-size 1024 --json plan.json train.py

The script runs in this process, unmodified, up to its first `fit` (`keras.Model.fit` or `SafeTrainer.fit`):
what comes before it (loading data, building and compiling the model) runs as usual. That call is replaced by
`SafeTrainer.plan_memory` with the same data, batch size and sample weights (a dataset's or `PyDataset`'s
batch size read from its first batch where its spec leaves it open); the plan's table is printed and
the script stops there. No step trains, and memory is that of the script at its `fit`, its data included.
Patches go in as the script imports Keras and safetrain, so what it sets first (environment variables such as
`TF_ENABLE_ONEDNN_OPTS`) still applies; like the doctor, this module imports neither itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from safetrain.scripts import after_import, as_main, run_script

__all__ = ["plan_script", "main"]


class _Planned(BaseException):
    """Stops the script once its first fit is planned (a BaseException: the script's own `except Exception`
    must not catch it and train on)."""

    def __init__(self, result: dict) -> None:
        super().__init__("planned")
        self.result = result


def _first_batch_size(x) -> int | None:
    """The size of the first batch a `tf.data.Dataset` or `PyDataset` yields, where its spec leaves the batch
    dimension open (a last partial batch): `plan_memory` does not iterate a dataset (that would move its
    shuffling), but here the script stops after the plan."""
    import keras
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        if all(s.shape.rank and s.shape[0] is not None for s in tf.nest.flatten(x.element_spec)):
            return None  # the spec says it
        first = next(iter(x))
    elif isinstance(x, keras.utils.PyDataset):
        first = x[0]
    else:
        return None
    sizes = [t.shape[0] for t in tf.nest.flatten(first) if len(getattr(t, "shape", ()) or ())]
    return int(sizes[0]) if sizes else None


def _plan_instead(fit, api: str, batch_size: int | None, budget: float | str | None):
    """`fit` replaced by a call that plans it, from where the script called it, and stops the script."""
    signature = inspect.signature(fit)

    @functools.wraps(fit)
    def planned(self, *args, **kwargs):
        from safetrain.plan import resolve_budget
        from safetrain.trainer import SafeTrainer

        caller = sys._getframe(1)
        given = signature.bind(self, *args, **kwargs).arguments
        trainer = self if isinstance(self, SafeTrainer) else SafeTrainer(self)
        plan = trainer.plan_memory(
            given.get("x"),
            given.get("y"),
            batch_size=batch_size or given.get("batch_size") or _first_batch_size(given.get("x")),
            sample_weight=given.get("sample_weight"),
        )
        raise _Planned(
            dict(
                plan=plan,
                budget_mb=resolve_budget(budget if budget is not None else trainer.memory_budget_mb),
                api=api,
                where=f"{caller.f_code.co_filename}:{caller.f_lineno}",
            )
        )

    return planned


def plan_script(
    script: str, args: Sequence[str] = (), *, batch_size: int | None = None, budget_mb: float | str | None = None
) -> dict | None:
    """Run `script` with `args` up to its first `fit` and plan that fit instead of running it.

    Returns `{"plan": MemoryPlan, "budget_mb": MiB or None, "api": "Model.fit" or "SafeTrainer.fit",
    "where": "file:line"}`, or None when the script ended without calling `fit`. `batch_size` plans for that
    batch size instead of the script's; `budget_mb` (MiB or "auto") is the budget the table's last rows judge
    (default: the script's `SafeTrainer(memory_budget_mb=...)`, if any). The script's own exceptions, and
    `SystemExit` before its `fit`, propagate; `sys.argv`, `sys.path` and every patch are put back after.

    Example:
        >>> result = plan_script("train.py", ["--epochs", "5"], budget_mb=4096)
        >>> result["plan"].peak_mb, result["plan"].max_batch_size(4096)
        (1437.2, 3310)
    """
    if not os.path.isfile(script):
        raise ValueError(f"`script`: no such file: {script!r}")
    patched: list[tuple[type, Any]] = []

    def patch(cls_of, api: str):
        def run() -> None:
            cls = cls_of()
            patched.append((cls, cls.__dict__.get("fit")))
            cls.fit = _plan_instead(cls.fit, api, batch_size, budget_mb)

        return run

    def keras_model():
        import keras

        return keras.Model

    def safe_trainer():
        from safetrain.trainer import SafeTrainer

        return SafeTrainer

    removers = [
        after_import("keras", patch(keras_model, "Model.fit")),
        after_import("safetrain.trainer", patch(safe_trainer, "SafeTrainer.fit")),
    ]
    try:
        with as_main(script, args) as module:
            run_script(module)
    except _Planned as planned:
        return planned.result
    finally:
        for remove in removers:
            remove()
        for cls, original in reversed(patched):
            if original is None:
                del cls.fit
            else:
                cls.fit = original
    return None


def _plan_json(result: dict) -> dict:
    plan, budget = result["plan"], result["budget_mb"]
    out = dict(dataclasses.asdict(plan), peak_mb=plan.peak_mb, per_sample_mb=plan.per_sample_mb)
    out.update(api=result["api"], where=result["where"], budget_mb=budget)
    if budget is not None:
        size, least = plan.choose(budget)
        out.update(microbatch_size=size, least_pipeline=least, max_batch_size=plan.max_batch_size(budget))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m safetrain plan [--batch-size N] [--budget MIB|auto] [--json F] script.py [script args]`."""
    p = argparse.ArgumentParser(
        prog="safetrain plan",
        description="Run a training script up to its first fit and print the memory plan of that fit, "
        "without training: what does not grow with the batch, what does, the predicted peak.",
    )
    p.add_argument("--batch-size", type=int, default=None, help="plan for this batch size instead of the script's")
    p.add_argument(
        "--budget",
        default=None,
        metavar="MIB",
        help='a memory budget in MiB, or "auto" (what the machine has free, less a margin): what it allows '
        "(whole batches, microbatches of N, or not even one sample) and the largest batch under it",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan here")
    p.add_argument("script", help="the Python script to run up to its first fit")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    a = p.parse_args(argv)
    budget: float | str | None = a.budget
    if budget is not None and budget != "auto":
        try:
            budget = float(budget)
        except ValueError:
            p.error(f'--budget: expected a number of MiB or "auto", got {a.budget!r}')
        if budget <= 0:
            p.error(f"--budget: expected a positive number of MiB, got {a.budget!r}")
    if a.batch_size is not None and a.batch_size < 1:
        p.error(f"--batch-size: expected a positive integer, got {a.batch_size}")
    if not os.path.isfile(a.script):
        p.error(f"no such file: {a.script!r}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # our output; the script can still set its own
    result = plan_script(a.script, a.args, batch_size=a.batch_size, budget_mb=budget)
    if result is None:
        print(
            f"safetrain plan: {a.script} ended without calling fit (keras.Model.fit or SafeTrainer.fit): "
            "nothing to plan.",
            file=sys.stderr,
        )
        return 1
    print(result["plan"].table(result["budget_mb"]))
    print(f"  planned                   {result['api']} at {result['where']}; the script stopped there, untrained")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(_plan_json(result), f, indent=1)
    return 0
