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
    lc = cfg.loss
    beta = lc.beta if name == lc.name else (2.0 if name == "simpo" else 0.1)
    if name == "mmpo":
        loss, metrics = losses.mmpo_loss(
            **batch,
            beta=beta,
            reward_epsilon=lc.reward_epsilon,
            rejected_epsilon=lc.rejected_epsilon,
            norm_eps=lc.norm_eps,
            aux_weight=lc.aux_weight,
            normalize=lc.normalize,
        )
    elif name == "dpo":
        loss, metrics = losses.dpo_loss(**batch, beta=beta, label_smoothing=lc.label_smoothing)
    else:
        # SimPO reads length-averaged log-probs: ~40 tokens per completion here.
        loss, metrics = losses.simpo_loss(
            batch["policy_chosen_logps"] / 40.0,
            batch["policy_rejected_logps"] / 40.0,
            beta=beta,
            gamma=lc.gamma,
        )
    return {k: float(v) for k, v in metrics.items()}
