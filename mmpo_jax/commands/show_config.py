"""`mmpo-jax config [CONFIG] [key=value ...]`: print the resolved run config as YAML.

Only what applies is shown: with `model.path` set, the `model.init` block (the shapes of
a random init) is left out, a comment in its place. The text is a config `mmpo-jax
train` accepts back.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

import yaml

from mmpo_jax.commands.common import add_config_items, load_from_items
from mmpo_jax.config import config_to_dict

if TYPE_CHECKING:
    from mmpo_jax.config_schema import RunConfig

# A plain scalar safe_dump writes unquoted, so its line is found and replaced exactly.
_INIT_PLACEHOLDER = "MMPO_JAX_MODEL_INIT_OMITTED"
INIT_UNUSED_COMMENT = "# init: unused, the architecture comes from model.path"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config")
    add_config_items(p)
    p.set_defaults(func=run)


def shown_yaml(cfg: RunConfig) -> str:
    """The resolved config as `config_to_yaml` writes it, less what does not apply.

    Not `config_to_yaml` itself: that is the run's config.yaml, compared byte for byte
    on resume, so it must keep every key.
    """
    data = config_to_dict(cfg)
    if not cfg.model.path:
        return yaml.safe_dump(data, sort_keys=False)
    # a placeholder rather than a deletion, so the comment lands where the block was
    data["model"]["init"] = _INIT_PLACEHOLDER
    text = yaml.safe_dump(data, sort_keys=False)
    line = f"  init: {_INIT_PLACEHOLDER}\n"
    if text.count(line) != 1:  # pragma: no cover - safe_dump's layout changed
        raise AssertionError(f"cannot find model.init in the dumped config:\n{text}")
    return text.replace(line, f"  {INIT_UNUSED_COMMENT}\n")


def run(args: argparse.Namespace) -> int:
    print(shown_yaml(load_from_items(args.items)), end="")
    return 0
