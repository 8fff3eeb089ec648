"""Two runs' per-step metrics compared within float32 noise (the train parity and packing tests)."""

import numpy as np


def assert_same_history(got, want, label, beta=0.1):
    """Losses and log-probs to 1e-5 relative. Rewards are beta * (policy - reference) of
    log-probs around -50: their float32 noise is set by the log-probs' size, so they are
    compared to 1e-5 of beta * |log-prob|; `rewards/accuracies` (near-equal rewards while the
    policy is close to the reference) to within one pair; `grad_norm` (a sum over every
    parameter) to 1e-4 relative."""
    assert len(got) == len(want), (label, len(got), len(want))
    for step, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), (label, step, sorted(a.keys() ^ b.keys()))
        scale = beta * max(abs(b["logps/chosen"]), abs(b["logps/rejected"]))
        for key in b:
            if key in ("rewards/accuracies", "mmpo/score_accuracy"):  # may flip one pair of 8
                assert abs(a[key] - b[key]) <= 1 / 8 + 1e-6, (label, step, key, a[key], b[key])
                continue
            if key.startswith(("rewards/", "mmpo/")):
                tol = dict(rtol=1e-5, atol=1e-5 * scale)
            elif key == "grad_norm":
                tol = dict(rtol=1e-4)
            else:
                tol = dict(rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(a[key], b[key], **tol, err_msg=f"{label}: {key} at step {step}")
