"""`mmpo-jax` command line: one subcommand per module of `mmpo_jax.commands`.

Errors a user can fix (a bad key, a missing file, bad data) print one line and
exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from mmpo_jax.config import ConfigError
from mmpo_jax.errors import UserError

# Add a subcommand by adding its module here (see mmpo_jax/commands/__init__.py).
SUBCOMMANDS = (
    "mmpo_jax.commands.aot_check",
    "mmpo_jax.commands.compare",
    "mmpo_jax.commands.convert_config",
    "mmpo_jax.commands.evaluate",
    "mmpo_jax.commands.export",
    "mmpo_jax.commands.generate",
    "mmpo_jax.commands.inspect_data",
    "mmpo_jax.commands.launch",
    "mmpo_jax.commands.losses",
    "mmpo_jax.commands.show_config",
    "mmpo_jax.commands.sweep",
    "mmpo_jax.commands.train",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmpo-jax", description="Offline preference optimisation (MMPO, DPO, SimPO) in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow an option (`eval RUN --json loss.beta=0.2`), which
    # argparse alone does not allow for a positional list
    slot = next((name for name in ("items", "overrides") if isinstance(getattr(args, name, None), list)), None)
    if extra and slot and all("=" in e and not e.startswith("-") for e in extra):
        getattr(args, slot).extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"mmpo-jax: config error: {err}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"mmpo-jax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
