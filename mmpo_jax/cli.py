"""`mmpo-jax` command line: one subcommand per module of `mmpo_jax.commands`.

Errors a user can fix (a bad key, a missing file, bad data) print one line and
exit 2, with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from mmpo_jax.config_schema import ConfigError
from mmpo_jax.errors import INTERRUPTED_EXIT, UserError
from mmpo_jax.storage_errors import describe, quiet_failed_writes

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
    "mmpo_jax.commands.plot",
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
    # transformers' import-time "PyTorch was not found. Models won't be available" is
    # advice for its own models; this package needs only its tokenizers and configs, and a
    # newcomer reads that line as the run failing
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
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
        with quiet_failed_writes():
            return args.func(args)
    except ConfigError as err:
        print(f"mmpo-jax: config error: {err}", file=sys.stderr)
        return 2
    except UserError as err:
        print(f"mmpo-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # a second Ctrl-C (or SIGTERM, SIGHUP: `train.run_signals.SecondSignal`) during a run, or a Ctrl-C
        # outside it: stop without a traceback, with the status a shell gives that signal
        print("mmpo-jax: interrupted", file=sys.stderr)
        return int(getattr(err, "exit_status", INTERRUPTED_EXIT))
    except Exception as err:
        # disk full, ulimit -f, permissions: an OSError of our own writes, or the same errno
        # in the text of orbax's (tensorstore's) or safetensors' error
        line = describe(err)
        if line is None:
            raise
        print(f"mmpo-jax: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
