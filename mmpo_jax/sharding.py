"""The device mesh: axes `data`, `fsdp`, `tensor`, sized by the run config.

The batch is split over `data` x `fsdp` (`BATCH_AXES`); parameters are sharded
over `fsdp` and `tensor`. One config runs on 1 CPU, 8 simulated CPU devices, a
GPU or a TPU pod: a size of -1 takes whatever devices the other axes leave.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, PartitionSpec

from mmpo_jax.config_schema import ConfigError, MeshConfig

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
# The axes the pairs of a batch are split over; losses reduce over these.
BATCH_AXES: tuple[str, str] = ("data", "fsdp")


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Returns `(data, fsdp, tensor)` sizes whose product is `num_devices`.

    `mesh` is a validated `MeshConfig` (sizes >= 1, at most one -1: `MeshConfig.validate`
    says so to the user); raises a ConfigError naming the sizes when they cannot cover
    the devices.
    """
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    rest = [i for i, s in enumerate(sizes) if s == -1]
    assert all(s >= 1 or s == -1 for s in sizes) and len(rest) <= 1, f"an unvalidated mesh config: {mesh}"
    fixed = int(np.prod([s for s in sizes if s != -1]))
    described = " x ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
    if rest:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh {described}: the fixed axes multiply to {fixed}, which does not "
                f"divide the {num_devices} devices; choose sizes whose product divides {num_devices}"
            )
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh {described} = {fixed} devices, but {num_devices} are available; "
            "make the sizes multiply to the device count, or set one axis to -1 "
            "(e.g. mesh.data=-1) to use the rest"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `(data, fsdp, tensor)` mesh over `devices` (default: all devices).

    Axis types are Auto (classic GSPMD propagation): the step states its input
    and output shardings and lets XLA place the rest.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh, len(devices))
    if len(devices) == len(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (TPU ICI rings).
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(
        np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
    )


# --------------------------------------------------------------------------- #
# Logical axes -> mesh axes
# --------------------------------------------------------------------------- #
# The one table mapping the logical axis names that parameters (and activations)
# carry to mesh axes. A logical name maps to a mesh axis, a tuple of mesh axes, or
# None (replicated). Parameters: FSDP shards the `embed` axis of every matrix over
# `fsdp`; tensor parallelism shards heads, kv heads, the MLP width and the vocabulary
# over `tensor` (Megatron-style column/row split: q/k/v/gate/up by output, o/down by
# input). A dimension a mesh axis does not divide stays replicated (e.g. one kv head
# under tensor=2), see `logical_to_spec`.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("layers", None),  # the stacked-layers axis of scanned layers
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),  # RMSNorm scales and other [embed] vectors: small, replicated
    ("lora_rank", None),  # LoRA's rank axis: a few columns, never split
    # activations
    ("batch", BATCH_AXES),
    ("seq", None),
    ("act_embed", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def logical_to_spec(
    axes: Sequence[str | None] | None,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of logical `axes` under `LOGICAL_AXIS_RULES`.

    With `shape` and `mesh`, a mesh axis that does not divide its dimension, or is
    already used by an earlier dimension, is dropped (that dimension is replicated
    over it): JAX needs even shards, and one kv head cannot be split.
    """
    if not axes:
        return PartitionSpec()
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in _RULES:
            raise ValueError(
                f"logical axis '{name}' has no rule in LOGICAL_AXIS_RULES "
                f"({', '.join(_RULES)})"
            )  # a bug in the model code
        target = _RULES[name]
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        size = 1
        for ax in mesh_axes:
            if ax in used:
                continue
            if mesh is not None:
                n = mesh.shape[ax]
                if shape is not None and shape[i] % (size * n):
                    continue
                size *= n
            kept.append(ax)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def _logical_axes(var: nnx.Variable) -> tuple | None:
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    return meta.get("out_sharding")


def model_partition_specs(state: nnx.State | nnx.Module, mesh: Mesh | None = None) -> nnx.State:
    """A PartitionSpec for every Variable of an NNX state (or module), same tree
    structure, from the logical axes in each Variable's `out_sharding` metadata;
    Variables without it are replicated. With `mesh`, non-dividing axes are dropped
    (`logical_to_spec`)."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)

    def spec(var: nnx.Variable) -> nnx.Variable:
        value = var.get_value() if hasattr(var, "get_value") else var.value
        shape = getattr(value, "shape", None)
        return var.replace(logical_to_spec(_logical_axes(var), shape, mesh))

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def model_shardings(state: nnx.State | nnx.Module, mesh: Mesh) -> nnx.State:
    """The NamedSharding of every Variable of an NNX state (or module) on `mesh`
    (same tree structure as `nnx.state(model)`): the `in_shardings`/`out_shardings`
    of a jitted step, or the targets of `jax.device_put`."""
    specs = model_partition_specs(state, mesh)
    return jax.tree.map(
        lambda v: v.replace(jax.sharding.NamedSharding(mesh, v.get_value())),
        specs,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
