"""`mmpo-jax export RUN_DIR OUT_DIR [--adapter] [--dtype float32|bfloat16]`.

Writes the policy of the run's latest checkpoint as a transformers directory
(`config.json`, safetensors, the tokenizer of `data.tokenizer`), LoRA adapters
merged into the weights. With `--adapter`, the LoRA adapter alone in PEFT's format
(`adapter_config.json`, `adapter_model.safetensors`) for the run's base model
(`model.path`).
"""

from __future__ import annotations

import argparse

from mmpo_jax.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's latest policy as an HF directory (or its LoRA adapter)",
                       description=__doc__.split("\n\n", 1)[1])
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--adapter", action="store_true", help="only the LoRA adapter, in PEFT's format")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the exported weights (default float32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from mmpo_jax.data.tokenizers import load_tokenizer
    from mmpo_jax.models.checkpoints import export_hf
    from mmpo_jax.models.lora_export import export_peft_adapter
    from mmpo_jax.train.loop import restore_run

    trainer, step = restore_run(args.run_dir)
    cfg = trainer.cfg
    policy = trainer.sdef.policy(trainer.state)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if args.adapter:
        if not cfg.model.path:
            raise UserError("--adapter needs a base model others can load (model.path); this run starts "
                            "from a random init: export the full model instead")
        out = export_peft_adapter(policy, args.out_dir, cfg.model.path, tokenizer) if jax.process_index() == 0 else None
    else:
        out = export_hf(policy, trainer.arch, tokenizer, args.out_dir, dtype=args.dtype) if jax.process_index() == 0 else None
    if out is not None:
        print(f"exported step {step} of {args.run_dir} to {out}" + (" (LoRA adapter)" if args.adapter else ""))
    return 0
