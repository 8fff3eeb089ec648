"""The mesh: sizes from the config, -1 as the rest, clear errors."""

import jax
import pytest

from mmpo_jax.config_schema import ConfigError, MeshConfig
from mmpo_jax.sharding import MESH_AXES, make_mesh, resolve_mesh_shape


@pytest.mark.parametrize(
    "sizes,n,expected",
    [
        ((-1, 1, 1), 8, (8, 1, 1)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((1, 4, -1), 8, (1, 4, 2)),
        ((2, 2, 2), 8, (2, 2, 2)),
        ((-1, 1, 1), 1, (1, 1, 1)),
    ],
)
def test_resolve(sizes, n, expected):
    assert resolve_mesh_shape(MeshConfig(*sizes), n) == expected


@pytest.mark.parametrize(
    "sizes,n,needle",
    [
        ((2, 3, 1), 8, "6 devices, but 8 are available"),
        ((3, -1, 1), 8, "does not divide the 8 devices"),
        ((-1, -1, 1), 8, "at most one"),
        ((0, 1, 1), 8, "mesh.data=0"),
    ],
)
def test_resolve_errors(sizes, n, needle):
    with pytest.raises(ConfigError, match=needle):
        mesh = MeshConfig(*sizes)
        mesh.validate("mesh")  # the config's own rules, checked once where it is loaded
        resolve_mesh_shape(mesh, n)


def test_make_mesh_on_simulated_devices():
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.shape.values()) == (2, 2, 2)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    sub = make_mesh(MeshConfig(), devices=jax.devices()[:4])
    assert tuple(sub.shape.values()) == (4, 1, 1)
