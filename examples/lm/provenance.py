"""Where a result came from: the command, the code, the versions and the machine.

Every file under ``results/`` carries this record (``"provenance"``), and a finished training run
is reused only on the code and machine that made it (:func:`same_origin`): on CPU a run is
bit-for-bit reproducible for one code version, software stack and machine, but the number of
threads XLA uses and the processor change the rounding, and after 1,000 steps the final loss
differs in the third decimal (results/README.md).
"""

import contextlib
import datetime
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("jax", "jaxlib", "optax", "flax", "numpy")


# What can change a result: edits elsewhere (README, docs/, tests/, results/) do not make a run "+dirty".
CODE_PATHS = ("fira_jax", "examples", "benchmarks", "pyproject.toml")


def commit() -> str:
    """The repository's commit, with ``+dirty`` when tracked files under :data:`CODE_PATHS` differ
    from it ("unknown" outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               cwd=REPO, capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The processor, its cores and the JAX devices a run computes on."""
    import jax

    device = jax.devices()[0]
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def command(argv: list[str] | None = None, script: str | None = None) -> str:
    """The command line that reproduces this run, from the repository root."""
    script = script or sys.argv[0]
    with contextlib.suppress(ValueError):  # a script outside the repository keeps its path
        script = str(pathlib.Path(script).resolve().relative_to(REPO))
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", script, *map(shlex.quote, args)])


def record(argv: list[str] | None = None, script: str | None = None) -> dict[str, Any]:
    """``{"command", "commit", "date", "versions", "machine"}`` for a results file."""
    return {
        "command": command(argv, script),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(),
        "machine": machine(),
    }


def same_origin(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records come from the same code, versions and machine (so a run may be reused)."""
    return all(a.get(k) == b.get(k) for k in ("commit", "versions", "machine"))


def describe(prov: dict[str, Any]) -> str:
    """One line for a results page: machine, versions, commit and date."""
    m, v = prov["machine"], prov["versions"]
    commit = prov["commit"][:12] + ("+dirty" if prov["commit"].endswith("+dirty") else "")
    return (
        f"{m['cpu']} ({m['cores']} cores), {m['devices']} {m['backend']} device(s); JAX {v.get('jax', '?')}, "
        f"optax {v.get('optax', '?')}, flax {v.get('flax', '?')}; commit {commit}; {prov['date']}"
        + (" (provenance reconstructed afterwards: see the JSON file)" if "reconstructed" in prov else "")
    )
