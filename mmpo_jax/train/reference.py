"""The reference model, by `model.reference`: one object per mode.

- `separate`: the train state holds a full copy of the reference's parameters (the
  initial policy, or `model.reference_path`), in the compute dtype where that is
  narrower (`stored_dtype`); its forward merges them with the policy's `rest`.
- `lora_base`: no copy; the policy's own base weights with the LoRA params zeroed
  (B = 0 makes every adapter contribute exactly nothing).
- `precomputed`: the reference log-probs arrive with the batch (`ref_logps`
  `[pairs, 2]`), computed in one pass before training (`reference_cache`) by the
  initial model, loaded for that pass only (`setup.initial_reference`).
- `none`: no reference (losses that need none: `losses.declarations.REFERENCE_FREE_LOSSES`).

Each mode says what it adds to the state (`stored`), its model (`model`), its per-pair
log-probs for a batch (`logps`), the batch keys it needs and how to describe it; the
state, the step, the AOT check, the probe and the win rate ask it instead of branching
on the mode's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from mmpo_jax.config_model import LORA_BASE_NEEDS_LORA
from mmpo_jax.train.pair_logps import pair_logps
from mmpo_jax.train.state import merge_states

if TYPE_CHECKING:
    from mmpo_jax.data.layout import DeviceBatch
    from mmpo_jax.models.decoder import Decoder
    from mmpo_jax.config_schema import RunConfig
    from mmpo_jax.train.state import StateDef
    from mmpo_jax.train.state import TrainState
    from mmpo_jax.train.setup import Evaluator


def stored_dtype(dtype: Any, compute_dtype: Any) -> Any:
    """The dtype a `separate` reference keeps a parameter of `dtype` in: the compute dtype
    when that is a narrower float (the forward casts every parameter to it anyway, so the
    reference computes the same numbers in less memory), else its own."""
    dtype, compute = jnp.dtype(dtype), jnp.dtype(compute_dtype)
    if jnp.issubdtype(dtype, jnp.floating) and compute.itemsize < dtype.itemsize:
        return compute
    return dtype


@dataclass(frozen=True)
class ReferenceMode:
    """One `model.reference` mode (see the module docstring)."""

    name: str
    # the train state holds the reference's parameters (TrainState.reference)
    stores_weights: bool = False
    # the reference model is the policy's base weights (needs LoRA)
    uses_lora_base: bool = False
    # the log-probs come with the batch, from one pass before training
    precomputed: bool = False

    @property
    def exists(self) -> bool:
        """The run has reference log-probs (every mode but `none`)."""
        return self.stores_weights or self.uses_lora_base or self.precomputed

    @property
    def has_model(self) -> bool:
        """A reference model exists in the state for the step, the probe and generation."""
        return self.stores_weights or self.uses_lora_base

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """Batch keys this mode adds to the step's batch."""
        return ("ref_logps",) if self.precomputed else ()

    def check(self, *, lora: bool) -> None:
        if self.uses_lora_base and not lora:
            raise ValueError(f"model.reference={self.name} {LORA_BASE_NEEDS_LORA}")

    def stored(self, params: Any, compute_dtype: Any) -> Any:
        """What `TrainState.reference` holds, from the reference's `nnx.Param` state
        `params`: arrays (copied, as the policy's buffers are donated) or, for an
        abstract state, ShapeDtypeStructs; None for a mode that stores none."""
        if not self.stores_weights:
            return None

        def keep(x: Any) -> Any:
            dtype = stored_dtype(x.dtype, compute_dtype)
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
            return x.astype(dtype) if dtype != x.dtype else jnp.copy(x)

        return jax.tree.map(keep, params)

    def model(self, sdef: StateDef, state: TrainState) -> Decoder | None:
        """The reference module of `state` (None when the state keeps none)."""
        if self.stores_weights:
            assert state.reference is not None, f"reference mode {self.name} stores its weights"
            return merge_states(sdef.graphdef, state.reference, state.rest)
        if self.uses_lora_base:
            zeros = jax.tree.map(jnp.zeros_like, state.trainable)
            return merge_states(sdef.graphdef, zeros, state.frozen, state.rest)
        return None

    def logps(self, sdef: StateDef, state: TrainState, batch: DeviceBatch, *, average: bool,
              chunk: int | None, ld_alpha: float | None = None) -> jax.Array | None:
        """`[pairs, 2]` reference sequence log-probs of `batch` (no gradient), reduced as the
        policy's (`average`, `ld_alpha`), or None."""
        if self.precomputed:
            assert batch.ref_logps is not None, "a precomputed reference's batch holds ref_logps"
            return jax.lax.stop_gradient(batch.ref_logps.astype(jnp.float32))
        model = self.model(sdef, state)
        if model is None:
            return None
        logps = pair_logps(model, batch, average=average, chunk=chunk,
                           ld_alpha=ld_alpha).logps
        return jax.lax.stop_gradient(logps)

    def source(self, cfg: RunConfig) -> str:
        """Where the reference's weights come from, in words."""
        initial = initial_model_description(cfg)
        path = cfg.model.reference_path
        if self.uses_lora_base:
            return initial
        if path and (self.stores_weights or self.precomputed):
            return f"model.reference_path={path!r}"
        return f"the initial {'policy' if self.stores_weights else 'model'}, {initial}"

    def describe(self, cfg: RunConfig) -> str:
        """The reference model this mode holds, in words."""
        source = self.source(cfg)
        if self.stores_weights:
            return f"the run's frozen reference ({source})"
        if self.uses_lora_base:
            return f"the base model without the LoRA adapters (model.reference={self.name}; {source})"
        if self.precomputed:
            return f"the run's reference (model.reference={self.name}: {source})"
        return source


def initial_model_description(cfg: RunConfig) -> str:
    """Where the run's initial weights come from, in words."""
    if cfg.model.path:
        return f"model.path={cfg.model.path!r}"
    return f"the random init of model.init with train.seed={cfg.train.seed}"


REFERENCE_MODES: dict[str, ReferenceMode] = {
    mode.name: mode
    for mode in (
        ReferenceMode("separate", stores_weights=True),
        ReferenceMode("lora_base", uses_lora_base=True),
        ReferenceMode("precomputed", precomputed=True),
        ReferenceMode("none"),
    )
}


def reference_mode(name: str) -> ReferenceMode:
    """The mode `name` (a resolved `model.reference`; `auto` is settled by the config): the
    one place the config's string becomes the object that the state, the step and the
    commands carry (`StateDef.reference_mode`)."""
    try:
        return REFERENCE_MODES[name]
    except KeyError:
        raise ValueError(f"reference mode {name!r} not in {tuple(REFERENCE_MODES)}") from None


def held_model(run: Evaluator) -> Decoder | None:
    """The reference model `run`'s state holds (`separate`, `lora_base`), else None
    (`precomputed` and `none` keep none: `setup.initial_reference` loads the initial one)."""
    return run.sdef.reference_mode.model(run.sdef, run.state)
