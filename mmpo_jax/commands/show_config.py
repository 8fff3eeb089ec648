"""`mmpo-jax config [CONFIG] [key=value ...]`: print the resolved run config as YAML.

Only what applies is shown: with `model.path` set, the `model.init` block (the shapes of
a random init) is left out, and so are the `loss.*` keys the loss does not read, a comment
in place of each. The text is a config `mmpo-jax
train` accepts back.

`model.attention` is checked against the batch layout and the compute dtype as a run
checks it at start, before any model is read (`mmpo_jax.models.kernels.check_kernel`):
for `--backend cpu|gpu|tpu` as a run there would; without it, a kernel that none of its
own backends runs (e.g. `model.attention=cudnn data.packing=packed`) is refused. A
refusal exits 2; the printed config is the same either way.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import yaml

from mmpo_jax.commands.common import add_config_items, load_from_items
from mmpo_jax.config import applicable_dict, config_to_dict, unused_keys
from mmpo_jax.models.kernels import BACKENDS, check_kernel

if TYPE_CHECKING:
    from mmpo_jax.config_schema import RunConfig

# A plain scalar safe_dump writes unquoted, so its line is found and replaced exactly.
_INIT_PLACEHOLDER = "MMPO_JAX_MODEL_INIT_OMITTED"
_LOSS_PLACEHOLDER = "MMPO_JAX_LOSS_KEYS_OMITTED"
INIT_UNUSED_COMMENT = "# init: unused, the architecture comes from model.path"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config")
    add_config_items(p)
    p.add_argument("--backend", choices=BACKENDS,
                   help="check model.attention against this backend, the batch layout (data.packing) "
                        "and the compute dtype as a run there checks it at start (exit 2 when it is "
                        "refused); without it, only a kernel no backend runs is refused")
    p.set_defaults(func=run)


def shown_yaml(cfg: RunConfig) -> str:
    """The resolved config as `config_to_yaml` writes it, less what does not apply
    (`unused_keys`), a comment in place of each left-out part.

    Not `config_to_yaml` itself: that is the run's config.yaml, compared byte for byte
    on resume, so it must keep every key.
    """
    unused = unused_keys(cfg)
    if not unused:
        return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    data = applicable_dict(cfg)
    loss_unused = [k.split(".", 1)[1] for k in unused if k.startswith("loss.")]
    # placeholders rather than deletions, so each comment lands where its keys were
    if "model.init" in unused:
        data["model"] = _put_after(data["model"], "path", "init", _INIT_PLACEHOLDER)
    if loss_unused:
        data["loss"] = _put_after(data["loss"], "name", _LOSS_PLACEHOLDER, _LOSS_PLACEHOLDER)
    text = yaml.safe_dump(data, sort_keys=False)
    comments = {f"  init: {_INIT_PLACEHOLDER}\n": f"  {INIT_UNUSED_COMMENT}\n",
                f"  {_LOSS_PLACEHOLDER}: {_LOSS_PLACEHOLDER}\n":
                    f"  # unused by loss.name={cfg.loss.name}: {', '.join(loss_unused)}\n"}
    for line, comment in comments.items():
        if line in text:
            text = text.replace(line, comment)
    return text


def _put_after(section: dict[str, Any], after: str, key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in section.items():
        out[k] = v
        if k == after:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    cfg = load_from_items(args.items)
    # the refusals that need no checkpoint; `data.packing` other than none hands the model segment ids
    # (`Layout.segments`, not imported: data.layout loads jax, which this command does not)
    check_kernel(cfg.model.attention, cfg.model.compute_dtype, cfg.data.packing != "none", args.backend)
    print(shown_yaml(cfg), end="")
    return 0
