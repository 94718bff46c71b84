"""What the sharded initialization of the example's model holds per device (compiled, never run).

``lm.sharding.init_sharded`` initializes the model under ``jax.jit`` straight into its parameters'
shardings. This script compiles that program for ``--preset`` on a mesh of ``--devices`` devices
(``--mesh``, default all ``fsdp``) and reads the compiler's memory analysis: the output (the
parameters' shards on one device) and the temporaries (the random bits being made), against the
whole model. ``--platform cpu`` simulates the devices (``--xla_force_host_platform_device_count``;
the CPU compiler's concurrency-optimized scheduler is turned off, else it keeps every layer's random
bits alive at once); ``--platform tpu-v5e`` compiles for a v5e slice of that many chips without a
TPU (libtpu).

  python benchmarks/init_memory.py --preset 7b --devices 8 --json results/init_memory_7b_cpu.json
  python benchmarks/init_memory.py --preset 7b --devices 8 --platform tpu-v5e --json results/init_memory_7b_tpu_v5e.json
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

TPU_SLICES = {4: ("v5e:2x2", "v5litepod-4"), 8: ("v5e:2x4", "v5litepod-8")}  # chips: (topology, accelerator type)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog=pathlib.Path(__file__).name, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--preset", default="7b")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--layers", type=int, default=None, help="the preset with this many layers (default: its own)")
    p.add_argument("--mesh", default="fsdp", help="as train_lm.py's --mesh")
    p.add_argument("--platform", choices=("cpu", "tpu-v5e"), default="cpu")
    p.add_argument("--json", metavar="FILE", help="also write the figures and their provenance to FILE")
    args = p.parse_args(argv)
    if args.platform == "tpu-v5e" and args.devices not in TPU_SLICES:
        p.error(f"--platform tpu-v5e: --devices must be one of {sorted(TPU_SLICES)}, got {args.devices}")
    if args.platform == "cpu":
        if "jax" in sys.modules:
            p.error("--platform cpu sets the simulated device count before JAX starts: run it as a script")
        os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                                   "--xla_cpu_enable_concurrency_optimized_scheduler=false")  # fmt: skip
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        topology, accelerator = TPU_SLICES[args.devices]
        env = {"TPU_ACCELERATOR_TYPE": accelerator, "TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "1"}
        for key, val in env.items():
            os.environ.setdefault(key, val)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
    import jax
    from flax import nnx
    from lm import model as model_lib
    from lm import provenance, sharding

    if args.preset not in model_lib.PRESETS:
        p.error(f"--preset {args.preset!r}: one of {sorted(model_lib.PRESETS)}")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    cfg = model_lib.PRESETS[args.preset]
    cfg = dataclasses.replace(cfg, layers=args.layers) if args.layers else cfg
    if args.platform == "cpu":
        devices = jax.devices()
    else:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(topology, platform="tpu").devices
    try:
        sizes = sharding.parse_mesh(args.mesh, len(devices))
    except sharding.MeshError as e:
        p.error(str(e))
    mesh = sharding.make_mesh(sizes, devices)  # the example's own mesh (TPU: the topology's device order)

    def make() -> model_lib.LLaMA:
        return model_lib.LLaMA(cfg, rngs=nnx.Rngs(0))

    t0 = time.perf_counter()
    _, program = sharding.init_program(make, mesh)
    memory = program.lower().compile().memory_analysis()
    seconds = time.perf_counter() - t0
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(program)))
    saved = {"preset": args.preset, "layers": cfg.layers, "devices": len(devices), "mesh": sizes,
             "platform": args.platform, "device_kind": devices[0].device_kind, "model_bytes": total,
             "output_bytes": memory.output_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
             "compile_s": seconds}  # fmt: skip
    print(render(saved))
    if args.json:
        saved["provenance"] = provenance.record(argv, __file__)
        pathlib.Path(args.json).write_text(json.dumps(saved, indent=1))
    return saved


def render(saved: dict) -> str:
    """One line: the model, one device's output and temporaries, in GiB and as shares of a shard."""
    gib = 2**30
    shard = saved["model_bytes"] / saved["devices"]
    return (f"{saved['preset']} ({saved.get('layers', '?')} layers) float32 ({saved['model_bytes'] / gib:.2f} GiB) "
            f"on {saved['devices']} "
            f"{saved['device_kind']} devices, mesh {saved['mesh']}: per device, output "
            f"{saved['output_bytes'] / gib:.3f} GiB ({saved['output_bytes'] / shard:.3f} of a 1/{saved['devices']} "
            f"shard) + temporaries {saved['temp_bytes'] / gib:.3f} GiB ({saved['temp_bytes'] / shard:.3f}); "
            f"compiled in {saved['compile_s']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
