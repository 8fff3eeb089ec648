"""The preference losses, one package: each a pure JAX function of per-pair sequence
log-probs returning `(loss, metrics)` (`mmpo`: MMPO, SimPO, SFT; `dpo`: DPO with TRL's
loss types; `policy`: CPO, ORPO), the masked global reductions they share (`reduce`),
their typed inputs (`inputs`), the declaration of each loss (`declarations`, no jax: the
config and the CLI read it), the binding of a config's arguments (`binding`) and the
JAX function of each (`registry`).

The contract is `docs/losses.md`.
"""
