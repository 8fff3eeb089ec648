"""A fixed example batch of sequence log-probs, for trying the losses without a model."""

from __future__ import annotations

import numpy as np

from mmpo_jax.config import RunConfig

EXAMPLE_PAIRS = 8


def example_logps(seed: int, pairs: int = EXAMPLE_PAIRS) -> dict[str, np.ndarray]:
    """Plausible summed log-probs of ~40-token completions, `[pairs]` each.

    The policy starts near the reference and the chosen answers are a little
    more likely, as after supervised fine-tuning.
    """
    rng = np.random.default_rng(seed)
    ref_chosen = rng.uniform(-90.0, -30.0, pairs)
    ref_rejected = ref_chosen - rng.uniform(-5.0, 15.0, pairs)
    return {
        "policy_chosen_logps": ref_chosen + rng.normal(0.5, 1.0, pairs),
        "policy_rejected_logps": ref_rejected + rng.normal(-0.5, 1.0, pairs),
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }


def example_metrics(cfg: RunConfig, name: str) -> dict[str, float]:
    """Runs loss `name` with the settings of `cfg.loss` on the example batch."""
    import jax.numpy as jnp

    from mmpo_jax import losses

    batch = {k: jnp.asarray(v, jnp.float32) for k, v in example_logps(cfg.train.seed).items()}
    pc, pr = batch["policy_chosen_logps"], batch["policy_rejected_logps"]
    beta = cfg.loss.beta if name == cfg.loss.name else (2.0 if name == "simpo" else 0.1)
    if name == "simpo":  # SimPO reads length-averaged log-probs: ~40 tokens per completion here
        pc, pr = pc / 40.0, pr / 40.0
    _, metrics = losses.configured_loss(
        cfg.loss, pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], name=name, beta=beta
    )
    return {k: float(v) for k, v in metrics.items()}
