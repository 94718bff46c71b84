"""The accelerator run: the figures a user asks of a GPU or TPU, in one call that fits a short loan.

Prepare once on a machine with the test dependencies and the package registries (the accelerator
machine may have neither):

  python benchmarks/accelerator.py --prepare       # .accel/: the authors' torch sources, data

Then, on the accelerator, from the repository root, one command (``run_accelerator.sh`` calls this):

  bash benchmarks/run_accelerator.sh                # all parts; results in runs/accelerator/ or $OUT
  bash benchmarks/run_accelerator.sh --smoke        # every part at tiny sizes on CPU (CI, ~2 min)

Each part runs in its own process under its own time limit (:data:`LIMITS`), so a part that
overruns is killed, reported as ``timeout`` with whatever it had written, and the others run:

  env     versions, device, driver; the device's copy bandwidth (read + write of 2 GiB, measured)
  update  one whole optimizer step (update and apply, jitted, parameters and state donated) of
          fira_jax's Fira / GaLore / APOLLO / APOLLO-Mini, optax.contrib.galore and optax.adamw,
          against the authors' torch FiraAdamW / GaLoreAdamW / APOLLOAdamW and torch's fused AdamW
          on the same device: a plain step and a refresh step, at the 60m shapes (8 layers of
          q, k, v, o, gate, up, down) and the 1b shapes (4 layers); optax.adamw's effective
          bandwidth (28 bytes per float32 parameter) against the copy bandwidth
  memory  the real train step (``lm/step.py``, ordinary and with per-layer updates), one process
          per row: SGD, AdamW and Fira at 1b and Fira at 7b, bf16, 1 x 256 tokens, Fira with
          ``svd="subspace"`` refreshed by shape: ``memory_stats()["peak_bytes_in_use"]`` after a
          refresh step and after a plain step, beside the compiler's ``memory_analysis`` of the
          same compiled step; the core tests run beside this part (not beside a timing part)
  train   the paper-60m recipe (batch 512 x 256 tokens, bf16) for Fira and AdamW, 100 steps each,
          on the prepared data: tokens/s, MFU, peak memory
  tests   ``pytest -m "core and not slow" -n 6`` on the accelerator, its summary line kept

Writes ``accelerator.json`` (provenance and every part's status, seconds and figures) and
``accelerator.log`` (every part's output) into ``--out``; prints a summary. ``--smoke`` writes
nothing into ``results/``; ``--render FILE`` prints a results page from such a JSON file.
"""

import argparse
import concurrent.futures
import contextlib
import importlib
import importlib.util
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
PREPARED = ROOT / ".accel"  # --prepare writes here (git-ignored); the run reads it
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Seconds per part on the accelerator (the tests run inside the memory part's window), and at --smoke.
LIMITS = {"env": 15, "update": 150, "memory": 205, "train": 110}
SMOKE_LIMITS = {"env": 60, "update": 90, "memory": 150, "train": 120}
# Nominal memory bandwidth (bytes/s, the vendors' datasheets), beside the measured copy bandwidth.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
REFERENCES = {"fira": "fira", "galore_torch": "galore-torch", "apollo_torch": "apollo-torch"}
# The update part's shapes: (hidden, intermediate, the authors' rank, layers).
UPDATE_SHAPES = {"60m": (512, 1376, 128, 8), "1b": (2048, 5461, 512, 4)}
SMOKE_UPDATE_SHAPES = {"tiny": (64, 172, 16, 1), "tiny-2": (32, 88, 8, 2)}  # two: as many as the full run
# The memory part's rows: (preset, optimizer, per-layer updates), the headline first.
MEMORY_ROWS = [("7b", "fira", True), ("7b", "fira", False), ("1b", "fira", True), ("1b", "adamw", True),
               ("1b", "sgd", True), ("1b", "fira", False), ("1b", "adamw", False), ("1b", "sgd", False)]  # fmt: skip
SMOKE_MEMORY_ROWS = [("micro", "fira", True), ("micro", "sgd", False)]


# ---------------------------------------------------------------------------------------------
# Preparing (here, before the loan)


def prepare(folder: pathlib.Path, smoke: bool = False) -> None:
    """The authors' torch sources (pure Python; the accelerator machine has no registry) and the
    training data: a 32,000-token BPE trained here on the standard library's sources, and those
    sources tokenized with it (``--smoke``: 400 files as bytes)."""
    from lm import prepare as prepare_lib

    folder.mkdir(parents=True, exist_ok=True)
    refs = folder / "refs"
    for module, dist in {} if smoke else REFERENCES.items():  # --smoke: the installed packages, if any
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"--prepare: {dist} is not installed here (pip install --no-deps {dist})")
        shutil.rmtree(refs / module, ignore_errors=True)
        shutil.copytree(spec.submodule_search_locations[0], refs / module, ignore=shutil.ignore_patterns("__pycache__"))
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size)
    files = files[: 400 if smoke else 1500]
    corpus = folder / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir()
    for i, path in enumerate(files):
        (corpus / f"{i:05d}.txt").write_text(path.read_text(errors="replace"))
    tokenizer = "bytes"
    if not smoke:
        from lm import tokenizer as tokenizer_lib  # the BPE of examples/train_tokenizer.py

        tokenizer = str(folder / "tokenizer.json")
        tokenizer_lib.train_bpe((p.read_text() for p in sorted(corpus.iterdir())), 32000, tokenizer)
    prepare_lib.prepare(str(corpus), tokenizer, folder / "data", progress=False)
    shutil.rmtree(corpus)
    refs_note = "" if smoke else f"refs/ ({', '.join(REFERENCES.values())}), "
    print(f"prepared {folder}: {refs_note}data/ ({tokenizer})")


# ---------------------------------------------------------------------------------------------
# env


def part_env(smoke: bool, emit: Callable[[dict], None]) -> None:
    import jax
    import jax.numpy as jnp
    from lm import provenance

    out: dict[str, Any] = {"versions": provenance.versions(), "machine": provenance.machine()}
    for name in ("torch", "chex", "orbax-checkpoint", "pytest"):
        with contextlib.suppress(Exception):
            out["versions"][name] = importlib.metadata.version(name)
    device = jax.devices()[0]
    out["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, check=False, timeout=20)
        out["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    with contextlib.suppress(Exception):
        import torch

        out["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    emit(out)
    n = (2**24 if smoke else 2**29) // 4 * 4  # float32 elements: 64 MiB (smoke) or 2 GiB
    x = jnp.ones((n,), jnp.float32)
    add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = jax.block_until_ready(add(x))
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        x = jax.block_until_ready(add(x))
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    out["copy_bandwidth"] = {"bytes": 2 * 4 * n, "seconds": seconds, "bytes_per_s": 2 * 4 * n / seconds}
    emit(out)


# ---------------------------------------------------------------------------------------------
# update


def _lower(tx: Any, params: dict, grads: dict) -> tuple:
    """``tx``'s whole donated step (update and apply), lowered; and its initial state."""
    import jax
    import optax

    def step(p: Any, s: Any, g: Any) -> tuple:
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    state0 = tx.init(params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state0, grads), state0


def _compile(lowered: Any) -> tuple:
    t0 = time.perf_counter()
    return lowered.compile(), time.perf_counter() - t0


def _jax_runners(compiled: Any, compile_s: float, state0: Any, params: dict, grads: dict) -> dict:
    """The compiled step: ``plain`` (count 1 onwards, no refresh) and ``refresh`` (from count 0)."""
    import jax
    import jax.numpy as jnp

    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    live = list(compiled(copy(params), copy(state0), grads))  # count 0 -> 1: later calls are plain steps
    jax.block_until_ready(live)

    def plain() -> Any:
        live[:] = compiled(live[0], live[1], grads)
        return live[0]

    def refresh() -> Any:  # from the initial state (count 0), copied outside the timing
        args = jax.block_until_ready((copy(params), copy(state0)))
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args, grads))
        return time.perf_counter() - t0

    from hlo_bytes import plain_step_bytes

    mem = compiled.memory_analysis()
    moved = plain_step_bytes(compiled.as_text())  # the step's bytes outside its refresh, from the compiled program
    return {"plain": plain, "sync": jax.block_until_ready, "refresh": refresh, "compile_s": compile_s,
            "state_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state0)),
            "temp_bytes": mem.temp_size_in_bytes if mem is not None else None,
            "plain_bytes": None if moved.loops else moved.plain}  # fmt: skip


def _torch_runners(torch: Any, make: Callable[[list, int], Any], params: dict, grads: dict, device: str) -> dict:
    """The torch optimizer ``make(tensors, gap)`` on ``device``: plain steps, and a refresh (gap 1)."""

    def tensors() -> list:
        out = []
        for p, g in zip(params.values(), grads.values(), strict=True):
            t = torch.nn.Parameter(_to_torch(torch, p, device))
            t.grad = _to_torch(torch, g, device)
            out.append(t)
        return out

    sync = (lambda _=None: torch.cuda.synchronize()) if device == "cuda" else (lambda _=None: None)
    opt = make(tensors(), 10**9)
    opt.step()  # the first step refreshes (GaLore / Fira / APOLLO); later ones do not
    sync()
    again = make(tensors(), 1)

    def refresh() -> float:
        sync()
        t0 = time.perf_counter()
        again.step()
        sync()
        return time.perf_counter() - t0

    def tensors_in(v: Any) -> list:  # a state entry, or the tensors an object in the state holds (a projector's basis)
        if torch.is_tensor(v):
            return [v]
        return [t for t in vars(v).values() if torch.is_tensor(t)] if hasattr(v, "__dict__") else []

    state = sum(t.numel() * t.element_size() for s in opt.state.values() for v in s.values() for t in tensors_in(v))
    return {"plain": opt.step, "sync": sync, "refresh": refresh, "compile_s": None, "state_bytes": state,
            "temp_bytes": None, "state_counts_objects": True}  # fmt: skip


def _to_torch(torch: Any, x: Any, device: str) -> Any:
    """A torch copy of the JAX array ``x`` on ``device`` (through DLPack when it can, else the host)."""
    try:
        return torch.from_dlpack(x).clone().to(device)
    except Exception:  # any DLPack mismatch: take the slow road
        import numpy as np

        return torch.tensor(np.asarray(x), device=device)


def _load_reference(package: str, module: str) -> Any:
    """The authors' ``package.module`` without the package's ``__init__`` (which imports optional extras)."""
    import bench_update

    loaded = bench_update.load_torch_reference(package, module)
    return None if loaded is None else loaded[1]


def part_update(smoke: bool, emit: Callable[[dict], None]) -> None:
    import jax
    import optax
    from optax import contrib

    import fira_jax

    lr, gap = 1e-2, 200
    try:
        import torch
    except ImportError:
        torch = None
    device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    out: dict[str, Any] = {"torch_device": device if torch is not None else None, "shapes": {}}
    shapes = SMOKE_UPDATE_SHAPES if smoke else UPDATE_SHAPES
    repeats, rounds = (3, 2) if smoke else (10, 3)
    for preset, (h, inter, rank, layers) in shapes.items():
        per_layer = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (h, inter), "up": (h, inter),
                     "down": (inter, h)}  # fmt: skip
        key, params, grads = jax.random.key(0), {}, {}
        for n in range(layers):
            for name, s in per_layer.items():
                key, k1, k2 = jax.random.split(key, 3)
                params[f"layer{n}/{name}"] = 0.02 * jax.random.normal(k1, s)
                grads[f"layer{n}/{name}"] = jax.random.normal(k2, s)
        n_params = sum(x.size for x in params.values())
        jax_rows = {
            "fira_jax.fira": fira_jax.fira(lr, rank=rank, update_proj_gap=gap),
            "fira_jax.fira subspace": fira_jax.fira(lr, rank=rank, update_proj_gap=gap, refresh_method="subspace"),
            "fira_jax.galore": fira_jax.galore(lr, rank=rank, update_proj_gap=gap),
            "fira_jax.apollo": fira_jax.apollo(lr, rank=rank, update_proj_gap=gap),
            "fira_jax.apollo_mini": fira_jax.apollo_mini(lr, update_proj_gap=gap),
            "optax.contrib.galore": contrib.galore(lr, rank=rank, update_proj_gap=gap),
            "optax.adamw": optax.adamw(lr),
        }
        lowered = {name: _lower(tx, params, grads) for name, tx in jax_rows.items()}
        print(f"{preset}: {len(lowered)} steps lowered; compiling them side by side", flush=True)
        with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:  # XLA compiles without the GIL
            compiled = dict(zip(lowered, pool.map(_compile, [low for low, _ in lowered.values()]), strict=True))
        runners = {name: _jax_runners(*compiled[name], state0, params, grads)
                   for name, (_, state0) in lowered.items()}  # fmt: skip
        print(f"{preset}: compiled in " + ", ".join(f"{n} {c[1]:.0f} s" for n, c in compiled.items()), flush=True)
        if torch is not None:
            torch_rows = {
                "torch FiraAdamW": (("fira", "fira_adamw"), {"alpha": 0.25, "proj_type": "std"}),
                "torch GaLoreAdamW": (("galore_torch", "adamw"), {"scale": 0.25, "proj_type": "std"}),
                "torch APOLLOAdamW": (("apollo_torch", "apollo"),
                                      {"scale": 1.0, "proj_type": "std", "scale_type": "channel", "proj": "random"}),
            }  # fmt: skip
            for name, (where, group) in torch_rows.items():
                cls = _load_reference(*where)
                if cls is None:
                    out.setdefault("missing", []).append(name)
                    continue

                def make(tensors: list, g: int, cls: Any = cls, group: dict = group, rank: int = rank) -> Any:
                    groups = [{"params": tensors, "rank": rank, "update_proj_gap": g, **group}]
                    return cls(groups, lr=lr, no_deprecation_warning=True)

                runners[name] = _torch_runners(torch, make, params, grads, device)

            def fused(tensors: list, _: int) -> Any:
                try:
                    return torch.optim.AdamW(tensors, lr=lr, fused=True)
                except RuntimeError:  # no fused kernel for this device
                    return torch.optim.AdamW(tensors, lr=lr, foreach=True)

            runners["torch AdamW fused"] = _torch_runners(torch, fused, params, grads, device)
        keep = ("compile_s", "state_bytes", "temp_bytes", "state_counts_objects", "plain_bytes")
        rows = {name: {"plain_s": float("inf"), "refresh_s": float("inf")} | {k: r[k] for k in keep if k in r}
                for name, r in runners.items()}  # fmt: skip
        record = {"hidden": h, "intermediate": inter, "rank": rank, "layers": layers, "params": n_params,
                  "repeats": repeats, "rounds": rounds, "rows": rows}  # fmt: skip
        out["shapes"][preset] = record
        for _ in range(rounds):  # interleaved: every row in every round; the best round counts
            for name, r in runners.items():
                r["sync"](r["plain"]())
                t0 = time.perf_counter()
                for _ in range(repeats):
                    last = r["plain"]()
                r["sync"](last)
                rows[name]["plain_s"] = min(rows[name]["plain_s"], (time.perf_counter() - t0) / repeats)
            emit(out)
            print(f"{preset}: a round of plain steps timed", flush=True)
        for name, r in runners.items():  # one refresh each (a full SVD of every matrix is slow)
            rows[name]["refresh_s"] = r["refresh"]()
            emit(out)
            print(f"{preset}: {name} refresh {rows[name]['refresh_s']:.3f} s", flush=True)
        del runners


# ---------------------------------------------------------------------------------------------
# memory


def memory_row(preset: str, name: str, per_layer: bool, smoke: bool) -> dict:
    """One row of the memory part, in this process: compile the train step, run a refresh and a plain step."""
    import jax
    import jax.numpy as jnp
    import memory_report
    from flax import nnx

    dtype = jnp.bfloat16
    vocab = 512 if smoke else memory_report.VOCAB
    seq_len = 32 if smoke else 256
    device = jax.devices()[0]
    stats = device.memory_stats if device.platform != "cpu" else lambda: None
    model, opt = memory_report.build(preset, name, dtype, vocab, svd="subspace", by_shape=True, per_layer=per_layer)
    graphdef, state = nnx.split((model, opt))
    del model, opt
    rng = jax.random.key(0)
    batches = [jax.random.randint(jax.random.fold_in(rng, i), (1, seq_len + 1), 0, vocab) for i in range(2)]
    t0 = time.perf_counter()
    compiled = memory_report.train_step(per_layer).lower(graphdef, state, batches[0]).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    analysed = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    out = {"preset": preset, "optimizer": name, "per_layer": per_layer, "tokens": [1, seq_len], "vocab": vocab,
           "compile_s": compile_s, "analysed_peak_bytes": analysed, "argument_bytes": mem.argument_size_in_bytes,
           "temp_bytes": mem.temp_size_in_bytes, "before": stats()}  # fmt: skip
    for label, batch in zip(("refresh", "plain"), batches, strict=True):
        t0 = time.perf_counter()
        state, loss = compiled(state, batch)
        jax.block_until_ready((state, loss))
        out[f"{label}_s"] = time.perf_counter() - t0
        out[f"after_{label}"] = stats()
        out[f"{label}_loss"] = float(loss)
    return out


def part_memory(smoke: bool, emit: Callable[[dict], None], deadline: float) -> None:
    rows = SMOKE_MEMORY_ROWS if smoke else MEMORY_ROWS
    parallel = len(rows)  # all at once: the figures are bytes, not seconds, and 16 cores compile them
    out: dict[str, Any] = {"rows": [], "failed": []}
    pending = list(rows)
    running: list[tuple[tuple, subprocess.Popen, Any]] = []
    while pending or running:
        while pending and len(running) < parallel:
            row = pending.pop(0)
            log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed when the row ends)
            cmd = [sys.executable, __file__, "--memory-row", json.dumps([*row, smoke])]
            running.append((row, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True), log))
        time.sleep(0.5)
        for item in list(running):
            row, proc, log = item
            if proc.poll() is None and time.monotonic() < deadline:
                continue
            if proc.poll() is None:
                proc.kill()
            stdout = proc.communicate()[0]
            log.seek(0)
            err = log.read().strip().splitlines()
            log.close()
            running.remove(item)
            if proc.returncode == 0:
                out["rows"].append(json.loads(stdout.strip().splitlines()[-1]))
            else:
                why = err[-1] if err else f"rc {proc.returncode}"
                why = "killed at the part's limit" if proc.returncode < 0 else why
                out["failed"].append({"row": list(row), "why": why})
                print(f"memory row {row}: {why}", file=sys.stderr, flush=True)
            emit(out)
        if time.monotonic() >= deadline:
            out["failed"] += [{"row": list(row), "why": "not started: the part's limit"} for row in pending]
            pending = []
    emit(out)


# ---------------------------------------------------------------------------------------------
# train


def part_train(smoke: bool, emit: Callable[[dict], None], data: pathlib.Path) -> None:
    out: dict[str, Any] = {"runs": {}}
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="accel-train-"))
    base = ["--recipe", "paper-60m", "--steps", "60", "--eval-every", "60", "--eval-batches", "4"]
    if smoke:
        base = ["--preset", "micro", "--steps", "6", "--eval-every", "6", "--eval-batches", "1", "--batch-size", "4",
                "--seq-len", "32", "--log-every", "2"]  # fmt: skip
    for name, lr in (("fira", "0.01"), ("adamw", "0.001")):
        flags = [*base, "--data", _relative(data), "--optimizer", name, "--lr", lr, "--no-progress"]
        cmd = [sys.executable, "examples/train_lm.py", *flags, "--out", str(scratch / name)]
        done = subprocess.run(cmd, cwd=ROOT, check=False)
        summary = scratch / name / "summary.json"
        if done.returncode or not summary.exists():
            out["runs"][name] = {"failed": f"rc {done.returncode}"}
        else:
            s = json.loads(summary.read_text())
            keys = ("preset", "tokens_per_s", "mfu", "peak_bytes_in_use", "median_step_s", "final_val_loss", "wall_s",
                    "optimizer_state_mib", "adamw_state_mib")  # fmt: skip
            out["runs"][name] = {k: s.get(k) for k in keys} | {"command": " ".join(["python", *cmd[1:-2]])}
        emit(out)
    shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The driver


def _relative(path: pathlib.Path) -> str:
    """``path`` from the repository root when inside it (the command in a results file stays portable)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def smoke_problems(record: dict) -> list[str]:
    """What a ``--smoke`` run must have produced, beyond every part's "ok": each row of each part."""
    parts, problems = record["parts"], []
    update = parts["update"]["figures"].get("shapes", {}).get("tiny", {}).get("rows", {})
    wanted = {"fira_jax.fira", "fira_jax.galore", "fira_jax.apollo", "optax.contrib.galore", "optax.adamw"}
    if importlib.util.find_spec("torch"):
        wanted |= {"torch FiraAdamW", "torch GaLoreAdamW", "torch APOLLOAdamW", "torch AdamW fused"}
    problems += [f"update: no row {name}" for name in sorted(wanted - set(update))]
    problems += [f"update: {name} not timed" for name, r in update.items()
                 if not 0 < r["plain_s"] < float("inf") or not 0 < r["refresh_s"] < float("inf")]  # fmt: skip
    rows = parts["memory"]["figures"].get("rows", [])
    if len(rows) != len(SMOKE_MEMORY_ROWS) or not all(r["analysed_peak_bytes"] > 0 for r in rows):
        problems.append(f"memory: {len(rows)} of {len(SMOKE_MEMORY_ROWS)} rows measured")
    runs = parts["train"]["figures"].get("runs", {})
    problems += [f"train: {n} {r.get('failed', 'no tokens/s')}" for n, r in runs.items() if not r.get("tokens_per_s")]
    if set(runs) != {"fira", "adamw"}:
        problems.append(f"train: runs {sorted(runs)}")
    if not parts["tests"]["figures"]["summary"]:
        problems.append("tests: no summary line")
    return problems


def run_part(name: str, limit: float, smoke: bool, log: Any, extra: list[str]) -> dict:
    """Runs ``part_<name>`` in a child process under ``limit`` seconds; its last emitted figures, status and seconds."""
    result = pathlib.Path(tempfile.mkstemp(prefix=f"accel-{name}-", suffix=".json")[1])
    cmd = [sys.executable, __file__, "--part", name, "--result", str(result), "--limit", str(limit), *extra]
    cmd += ["--smoke"] if smoke else []
    log.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
    log.flush()
    start = log.tell()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=limit)
        status = "ok" if rc == 0 else f"failed (rc {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the part and any process it started
        proc.wait()
        status = "timeout"
    seconds = time.perf_counter() - t0
    figures = json.loads(result.read_text()) if result.stat().st_size else {}
    result.unlink()
    log.flush()
    with open(log.name, errors="replace") as f:  # what the part said last: why it failed, where it stopped
        f.seek(start)
        said = [line.rstrip() for line in f.read().splitlines() if line.strip()]
    log.write(f"===== {name}: {status} in {seconds:.0f} s =====\n")
    log.flush()
    out = {"status": status, "seconds": round(seconds, 1), "limit_s": limit, "figures": figures}
    return out | ({"last_output": said[-3:]} if status != "ok" else {})


def start_tests(smoke: bool, log_path: pathlib.Path) -> subprocess.Popen:
    if smoke:
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "core", "tests/test_limiter.py"]
    else:
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "core and not slow", "-n", "6"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def finish_tests(proc: subprocess.Popen, log_path: pathlib.Path, deadline: float, t0: float) -> dict:
    try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        status = "ok" if rc == 0 else f"failed (rc {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        status = "timeout"
    lines = log_path.read_text(errors="replace").splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln), None)
    failures = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    return {"status": status, "seconds": round(time.monotonic() - t0, 1), "limit_s": round(deadline - t0),
            "figures": {"summary": summary, "failures": failures[:40],
                        "command": " ".join(["python", *proc.args[1:]])}}  # fmt: skip


def drive(args: argparse.Namespace, argv: list[str]) -> int:
    from lm import provenance

    out = pathlib.Path(args.out or os.environ.get("OUT") or ROOT / "runs/accelerator")
    out.mkdir(parents=True, exist_ok=True)
    limits = dict(SMOKE_LIMITS if args.smoke else LIMITS)
    for item in args.limits:
        part, _, seconds = item.partition("=")
        if part not in limits or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--limits {item}: expected PART=SECONDS with PART one of {', '.join(limits)}")
        limits[part] = float(seconds)
    data = pathlib.Path(args.data) if args.data else PREPARED / "data"
    prepared_here = None
    if args.smoke and not args.data:  # CI: prepare a tiny folder on the spot
        prepared_here = pathlib.Path(tempfile.mkdtemp(prefix="accel-smoke-"))
        prepare(prepared_here, smoke=True)
        data = prepared_here / "data"
    elif not (data / "meta.json").exists():
        raise SystemExit(f"{data}: no prepared data; run `python benchmarks/accelerator.py --prepare` first")
    record: dict[str, Any] = {"provenance": provenance.record(argv, __file__), "smoke": args.smoke, "parts": {}}
    if args.commit:
        record["provenance"]["commit"] = args.commit
    started = time.monotonic()
    with (out / "accelerator.log").open("w") as log:
        parts = record["parts"]
        for name in ("env", "update"):
            if name in args.parts:
                parts[name] = run_part(name, limits[name], args.smoke, log, [])
                print(f"{name}: {parts[name]['status']} in {parts[name]['seconds']:.0f} s", flush=True)
        if "memory" in args.parts:
            memory_and_tests(parts, limits["memory"], args.smoke, log)
        if "train" in args.parts:
            parts["train"] = run_part("train", limits["train"], args.smoke, log, ["--data", str(data)])
            print(f"train: {parts['train']['status']} in {parts['train']['seconds']:.0f} s", flush=True)
    record["seconds"] = round(time.monotonic() - started, 1)
    (out / "accelerator.json").write_text(json.dumps(record, indent=1))
    if prepared_here:
        shutil.rmtree(prepared_here, ignore_errors=True)
    print("\n" + render(record))
    print(f"wrote {out / 'accelerator.json'} and {out / 'accelerator.log'} ({record['seconds']:.0f} s in all)")
    bad = [f"{n}: {p['status']}" for n, p in parts.items() if p["status"] != "ok"]
    bad += smoke_problems(record) if args.smoke and set(args.parts) == set(LIMITS) else []
    if bad:
        print(f"not ok: {'; '.join(bad)} (see {out / 'accelerator.log'})", file=sys.stderr)
    return 1 if bad else 0


def memory_and_tests(parts: dict, limit: float, smoke: bool, log: Any) -> None:
    """The memory part, with the tests in the background for as long as it is allowed (not beside a timing part)."""
    tests_log = pathlib.Path(tempfile.mkstemp(prefix="accel-tests-", suffix=".log")[1])
    t_tests = time.monotonic()
    tests = start_tests(smoke, tests_log)
    parts["memory"] = run_part("memory", limit, smoke, log, [])
    print(f"memory: {parts['memory']['status']} in {parts['memory']['seconds']:.0f} s", flush=True)
    parts["tests"] = finish_tests(tests, tests_log, t_tests + limit, t_tests)
    log.write("\n===== tests =====\n" + tests_log.read_text(errors="replace"))
    tests_log.unlink()
    print(f"tests: {parts['tests']['status']}: {parts['tests']['figures']['summary']}", flush=True)


# ---------------------------------------------------------------------------------------------
# The page


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f}"


def _ms(x: float | None) -> str:
    return "n/a" if x is None or x == float("inf") else f"{1e3 * x:.2f}"


def render(saved: dict) -> str:
    """The results page of an ``accelerator.json`` (results/accelerator.md), from the JSON alone."""
    from lm import provenance

    prov, parts = saved["provenance"], saved["parts"]
    env = parts.get("env", {}).get("figures", {})
    lines = ["# The accelerator run" + (" (smoke: tiny sizes, not figures)" if saved.get("smoke") else ""), "",
             f"`{prov['command']}`", "", f"Made on {provenance.describe(prov)}.", ""]  # fmt: skip
    device = env.get("device", {})
    lines += [f"Device: {device.get('kind', '?')} ({device.get('platform', '?')}); "
              f"nvidia-smi: {env.get('nvidia_smi', 'n/a')}; torch {env.get('versions', {}).get('torch', 'n/a')} on "
              f"{env.get('torch_device', 'n/a')}.", ""]  # fmt: skip
    lines += ["| part | status | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {n} | {p['status']} | {p['seconds']:.0f} | {p.get('limit_s', 0):.0f} |" for n, p in parts.items()]
    for n, p in parts.items():
        lines += [f"- {n}, its last output: `{line}`" for line in p.get("last_output", [])]
    bw = env.get("copy_bandwidth")
    nominal = next((v for k, v in NOMINAL_BANDWIDTH.items() if k in device.get("kind", "")), None)
    if bw:
        sheet = f" (datasheet {nominal / 1e12:.1f} TB/s)" if nominal else ""
        lines += ["", f"Copy bandwidth (read + write, {bw['bytes'] / 2**30:.2f} GiB): {bw['bytes_per_s'] / 1e12:.2f} "
                  f"TB/s{sheet}."]  # fmt: skip
    for preset, rec in parts.get("update", {}).get("figures", {}).get("shapes", {}).items():
        rows = rec["rows"]
        lines += [
            "",
            f"## Update step, {preset} shapes: {rec['layers']} layer(s) of q, k, v, o, gate, up, down "
            f"({rec['params'] / 1e6:.1f}M float32 weights), rank {rec['rank']}",
            "",
            "One whole step (update and apply, donated); plain: best of "
            f"{rec['rounds']} rounds of {rec['repeats']} back-to-back steps; refresh: one step from count 0.",
            "",
            "| optimizer | plain ms | refresh ms | plain / optax.adamw | plain / torch FiraAdamW | state MiB |",
        ]
        moved_rows = any(r.get("plain_bytes") for r in rows.values())  # runs before hlo_bytes have none
        if moved_rows:
            lines[-1] += " compiled B / weight | bandwidth bound ms | bound / plain |"
        lines.append("|---|---|---|---|---|---|" + "---|---|---|" * moved_rows)
        adamw = rows.get("optax.adamw", {}).get("plain_s")
        torch_fira = rows.get("torch FiraAdamW", {}).get("plain_s")
        for name, r in rows.items():
            ratio = lambda base, r=r: f"{r['plain_s'] / base:.2f}x" if base and r["plain_s"] != float("inf") else "-"  # noqa: E731
            # The first run counted a torch optimizer's state tensors but not its projector's basis: not shown.
            counted = "AdamW" not in name or "fused" in name or r.get("state_counts_objects")
            state = f"{r['state_bytes'] / 2**20:.1f}" if counted else "n/a"
            line = f"| {name} | {_ms(r['plain_s'])} | {_ms(r['refresh_s'])} | {ratio(adamw)} | {ratio(torch_fira)} | "
            line += f"{state} |"
            if moved_rows:
                moved, bound = r.get("plain_bytes"), "- | -"
                if moved and bw and r["plain_s"] != float("inf"):  # the compiled bytes at the copy bandwidth
                    bound = f"{_ms(moved / bw['bytes_per_s'])} | {moved / bw['bytes_per_s'] / r['plain_s']:.0%}"
                line += f" {moved / rec['params']:.1f} | {bound} |" if moved else f" - | {bound} |"
            lines.append(line)
        if adamw and adamw != float("inf"):
            eff = 28 * rec["params"] / adamw
            share = f", {eff / bw['bytes_per_s']:.0%} of the measured copy bandwidth" if bw else ""
            lines += ["", f"optax.adamw moves 28 bytes per weight: {eff / 1e12:.2f} TB/s effective{share}."]
        if moved_rows:
            lines += ["", "*Compiled B / weight*: the bytes the compiled step (update and apply) moves outside its "
                      "refresh, counted instruction by instruction in its HLO (`benchmarks/hlo_bytes.py`), per "
                      "weight; *bandwidth bound*: those bytes at the measured copy bandwidth; *bound / plain*: the "
                      "share of that bound the step reaches."]  # fmt: skip
    mem = parts.get("memory", {}).get("figures", {})
    if mem.get("rows"):
        first = mem["rows"][0]
        lines += ["", "## Train-step memory, executed", "",
                  "The real train step (`lm/step.py`), one process per row, bf16, "
                  f"{first['tokens'][0]} x {first['tokens'][1]} tokens, vocabulary {first['vocab']:,}; Fira with "
                  "svd='subspace' refreshed by shape. `peak_bytes_in_use` is the process's high-water mark: before "
                  "the first step (initialisation, compilation), after a refresh step and after a plain step. "
                  "*Added* is the peak after both steps minus the bytes in use before them; the compiler's "
                  "figure for the same thing is its peak (arguments + outputs + temporaries - aliased) minus the "
                  "arguments.", "",
                  "| preset | optimizer | per-layer | in use before GiB | peak before GiB | peak after refresh GiB "
                  "| peak after plain GiB | analysed peak GiB | added GiB | analysed added GiB | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        order = {(p, o, pl): i for i, (p, o, pl) in enumerate(MEMORY_ROWS + SMOKE_MEMORY_ROWS)}
        for r in sorted(mem["rows"], key=lambda r: order.get((r["preset"], r["optimizer"], r["per_layer"]), 99)):
            stat = lambda when, key, r=r: (r.get(when) or {}).get(key)  # noqa: E731
            before, last = stat("before", "bytes_in_use"), stat("after_plain", "peak_bytes_in_use")
            cells = [r["preset"], r["optimizer"], "yes" if r["per_layer"] else "no", _gib(before),
                     _gib(stat("before", "peak_bytes_in_use")), _gib(stat("after_refresh", "peak_bytes_in_use")),
                     _gib(last), _gib(r["analysed_peak_bytes"]), _gib(None if last is None else last - before),
                     _gib(r["analysed_peak_bytes"] - r["argument_bytes"]), f"{r['compile_s']:.0f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines += [f"- not measured: {' '.join(map(str, f['row']))}: {f['why']}" for f in mem.get("failed", [])]
    runs = parts.get("train", {}).get("figures", {}).get("runs", {})
    if runs:
        lines += ["", "## Training throughput", "",
                  "| optimizer | preset | tokens/s | MFU | peak GiB | median step ms | val loss |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in runs.items():
            if "failed" in r:
                lines.append(f"| {name} | failed: {r['failed']} | | | | | |")
                continue
            mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            cells = [name, r["preset"], f"{r['tokens_per_s']:,.0f}", mfu, _gib(r["peak_bytes_in_use"]),
                     _ms(r["median_step_s"]), f"{r['final_val_loss']:.3f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        first = next(iter(runs.values()))
        if "command" in first:
            lines += ["", f"`{first['command']}` (AdamW: `--optimizer adamw --lr 0.001`)"]
    tests = parts.get("tests", {}).get("figures", {})
    if tests:
        lines += ["", "## Tests on the device", "", f"`{tests.get('command')}`: {tests.get('summary')}"]
        lines += [f"- {f}" for f in tests.get("failures", [])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help=f"write {PREPARED.name}/ (sources, data) and stop")
    p.add_argument("--smoke", action="store_true", help="every part at tiny sizes (CPU, CI)")
    p.add_argument("--out", help="results folder (default $OUT, else runs/accelerator)")
    p.add_argument("--data", help=f"prepared data folder (default {PREPARED.name}/data)")
    p.add_argument("--commit", help="the commit to record (a copy of the working tree has no .git)")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=tuple(LIMITS),
        default=list(LIMITS),
        help="the parts to run (the tests run with the memory part)",
    )
    p.add_argument("--limits", nargs="+", default=[], metavar="PART=SECONDS", help="change parts' time limits")
    p.add_argument("--render", metavar="FILE", help="print the results page of an accelerator.json")
    p.add_argument("--part", help=argparse.SUPPRESS)  # the driver's children
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    p.add_argument("--memory-row", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.render:
        try:
            print(render(json.loads(pathlib.Path(args.render).read_text())), end="")
        except (OSError, json.JSONDecodeError, KeyError) as e:
            p.error(f"--render {args.render}: not an accelerator.json ({e})")
        return 0
    if args.memory_row:
        print(json.dumps(memory_row(*json.loads(args.memory_row))))
        return 0
    if args.part:
        started = time.monotonic()
        refs = PREPARED / "refs"
        if refs.is_dir():
            sys.path.insert(0, str(refs))

        def emit(figures: dict) -> None:  # rewritten after each row, so a killed part keeps what it had
            pathlib.Path(args.result + ".tmp").write_text(json.dumps(figures))
            os.replace(args.result + ".tmp", args.result)

        if args.part == "memory":
            part_memory(args.smoke, emit, started + args.limit - 5)
        elif args.part == "train":
            part_train(args.smoke, emit, pathlib.Path(args.data))
        else:
            {"env": part_env, "update": part_update}[args.part](args.smoke, emit)
        return 0
    if args.prepare:
        prepare(PREPARED)
        return 0
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
