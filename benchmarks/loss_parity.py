"""Largest differences of the JAX losses against their PyTorch twins (float64), over every
case of tests/test_losses_trl_types.py (TRL's DPO loss types, mixtures, f-divergences,
CPO, and the 8-device shard_map cases). The tests assert 1e-10; this prints the maxima.

    python benchmarks/loss_parity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import conftest  # noqa: E402,F401  (8 simulated CPU devices, set before jax is imported)
import numpy as np  # noqa: E402
import test_losses_trl_types as cases  # noqa: E402

from mmpo_jax.losses import mmpo as jl  # noqa: E402
from mmpo_jax.torch_ref import losses as tl  # noqa: E402


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300))) if a.size else 0.0


def main() -> None:
    worst = {"loss": (0.0, ""), "metric": (0.0, ""), "gradient": (0.0, "")}

    def record(label, ours, theirs, mask):
        real = mask > 0
        found = {
            "loss": _rel(ours[0], theirs[0]),
            "metric": max(_rel(ours[1][k], theirs[1][k]) for k in ours[1] if abs(theirs[1][k]) > 1e-12),
            "gradient": max(_rel(g[real], t[real]) for g, t in zip(ours[2], theirs[2]) if np.any(t[real])),
        }
        for kind, value in found.items():
            if value > worst[kind][0]:
                worst[kind] = (value, label)

    for case in cases.DPO_CASES:
        for n in (1, 9, 32):
            kw = dict(case)
            kw.setdefault("beta", 0.1)
            data, extra, _ = cases._inputs(n, seed=n)
            record(f"dpo {cases._label(case)} n={n}",
                   cases._jax_value_and_grads(jl.dpo_loss, data, extra, kw, cases.SUMS),
                   cases._torch_value_and_grads(tl.dpo_loss, data, extra, kw, cases.SUMS), extra["pair_mask"])
    for case in cases.CPO_CASES:
        data, extra, _ = cases._inputs(11, seed=3, averaged=case["averaged"])
        extra = {k: extra[k] for k in ("chosen_tokens", "pair_mask")}
        kw = dict(beta=0.1, gamma=0.5, **case)
        record(f"cpo {cases._label(case)}", cases._jax_value_and_grads(jl.cpo_loss, data, extra, kw, cases.SUMS[:2]),
               cases._torch_value_and_grads(tl.cpo_loss, data, extra, kw, cases.SUMS[:2]), extra["pair_mask"])
    for case in cases.SHARDED_CASES:
        data, extra, _ = cases._inputs(32, seed=7)
        kw = dict(beta=0.1, **case)
        record(f"8-device dpo {cases._label(case)}", cases._sharded_value_and_grads(kw, data, extra, cases._mesh()),
               cases._torch_value_and_grads(tl.dpo_loss, data, extra, kw, cases.SUMS), extra["pair_mask"])
    for kind, (value, label) in worst.items():
        print(f"largest relative difference, {kind}: {value:.2e} ({label})")


if __name__ == "__main__":
    main()
