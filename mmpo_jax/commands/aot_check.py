"""`mmpo-jax aot-check CONFIG --topology NAME [key=value ...] [--json]`: does a step fit a TPU slice?

Compiles the real train step of CONFIG for the TPU topology NAME (JAX's names,
counted in chips: v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:2x4x4, v4:2x2x2, v6e:4x4) on this
machine, no TPU needed, and prints XLA's per-chip memory plan against the chip's
HBM. The state is built abstractly: nothing of model size is allocated. The batch
is data.batch_size pairs of data.max_length tokens, split over mesh.data x mesh.fsdp
(mesh.* over the slice's chips; for FSDP: mesh.fsdp=-1 mesh.data=1). model.path
needs only its config.json; or give the shapes with model.path="" model.init.*=...

Exit status: 0 when it fits (total <= 95% of HBM), 3 when it does not, 2 on a
config or usage error (a model.attention a TPU run refuses, cudnn or pallas_gpu, before
libtpu is opened). Needs libtpu: pip install -e '.[aot]'.
"""

from __future__ import annotations

import argparse
import json
import os

from mmpo_jax.config import load_config, split_config_and_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("aot-check", help="compile the train step for a TPU topology and report per-chip memory",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--topology", required=True, metavar="NAME", help="e.g. v5e:2x2, v5p:2x2x2")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The compile targets the topology's devices, never this machine's accelerators:
    # without this, importing jax with libtpu installed tries to open a local TPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # lazy: mmpo_jax.aot imports jax, which must come after JAX_PLATFORMS (and `--help` needs none)
    from mmpo_jax.aot import EXIT_DOES_NOT_FIT, aot_check, format_table, parse_topology

    parse_topology(args.topology)  # a bad name fails before the config is read
    path, overrides = split_config_and_overrides([args.config, *args.overrides])
    result = aot_check(load_config(path, overrides), args.topology)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_table(result))
    return 0 if result.fits else EXIT_DOES_NOT_FIT
