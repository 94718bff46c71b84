"""Smoke tests of the Flax LM example: one step of train_lm on a micro model, the data formats."""

import gzip
import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

pytest.importorskip("tqdm", reason="examples extra not installed")
import train_lm  # noqa: E402
from lm import data as data_lib  # noqa: E402
from lm import prepare as prepare_lib  # noqa: E402


# fira in README's command; the others with the slow tests (README's command stays short)
@pytest.mark.parametrize(
    "optimizer",
    ["fira", *(pytest.param(o, marks=pytest.mark.slow) for o in ("galore", "apollo", "apollo-mini", "adamw"))],
)
def test_train_lm_micro_one_step(tmp_path, optimizer):
    out = tmp_path / optimizer
    result = train_lm.main(
        ["--preset", "micro", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
         "--optimizer", optimizer, "--rank", "4", "--no-progress", "--out", str(out)]
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and "train_loss" in records[0] and "val_loss" in records[-1]
    assert np.isfinite(result["final_val_loss"])
    assert (out / "loss.png").stat().st_size > 0
    if optimizer != "adamw":
        assert result["optimizer_state_mib"] < result["adamw_state_mib"]


def test_data_formats(tmp_path):
    docs = [f"document {i} " * 50 for i in range(60)]
    (tmp_path / "a.txt").write_text("".join(docs[:30]))
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in docs[30:45]:
            f.write(json.dumps({"text": d}) + "\n")
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        for d in docs[45:]:
            f.write(json.dumps({"text": d, "url": "x"}) + "\n")
    meta = prepare_lib.prepare(str(tmp_path), "bytes", tmp_path / "prep", val_fraction=0.3, workers=1, progress=False)
    corpus = data_lib.open_prepared(tmp_path / "prep")
    train, val = np.asarray(corpus.train), np.asarray(corpus.val)
    assert "3 files" in corpus.description and meta["splits"]["val"]["documents"] > 0
    total = sum(len(d) for d in docs)
    assert len(train) + len(val) == total + (1 + 15 + 15) - 2  # a.txt is one document; separators between
    assert set(np.unique(np.concatenate([train, val]))) <= set(b"document 0123456789\x00")
    batches = data_lib.Batches(train, 4, 32, seed=1)
    np.testing.assert_array_equal(batches(3), batches(3))
    assert batches(3).shape == (4, 33)
    with pytest.raises(data_lib.DataError, match=r"bad.jsonl:1: .*'text'"):
        (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
        prepare_lib.prepare(str(tmp_path / "bad.jsonl"), "bytes", tmp_path / "p1", workers=1, progress=False)
    with pytest.raises(data_lib.DataError, match=r"broken.jsonl:2: not a JSON record"):
        (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
        prepare_lib.prepare(str(tmp_path / "broken.jsonl"), "bytes", tmp_path / "p2", workers=1, progress=False)
    with pytest.raises(data_lib.DataError, match="no such file"):
        prepare_lib.load(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("train_lm", ["--data", "/nonexistent/path"], "--data /nonexistent/path: no such file or folder"),
        ("train_lm", ["--steps", "0"], "--steps must be >= 1"),
        ("train_lm", ["--optimizer", "sgd"], "invalid choice"),
        ("train_lm", ["--per-layer-updates", "--grad-clip", "1"], "--per-layer-updates applies each layer's"),
        ("compare", ["--data", "/nonexistent/path"], "no such file or folder"),
        ("similarity", ["--measure-every", "0"], "--measure-every must be >= 1"),
    ],
)
def test_command_line_mistakes_are_one_line_usage_errors(script, flags, message, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last and message in last, err


@pytest.mark.slow  # an end-to-end example run (README's command stays short)
@pytest.mark.parametrize("per_layer", [False, True], ids=["whole-model-step", "per-layer-updates"])
def test_resume_continues_identically(tmp_path, per_layer):
    """Checkpoints hold the whole optimizer state (one per stage with per-layer updates): resuming at
    step 2 reproduces steps 3-4 exactly."""
    flags = ["--preset", "micro", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
             "--eval-every", "2", "--log-every", "1", "--rank", "4", "--update-proj-gap", "3", "--no-progress",
             "--checkpoint-every", "2"] + (["--per-layer-updates"] if per_layer else [])  # fmt: skip
    out = tmp_path / "run"
    train_lm.main([*flags, "--out", str(out)])
    full = (out / "metrics.jsonl").read_text().splitlines()
    wall = json.loads((out / "summary.json").read_text())["wall_s"]
    # Pretend the run stopped after the step-2 checkpoint (its metrics went on to step 4), then resume it.
    import shutil

    shutil.rmtree(out / "checkpoints" / "4")
    result = train_lm.main([*flags, "--out", str(out), "--resume"])
    resumed = (out / "metrics.jsonl").read_text().splitlines()

    def losses(lines):
        return [(r["step"], r["train_loss"], r.get("val_loss")) for r in map(json.loads, lines)]

    assert losses(resumed) == losses(full)  # steps 3-4 replace the first run's (no duplicates); refresh at t = 3
    assert [r["step"] for r in result["records"]] == [1, 2, 3, 4]  # the plot and summary see the whole run
    # The wall time continues from the checkpoint's (step 2 of the first run), not from zero.
    first_two = json.loads(full[1])["time"]
    assert first_two <= json.loads(resumed[1])["time"] < json.loads(resumed[2])["time"]
    assert result["wall_s"] > first_two and wall > 0


def test_similarity_measures_every_layers_matrices(tmp_path, capsys):
    """similarity.py on the scanned model: one factor per matrix of every stacked kernel (7 per
    layer), and rank correlations that are numbers."""
    import similarity

    saved = similarity.main(["--preset", "micro", "--steps", "2", "--measure-every", "2", "--batch-size", "2",
                             "--seq-len", "16", "--rank", "4", "--out", str(tmp_path)])  # fmt: skip
    (row,) = saved["rows"]
    assert row["n_matrices"] == 7 * similarity.model_lib.PRESETS["micro"].layers
    assert all(np.isfinite(row[k]) for k in ("matrix_spearman", "column_spearman", "column_kendall"))
    assert (tmp_path / "similarity.json").exists()


def test_rank_correlations_match_definitions():
    import itertools

    import similarity

    rng = np.random.default_rng(0)
    a = rng.standard_normal(40)
    b = a + 0.5 * rng.standard_normal(40)
    b[:5] = b[5]  # ties

    # Spearman: Pearson correlation of average ranks.
    def avg_ranks(x):
        return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])

    expected = np.corrcoef(avg_ranks(a), avg_ranks(b))[0, 1]
    assert similarity.spearman(a, b) == pytest.approx(expected, rel=1e-12)
    # Kendall tau-b from its definition over all pairs.
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(40), 2):
        s = np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
        conc += s > 0
        disc += s < 0
        ties_a += a[i] == a[j]
        ties_b += b[i] == b[j]
    n0 = 40 * 39 / 2
    tau_b = (conc - disc) / np.sqrt((n0 - ties_a) * (n0 - ties_b))
    assert similarity.kendall_tau_b(a, b) == pytest.approx(tau_b, rel=1e-12)


# Trains the micro preset on 8 simulated devices with each mesh of argv[2:] ("MESH" or "MESH+per-layer")
# into argv[1]/MESH, and for a mesh with a tensor axis prints the optimizer state's bytes on one
# device against its total.
_MESH_RUNS = """
import json, pathlib, sys
sys.path.insert(0, {examples!r})
import jax
from flax import nnx
import train_lm
from lm import sharding, train
jax.config.update("jax_log_compiles", True)  # each run's step must compile once (counted from stderr)
flags = {flags!r}
for spec in sys.argv[2:]:
    mesh_spec, per_layer = spec.split("+")[0], spec.endswith("+per-layer")
    out = pathlib.Path(sys.argv[1]) / spec
    train_lm.main([*flags, "--mesh", mesh_spec, "--out", str(out)] + ["--per-layer-updates"] * per_layer)
    if "tensor" not in mesh_spec:
        continue
    cfg = train.TrainConfig(preset="micro", rank=4, mesh=mesh_spec)
    model, tx = train.build(cfg)
    mesh = sharding.make_mesh(sharding.parse_mesh(mesh_spec, jax.device_count()), jax.devices())
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.device_put(params, sharding.param_shardings(params, mesh)))
    state = jax.tree.leaves(nnx.state(nnx.Optimizer(model, tx, wrt=nnx.Param)).filter(nnx.OptState))
    one = sum(x.addressable_shards[0].data.nbytes for x in state)
    print("STATE", spec, one, sum(x.nbytes for x in state))
"""


@pytest.mark.slow  # 8 simulated devices in a subprocess
def test_meshes_train_alike_on_8_simulated_devices(tmp_path):
    """The example on meshes (data, fsdp, tensor) = (8,1,1), (2,4,1) and (2,2,2) (with per-layer
    updates: the ordinary step's sharding is the same) gives the losses of one device, step by step
    (sharding reorders reductions only), each run compiles its step once, and the optimizer's
    state follows the parameters: on (2,2,2) one device holds at most half of it. (A subprocess:
    the device count is set at start.)"""
    import os
    import subprocess

    flags = ["--preset", "micro", "--steps", "3", "--batch-size", "8", "--seq-len", "16", "--eval-every", "3",
             "--eval-batches", "1", "--log-every", "1", "--rank", "4", "--update-proj-gap", "2",
             "--no-progress"]  # fmt: skip
    meshes = ["data", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2+per-layer"]
    code = _MESH_RUNS.format(examples=str(EXAMPLES), flags=flags)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), *meshes], capture_output=True, text=True,
                          env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 cpu device(s)" in proc.stdout
    # The state comes back in its own shardings, so the second step does not compile again.
    assert proc.stderr.count("Compiling jit(step) ") == len(meshes)
    assert jax.device_count() == 1  # the reference: this process, one device
    train_lm.main([*flags, "--out", str(tmp_path / "one")])

    def losses(run):
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["train_loss"] for r in records] + [records[-1]["val_loss"]]

    reference = losses("one")
    for mesh in meshes:
        np.testing.assert_allclose(losses(mesh), reference, rtol=1e-5, err_msg=mesh)
    state = {line.split()[1]: [int(v) for v in line.split()[2:]] for line in proc.stdout.splitlines()
             if line.startswith("STATE")}  # fmt: skip
    one, total = state["data=2,fsdp=2,tensor=2+per-layer"]
    assert one <= total / 2, state


# On 8 simulated devices: the tiny preset initialized sharded, against one device, jitted and eager.
_SHARDED_INIT = """
import sys
sys.path.insert(0, {examples!r})
import jax, numpy as np
from flax import nnx
from lm import model as model_lib, sharding
make = lambda: model_lib.LLaMA(model_lib.PRESETS["tiny"], rngs=nnx.Rngs(0))
mesh = sharding.make_mesh(sharding.parse_mesh("data=2,fsdp=2,tensor=2", 8), jax.devices())
sharded = jax.tree.leaves(nnx.state(sharding.init_sharded(make, mesh), nnx.Param))
assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in sharded)
one = jax.tree.leaves(jax.jit(lambda: nnx.state(make(), nnx.Param))())
eager = jax.tree.leaves(nnx.state(make(), nnx.Param))
print("JIT", all(np.array_equal(a, b) for a, b in zip(sharded, one, strict=True)))
ulps = max(float(np.max(np.abs(np.asarray(a) - b) / np.spacing(np.abs(b)))) for a, b in zip(sharded, eager))
print("EAGER_ULPS", ulps)
"""


@pytest.mark.slow  # 8 simulated devices in a subprocess
def test_sharded_initialization_holds_one_shard_per_device(tmp_path):
    """The 7b preset's layers initialized on 8 simulated devices (benchmarks/init_memory.py; 4 of
    its 32 layers, to compile in seconds: results/init_memory_7b_cpu.json has all 32, 24 GiB, with
    temporaries 0.21 of a shard): the compiled program's output is one shard per device, its temporaries at
    most a quarter of that (compiler analysis, nothing allocated). A tiny model initialized sharded
    on (2,2,2) is the model the same program makes on one device, bit for bit, and the eager one
    within one ulp."""
    import os
    import subprocess

    script = EXAMPLES.parent / "benchmarks" / "init_memory.py"
    flags = ["--preset", "7b", "--layers", "4", "--devices", "8", "--json", str(tmp_path / "init.json")]
    proc = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads((tmp_path / "init.json").read_text())
    total, output, temp = found["model_bytes"], found["output_bytes"], found["temp_bytes"]
    assert total > 2**30 and abs(output - total / 8) <= 0.001 * total / 8, (total, output)
    assert temp <= 0.25 * output, (temp, output)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_INIT.format(examples=str(EXAMPLES))], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    assert found["JIT"] == ["True"] and float(found["EAGER_ULPS"][0]) <= 1.0


def test_logical_axes_map_to_the_mesh_by_one_table():
    """Every parameter of the model (and of its LoRA adapters) has logical axis names; RULES place
    them: the layer axis never sharded, embed on fsdp, heads / mlp / vocab on tensor; an axis that
    does not divide its mesh axis is an error naming the parameter; a mesh spec is checked."""
    import jax
    from flax import nnx
    from jax.sharding import AbstractMesh
    from lm import lora, sharding
    from lm import model as model_lib

    model = lora.apply(nnx.eval_shape(lambda: model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(0))), rank=4)
    params = nnx.state(model, nnx.Param)
    mesh = AbstractMesh((2, 2, 2), sharding.AXES)
    specs = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = model_lib.path_names(path)
        specs["/".join(names)] = tuple(sharding.param_spec("/".join(names), model_lib.logical_axes(names, x.ndim),
                                                           x.shape, mesh))  # fmt: skip
    assert specs["embed/embedding"] == ("tensor", "fsdp") and specs["lm_head/kernel"] == ("fsdp", "tensor")
    assert specs["layers/attn/q/base/kernel"] == (None, "fsdp", "tensor")
    assert specs["layers/attn/o/kernel"] == (None, "tensor", "fsdp")
    assert specs["layers/mlp/down/base/kernel"] == (None, "tensor", "fsdp")
    assert specs["layers/attn/q/lora/lora_a"] == (None, "fsdp", None)
    assert specs["layers/mlp/up/lora/lora_b"] == (None, None, "tensor")
    assert specs["layers/attn_norm/weight"] == (None, None) and specs["norm/weight"] == (None,)
    assert all(s[0] is None for k, s in specs.items() if k.startswith("layers/"))
    with pytest.raises(sharding.MeshError, match=r"parameter layers/mlp/up/kernel: axis 2 \(mlp, size 88\)"):
        sharding.param_spec("layers/mlp/up/kernel", ("layers", "embed", "mlp"), (1, 32, 88),
                            AbstractMesh((1, 1, 16), sharding.AXES))  # fmt: skip
    with pytest.raises(ValueError, match="no logical axis names"):
        model_lib.logical_axes(("layers", "attn", "extra", "kernel"), 3)
    assert sharding.parse_mesh("fsdp", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharding.parse_mesh("tensor=2,data=4", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    for bad, message in (("data=3,fsdp=2", "multiply to 6"), ("pipe=8", "expected data, fsdp"),
                         ("data=0,fsdp=8", "SIZE >= 1")):  # fmt: skip
        with pytest.raises(sharding.MeshError, match=message):
            sharding.parse_mesh(bad, 8)


def test_weight_decay_goes_to_kernels_only():
    """The example decays attention/MLP/head kernels; norms' scales and the embedding are exempt."""
    import jax
    from flax import nnx
    from lm import model as model_lib
    from lm import optim

    import fira_jax

    model = model_lib.LLaMA(model_lib.PRESETS["micro"], rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = fira_jax.mask_by_path(*optim.DECAY_MODULES)(params)
    flat = {fira_jax.matrices.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat and all(v == ("kernel" in k) for k, v in flat.items()), flat
    assert not any(v for k, v in flat.items() if "embed" in k or "norm" in k)


@pytest.mark.slow  # several training runs end to end
def test_rank_sweep_tables_and_reuse(tmp_path, monkeypatch):
    """1 rank x 2 seeds x 5 steps on micro: the page's structure, then a rerun that trains nothing."""
    import compare
    from lm import sweep
    from lm import train as train_lib

    flags = ["--rank-sweep", "--preset", "micro", "--steps", "5", "--batch-size", "2", "--seq-len", "16",
             "--ranks", "2", "--seeds", "0", "1", "--lrs", "1e-2", "3e-2", "--adamw-lrs", "1e-3",
             "--eval-every", "5", "--out", str(tmp_path)]  # fmt: skip
    compare.main(flags)
    page = (tmp_path / "rank_sweep.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| rank | Fira | GaLore | Fira − GaLore")
    assert rows[1].startswith("| 2 (h/16) |") and rows[2].startswith("| AdamW (full rank) |")
    assert "| rank | seed 0 | seed 1 |" in page
    numbers = json.loads((tmp_path / "rank_sweep.json").read_text())
    for rank in ("2",):
        cell = numbers["ranks"][rank]
        diffs = cell["fira_minus_galore"]
        fira, galore = cell["fira"]["losses"], cell["galore"]["losses"]
        assert diffs == pytest.approx([fira[s] - galore[s] for s in ("0", "1")])
        assert cell["fira"]["lr"] in (1e-2, 3e-2)
    assert (tmp_path / "rank_sweep.png").stat().st_size > 0
    # 2 optimizers x 2 lrs + 1 AdamW lr on seed 0, then 2 + 1 at the chosen lrs on seed 1.
    assert len(list((tmp_path / "runs" / "rank_sweep").iterdir())) == 5 + 3

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_lib, "train", no_training)
    (tmp_path / "rank_sweep.md").unlink()
    compare.main(flags)

    def body(text: str) -> str:  # without the provenance line (its date) and the wall time
        return "\n".join(x for x in text.split("Wall time")[0].splitlines() if not x.startswith("Made on"))

    assert body((tmp_path / "rank_sweep.md").read_text()) == body(page)
    assert (
        sweep.render(json.loads((tmp_path / "rank_sweep.json").read_text())) == (tmp_path / "rank_sweep.md").read_text()
    )

    # The family sweep beside it: APOLLO at rank 2 and APOLLO-Mini on a one-point grid, Fira with
    # svd="subspace" at Fira's lr, and the check run; then seed 1 for the three cells.
    monkeypatch.undo()
    compare.main(["--family-sweep", *flags[1:flags.index("--lrs")], "--lrs", "1e-2", "--eval-every", "5",
                  "--out", str(tmp_path)])  # fmt: skip
    family = json.loads((tmp_path / "family_sweep.json").read_text())
    assert [(c["label"], c["rank"]) for c in family["cells"]] == [("APOLLO", 2), ("APOLLO-Mini", 1),
                                                                   ("Fira, svd=subspace", 2)]  # fmt: skip
    subspace = family["cells"][2]
    assert subspace["lr"] == numbers["ranks"]["2"]["fira"]["lr"] and set(subspace["losses"]) == {"0", "1"}
    check = family["check"]
    assert check["loss"] == pytest.approx(check["published"], abs=1e-6)  # the same run again: deterministic
    assert sweep.render_family(family) == (tmp_path / "family_sweep.md").read_text()
    assert "| APOLLO-Mini | 1 (h/32) |" in (tmp_path / "family_sweep.md").read_text()


@pytest.mark.slow  # several training runs end to end
def test_compare_page_is_rendered_from_its_json(tmp_path):
    """compare.md is a function of compare.json, which records where it came from."""
    import compare

    compare.main(["--preset", "micro", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "4",
                  "--optimizers", "fira", "adamw", "--lrs", "1e-2", "3e-2", "--out", str(tmp_path)])  # fmt: skip
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert compare.render(saved) == (tmp_path / "compare.md").read_text()
    assert [r["tag"] for r in saved["runs"]] == ["fira-lr0.01", "fira-lr0.03", "adamw-lr0.01", "adamw-lr0.03"]
    prov = saved["provenance"]
    assert prov["command"].startswith("python examples/compare.py --preset micro")
    assert len(prov["commit"].removesuffix("+dirty")) == 40 or prov["commit"] == "unknown"
    assert prov["versions"]["jax"] == jax.__version__ and prov["machine"]["backend"] == jax.default_backend()
    best = compare.best_runs(saved["runs"])
    for name in ("fira", "adamw"):
        row = next(x for x in (tmp_path / "compare.md").read_text().splitlines() if x.startswith(f"| {name} | "))
        assert f"{best[name]['final_val_loss']:.4f}" in row


_HELP_DRIVER = """
import contextlib, io, json, runpy, sys
texts = {}
for script in sys.argv[1:]:
    sys.argv, out = [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), f"{script} --help exited with {e.code}"
    texts[script] = out.getvalue()
print(json.dumps(texts))
"""


def _help_texts(scripts: list[str]) -> dict[str, str]:
    """Each script's ``--help`` text, all of them run in one Python process (each in its own
    process cost 4 s of imports apiece)."""
    done = subprocess.run([sys.executable, "-c", _HELP_DRIVER, *scripts], cwd=EXAMPLES.parent, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every `python examples/...` or `python benchmarks/...` command in a ```bash
    block of README.md, docs/*.md and examples/README.md."""
    import re
    import shlex

    root = EXAMPLES.parent
    found = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md")), EXAMPLES / "README.md"]:
        if not page.exists():
            continue
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for segment in re.split(r"&&|;|\|", line.split("#")[0]):
                    argv = shlex.split(segment)
                    if len(argv) >= 2 and argv[0] == "python" and argv[1].startswith(("examples/", "benchmarks/")):
                        found.append((str(page.relative_to(root)), argv[1:]))
    return found


def test_documented_commands_name_real_flags():
    """Each documented command's script exists and accepts every flag it is given (its --help)."""
    commands = _documented_commands()
    scripts = sorted({argv[0] for _, argv in commands})
    assert "examples/train_lm.py" in scripts, scripts  # the parser found README's commands
    missing = [s for s in scripts if not (EXAMPLES.parent / s).is_file()]
    assert not missing, f"documented scripts that do not exist: {missing}"
    texts = _help_texts(scripts)
    for page, argv in commands:
        flags = [a.split("=")[0] for a in argv[1:] if a.startswith("--")]
        unknown = [f for f in flags if not re.search(rf"{re.escape(f)}\b", texts[argv[0]])]
        assert not unknown, f"{page}: {' '.join(argv)}: {argv[0]} has no flag {unknown}"


def test_a_non_finite_loss_stops_pre_training(tmp_path, capsys):
    """The shared run log (lm/runlog.py) stops a diverging run and says so."""
    out = tmp_path / "run"
    train_lm.main(["--preset", "micro", "--steps", "8", "--batch-size", "2", "--seq-len", "16", "--eval-every", "8",
                   "--eval-batches", "1", "--log-every", "1", "--optimizer", "adamw", "--lr", "1e30", "--warmup", "0",
                   "--out", str(out), "--no-progress"])  # fmt: skip
    losses = [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) < 8 and not np.isfinite(losses[-1]) and np.isfinite(losses[0])
    assert f"step {len(losses)}: non-finite training loss" in capsys.readouterr().out


@pytest.mark.slow  # two 40-step training runs
def test_bf16_training_reaches_the_float32_loss(tmp_path):
    """The tiny preset in bfloat16 (parameters, compute, float32 Adam moments by default, gradients
    summed in float32 over 2 micro-batches) ends within drift of the float32 run's validation loss."""
    flags = ["--preset", "tiny", "--steps", "40", "--batch-size", "8", "--seq-len", "32", "--eval-every", "40",
             "--eval-batches", "2", "--rank", "8", "--update-proj-gap", "20", "--no-progress"]  # fmt: skip
    f32 = train_lm.main([*flags, "--out", str(tmp_path / "f32")])
    bf16 = train_lm.main([*flags, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16", "--param-dtype", "bfloat16",
                          "--grad-accum", "2"])  # fmt: skip
    first = json.loads((tmp_path / "f32" / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert f32["final_val_loss"] < 0.8 * first  # it trained
    drift = abs(bf16["final_val_loss"] - f32["final_val_loss"]) / f32["final_val_loss"]
    print(f"bf16 {bf16['final_val_loss']:.4f}, float32 {f32['final_val_loss']:.4f}: drift {drift:.2%}")
    assert drift < 0.03


def test_tensorboard_scalars_and_a_profile_of_chosen_steps(tmp_path):
    """--profile 1:3 traces steps 1 and 2 for XProf; the logged records go to TensorBoard as scalars."""
    import struct

    pytest.importorskip("tensorboardX", reason="tensorboardX is not installed: TensorBoard scalars NOT checked")
    from tensorboardX.proto import event_pb2

    out = tmp_path / "run"
    train_lm.main(["--preset", "micro", "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--eval-every", "4",
                   "--eval-batches", "1", "--log-every", "1", "--no-progress", "--profile", "1:3",
                   "--out", str(out)])  # fmt: skip
    scalars = {}
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        data = events.read_bytes()
        while data:  # TFRecord: length (8 bytes), its CRC (4), the record, its CRC (4)
            (length,) = struct.unpack("<Q", data[:8])
            event = event_pb2.Event.FromString(data[12 : 12 + length])
            data = data[16 + length :]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(scalars["train_loss"]) == [1, 2, 3, 4]
    assert scalars["train_loss"][4] == pytest.approx(records[-1]["train_loss"])
    assert scalars["val_loss"] == {4: pytest.approx(records[-1]["val_loss"])}
    traces = list((out / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
