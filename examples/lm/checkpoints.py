"""Orbax checkpoints of a run: the model, its whole optimizer state and the run's record, resumable.

Pre-training (``lm/train.py``) and fine-tuning (``finetune.py``) both save with :func:`save` every
``--checkpoint-every`` steps under ``OUT/checkpoints`` (the two latest kept) and continue with
``--resume`` from the latest one (:func:`restore`).

Each checkpoint holds two items: ``state`` (model and optimizer) and ``run``, a JSON record of the
configuration that made it and the wall time spent so far. :func:`restore` compares the recorded
configuration with the resuming run's before it loads a single array and says in one line what
differs (:class:`CheckpointError`); so does every failure to read or write a checkpoint.
"""

import json
import logging
import pathlib
import shutil
import sys
from typing import Any

import jax
from flax import nnx

import fira_jax


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from or written; the message is one line."""


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()


def _not_orbax_error(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _quiet_failed_writes() -> None:
    """Keeps a failed save to the one line :func:`save` or :func:`close` raises: orbax's background
    threads log each failure with its traceback (absl), and the asyncio loops they leave behind report
    "Event loop is closed" as unraisable exceptions. Both say nothing that line does not."""
    absl = logging.getLogger("absl")
    if _not_orbax_error not in absl.filters:
        absl.addFilter(_not_orbax_error)  # a record the filter returns False for is dropped
    if getattr(sys.unraisablehook, "quiet_failed_writes", False):
        return
    default = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value)):
            default(unraisable)

    hook.quiet_failed_writes = True
    sys.unraisablehook = hook


def manager(out: pathlib.Path, every: int, resume: bool) -> Any:
    """An orbax ``CheckpointManager`` for ``out / "checkpoints"``, or None when the run neither saves nor resumes.

    Raises:
      CheckpointError: ``resume`` and ``out / "checkpoints"`` holds no checkpoint.
    """
    if not (every or resume):
        return None
    import orbax.checkpoint as ocp

    if resume:
        check_resumable(out)
    _quiet_failed_writes()
    folder = (out / "checkpoints").resolve()
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    return ocp.CheckpointManager(folder, options=options, item_names=("state", "run"))


def check_resumable(out: pathlib.Path) -> None:
    """Raises CheckpointError unless ``out / "checkpoints"`` holds a checkpoint (call before writing there)."""
    folder = (out / "checkpoints").resolve()
    if not (folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())):
        raise CheckpointError(f"--resume: {folder} holds no checkpoint (drop --resume to start a new run there)")


def kept_bytes(model: nnx.Module, optimizer: nnx.Pytree) -> int:
    """About what the kept checkpoints take on disk: two copies of the model and optimizer state."""
    arrays = jax.tree.leaves((nnx.state(model), nnx.state(optimizer)))
    return 2 * sum(x.size * x.dtype.itemsize for x in arrays if hasattr(x, "dtype"))


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"--name SAVED (now NOW)"`` for each setting that differs between two recorded configurations."""
    keys = sorted(saved.keys() | now.keys())
    return [f"--{k.replace('_', '-')} {saved.get(k)} (now {now.get(k)})" for k in keys if saved.get(k) != now.get(k)]


class FinishedError(Exception):
    """``--resume`` on a run whose latest checkpoint is its last step: nothing to do."""


def finished(error: FinishedError, out: str) -> dict:
    """Says ``error``'s one line and returns the finished run's summary (``out/summary.json``, or {})."""
    print(error)
    summary = pathlib.Path(out).expanduser() / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def restore(checkpoints: Any, model: nnx.Module, optimizer: nnx.Pytree, config: dict[str, Any],
            log: Any = print, steps: int | None = None) -> tuple[int, float]:  # fmt: skip
    """Loads the latest readable checkpoint into ``model`` and ``optimizer``; returns (its step, wall
    seconds so far). A latest checkpoint that cannot be read is named, and the one before it (two are
    kept) is used, with one line saying so.

    ``config`` is the resuming run's record (JSON values); the checkpoint's must be equal. A run
    whose checkpoint is at its last step (``steps``) is finished: nothing is read.

    Raises:
      FinishedError: the checkpoint is at step ``steps``.
      CheckpointError: the checkpoint was made with another configuration (each difference named),
        by an older version of these examples, holds another optimizer state format
        (``fira_jax.STATE_VERSION``, named with this one), or no kept checkpoint can be read.
    """
    kept = sorted(checkpoints.all_steps(), reverse=True)
    for i, step in enumerate(kept):
        try:
            return _restore_step(checkpoints, step, model, optimizer, config, log, steps)
        except _UnreadableError as e:
            if i + 1 == len(kept):
                raise CheckpointError(str(e)) from None
            log(f"{e}; resuming from the checkpoint of step {kept[i + 1]} instead")
    raise CheckpointError(f"--resume: {checkpoints.directory} holds no checkpoint")


class _UnreadableError(Exception):
    """A checkpoint whose files cannot be read (damaged or partial): the previous one may be."""


def _restore_step(checkpoints: Any, step: int, model: nnx.Module, optimizer: nnx.Pytree, config: dict[str, Any],
                  log: Any, steps: int | None) -> tuple[int, float]:  # fmt: skip
    import orbax.checkpoint as ocp

    where = f"--resume: the checkpoint of step {step} in {checkpoints.directory}"
    try:
        run = checkpoints.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    except Exception as e:  # orbax raises many kinds; the first line says which
        raise _UnreadableError(f"{where} has no readable run record ({_first_line(e)}); start a new --out") from None
    saved_format = run.get("state_version", 1)  # the record gained it with format 2
    if saved_format != fira_jax.STATE_VERSION:
        raise CheckpointError(
            f"{where} holds optimizer state format {saved_format}, and this fira_jax reads format "
            f"{fira_jax.STATE_VERSION}: resume with the version that wrote it, or start a new --out"
        )
    changed = ", ".join(differences(run["config"], config))
    if changed:
        raise CheckpointError(f"{where} was made with {changed}: resume with its settings or use a new --out")
    if steps is not None and step >= steps:
        raise FinishedError(f"--resume: the run in {checkpoints.directory.parent} already finished at step {step}")
    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    try:
        state = checkpoints.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as e:
        raise _UnreadableError(f"{where} cannot be read ({_first_line(e)})") from None
    nnx.update(model, state["model"])
    nnx.update(optimizer, state["optimizer"])
    log(f"resumed from step {step}")
    return step, float(run["wall_s"])


def _discard_partial(checkpoints: Any) -> None:
    """Removes the temporary folders of a save that failed (orbax renames a complete one into place)."""
    for tmp in pathlib.Path(checkpoints.directory).glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _write_error(checkpoints: Any, error: BaseException) -> CheckpointError:
    _discard_partial(checkpoints)
    kept = checkpoints.all_steps()  # committed ones only: a failed save is never listed
    earlier = f"the checkpoint of step {max(kept)} is intact" if kept else "no earlier checkpoint exists"
    where = checkpoints.directory
    return CheckpointError(f"--out: writing a checkpoint to {where} failed ({_first_line(error)}); {earlier}")


def save(checkpoints: Any, step: int, every: int, model: nnx.Module, optimizer: nnx.Pytree,
         config: dict[str, Any], wall_s: float) -> None:  # fmt: skip
    """Saves after ``step`` steps when ``every`` divides it (asynchronously; :func:`close` waits).

    ``config`` (JSON values) and ``wall_s`` (seconds the run has taken) go in the ``run`` item.

    Raises:
      CheckpointError: this save, or the previous one still being written, failed (e.g. a full disk).
    """
    if checkpoints is None or not every or step % every or checkpoints.latest_step() == step:
        return  # (the last: saved already, a Ctrl-C right after a regular save)
    import orbax.checkpoint as ocp

    state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    run = {"config": config, "wall_s": wall_s, "state_version": fira_jax.STATE_VERSION}
    try:
        checkpoints.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(run)))
    except Exception as e:
        raise _write_error(checkpoints, e) from None


def close(checkpoints: Any) -> None:
    """Waits for the last save to be written.

    Raises:
      CheckpointError: it failed (its partial folder is removed).
    """
    if checkpoints is None:
        return
    try:
        checkpoints.wait_until_finished()
    except Exception as e:
        raise _write_error(checkpoints, e) from None
