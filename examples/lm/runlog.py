"""What a training run reports as it goes, the same for pre-training and fine-tuning.

:class:`RunLog` writes ``metrics.jsonl`` (one JSON object per logged step, flushed as it goes)
and, when ``tensorboardX`` is installed, the same scalars as TensorBoard event files in
``tensorboard/`` (``tensorboard --logdir <out>/tensorboard``); it keeps a progress bar, prints
messages without breaking the bar, and says when a non-finite loss stops the run. Only the
process that writes (process 0) gets a folder; the others pass None.
"""

import json
import math
import pathlib
from collections.abc import Callable
from types import TracebackType
from typing import Any

from lm import files


class RunLog:
    """``with RunLog(out, total) as run:`` then ``run.write(record)``, ``run.say(msg)``, ``run.advance()``.

    Args:
      out: the run's folder (``metrics.jsonl`` goes there), or None to write nothing.
      total: the run's steps (the bar's length).
      initial: steps already done. A resumed run keeps the records of its first ``initial`` steps
        (in :attr:`earlier`; those of steps replayed after the checkpoint are dropped) and appends.
      progress: show a tqdm bar.
      log: where messages go without a bar.
      tensorboard: also write the records' numbers as TensorBoard scalars (where ``tensorboardX``
        is installed; no TensorFlow needed).
    """

    def __init__(self, out: pathlib.Path | None, total: int, initial: int = 0, progress: bool = True,
                 log: Callable[[str], None] = print, tensorboard: bool = True) -> None:  # fmt: skip
        self.log = log
        self.board = _board(out / "tensorboard") if out is not None and tensorboard else None
        self.earlier: list[dict[str, Any]] = []
        self.file = None
        if out is not None:
            path = out / "metrics.jsonl"
            if initial and path.exists():
                records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                self.earlier = [r for r in records if r["step"] <= initial]
            files.write_text(path, "".join(json.dumps(r) + "\n" for r in self.earlier))
            self.file = open(path, "a")  # noqa: SIM115
        self.bar = None
        if progress and out is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()
        if self.bar is not None:
            self.bar.close()

    def say(self, message: str) -> None:
        """Prints ``message`` above the bar."""
        (self.bar.write if self.bar is not None else self.log)(message)

    def write(self, record: dict[str, Any], **postfix: Any) -> None:
        """Appends ``record`` to ``metrics.jsonl``; ``postfix`` goes beside the bar."""
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.board.add_scalar(key, value, record["step"])
            self.board.flush()
        if self.bar is not None and postfix:
            self.bar.set_postfix(**postfix)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def finite(self, step: int, loss: float) -> bool:
        """False, after saying so, when the training loss is not finite (the run should stop)."""
        if math.isfinite(loss):
            return True
        self.say(f"step {step}: non-finite training loss {loss}; stopping")
        return False


def _board(folder: pathlib.Path) -> Any:
    """A TensorBoard writer into ``folder``, or None when ``tensorboardX`` is not installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
