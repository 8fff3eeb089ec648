"""The device mesh: axes `data`, `fsdp`, `tensor`, sized by the run config.

The batch is split over `data` x `fsdp` (`BATCH_AXES`); parameters are sharded
over `fsdp` and `tensor`. One config runs on 1 CPU, 8 simulated CPU devices, a
GPU or a TPU pod: a size of -1 takes whatever devices the other axes leave.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mmpo_jax.config import ConfigError, MeshConfig

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
# The axes the pairs of a batch are split over; losses reduce over these.
BATCH_AXES: tuple[str, str] = ("data", "fsdp")


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Returns `(data, fsdp, tensor)` sizes whose product is `num_devices`.

    Raises a ConfigError naming the sizes when they cannot cover the devices.
    """
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size}: must be >= 1, or -1 for the rest")
    rest = [i for i, s in enumerate(sizes) if s == -1]
    if len(rest) > 1:
        raise ConfigError(
            "mesh: at most one of data, fsdp, tensor may be -1, got "
            + ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))
        )
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
