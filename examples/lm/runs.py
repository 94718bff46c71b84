"""Running many training configurations: reuse of finished runs, and parallel worker processes.

A run's folder holds ``result.json`` with the configuration it ran; the same configuration is
never run twice (training is deterministic on CPU for a given configuration), so an interrupted
sweep resumes where it stopped and a finished one regenerates its tables in seconds.
"""

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
from collections.abc import Callable
from typing import Any

from lm.config import TrainConfig


def _config_key(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}


def load_finished(cfg: TrainConfig) -> dict | None:
    """The saved result of ``cfg`` if ``cfg.out`` holds a finished run of exactly this configuration."""
    saved = pathlib.Path(cfg.out) / "result.json"
    if saved.exists():
        record = json.loads(saved.read_text())
        if record.get("config") == _config_key(cfg):
            return record["result"]
    return None


def run_or_reuse(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Trains ``cfg`` (writing ``cfg.out/result.json``) unless a finished identical run is there."""
    from lm.train import train  # imported here: worker processes import JAX only when they train

    result = load_finished(cfg)
    if result is not None:
        log(f"== {cfg.out}: reusing the finished run")
        return result
    log(f"== {cfg.out}")
    result = train(cfg, log=lambda msg: log(f"    {msg}"))
    pathlib.Path(cfg.out, "result.json").write_text(json.dumps({"config": _config_key(cfg), "result": result}))
    return result


def _worker(cfg: TrainConfig) -> dict:
    return run_or_reuse(cfg, log=lambda msg: print(msg, flush=True))


def run_all(cfgs: list[TrainConfig], workers: int = 1) -> list[dict]:
    """Runs (or reuses) every configuration, in ``workers`` processes when more than one is needed.

    Each worker process gets one XLA CPU thread, so that ``workers`` runs share the cores
    instead of fighting over them. Results come back in the order of ``cfgs``.
    """
    todo = [c for c in cfgs if load_finished(c) is None]
    if workers <= 1 or len(todo) <= 1:
        return [_worker(c) for c in cfgs]
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip()
    try:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_worker, todo))
    finally:
        os.environ["XLA_FLAGS"] = flags
    return [load_finished(c) for c in cfgs]  # all finished now: the results, in order
