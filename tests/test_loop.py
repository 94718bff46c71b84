"""The shared training loop: prefetch in order, one host wait per window, records, early stop."""

import pathlib
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from lm import loop, runlog


def test_prefetch_yields_every_step_in_order_from_another_thread():
    made_by = []

    def make(step):
        made_by.append(threading.current_thread())
        return step * 10

    with loop.Prefetch(make, range(3, 9), depth=2) as batches:
        assert list(batches) == [(s, s * 10) for s in range(3, 9)]
        assert next(batches, "end") == "end"  # stays ended
    assert made_by and threading.main_thread() not in made_by
    with loop.Prefetch(make, range(0), depth=1) as batches:
        assert list(batches) == []


def test_prefetch_raises_the_makers_error_at_its_step_and_closes_early():
    def make(step):
        if step == 2:
            raise ValueError("bad batch 2")
        return step

    batches = loop.Prefetch(make, range(5))
    assert [next(batches), next(batches)] == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="bad batch 2"):
        next(batches)
    batches.close()
    slow = loop.Prefetch(lambda s: s, range(10**6), depth=1)
    next(slow)
    slow.close()  # returns although the thread had most steps left to make
    with pytest.raises(ValueError, match="depth"):
        loop.Prefetch(make, range(3), depth=0)


class _Log(runlog.RunLog):
    def __init__(self):
        self.records, self.messages = [], []
        super().__init__(None, 0, progress=False, log=self.messages.append)

    def write(self, record, **postfix):
        self.records.append(record)


def test_run_averages_each_window_validates_and_checkpoints():
    """A fake step whose loss is the step number: each record's train_loss is its window's mean."""
    saved, log = [], _Log()
    result = loop.run(log, lambda b: jnp.asarray(b, jnp.float32), lambda i: float(i), 2, 13, log_every=4,
                      eval_every=6, evaluate=lambda: {"val_loss": -1.0}, checkpoint=lambda s, w, f: saved.append(s),
                      throughput=lambda s: {"tokens_per_s": 8 / s}, wall_before=5.0)  # fmt: skip
    steps = [r["step"] for r in result.records]
    assert steps == [4, 6, 8, 12, 13]  # every 4, and the validations at 6, 12 and the end
    windows = {4: [2, 3], 6: [4, 5], 8: [6, 7], 12: [8, 9, 10, 11], 13: [12]}
    for r in result.records:
        assert r["train_loss"] == pytest.approx(np.mean(windows[r["step"]]))
        assert ("val_loss" in r) == (r["step"] in (6, 12, 13))
        assert r["time"] >= 5.0
    assert result.records[0]["step_s"] is None and "tokens_per_s" not in result.records[0]  # compiles
    assert all(r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(8 / r["step_s"]) for r in result.records[1:])
    assert result.median_step_s == pytest.approx(np.median([r["step_s"] for r in result.records[1:]]))
    assert saved == list(range(3, 14)) and result.stopped is None and result.wall_s >= 5.0
    assert [m.split(":")[0] for m in log.messages] == ["step 6", "step 12", "step 13"]


def test_run_stops_at_the_window_of_a_non_finite_loss():
    log = _Log()
    result = loop.run(log, lambda b: jnp.asarray(np.inf if b == 5 else 1.0), lambda i: i, 0, 20, log_every=4,
                      eval_every=100, evaluate=lambda: {"val_loss": 0.0})  # fmt: skip
    assert result.stopped == 8 and [r["step"] for r in result.records] == [4, 8]
    assert any("non-finite" in m for m in log.messages)


@pytest.mark.slow  # two training runs
def test_how_often_the_host_looks_changes_no_result(tmp_path):
    """benchmarks/host_overhead.py on the micro preset: --log-every 1 and 50 train the same run to
    the same final validation loss, bit for bit, and its page renders from its JSON."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import host_overhead

    saved = host_overhead.main(
        [
            "--preset",
            "micro",
            "--steps",
            "100",
            "--pairs",
            "1",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--json",
            str(tmp_path / "h.json"),
        ]
    )
    (one,), (fifty,) = saved["runs"]["1"], saved["runs"]["50"]
    assert one["final_val_loss"] == fifty["final_val_loss"] and np.isfinite(one["final_val_loss"])
    assert one["step_s"] > 0 and fifty["step_s"] > 0
    assert (tmp_path / "h.md").read_text() == host_overhead.render(saved)
    with pytest.raises(SystemExit):
        host_overhead.main(["--steps", "120"])


def test_a_ctrl_c_stops_between_steps_with_a_forced_checkpoint():
    """The first SIGINT only asks the loop to stop: the step it came in finishes, its checkpoint is forced."""
    import os
    import signal

    saved = []

    def step(b):
        if b == 5:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 5 runs
        return jnp.asarray(b, jnp.float32)

    with pytest.raises(loop.StoppedError) as stopped:
        loop.run(_Log(), step, lambda i: i, 0, 20, log_every=100, eval_every=100, evaluate=dict,
                 checkpoint=lambda s, w, force: saved.append((s, force)))  # fmt: skip
    assert stopped.value.done == 6  # step 5 is the sixth step
    assert saved[-2:] == [(6, False), (6, True)] and [s for s, _ in saved[:-1]] == list(range(1, 7))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_a_stopped_run_says_where_in_one_line(capsys):
    assert loop.stopped(6, "runs/x", 2) == 130
    assert (
        capsys.readouterr().err
        == "stopped by Ctrl-C after step 6: its checkpoint is in runs/x/checkpoints (resume with --resume)\n"
    )
    loop.stopped(6, "runs/x", 0)
    assert capsys.readouterr().err == "stopped by Ctrl-C after step 6: no checkpoint (--checkpoint-every 0)\n"
