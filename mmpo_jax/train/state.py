"""The train state: trainable params, frozen params, the reference, optimizer state.

The policy model is split once with `nnx.split` into a static `graphdef` and
three states:

- `trainable`: what the optimizer updates: every `nnx.Param` for full
  fine-tuning, only the `nnx.LoRAParam`s with LoRA (so only they get optimizer
  state);
- `frozen`: the other params (the base weights under LoRA; empty otherwise);
- `rest`: non-parameter variables (RoPE tables), never trained.

`reference`: what the reference mode stores (`mmpo_jax.train.reference`: a full
`nnx.Param` state for `separate`, nothing for the others).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.nnx import filterlib

from mmpo_jax.sharding import model_shardings

if TYPE_CHECKING:
    from mmpo_jax.models.decoder import Decoder
    from mmpo_jax.train.reference import ReferenceMode


@flax.struct.dataclass
class TrainState:
    """Everything that changes or is needed on device across steps (a pytree)."""

    step: jax.Array  # int32 [], optimizer steps applied
    trainable: nnx.State
    frozen: nnx.State
    rest: nnx.State
    reference: nnx.State | None  # what the reference mode stores (all Params for `separate`)
    opt_state: Any
    rng: jax.Array  # key for dropout


@dataclass(frozen=True)
class StateDef:
    """The static half of the state: how to rebuild the modules."""

    graphdef: nnx.GraphDef
    lora: bool
    reference_mode: ReferenceMode

    def policy(self, state: TrainState, trainable: nnx.State | None = None) -> Decoder:
        """The policy module from the state (`trainable` overrides the state's)."""
        t = state.trainable if trainable is None else trainable
        return merge_states(self.graphdef, t, state.frozen, state.rest)

    def reference(self, state: TrainState) -> Decoder:
        """The reference module of the modes that keep one in the state (`separate`, `lora_base`)."""
        model = self.reference_mode.model(self, state)
        if model is None:
            raise ValueError(f"reference mode {self.reference_mode.name!r} has no reference model")
        return model


def merge_states(graphdef: Any, *states: nnx.State) -> Any:
    """`nnx.merge` on fresh Variable objects.

    The step builds modules inside nested traces (value_and_grad inside a scan
    over micro-batches) from states captured at the outer jit level; NNX refuses
    Variables created at another trace level, so rebuild them here (no array work).
    """
    return nnx.merge(graphdef, *[jax.tree.map(lambda x: x, s) for s in states])


def frozen_filter(lora: bool) -> filterlib.Filter:
    # LoRAParam is a subclass of Param: exclude it explicitly.
    return nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)) if lora else nnx.Param


def split_model(model: nnx.Module, lora: bool) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """`graphdef, trainable, frozen, rest` of `model` (see the module docstring)."""
    if lora:
        graphdef, trainable, *states = nnx.split(model, nnx.LoRAParam, frozen_filter(True), ...)
        frozen, rest = states
        return graphdef, trainable, frozen, rest
    graphdef, params, *others = nnx.split(model, nnx.Param, ...)
    (rest,) = others
    empty: nnx.State = nnx.State({})
    return graphdef, params, empty, rest


def create_state(
    model: Decoder,
    optimizer: optax.GradientTransformation,
    *,
    lora: bool,
    reference_mode: ReferenceMode,
    reference_model: Decoder | None = None,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[StateDef, TrainState]:
    """The initial state of a run.

    `reference_mode`: what the state keeps for the reference (`reference.reference_mode(name)`
    of a resolved `model.reference`). `reference_model` (mode `separate` only): the
    reference; None = a copy of the initial policy. With `mesh`, the optimizer's moments
    are created sharded as their parameters (FSDP shards the AdamW state with the
    weights: for full fine-tuning in float32 it is twice the model).
    """
    reference_mode.check(lora=lora)
    graphdef, trainable, frozen, rest = split_model(model, lora)
    # all Params, LoRA adapters included: the initial policy (or the given reference) as it is
    source = model if reference_model is None else reference_model
    reference = reference_mode.stored(nnx.state(source, nnx.Param), source.options.compute_dtype)
    opt_state = init_optimizer_state(optimizer, trainable, mesh)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        rest=rest,
        reference=reference,
        opt_state=opt_state,
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    if mesh is not None:
        state = _onto_mesh(state, mesh)
    return StateDef(graphdef=graphdef, lora=lora, reference_mode=reference_mode), state


def optimizer_state_shardings(optimizer: optax.GradientTransformation, opt_state: Any, param_shardings: Any,
                              mesh: jax.sharding.Mesh) -> Any:
    """The sharding of every leaf of `opt_state` (arrays or ShapeDtypeStructs): a
    per-parameter leaf (`mu`, `nu`) as its parameter in `param_shardings`, the rest
    (step counters) replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated)


def init_optimizer_state(optimizer: optax.GradientTransformation, trainable: nnx.State,
                         mesh: jax.sharding.Mesh | None) -> Any:
    """`optimizer.init(trainable)` on the devices of `trainable`, sharded as it is.

    A plain `jit(optimizer.init)` would not do: the moments are zeros with no data
    dependence on the parameters, so XLA's sharding propagation replicates them.
    """
    if mesh is None:
        return jax.jit(optimizer.init)(trainable)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def on_mesh(x: jax.Array) -> jax.sharding.Sharding:  # a parameter not yet placed on `mesh` is replicated there later (_onto_mesh)
        s = x.sharding
        return s if isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh else replicated

    shapes = jax.eval_shape(optimizer.init, trainable)
    shardings = optimizer_state_shardings(optimizer, shapes, jax.tree.map(on_mesh, trainable), mesh)
    return jax.jit(optimizer.init, out_shardings=shardings)(trainable)


def _onto_mesh(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Arrays not already placed on the mesh (the step counter, the RNG, the
    optimizer's counters) are replicated over it, so that the jitted step sees one
    device set and the same shardings in as out."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(x: jax.Array) -> jax.Array:
        # A single-device sharding would also differ from the step's outputs'
        # NamedShardings and cost a second compile of the step.
        if isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(place, tree)


def place_abstract_state(state: TrainState, optimizer: optax.GradientTransformation,
                         mesh: jax.sharding.Mesh) -> TrainState:
    """`state` of ShapeDtypeStructs (`create_state` under `jax.eval_shape`) with the
    sharding a run on `mesh` gives each array: the parameters and the reference by the
    logical-axis rules (as `build_model` places them), the optimizer's moments as their
    parameters (`init_optimizer_state`), the rest replicated (`_onto_mesh`)."""
    def placed(tree: Any) -> Any:
        return _with_shardings(tree, model_shardings(tree, mesh))

    trainable = placed(state.trainable)
    param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return dataclasses.replace(
        state,
        step=_with_shardings(state.step, replicated),
        trainable=trainable,
        frozen=placed(state.frozen),
        rest=placed(state.rest),
        reference=None if state.reference is None else placed(state.reference),
        opt_state=_with_shardings(
            state.opt_state, optimizer_state_shardings(optimizer, state.opt_state, param_shardings, mesh)),
        rng=_with_shardings(state.rng, replicated),
    )


def _with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` with `shardings` (a tree like it, or one sharding for all)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def state_shardings(state: TrainState) -> Any:
    """The sharding of every array of `state` (as placed), for the step's in/out shardings."""
    return jax.tree.map(lambda x: x.sharding, state)
