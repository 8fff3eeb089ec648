"""alignment-handbook / TRL preference recipes -> our run config (`mmpo-jax convert-config`).

A recipe is the flat YAML that alignment-handbook's `scripts/run_dpo.py` reads
(its ModelArguments and DataArguments plus TRL's DPOConfig), including the MMPO
authors' fork of it (`objective_type: mmpo`, `mmpo_reward_epsilon`, ...), TRL's
CPO/SimPO keys (`loss_type: simpo`, `simpo_gamma`, `cpo_alpha`) and the SimPO
authors' `gamma_beta_ratio`. `convert_recipe` maps every key it can to our
sections, records where each value came from, and lists every key it cannot
carry with the reason. It never invents a value the recipe does not imply;
where transformers/TRL fill in a default the recipe relies on, it says so.

The rules a reader of the output needs (each is also stated in it):

- Global batch. `data.batch_size` (pairs per optimizer step) is
  `per_device_train_batch_size x gradient_accumulation_steps x devices`. The
  recipe does not say how many devices it ran on, so the caller does
  (`devices`, default 1). `optim.grad_accum` is `gradient_accumulation_steps`,
  so run on that many devices each one holds the recipe's per-device batch.
- Run length. `max_steps > 0` wins, as in transformers. Otherwise
  `num_train_epochs` needs the number of training pairs (`train_rows`): an
  epoch is `floor(train_rows / batch_size)` steps (ours drops each epoch's last
  partial batch) and the run `ceil(epochs x steps_per_epoch)` steps. Without
  it the epochs are listed as not carried, and so is anything else that needs
  the total (`warmup_ratio`, fractional `*_steps`, "epoch" strategies).
- Precision. `bf16`/`torch_dtype: bfloat16` give `model.compute_dtype:
  bfloat16`, while `model.param_dtype` stays float32: the handbook's
  bf16 runs keep float32 master weights (DeepSpeed / accelerate mixed
  precision) and PEFT keeps adapters in float32, and AdamW updates of a
  bfloat16 copy would round small learning rates away.
- Keys set to false / null / none that ask for nothing (`push_to_hub: false`)
  are read and not listed; so are LoRA keys when `use_peft` is false.
- Values are judged by `mmpo_jax.config`'s own rules (asked through
  `part.config_rule`): a refused learning rate, beta, dropout, length, ... is
  listed as not carried and ours keeps its default. `finalize` then loads the
  whole result with `config_from_dict`, so any other bad value stops the
  conversion with our key named.

Where things are: `reading` (the file, value parsers), `table` (one-to-one keys
and keys with no counterpart), one module of rules per concern (`model`,
`steps`, `data`, `loss`, `optim`, `train`), each rule a function of the recipe
returning a `part.Part`; `convert` runs them in turn; `render` writes the result.
"""

from __future__ import annotations

from mmpo_jax.recipes.convert import SECTIONS, convert_recipe
from mmpo_jax.recipes.loss import LOSS_KEYS
from mmpo_jax.recipes.model import (
    PEFT_LLAMA_DEFAULT_TARGETS,
    PEFT_TARGETS,
    TRL_LORA_DEFAULTS,
)
from mmpo_jax.recipes.optim import ADAMW_OPTIMS, LOW_PRECISION_ADAMW, SCHEDULES
from mmpo_jax.recipes.part import Conversion, Skipped
from mmpo_jax.recipes.reading import PLACEHOLDERS, read_recipe
from mmpo_jax.recipes.render import finalize, flow_yaml, render_yaml, to_json
from mmpo_jax.recipes.steps import HF_EPOCHS, HF_PER_DEVICE_BATCH
from mmpo_jax.recipes.table import NOT_CARRIED, SILENT
from mmpo_jax.recipes.train import HF_SAVE_STEPS

__all__ = [
    "ADAMW_OPTIMS",
    "HF_EPOCHS",
    "HF_PER_DEVICE_BATCH",
    "HF_SAVE_STEPS",
    "LOSS_KEYS",
    "LOW_PRECISION_ADAMW",
    "NOT_CARRIED",
    "PEFT_LLAMA_DEFAULT_TARGETS",
    "PEFT_TARGETS",
    "PLACEHOLDERS",
    "SCHEDULES",
    "SECTIONS",
    "SILENT",
    "TRL_LORA_DEFAULTS",
    "Conversion",
    "Skipped",
    "convert_recipe",
    "finalize",
    "flow_yaml",
    "read_recipe",
    "render_yaml",
    "to_json",
]
