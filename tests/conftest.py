"""Test-session setup.

- Every test module carries markers saying what it tests (``MARKERS``; registered in
  pyproject.toml): ``core`` (the library, with jax, optax, chex and hypothesis), ``examples`` (the
  Flax example and its scripts), ``parity`` (against the authors' PyTorch code), ``slow`` (long
  runs). ``pytest -m core`` runs the library's tests; CI's lowest-versions job runs
  ``-m core``. A module missing from ``MARKERS`` is an error. ``slow`` may also
  mark single tests. README's test command leaves the slow tests out (pyproject.toml's addopts),
  and says so in a banner; ``python -m pytest -m slow`` runs them, and CI runs both.
- ``variant``: a fixture that runs a test's function with and without ``jax.jit``.
- Skipped tests are loud: a banner at the end of the run lists every skip and its reason.
- JAX's persistent compilation cache points at a fresh temporary folder for the session (and,
  through the environment, for the subprocesses tests start), so a program that several tests
  compile alike (the same model and optimizer, another seed) is compiled once: the suite runs
  about a fifth faster on 2 cores. Nothing outlives the session.
- Float32 matrix products run at full float32 precision (``jax_default_matmul_precision``
  ``"highest"``), also on accelerators whose default is lower (TF32 on NVIDIA GPUs since Ampere,
  bf16 passes on TPUs): the tests compare against float64 NumPy transcriptions, i.e. they check
  the equations, not the device's default rounding. On the H200 without this, 86 of 352 core tests
  failed by up to 3.4e-3 (results/accelerator.md); see docs/devices.md.
"""

import atexit
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="fira_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ |= {"JAX_COMPILATION_CACHE_DIR": _cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # fmt: skip
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")  # and in the processes tests start
jax.config.update("jax_default_matmul_precision", "highest")

MARKERS = {
    "test_alias": ("core",),
    "test_api": ("core",),
    "test_apollo": ("core",),
    "test_build_your_own": ("core",),
    "test_moments": ("core",),
    "test_composition": ("core",),
    "test_docstrings": ("core",),
    "test_house": ("core",),
    "test_limiter": ("core",),
    "test_masks": ("core",),
    "test_options": ("core",),
    "test_projection": ("core",),
    "test_docs": ("core",),
    "test_reliability": ("core", "slow"),
    "test_residual": ("core",),
    "test_sharding": ("core",),
    "test_adam": ("core",),
    "test_low_rank": ("core",),
    "test_weight_decay": ("core",),
    "test_reference_parity": ("parity",),
    "test_bad_input": ("examples",),
    "test_data": ("examples",),
    "test_examples": ("examples",),
    "test_finetune": ("examples",),
    "test_hf": ("examples", "parity"),
    "test_hlo_bytes": ("examples",),
    "test_lora": ("examples",),
    "test_loop": ("examples",),
    "test_memory_report": ("examples",),
    "test_multihost": ("examples", "slow"),
    "test_pytasks": ("examples",),
    "test_results": ("examples",),
    "test_step": ("examples",),
}


MARKER_NAMES = ("core", "examples", "parity", "slow")


def pytest_ignore_collect(collection_path: pathlib.Path, config: pytest.Config) -> bool | None:
    """With ``-m EXPR``, a module whose markers cannot match is not even imported (the lowest-versions
    job has no example dependencies)."""
    expr = config.getoption("markexpr")
    if not expr or collection_path.suffix != ".py" or collection_path.stem not in MARKERS:
        return None
    names = {"core", "examples", "parity"}
    present = {name: name in MARKERS[collection_path.stem] for name in names}
    # "slow" may also mark single tests of a module: the module is collected if some value of it matches.
    slow = [True] if "slow" in MARKERS[collection_path.stem] else [True, False]
    return not any(eval(expr, {"__builtins__": {}}, present | {"slow": s}) for s in slow)  # Python's and/or/not


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        if module not in MARKERS:
            raise pytest.UsageError(f"{item.path}: give the module its markers in tests/conftest.py's MARKERS")
        for name in MARKERS[module]:
            item.add_marker(getattr(pytest.mark, name))


@pytest.fixture(params=["jit", "no_jit"])
def variant(request: pytest.FixtureRequest):
    """``jax.jit`` or the identity: a test taking ``variant`` runs its function both ways.

    (``chex.variants`` does the same for ``chex.TestCase`` classes, absltest's parameterization;
    the tests here are plain pytest functions, so a parametrized fixture gives them the same two
    runs, with ids ``jit`` / ``no_jit`` that ``-k`` can select.)
    """
    import jax

    return jax.jit if request.param == "jit" else (lambda f: f)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    slow = [item for item in terminalreporter.stats.get("deselected", []) if item.get_closest_marker("slow")]
    expr = terminalreporter.config.getoption("markexpr")
    left_out = [
        module
        for module, names in MARKERS.items()
        if "slow" in names and expr and not eval(expr, {"__builtins__": {}}, {n: n in names for n in MARKER_NAMES})
    ]
    if slow or left_out or (expr and "not slow" in expr):
        modules = f", the modules {' and '.join(sorted(left_out))} among them" if left_out else ""
        terminalreporter.write_sep(
            "!", f"The tests marked slow (multi-device and end-to-end runs, more optimizer variants and parity "
            f"cases{modules}) were NOT RUN here: "
            "python -m pytest -m slow runs them", yellow=True,
        )  # fmt: skip
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.write_sep("!", f"{len(skipped)} TEST(S) SKIPPED: what they check was NOT checked", red=True)
    reasons: dict[str, int] = {}
    for report in skipped:
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in sorted(reasons.items()):
        terminalreporter.write_line(f"  {count} x {reason}", red=True)
