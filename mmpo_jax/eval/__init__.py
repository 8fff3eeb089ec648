"""Evaluating a model: the preference metrics on test pairs (`preference`), the
multiple-choice capability probe (`capability`), batched generation with a KV cache
(`generate`), the judge-based win rate against the reference (`win_rate`), and the
run-level evaluation `mmpo-jax eval` and `mmpo-jax sweep` share (`run`)."""
