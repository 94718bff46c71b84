"""The training loop that pre-training (``lm/train.py``) and fine-tuning (``finetune.py``) share.

Each script builds its model, data and optimizer, then hands :func:`run` four functions: the
batch of a step, the step itself, the validation and the checkpoint. The loop does not wait on
the host:

- the step's loss stays on the device; every ``log_every`` steps (and at a validation and at the
  end) the window's losses are averaged on the device and fetched at once: the one point where
  the host waits for the device;
- the next batches are made (read, sharded, put on the devices) by a thread, ``prefetch`` steps
  ahead, while the device runs the current step.

So a step's time is only known per window: ``step_s`` is a window's wall time over its steps
(validation and checkpoints excluded), and the first window of a process, which compiles the
step, is reported but not counted in :attr:`Result.median_step_s`. A non-finite loss is noticed at
the end of its window, and stops the run there.
"""

import contextlib
import dataclasses
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm import runlog


class StoppedError(Exception):
    """Ctrl-C (SIGINT) stopped the run after step ``done``, whose checkpoint was saved."""

    def __init__(self, done: int) -> None:
        super().__init__(done)
        self.done = done


def stopped(done: int | None, out: str, checkpoint_every: int) -> int:
    """Says in one line (stderr) where a Ctrl-C left the run, and returns the exit status 130."""
    if done is None:
        said = "stopped by Ctrl-C; no checkpoint was written at this point"
    elif checkpoint_every:
        said = f"stopped by Ctrl-C after step {done}: its checkpoint is in {out}/checkpoints (resume with --resume)"
    else:
        said = f"stopped by Ctrl-C after step {done}: no checkpoint (--checkpoint-every 0)"
    print(said, file=sys.stderr, flush=True)
    return 130


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Within the block, a first Ctrl-C (SIGINT) only sets a flag that the returned function reads,
    so the loop stops between steps with a consistent state; a second one interrupts at once. Off the
    main thread (where no handler can be set) the function always says no."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


class Trace:
    """A ``jax.profiler`` trace of the steps ``window = (start, stop)`` (none when ``window`` is None),
    stopped when the block is left, whatever happens."""

    def __init__(self, window: tuple[int, int] | None, folder: str | None) -> None:
        self.window, self.folder, self.on = window, folder, False

    def before(self, i: int) -> None:
        if self.window is not None and i == self.window[0]:
            jax.profiler.start_trace(self.folder)
            self.on = True

    def after(self, i: int, loss: jax.Array) -> None:
        if self.on and i + 1 == self.window[1]:
            loss.block_until_ready()  # the traced steps have run on the device
            jax.profiler.stop_trace()
            self.on = False

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on:
            jax.profiler.stop_trace()
            self.on = False


class Prefetch:
    """``make(step)`` for each step of ``steps``, in order, made ``depth`` steps ahead by a thread.

    An exception in ``make`` is raised by the ``next`` that would have returned its step.
    :meth:`close` (or leaving a ``with`` block) stops the thread.
    """

    def __init__(self, make: Callable[[int], Any], steps: range, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(make, steps), daemon=True)
        self._thread.start()

    def _fill(self, make: Callable[[int], Any], steps: range) -> None:
        for step in steps:
            try:
                item = (step, make(step), None)
            except Exception as e:  # handed to the consumer, which raises it
                item = (step, None, e)
            self._put(item)
            if self._stop.is_set() or item[2] is not None:
                return
        self._put((None, None, None))  # the end

    def _put(self, item: tuple) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self

    def __next__(self) -> tuple[int, Any]:
        step, value, error = self._queue.get()
        if error is not None:
            raise error
        if step is None:
            self._queue.put((None, None, None))  # every later next() ends too
            raise StopIteration
        return step, value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class Result:
    """What :func:`run` returns.

    Attributes:
      records: one per logged step: ``step``, ``train_loss`` (the window's mean), ``time`` (the
        run's seconds, earlier parts of a resumed run included), ``step_s`` (the window's seconds
        per step; None for the first window, which compiles), what ``throughput`` adds, and, at a
        validation, what ``evaluate`` returns.
      median_step_s: the median of the windows' ``step_s`` (the first window's when it is the only one).
      wall_s: the run's seconds, earlier parts included.
      stopped: the step at which a non-finite loss stopped the run, or None.
    """

    records: list[dict[str, Any]]
    median_step_s: float
    wall_s: float
    stopped: int | None = None


def run(
    log: runlog.RunLog,
    step: Callable[[Any], jax.Array],
    batch: Callable[[int], Any],
    start: int,
    stop: int,
    *,
    log_every: int,
    eval_every: int,
    evaluate: Callable[[], dict[str, float]],
    checkpoint: Callable[[int, float, bool], None] = lambda step, wall, force: None,
    throughput: Callable[[float], dict[str, Any]] = lambda step_s: {},
    wall_before: float = 0.0,
    prefetch: int = 2,
    profile: tuple[int, int] | None = None,
    profile_dir: str | None = None,
) -> Result:
    """Runs steps ``start`` to ``stop - 1``.

    Args:
      log: where records and messages go (its progress bar advances one step at a time).
      step: runs one train step on a batch, in place, and returns its loss (a device scalar).
      batch: ``batch(i)`` is step ``i``'s batch (called from the prefetch thread, in step order).
      start, stop: the steps to run (a resumed run starts after its checkpoint's step).
      log_every: fetch and record the mean training loss every this many steps.
      eval_every: also validate every this many steps (and at the last step).
      evaluate: the validation's fields (e.g. ``{"val_loss": ...}``); ``val_loss`` is printed.
      checkpoint: ``checkpoint(steps_done, wall_s, force)`` after every step (it decides when to
        save, unless ``force``: after a Ctrl-C, which then raises :class:`StoppedError`).
      throughput: extra fields of a record from its window's seconds per step (tokens/s, MFU).
      wall_before: the seconds of a resumed run's earlier parts.
      prefetch: batches made ahead.
      profile: ``(start, stop)``: a ``jax.profiler`` trace of steps ``start`` to ``stop - 1`` into
        ``profile_dir`` (the trace ends once the last traced step has finished on the device).

    Returns:
      The :class:`Result`.
    """
    records: list[dict[str, Any]] = []
    windows: list[float] = []
    losses: list[jax.Array] = []
    t_start = time.perf_counter()
    t_window, first_window, first_step_s, stopped = t_start, True, float("nan"), None
    trace = Trace(profile, profile_dir)
    with stop_requests() as stop_requested, trace, Prefetch(batch, range(start, stop), prefetch) as batches:
        for i, data in batches:
            trace.before(i)
            losses.append(step(data))
            trace.after(i, losses[-1])
            done, last = i + 1, i + 1 == stop
            validate = done % eval_every == 0 or last
            if done % log_every == 0 or validate:
                train_loss = float(jnp.mean(jnp.stack(losses)))  # the host waits here, once per window
                step_s = (time.perf_counter() - t_window) / len(losses)
                losses = []
                record = {"step": done, "train_loss": train_loss, "step_s": None if first_window else step_s}
                if first_window:
                    first_step_s, first_window = step_s, False
                else:
                    windows.append(step_s)
                    record |= throughput(step_s)
                if validate:
                    record |= evaluate()
                    log.say(f"step {done}: train {train_loss:.4f}  " + _describe(record))
                record["time"] = wall_before + time.perf_counter() - t_start
                records.append(record)
                log.write(record, loss=f"{train_loss:.3f}")
                if not log.finite(done, train_loss):
                    stopped = done
                    break
            log.advance()
            checkpoint(done, wall_before + time.perf_counter() - t_start, False)
            if stop_requested():
                checkpoint(done, wall_before + time.perf_counter() - t_start, True)
                raise StoppedError(done)
            if not losses:
                t_window = time.perf_counter()  # the next window starts after validation and checkpoint
    median = float(np.median(windows)) if windows else first_step_s
    return Result(records, median, wall_before + time.perf_counter() - t_start, stopped)


def _describe(record: dict[str, Any]) -> str:
    """The validation's figures of ``record`` as a message: loss, and perplexity and bits/byte if there."""
    text = f"val {record['val_loss']:.4f} nats/token"
    if "val_ppl" in record:
        text += f"  ppl {record['val_ppl']:.2f}"
    if "val_bpb" in record:
        text += f"  {record['val_bpb']:.3f} bits/byte"
    return text
