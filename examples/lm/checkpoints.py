"""Orbax checkpoints of a run: the model and its whole optimizer state, every N steps, resumable.

Pre-training (``lm/train.py``) and fine-tuning (``finetune.py``) both save with :func:`save` every
``--checkpoint-every`` steps under ``OUT/checkpoints`` (the two latest kept) and continue with
``--resume`` from the latest one (:func:`restore`).
"""

import pathlib
from typing import Any

from flax import nnx


def manager(out: pathlib.Path, every: int, resume: bool) -> Any:
    """An orbax ``CheckpointManager`` for ``out / "checkpoints"``, or None when the run neither saves nor resumes."""
    if not (every or resume):
        return None
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager((out / "checkpoints").resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2))


def restore(checkpoints: Any, model: nnx.Module, optimizer: nnx.Pytree, log: Any = print) -> int:
    """Loads the latest checkpoint into ``model`` and ``optimizer``; returns its step (0 when there is none)."""
    if checkpoints is None or checkpoints.latest_step() is None:
        return 0
    import orbax.checkpoint as ocp

    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    restored = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.StandardRestore(target))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    log(f"resumed from step {checkpoints.latest_step()}")
    return checkpoints.latest_step()


def save(checkpoints: Any, step: int, every: int, model: nnx.Module, optimizer: nnx.Pytree) -> None:
    """Saves after ``step`` steps when ``every`` divides it (asynchronously; :func:`close` waits)."""
    if checkpoints is None or not every or step % every:
        return
    import orbax.checkpoint as ocp

    state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    checkpoints.save(step, args=ocp.args.StandardSave(state))


def close(checkpoints: Any) -> None:
    """Waits for the last save to be written."""
    if checkpoints is not None:
        checkpoints.wait_until_finished()
