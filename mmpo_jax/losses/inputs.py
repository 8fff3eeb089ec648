"""The per-pair inputs of every loss, as one pytree.

    inputs = LossInputs.from_pairs(logps, tokens, pair_mask, ref=ref_logps, entropy=entropy)

The train and eval steps build it from the policy's `[pairs, 2]` log-probs and pass it
whole through `shard_map`; the PyTorch reference builds the same struct of tensors.
`mmpo_jax.losses.binding.BoundLoss` picks from it what a loss reads.
"""

from __future__ import annotations

from typing import Any

from flax import struct


@struct.dataclass
class LossInputs:
    """Sequence log-probs and counts of `pairs` preference pairs (arrays of JAX or torch).

    policy_chosen, policy_rejected  [pairs]  the policy's sequence log-probs (sums, or
                                             per-token means with `loss.average_logps`)
    ref_chosen, ref_rejected        [pairs]  the reference's, with the same reduction (or None)
    chosen_tokens, rejected_tokens  [pairs]  completion tokens of each answer (data, or None)
    entropy                         [pairs]  the entropy bonus of each pair (or None)
    pair_mask                       [pairs]  1 = real pair, 0 = padding (None: all real)
    chosen_sequence_logps           [pairs]  the chosen row's log-prob sum over every
                                             predicted token, prompt included (ORPO's NLL)
    chosen_sequence_tokens          [pairs]  how many tokens that sum covers
    pair_weights                    [pairs]  WPO's weight of each pair (no gradient), or None
    chosen_unweighted_logps         [pairs]  the chosen answers' plain log-prob sums when
                                             `policy_chosen` is LD-DPO-weighted (else None)
    """

    # field order = the order of the leaves a `shard_map` receives
    policy_chosen: Any
    policy_rejected: Any
    ref_chosen: Any = None
    ref_rejected: Any = None
    chosen_tokens: Any = None
    rejected_tokens: Any = None
    entropy: Any = None
    pair_mask: Any = None
    chosen_sequence_logps: Any = None
    chosen_sequence_tokens: Any = None
    pair_weights: Any = None
    chosen_unweighted_logps: Any = None

    @classmethod
    def from_pairs(cls, logps: Any, tokens: Any, pair_mask: Any, *, ref: Any = None,
                   entropy: Any = None, chosen_sequence: Any = None, pair_weights: Any = None,
                   chosen_unweighted: Any = None) -> "LossInputs":
        """From pair-major `[pairs, 2]` log-probs and token counts (chosen at `[:, 0]`),
        the reference's `[pairs, 2]` log-probs (or None), the `[pairs]` entropy bonus,
        `chosen_sequence` `(logps, tokens)` `[pairs]` each, WPO's `pair_weights` and the
        chosen answers' `chosen_unweighted` sums under LD-DPO (or None)."""
        return cls(
            policy_chosen=logps[:, 0],
            policy_rejected=logps[:, 1],
            pair_mask=pair_mask,
            ref_chosen=None if ref is None else ref[:, 0],
            ref_rejected=None if ref is None else ref[:, 1],
            chosen_tokens=None if tokens is None else tokens[:, 0],
            rejected_tokens=None if tokens is None else tokens[:, 1],
            entropy=entropy,
            chosen_sequence_logps=None if chosen_sequence is None else chosen_sequence[0],
            chosen_sequence_tokens=None if chosen_sequence is None else chosen_sequence[1],
            pair_weights=pair_weights,
            chosen_unweighted_logps=chosen_unweighted,
        )
