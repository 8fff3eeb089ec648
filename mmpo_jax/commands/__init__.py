"""One module per `mmpo-jax` subcommand.

Each module defines `register(subparsers)`, which adds its parser and sets
`func` to a function `(args) -> int`. Modules import only argparse-level code at
import time; heavy imports (jax models, torch, datasets) happen inside `func`, so
`mmpo-jax --help` stays fast and a missing optional dependency only affects the
subcommand that needs it.
"""
