"""The train step and eval step: one jitted function each, sharded over the mesh.

A batch is a `mmpo_jax.data.layout.DeviceBatch` in its layout (`data.packing`),
pair-major (or packed rows) and split over the batch mesh axes (`data` x `fsdp`) along
its first axis:

    input_ids   [pairs, 2, seq] int32   chosen at [:, 0], rejected at [:, 1]
    loss_mask   [pairs, 2, seq]         1 on the completion tokens, aligned with input_ids
                                        (`mmpo_jax.data.batches.PreferenceBatch`)
    pair_mask   [pairs]                 1 = real pair, 0 = padding (optional)
    ref_logps   [pairs, 2] float32      reference sequence log-probs (mode `precomputed`)

One step: for each of `optim.grad_accum` micro-batches (each normalised on its
own, as the loss contract says), the policy's chosen and rejected log-probs in
one forward, the reference's without gradient, and the loss named by `loss.name`
on their `LossInputs` (with the answers' token counts and the pair mask) under
`shard_map` with global statistics (`lax.pmin`/`pmax`/`psum` over the
batch axes), and its gradient; the gradients are averaged, clipped and applied
by the optimizer. If the loss, any gradient or any updated parameter is not
finite (an update can overflow where the gradient did not), the state is
returned unchanged (decided inside the jitted step, since the state's buffers
are donated) and `metrics["nonfinite"]` is 1.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmpo_jax.losses import declarations as loss_declarations
from mmpo_jax.config_schema import LossConfig
from mmpo_jax.data.layout import DeviceBatch, batch_shardings
from mmpo_jax.errors import UserError
from mmpo_jax.losses.binding import BoundLoss
from mmpo_jax.losses.inputs import LossInputs
from mmpo_jax.losses.registry import bind_loss
from mmpo_jax.sharding import BATCH_AXES
from mmpo_jax.train.pair_logps import pair_logps
from mmpo_jax.train.state import StateDef, TrainState

Metrics = dict[str, jax.Array]
# The jitted steps (`make_train_step`, `make_eval_step`): `(state, batch) -> (state, metrics)`
# and `(state, batch) -> metrics`.
TrainStepFn = Callable[[TrainState, DeviceBatch], tuple[TrainState, Metrics]]
EvalStepFn = Callable[[TrainState, DeviceBatch], Metrics]


# --------------------------------------------------------------------------- #
# The loss on per-pair log-probs, global over the mesh
# --------------------------------------------------------------------------- #
def loss_on_mesh(loss: BoundLoss, mesh: jax.sharding.Mesh, inputs: LossInputs) -> tuple[jax.Array, Metrics]:
    """The bound loss on `inputs` (`[pairs]` arrays split over the batch mesh axes), with
    global statistics; only the fields the loss reads enter the `shard_map`."""

    def local(used: LossInputs) -> tuple[jax.Array, Metrics]:
        return loss(used, axis_name=BATCH_AXES)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(BATCH_AXES),), out_specs=(P(), P()))
    return fn(loss.used(inputs))


# --------------------------------------------------------------------------- #
# Step functions
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class StepConfig:
    """What the step needs besides the state and the batch (all static)."""

    loss: LossConfig
    grad_accum: int
    logprob_chunk: int | None
    schedule: Callable[[jax.Array], jax.Array]
    dropout: bool  # dropout on (model.dropout > 0) during training
    # TR-DPO: (every N optimizer steps, mixup alpha), or None for a fixed reference
    reference_sync: tuple[int, float] | None = None
    # `loss` bound to its JAX function once, called on every micro-batch
    bound_loss: BoundLoss = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bound_loss", bind_loss(self.loss))  # frozen: set once, here


def _micro_batches(batch: DeviceBatch, n: int) -> DeviceBatch:
    """`[pairs, ...]` -> `[n, pairs / n, ...]`, micro-batch `a` = pairs `a, a+n, a+2n, ...`.

    Strided, not contiguous: each device keeps exactly its own pairs (the pairs
    axis is split into contiguous blocks over devices), so no data moves.
    """

    def split(x: jax.Array) -> jax.Array:
        pairs = x.shape[0]
        y = x.reshape(pairs // n, n, *x.shape[1:])
        return jnp.moveaxis(y, 1, 0)

    return jax.tree.map(split, batch)


def _forward_loss(
    sdef: StateDef,
    scfg: StepConfig,
    mesh: jax.sharding.Mesh,
    state: TrainState,
    trainable: nnx.State,
    batch: DeviceBatch,
    dropout_key: jax.Array | None,
) -> tuple[jax.Array, Metrics]:
    """Loss and metrics of one micro-batch, differentiable in `trainable`."""
    lc = scfg.loss
    assert lc.average_logps is not None, "the step reads a settled LossConfig"
    policy = sdef.policy(state, trainable)
    out = pair_logps(
        policy, batch, **loss_declarations.reduction(lc),
        chunk=scfg.logprob_chunk, entropy_estimator=loss_declarations.entropy_estimator(lc), dropout_key=dropout_key,
        chosen_sequence=scfg.bound_loss.declaration.sequence_nll, weighting=loss_declarations.weighting(lc),
    )
    ref = _reference_logps(sdef, scfg, state, batch)
    pair_mask = batch.pair_mask
    pair_mask = jnp.ones(out.logps.shape[:1], jnp.float32) if pair_mask is None else pair_mask.astype(jnp.float32)
    # completion tokens per answer (data): SFT's token mean divides by the chosen ones
    tokens = jnp.sum(batch.loss_mask.astype(jnp.float32), axis=-1)
    inputs = LossInputs.from_pairs(out.logps, tokens, pair_mask, ref=ref, entropy=out.entropy,
                                   chosen_sequence=out.chosen_sequence, pair_weights=out.weights,
                                   chosen_unweighted=out.chosen_unweighted)
    return loss_on_mesh(scfg.bound_loss, mesh, inputs)


def _reference_logps(sdef: StateDef, scfg: StepConfig, state: TrainState, batch: DeviceBatch) -> jax.Array | None:
    """`[pairs, 2]` reference log-probs of `batch`, as the run's reference mode gives them."""
    return sdef.reference_mode.logps(sdef, state, batch, chunk=scfg.logprob_chunk,
                                     **loss_declarations.reduction(scfg.loss))


def _all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def loss_and_grads(
    sdef: StateDef,
    scfg: StepConfig,
    mesh: jax.sharding.Mesh,
    state: TrainState,
    batch: DeviceBatch,
) -> tuple[nnx.State, Metrics]:
    """Gradients (float32, like `state.trainable`) and metrics of one optimizer step's
    batch: the mean over its `grad_accum` micro-batches, each normalised on its own."""
    n = scfg.grad_accum
    micro = _micro_batches(batch, n)
    base_key = jax.random.wrap_key_data(state.rng)
    step_key = jax.random.fold_in(base_key, state.step)

    grad_fn = jax.value_and_grad(
        lambda t, mb, key: _forward_loss(sdef, scfg, mesh, state, t, mb, key), has_aux=True
    )

    def body(carry: tuple[nnx.State, Metrics], xs: tuple[jax.Array, DeviceBatch]
             ) -> tuple[tuple[nnx.State, Metrics], None]:
        grads_sum, metrics_sum = carry
        index, mb = xs
        key = jax.random.fold_in(step_key, index) if scfg.dropout else None
        (_, metrics), grads = grad_fn(state.trainable, mb, key)
        grads_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_sum, grads)
        metrics_sum = jax.tree.map(jnp.add, metrics_sum, metrics)
        return (grads_sum, metrics_sum), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
    metric_shapes = jax.eval_shape(
        lambda: _forward_loss(sdef, scfg, mesh, state, state.trainable,
                              jax.tree.map(lambda x: x[0], micro), None)[1]
    )
    metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (grads, metrics), _ = jax.lax.scan(body, (zeros, metric_zeros), (jnp.arange(n), micro))
    return jax.tree.map(lambda g: g / n, grads), jax.tree.map(lambda m: m / n, metrics)


def train_step_fn(
    sdef: StateDef,
    scfg: StepConfig,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    state: TrainState,
    batch: DeviceBatch,
) -> tuple[TrainState, Metrics]:
    """One optimizer step (unjitted; see `make_train_step`)."""
    grads, metrics = loss_and_grads(sdef, scfg, mesh, state, batch)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
    updates, new_opt = optimizer.update(grads, state.opt_state, state.trainable)
    new_trainable = optax.apply_updates(state.trainable, updates)
    finite = jnp.isfinite(metrics["loss"]) & _all_finite(grads) & _all_finite(new_trainable)

    def keep(new: jax.Array, old: jax.Array) -> jax.Array:
        return jnp.where(finite, new, old)

    new_state = dataclasses.replace(
        state,
        step=jnp.where(finite, state.step + 1, state.step),
        trainable=jax.tree.map(keep, new_trainable, state.trainable),
        opt_state=jax.tree.map(keep, new_opt, state.opt_state),
    )
    if scfg.reference_sync is not None:
        new_state = _synced_reference(new_state, finite, *scfg.reference_sync)
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["learning_rate"] = scfg.schedule(state.step)
    metrics["nonfinite"] = (~finite).astype(jnp.float32)
    return new_state, metrics


def _synced_reference(state: TrainState, applied: jax.Array, every: int, alpha: float) -> TrainState:
    """TR-DPO (TRL's `SyncRefModelCallback`): after the optimizer steps that make
    `state.step` a multiple of `every`, `reference = (1 - alpha) reference + alpha policy`
    (in float32, stored back in the reference's dtype); a skipped step syncs nothing."""
    assert state.reference is not None, "reference sync needs a stored (separate) reference"
    sync = applied & (state.step % every == 0)

    def mix(ref: jax.Array, policy: jax.Array) -> jax.Array:
        mixed = (1.0 - alpha) * ref.astype(jnp.float32) + alpha * policy.astype(jnp.float32)
        return jnp.where(sync, mixed.astype(ref.dtype), ref)

    return dataclasses.replace(state, reference=jax.tree.map(mix, state.reference, state.trainable))


def eval_step_fn(
    sdef: StateDef, scfg: StepConfig, mesh: jax.sharding.Mesh, state: TrainState, batch: DeviceBatch
) -> Metrics:
    """The train step's metrics on `batch`, without gradients or an update."""
    _, metrics = _forward_loss(sdef, scfg, mesh, state, state.trainable, batch, None)
    return metrics


def check_batch_divisible(pairs: int, grad_accum: int, mesh: jax.sharding.Mesh) -> None:
    """A micro-batch's pairs must split evenly over the batch mesh axes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if pairs % grad_accum or (pairs // grad_accum) % shards:
        raise UserError(
            f"data.batch_size={pairs} pairs with optim.grad_accum={grad_accum} gives micro-batches "
            f"of {pairs / grad_accum:g} pairs, which must be a whole multiple of the "
            f"{shards} batch shards (mesh.data x mesh.fsdp); choose data.batch_size as a "
            f"multiple of {grad_accum * shards}"
        )


# Below this many parameters a CPU step is compile-bound (tests, tiny models), above it
# run-bound (the 135M demo: -O3 steps run ~1.7x faster for ~20 s more compile).
FAST_COMPILE_MAX_PARAMS = 20_000_000


def compiler_options(mesh: jax.sharding.Mesh, num_params: int = 0) -> dict[str, Any] | None:
    """XLA options of the steps: on CPU, for small models, LLVM at -O0.

    XLA's CPU compile of a train step is slow (~30 s for a 2-layer model here) and
    mostly LLVM optimisation of the fused elementwise loops; -O0 compiles ~2.5x faster
    and runs those loops ~2x slower, a gain where compiling dominates (models under
    FAST_COMPILE_MAX_PARAMS). MMPO_CPU_FAST_COMPILE=1 / 0 forces it on / off.
    """
    if not all(d.platform == "cpu" for d in mesh.devices.flat):
        return None
    forced = os.environ.get("MMPO_CPU_FAST_COMPILE")
    fast = num_params < FAST_COMPILE_MAX_PARAMS if forced is None else forced != "0"
    return {"xla_backend_optimization_level": 0} if fast else None


def make_train_step(sdef: StateDef, scfg: StepConfig, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, state_sharding: TrainState, example_batch: DeviceBatch,
                    num_params: int = 0) -> jax.stages.Wrapped:
    """The jitted train step `(state, batch) -> (state, metrics)`; the state is donated.
    `example_batch`: a batch with the step's fields and layout (`Layout.example`; only its
    shardings are read: it compiles once per batch shape)."""
    fn = partial(train_step_fn, sdef, scfg, optimizer, mesh)
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_shardings(mesh, example_batch)),
        out_shardings=(state_sharding, replicated),
        donate_argnums=(0,),
        compiler_options=compiler_options(mesh, num_params),
    )


def make_eval_step(sdef: StateDef, scfg: StepConfig, mesh: jax.sharding.Mesh, state_sharding: TrainState,
                   example_batch: DeviceBatch, num_params: int = 0) -> jax.stages.Wrapped:
    """The jitted eval step `(state, batch) -> metrics`."""
    fn = partial(eval_step_fn, sdef, scfg, mesh)
    return jax.jit(
        fn,
        in_shardings=(state_sharding, batch_shardings(mesh, example_batch)),
        out_shardings=NamedSharding(mesh, P()),
        compiler_options=compiler_options(mesh, num_params),
    )
