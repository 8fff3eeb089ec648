"""Every preference loss bound to its JAX function: `LOSSES[name]` is a `LossSpec`, the
loss's declaration (`mmpo_jax.losses.declarations`: what it reads, its defaults, its
keys and metrics) and the function itself.

    loss = bind_loss(cfg.loss)                 # once per step function
    value, metrics = loss(inputs, axis_name=BATCH_AXES)

Adding a loss: `docs/losses.md`, "Adding a loss".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import jax

from mmpo_jax.losses.binding import BoundLoss, LossFunction, bind
from mmpo_jax.losses.declarations import DECLARATIONS, LOSS_NAMES, LossDeclaration, declaration_of
from mmpo_jax.losses.dpo import dpo_loss
from mmpo_jax.losses.inputs import LossInputs
from mmpo_jax.losses.mmpo import mmpo_loss, sft_loss, simpo_loss
from mmpo_jax.losses.policy import cpo_loss, orpo_loss
from mmpo_jax.losses.reduce import AxisName, Metrics

if TYPE_CHECKING:
    from mmpo_jax.config_schema import LossConfig


@dataclass(frozen=True)
class LossSpec:
    """One loss: its declaration and its JAX function (`[pairs]` log-probs first, then
    keywords; `axis_name` for the global statistics under `shard_map`)."""

    declaration: LossDeclaration
    function: LossFunction

    @property
    def name(self) -> str:
        return self.declaration.name


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(DECLARATIONS["mmpo"], mmpo_loss),
        LossSpec(DECLARATIONS["dpo"], dpo_loss),
        LossSpec(DECLARATIONS["simpo"], simpo_loss),
        LossSpec(DECLARATIONS["sft"], sft_loss),
        LossSpec(DECLARATIONS["cpo"], cpo_loss),
        LossSpec(DECLARATIONS["orpo"], orpo_loss),
    )
}
# a declared loss without its function fails here, at import
assert tuple(LOSSES) == LOSS_NAMES, "one LossSpec per declared loss, in the declarations' order"


def spec_of(name: str) -> LossSpec:
    """The loss `name` (a ValueError naming the choices if there is none)."""
    return LOSSES[declaration_of(name).name]


def bind_loss(loss_cfg: LossConfig, *, name: str | None = None, beta: float | None = None) -> BoundLoss:
    """The JAX loss the settled `loss_cfg` names (or `name` at its own defaults, `beta`),
    its config's arguments bound: call it on each micro-batch's `LossInputs`."""
    return bind(loss_cfg, lambda loss: LOSSES[loss].function, name=name, beta=beta)


def configured_loss(loss_cfg: LossConfig, inputs: LossInputs, *, axis_name: AxisName = None,
                    name: str | None = None, beta: float | None = None) -> tuple[jax.Array, Metrics]:
    """`bind_loss(loss_cfg, name=name, beta=beta)` on `inputs` `[pairs]`, once (a caller
    that runs it per micro-batch binds it once itself)."""
    return bind_loss(loss_cfg, name=name, beta=beta)(inputs, axis_name=axis_name)
