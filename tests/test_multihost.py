"""Multi-host input: 2 JAX processes on localhost (CPU collectives, 4 simulated devices each) train
5 steps of the micro preset on a (data, fsdp, tensor) = (2, 2, 2) mesh with the same losses as 1
process with one device (the test's own); process 0 writes the
metrics, an orbax checkpoint is written by both processes together, and the exported Hugging Face
checkpoint (gathered from both) equals the one process's export."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

TRAIN_LM = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_lm.py"
FLAGS = ["--preset", "micro", "--steps", "5", "--batch-size", "8", "--seq-len", "16", "--eval-every", "5",
         "--eval-batches", "2", "--log-every", "1", "--rank", "4", "--update-proj-gap", "2",
         "--mesh", "data=2,fsdp=2,tensor=2", "--no-progress"]  # fmt: skip


def _env(devices, tmp_path):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                FIRA_JAX_CACHE=str(tmp_path / "cache"))  # fmt: skip


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRA_JAX_CACHE", str(tmp_path / "cache"))  # the data prepared once, for all three
    monkeypatch.syspath_prepend(str(TRAIN_LM.parent))
    import jax
    import train_lm

    assert jax.device_count() == 1  # the reference: this process, one device
    train_lm.main([*FLAGS[: FLAGS.index("--mesh")], "--no-progress", "--out", str(tmp_path / "one"),
                   "--export", str(tmp_path / "one-hf")])  # fmt: skip
    port = _free_port()

    def command(i):
        multi = ["--coordinator-address", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)]
        return [
            sys.executable,
            str(TRAIN_LM),
            *FLAGS,
            "--out",
            str(tmp_path / "two"),
            "--checkpoint-every",
            "5",
            "--export",
            str(tmp_path / "two-hf"),
            *multi,
        ]

    procs = [
        subprocess.Popen(command(i), env=_env(4, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "in 2 process(es)" in outputs[0] and "final validation loss" in outputs[0]
    assert "final validation loss" not in outputs[1]  # only process 0 reports and writes
    one, two = _records(tmp_path / "one" / "metrics.jsonl"), _records(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5, (a, b)
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) <= 1e-5
    assert (tmp_path / "two" / "checkpoints" / "5").is_dir()
    from safetensors.numpy import load_file

    exported = [load_file(tmp_path / f"{run}-hf" / "model.safetensors") for run in ("one", "two")]
    assert exported[0].keys() == exported[1].keys() and len(exported[0]) > 5
    for name, value in exported[0].items():
        assert np.allclose(value, exported[1][name], atol=1e-5), name
    print("losses, 1 process x 1 device:", [round(r["train_loss"], 6) for r in one])
    print("losses, 2 processes x 4 devices:", [round(r["train_loss"], 6) for r in two])
