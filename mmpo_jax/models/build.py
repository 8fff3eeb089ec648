"""`build_model`: the decoder with its parameters on a mesh, from a random init or
filled tensor by tensor from a checkpoint (transformers' layout), each placed straight
onto its sharding."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax import sharding as shd
from mmpo_jax.errors import UserError
from mmpo_jax.models.hf_weights import HFTensor, group_by_param, state_key
from mmpo_jax.models.decoder import Decoder
from mmpo_jax.models.decoder_config import DecoderConfig
from mmpo_jax.models.options import ModelOptions


def build_model(
    cfg: DecoderConfig,
    options: ModelOptions,
    *,
    mesh: jax.sharding.Mesh | None = None,
    get_tensor: Callable[[str], np.ndarray] | None = None,
    seed: int = 0,
    init_scale: float | None = None,
) -> Decoder:
    """The model, its parameters on `mesh` (sharded by `mmpo_jax.sharding` rules) or on
    the default device when `mesh` is None.

    `get_tensor` None: random init (normal with std `init_scale`, default 0.02; norms 1,
    biases 0) from `seed`, computed under jit straight into the shardings.

    Otherwise every parameter is read with `get_tensor(hf_name) -> np.ndarray` in
    transformers' layout (torch Linear weights `[out, in]`; any float dtype),
    converted to ours and placed straight onto its sharding: the model is built
    abstractly (`nnx.eval_shape`, nothing allocated), then one parameter at a time
    is converted into a single host array (a stacked layer parameter filled layer by
    layer) whose per-device shards, views of it, `jax.make_array_from_callback`
    places on this process's devices. `get_tensor` is called once per name (in
    our parameters' order, not the file's); a memory-mapped safetensors tensor or a
    dequantised GGUF tensor both do. A missing tensor (`get_tensor`
    raising KeyError) or a wrongly shaped one raises a `UserError` naming it and the
    expected shape.
    """
    scale = 0.02 if init_scale is None else float(init_scale)

    def make() -> Decoder:
        lora_key = jax.random.fold_in(jax.random.key(seed), 1)
        rngs = nnx.Rngs(params=seed, lora=lora_key)
        return Decoder(cfg, options, rngs=rngs, init_scale=scale, mesh=mesh)

    abstract = nnx.eval_shape(make)
    graphdef, abs_state = nnx.split(abstract)
    target = shd.model_shardings(abs_state, mesh) if mesh is not None else None

    if get_tensor is None:
        if target is None:
            return make()
        out_shardings = target

        @partial(jax.jit, out_shardings=out_shardings)
        def init_state() -> nnx.State:
            return nnx.split(make())[1]

        return nnx.merge(graphdef, init_state())

    groups = group_by_param(cfg, options.scan_layers)
    flat = nnx.to_flat_state(abs_state)
    # LoRA adapters are not in the checkpoint: they start from their init (B = 0).
    lora_init = (
        dict(nnx.to_flat_state(jax.jit(lambda: nnx.state(make(), nnx.LoRAParam))()))
        if options.lora is not None else {}
    )
    seen = set()
    leaves = []
    for path, var in flat:
        key = state_key(path)
        value = var.get_value() if hasattr(var, "get_value") else var.value
        if path in lora_init:
            init = lora_init[path]
            init = init.get_value() if hasattr(init, "get_value") else init.value
            leaves.append((path, var.replace(jax.device_put(init, _sharding_for(target, path, mesh)))))
            continue
        if key not in groups:
            raise AssertionError(f"no HF tensor maps to parameter {key}")  # a bug in this file
        seen.add(key)
        tensors = groups[key]
        sharding = _sharding_for(target, path, mesh)
        arr = _load_param(tensors, value.shape, value.dtype, sharding, get_tensor, stacked=len(tensors) > 1
                          or (options.scan_layers and tensors[0].layer is not None))
        leaves.append((path, var.replace(arr)))
    missing = set(groups) - seen
    assert not missing, missing  # a bug in this file
    state = nnx.from_flat_state(leaves)
    return nnx.merge(graphdef, state)


def _sharding_for(target: nnx.State | None, path: tuple[Any, ...], mesh: jax.sharding.Mesh | None
                  ) -> jax.sharding.Sharding:
    if target is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    node: Any = target  # a State, then its sub-States, then the Variable at `path`
    for p in path:
        node = node[p]
    return node.get_value() if hasattr(node, "get_value") else node


def _load_param(tensors: list[HFTensor], shape: tuple[int, ...], dtype: Any, sharding: jax.sharding.Sharding,
                get_tensor: Callable[[str], np.ndarray], stacked: bool) -> jax.Array:
    """One parameter, read from its HF tensor(s) (one per layer when stacked).

    Each HF tensor is read once and converted into one host array in our layout (one
    parameter at a time: the host never holds more than the largest parameter and
    one raw tensor); the devices' shards are views of it, which
    `jax.make_array_from_callback` places on its devices.
    """
    np_dtype = np.dtype(jnp.dtype(dtype))

    def read(t: HFTensor) -> np.ndarray:
        try:
            a = get_tensor(t.hf_name)
        except KeyError:
            raise UserError(
                f"checkpoint lacks tensor '{t.hf_name}' (expected shape {list(t.hf_shape)})"
            ) from None
        a = np.asarray(a)
        if tuple(a.shape) != tuple(t.hf_shape):
            raise UserError(
                f"tensor '{t.hf_name}' has shape {list(a.shape)}, expected {list(t.hf_shape)}"
            )
        return t.to_ours(a)

    if stacked:
        host = np.empty(shape, np_dtype)
        for i, t in enumerate(tensors):
            host[i] = read(t)
    else:
        host = np.ascontiguousarray(read(tensors[0]), dtype=np_dtype)
    assert host.shape == tuple(shape), (tensors[0].hf_name, host.shape, shape)
    return jax.make_array_from_callback(shape, sharding, lambda idx: host[idx])
