"""Hugging Face LLaMA checkpoints: load into the example's NNX model, and save back.

``load(path)`` reads a local folder with ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``): the same math as ``transformers``' ``LlamaForCausalLM``
(rotate-half rotary embeddings with ``rope_theta``, ``rms_norm_eps``, grouped-query attention via
``num_key_value_heads``, tied or untied embeddings), each parameter read shard by shard into its sharding on a
mesh (``load(path, mesh=mesh)``). ``save(model, path)``
writes a folder ``transformers`` loads (with the bos / eos token ids the model knows, in
``config.json`` and ``generation_config.json``). Nothing is downloaded.

The name map (Hugging Face ``nn.Linear`` weights are (out, in); NNX kernels are (in, out); the
blocks are stacked, so layer ``i`` of Hugging Face is row ``[i]`` of our leaf):

  model.embed_tokens.weight                   embed.embedding
  model.layers.{i}.input_layernorm.weight     layers.attn_norm.weight[i]
  model.layers.{i}.self_attn.{q,k,v,o}_proj   layers.attn.{q,k,v,o}.kernel[i] (transposed)
  model.layers.{i}.post_attention_layernorm   layers.mlp_norm.weight[i]
  model.layers.{i}.mlp.{gate,up,down}_proj    layers.mlp.{gate,up,down}.kernel[i] (transposed)
  model.norm.weight                           norm.weight
  lm_head.weight                              lm_head.kernel (transposed; absent when tied)

Each device's shard of a leaf is read alone (``safetensors``' ``get_slice``; a stacked leaf's
shard from each of its layers' tensors) and placed with ``jax.make_array_from_callback``: the host
holds one leaf's shards at a time, and a process reads only its own devices' shards.
"""

import contextlib
import json
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import files
from lm import model as model_lib


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: a missing file, an unsupported architecture, a bad tensor."""


SUPPORTED = ("LlamaForCausalLM",)
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")


def _read_json(path: pathlib.Path) -> dict:
    """A JSON object from ``path``, or a CheckpointError naming the file."""
    try:
        value = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise CheckpointError(f"{path}: not a JSON file{where}: {getattr(e, 'msg', e)}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _open(file: pathlib.Path) -> Any:
    """``safe_open`` on ``file``; a damaged, truncated or empty file raises a CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise CheckpointError(f"{file}: no such file")
    try:
        return safe_open(str(file), framework="flax")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def config_from_hf(hf: dict, where: str = "config.json") -> model_lib.ModelConfig:
    """The model configuration of a Hugging Face LLaMA ``config.json``; raises on what is not supported."""
    missing = [k for k in REQUIRED if not isinstance(hf.get(k), int)]
    if missing:
        raise CheckpointError(f"{where}: no integer {missing[0]!r} (a Hugging Face LLaMA config.json is expected)")
    arch = hf.get("architectures") or [hf.get("model_type", "?")]
    if arch[0] not in SUPPORTED:
        raise CheckpointError(f"{where}: architecture {arch[0]!r} is not supported (only {', '.join(SUPPORTED)})")
    # transformers 5 keeps rotary settings in "rope_parameters"; earlier ones in "rope_theta" / "rope_scaling".
    rope = hf.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    unsupported = {
        "hidden_act": hf.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "rope_scaling": hf.get("rope_scaling") not in (None, {}),
        "rope_parameters": rope.get("rope_type", "default") != "default",
        "head_dim": hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise CheckpointError(f"{where}: {', '.join(f'{k}={hf.get(k)!r}' for k in bad)} is not supported")
    return model_lib.ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden=hf["hidden_size"],
        intermediate=hf["intermediate_size"],
        heads=hf["num_attention_heads"],
        layers=hf["num_hidden_layers"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=rope_theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos := hf.get("eos_token_id"), list) else eos,
    )


def token_ids(cfg: model_lib.ModelConfig) -> dict:
    """``bos_token_id`` / ``eos_token_id`` as Hugging Face writes them (the ones the model knows)."""
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in ids.items() if v is not None}


def config_to_hf(cfg: model_lib.ModelConfig, dtype: Any) -> dict:
    return token_ids(cfg) | {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "num_hidden_layers": cfg.layers,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,  # read by transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # by transformers >= 5
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[jnp.dtype(dtype).name],
    }


def name_map(cfg: model_lib.ModelConfig) -> Iterator[tuple[str, tuple[str, ...], int | None, bool]]:
    """(Hugging Face tensor name, our parameter path, layer or None, transposed) for every tensor,
    a stacked leaf's layers one after another."""
    yield "model.embed_tokens.weight", ("embed", "embedding"), None, False
    per_layer = [("input_layernorm.weight", ("attn_norm", "weight"), False),
                 ("post_attention_layernorm.weight", ("mlp_norm", "weight"), False)]  # fmt: skip
    per_layer += [(f"self_attn.{p}_proj.weight", ("attn", p, "kernel"), True) for p in "qkvo"]
    per_layer += [(f"mlp.{p}_proj.weight", ("mlp", p, "kernel"), True) for p in ("gate", "up", "down")]
    for hf, ours, transpose in per_layer:
        for i in range(cfg.layers):
            yield f"model.layers.{i}.{hf}", ("layers", *ours), i, transpose
    yield "model.norm.weight", ("norm", "weight"), None, False
    if not cfg.tie_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), None, True


def _weight_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Which file holds each tensor (one file, or a sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with _open(single) as f:
        return dict.fromkeys(f.keys(), single)


def load(
    path: str | pathlib.Path, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None, remat: str = "none"
) -> model_lib.LLaMA:
    """The example's NNX LLaMA with the checkpoint's weights (stored as ``dtype``; ``remat`` as the model's).

    Each parameter is made with ``jax.make_array_from_callback`` in its sharding on ``mesh``
    (:func:`lm.sharding.param_shardings`; without a mesh, whole on the first device): each device's
    shard is read from the safetensors file alone, layer by layer (a stacked leaf's shard is its
    layers' slices), so the host holds one leaf's shards at a time, and a process only the shards
    of its own devices. The shapes are checked before anything is read.

    Raises:
      CheckpointError: a missing or damaged file, a missing tensor, or a tensor of the wrong shape (named).
      lm.sharding.MeshError: a parameter that does not divide over ``mesh`` (named).
    """
    from lm import sharding as sharding_lib

    path = pathlib.Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (a Hugging Face checkpoint folder is expected)")
    cfg = config_from_hf(_read_json(path / "config.json"), str(path / "config.json"))
    model = nnx.eval_shape(lambda: model_lib.LLaMA(cfg, rngs=nnx.Rngs(0), remat=remat))
    params = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(params)
    if mesh is not None:
        targets = nnx.to_pure_dict(sharding_lib.param_shardings(params, mesh))
    else:
        targets = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), pure)
    weight_files = _weight_files(path)
    leaves: dict[tuple[str, ...], list[str]] = {}  # our leaf -> its tensors (a stacked leaf's, layer by layer)
    transposed = {}
    for hf_name, ours, _, transpose in name_map(cfg):
        leaves.setdefault(ours, []).append(hf_name)
        transposed[ours] = transpose
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_open(file)) for file in sorted(set(weight_files.values()))}
        tensors = {}  # name -> (file, handle): every tensor present and of its shape before any is read
        for ours, names in leaves.items():
            target = _get(pure, ours[:-1])[ours[-1]]
            expected = tuple(target.shape[1:] if ours[0] == "layers" else target.shape)
            for hf_name in names:
                if hf_name not in weight_files:
                    raise CheckpointError(f"{path}: tensor {hf_name} is missing")
                file = weight_files[hf_name]
                shape = _shape(handles[file], file, hf_name)
                shape = shape[::-1] if transposed[ours] else shape
                if shape != expected:
                    raise CheckpointError(
                        f"{path}: tensor {hf_name} has shape {shape}{' (transposed)' if transposed[ours] else ''}, "
                        f"the model expects {expected}"
                    )
                tensors[hf_name] = file, handles[file]
        for ours, names in leaves.items():
            target = _get(pure, ours[:-1])[ours[-1]]
            read = _leaf_reader([tensors[n] + (n,) for n in names], ours[0] == "layers", transposed[ours], dtype)
            placed = jax.make_array_from_callback(target.shape, _get(targets, ours[:-1])[ours[-1]], read)
            _get(pure, ours[:-1])[ours[-1]] = placed
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(model, params)
    return model


def _shape(handle: Any, file: pathlib.Path, name: str) -> tuple[int, ...]:
    """A tensor's shape from the file's header (nothing read)."""
    from safetensors import SafetensorError

    try:
        return tuple(handle.get_slice(name).get_shape())
    except SafetensorError as e:
        raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None


def read_slice(handle: Any, file: pathlib.Path, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """``index`` of one tensor of a safetensors file, and nothing more, on the host."""
    from safetensors import SafetensorError

    try:
        with jax.default_device(_host()):  # the flax framework returns jax arrays: keep them off the accelerators
            return np.asarray(handle.get_slice(name)[index])
    except SafetensorError as e:
        raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from None


def _host() -> jax.Device | None:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the default device, for a slice's moment
        return None


def _leaf_reader(tensors: list[tuple[pathlib.Path, Any, str]], stacked: bool, transpose: bool,
                 dtype: Any) -> Callable[[tuple[slice, ...]], np.ndarray]:  # fmt: skip
    """The ``make_array_from_callback`` callback of one leaf: its shard at an index, from its tensors
    (a stacked leaf's layer ``i`` is ``tensors[i]``); a shard that several devices hold is read once."""
    done: dict[tuple, np.ndarray] = {}

    def one(file: pathlib.Path, handle: Any, name: str, index: tuple[slice, ...]) -> np.ndarray:
        value = read_slice(handle, file, name, index[::-1] if transpose else index)
        return (value.T if transpose else value).astype(dtype)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in done:
            if stacked:
                layers = range(*index[0].indices(len(tensors)))
                done[key] = np.stack([one(*tensors[i], tuple(index[1:])) for i in layers])
            else:
                done[key] = one(*tensors[0], tuple(index))
        return done[key]

    return read


def _get(state: Any, path: tuple) -> Any:
    for key in path:
        state = state[key]
    return state


def save(model: model_lib.LLaMA, path: str | pathlib.Path) -> None:
    """Writes ``config.json``, ``model.safetensors`` and ``generation_config.json`` that ``transformers``
    loads, whole: into a temporary sibling folder first, so a failure leaves ``path`` as it was."""
    with files.staged_folder(path, last=("config.json",)) as staging:
        _write(model, staging)


def save_or_keep(model: model_lib.LLaMA, path: str | pathlib.Path, flag: str, fallback: pathlib.Path | None) -> None:
    """:func:`save` to ``path``; if that fails, to ``fallback``, so a trained model is not lost.

    Raises:
      files.OutputError: ``path`` could not be written; the message names where the model went.
    """
    try:
        save(model, path)
        return
    except OSError as e:
        problem = f"{flag} {path}: writing failed ({e.strerror or e})"
    if fallback is None:
        raise files.OutputError(problem)
    try:
        save(model, fallback)
    except OSError as e:
        raise files.OutputError(f"{problem}, and so did {fallback} ({e.strerror or e}); the model is lost") from None
    raise files.OutputError(f"{problem}; the model was saved to {fallback} instead")


def _write(model: model_lib.LLaMA, path: pathlib.Path) -> None:
    from safetensors.flax import save_file

    cfg = model.cfg
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tensors, host = {}, {}
    for hf_name, ours, layer, transpose in name_map(cfg):
        if ours not in host:  # each leaf fetched once (a stacked leaf gives all its layers)
            host = {ours: np.asarray(jax.device_get(_get(pure, ours)))}
        value = host[ours] if layer is None else host[ours][layer]
        tensors[hf_name] = jnp.asarray(np.ascontiguousarray(value.T if transpose else value))
    dtype = tensors["model.embed_tokens.weight"].dtype
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if token_ids(cfg):  # what generate() starts and stops with
        (path / "generation_config.json").write_text(
            json.dumps({"_from_model_config": True} | token_ids(cfg), indent=1)
        )
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=1))
