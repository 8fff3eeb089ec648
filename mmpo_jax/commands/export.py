"""`mmpo-jax export RUN_DIR OUT_DIR [--adapter] [--dtype float32|bfloat16] [--overwrite]`.

Writes the policy of the run's latest checkpoint as a transformers directory
(`config.json`, safetensors, the tokenizer of `data.tokenizer`), LoRA adapters
merged into the weights. With `--adapter`, the LoRA adapter alone in PEFT's format
(`adapter_config.json`, `adapter_model.safetensors`) for the run's base model
(`model.path`), which `adapter_config.json` names so that PEFT's
`AutoPeftModelForCausalLM.from_pretrained(OUT_DIR)` opens it: a local directory by
its absolute path, a hub id as given. A base PEFT cannot open (a .gguf file, also
through a pkg: spec or from the hub; a gs:// URL) is written into OUT_DIR/base as an
HF directory, its weights as the run loaded them (dequantised, adapters not merged,
in --dtype), and OUT_DIR/base is the base named (by its absolute path: after moving
OUT_DIR, load with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
"OUT_DIR/base"), "OUT_DIR")`).

OUT_DIR must not exist yet, or be empty, or hold an earlier export (with
`--overwrite`). Every export writes `mmpo_export.json` listing the files it wrote;
`--overwrite` replaces such an export only when OUT_DIR holds nothing but those
files, and never touches any other file: a directory with anything else in it is
refused, flag or not. OUT_DIR may not be the run directory (RUN_DIR/export is
fine) or the run's model.path or model.reference_path, nor a directory holding
them. The export is written to a hidden directory beside OUT_DIR and renamed into
place when complete, so a failure (an error, a full disk, Ctrl-C) leaves OUT_DIR as
it was: absent, or the earlier export.

OUT_DIR and RUN_DIR may be gs:// URLs. A bucket destination follows the same rules
(checked by listing it); the export is written into a local temporary directory and
then copied up, its `mmpo_export.json` last.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpo_jax import storage

if TYPE_CHECKING:
    from mmpo_jax.data.tokenizer_protocol import Tokenizer
    from mmpo_jax.export_sources import AdapterBase
    from mmpo_jax.train.setup import Evaluator


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's latest policy as an HF directory (or its LoRA adapter)",
                       description=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # keep the paragraphs
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty directory, or an earlier export (--overwrite)")
    p.add_argument("--adapter", action="store_true", help="only the LoRA adapter, in PEFT's format")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the exported weights (default float32)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT_DIR (only the files listed in its mmpo_export.json; "
                        "a directory holding any other file is still refused)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # lazy: keeps `mmpo-jax --help` (and the other commands) free of jax, orbax and the model
    import jax

    from mmpo_jax.data.tokenizers import tokenizer_of
    from mmpo_jax.export_sources import adapter_base, check_not_a_source, real_path
    from mmpo_jax.models.export_dir import bucket_export, check_bucket_target, check_export_target
    from mmpo_jax.train.run_restore import restore_inference, saved_run_config

    # Before the (slow) restore: a refused destination is told at once. What the run
    # reads first, since --overwrite could not help there.
    saved = saved_run_config(args.run_dir)[0]
    check_not_a_source(args.out_dir, args.run_dir, saved)
    base = adapter_base(args.out_dir, saved.model.path) if args.adapter else None
    to_bucket = storage.is_url(args.out_dir)
    if to_bucket:
        storage.check_url(args.out_dir, "OUT_DIR")
        check_bucket_target(args.out_dir, overwrite=args.overwrite)
    else:
        check_export_target(args.out_dir, overwrite=args.overwrite)
    trainer, step = restore_inference(args.run_dir)  # the policy alone: no optimizer state, no reference
    tokenizer = tokenizer_of(trainer.cfg.data, trainer.cfg.model.path)
    about = {"run_dir": str(args.run_dir if storage.is_url(args.run_dir) else real_path(args.run_dir)), "step": int(step)}
    with contextlib.ExitStack() as stack:
        # a bucket destination: the export is written here, then copied there
        where = stack.enter_context(bucket_export(args.out_dir, overwrite=args.overwrite)) \
            if to_bucket and jax.process_index() == 0 else args.out_dir
        out = _write(args, trainer, tokenizer, where, about, base, overwrite=args.overwrite and not to_bucket)
    if out is not None:
        print(f"exported step {step} of {args.run_dir} to {args.out_dir if to_bucket else out}"
              + (" (LoRA adapter)" if args.adapter else ""))
        if base is not None and base.written:
            print(f"PEFT cannot open model.path '{saved.model.path}', so the base was written as an HF "
                  f"directory ({args.dtype}, the weights as loaded, adapters not merged) to {base.name}, "
                  "which adapter_config.json names as base_model_name_or_path"
                  + ("; PEFT reads no bucket: after copying the export down, set base_model_name_or_path "
                     "to the copy's base/" if to_bucket else ""))
    return 0


def _write(args: argparse.Namespace, trainer: Evaluator, tokenizer: Tokenizer, out_dir: str | os.PathLike,
           about: dict[str, Any], base: AdapterBase | None, overwrite: bool) -> Path | None:
    """Writes the export of `trainer`'s policy to the local `out_dir` on process 0 (None elsewhere)."""
    # lazy: as in `run`, jax and the writers load only when an export runs
    import jax

    from mmpo_jax.models.hf_export import export_hf
    from mmpo_jax.models.lora_export import export_peft_adapter

    policy = trainer.sdef.policy(trainer.state)
    if base is not None:
        return export_peft_adapter(policy, out_dir, base.name, tokenizer, overwrite=overwrite, about=about,
                                   base_dtype=args.dtype if base.written else None) \
            if jax.process_index() == 0 else None
    return export_hf(policy, trainer.arch, tokenizer, out_dir, dtype=args.dtype, overwrite=overwrite,
                     about=about) if jax.process_index() == 0 else None
