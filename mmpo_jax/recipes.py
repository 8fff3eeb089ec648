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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmpo_jax.config import RunConfig, apply_overrides, config_from_dict
from mmpo_jax.errors import UserError
from mmpo_jax.loss_registry import LOSSES

SECTIONS = ("model", "data", "loss", "optim", "mesh", "train")

# Our LoRA target names for the PEFT module names of the Llama family.
PEFT_TARGETS = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
# PEFT's own choice for Llama when `lora_target_modules` is not given.
PEFT_LLAMA_DEFAULT_TARGETS = ["q", "v"]

# Values the MMPO authors' recipes leave for their launch scripts to fill in.
PLACEHOLDERS = frozenset({"dummy"})

# TRL / transformers defaults a recipe relies on when it omits a key.
HF_PER_DEVICE_BATCH = 8
HF_EPOCHS = 3.0
HF_SAVE_STEPS = 500
TRL_LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05}

ADAMW_OPTIMS = frozenset(
    {
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_hf",
        "adamw_apex_fused",
        "adamw_torch_xla",
        "adamw_torch_npu_fused",
        "adamw_anyprecision",
    }
)
# bitsandbytes / torchao AdamW with quantized or paged state: the same update rule.
LOW_PRECISION_ADAMW = frozenset(
    {
        "adamw_8bit",
        "adamw_bnb_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
        "paged_adamw",
        "adamw_torch_4bit",
        "adamw_torch_8bit",
    }
)
SCHEDULES = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant",
    "constant_with_warmup": "constant",
}

_NO_HUB = "ours does not talk to the Hugging Face Hub; upload the exported model yourself"
_LAUNCHER = "ours shards over the device mesh (mesh.*); torch launcher settings do not apply"
_NO_QUANT = (
    "ours has no quantized base weights (QLoRA): the frozen base is stored in model.param_dtype"
)

# Recipe keys ours has no counterpart for, and why. A falsy value asks for
# nothing, so such keys are read without being listed.
NOT_CARRIED: dict[str, str] = {
    "hub_model_id": _NO_HUB,
    "hub_model_revision": _NO_HUB,
    "hub_strategy": _NO_HUB,
    "hub_private_repo": _NO_HUB,
    "hub_token": _NO_HUB,
    "push_to_hub": _NO_HUB,
    "report_to": "ours writes metrics to train.output_dir (metrics.jsonl, TensorBoard)",
    "run_name": "ours names a run by its train.output_dir",
    "logging_dir": "ours writes logs to train.output_dir",
    "log_level": "ours has no log-level setting",
    "log_level_replica": "ours has no log-level setting",
    "logging_first_step": "ours logs every train.log_every steps",
    "attn_implementation": "ours picks its attention kernel with model.attention "
    "(auto: cuDNN on GPU with bfloat16, else XLA)",
    "use_flash_attention_2": "ours picks its attention kernel with model.attention "
    "(auto: cuDNN on GPU with bfloat16, else XLA)",
    "trust_remote_code": "ours implements the Llama family itself and runs no remote code",
    "preprocessing_num_workers": "ours tokenizes each source once and caches the ids; "
    "there is no worker count",
    "dataset_num_proc": "ours tokenizes each source once and caches the ids; "
    "there is no worker count",
    "remove_unused_columns": "ours reads only prompt / chosen / rejected",
    "overwrite_output_dir": "ours has no such switch: train.output_dir holds one run",
    "per_device_eval_batch_size": "ours evaluates in batches of data.batch_size",
    "eval_accumulation_steps": "ours evaluates in batches of data.batch_size",
    "ddp_timeout": _LAUNCHER,
    "ddp_find_unused_parameters": _LAUNCHER,
    "ddp_backend": _LAUNCHER,
    "deepspeed": _LAUNCHER,
    "fsdp": _LAUNCHER,
    "fsdp_config": _LAUNCHER,
    "local_rank": _LAUNCHER,
    "tf32": "XLA picks the matmul precision; ours computes in model.compute_dtype",
    "torch_compile": "ours is compiled by XLA",
    "dataloader_num_workers": "ours builds batches with grain in the training process",
    "dataloader_pin_memory": "ours builds batches with grain in the training process",
    "dataloader_persistent_workers": "ours builds batches with grain in the training process",
    "auto_insert_empty_system_msg": "ours renders conversations with the tokenizer's chat "
    "template as they are (no system message is inserted)",
    "chat_template": "ours uses the chat template of data.tokenizer",
    "truncation_side": "ours cuts prompts from the left and completions from the right",
    "use_liger_kernel": "ours computes log-probs with its own chunked LM head",
    "use_liger_loss": "ours computes log-probs with its own chunked LM head",
    "generate_during_eval": "ours does not generate during eval",
    "include_tokens_per_second": "ours has no such metric switch",
    "include_num_input_tokens_seen": "ours has no such metric switch",
    "resume_from_checkpoint": "ours has no such key",
    "save_only_model": "ours saves the whole train state",
    "save_safetensors": "ours saves orbax checkpoints (and exports HF directories)",
    "padding_free": "ours pads each batch to a bucket length",
    "padding_value": "ours pads with the tokenizer's pad id",
    "label_pad_token_id": "ours masks padding with loss_mask",
    "model_init_kwargs": "ours loads checkpoints itself",
    "ref_model_init_kwargs": "ours loads checkpoints itself",
    "force_use_ref_model": "ours picks the reference with model.reference",
    "ref_adapter_name": "ours picks the reference with model.reference",
    "model_adapter_name": "ours picks the reference with model.reference",
    "sync_ref_model": "ours keeps the reference fixed (no TR-DPO syncing)",
    "ref_model_sync_steps": "ours keeps the reference fixed (no TR-DPO syncing)",
    "ref_model_mixup_alpha": "ours keeps the reference fixed (no TR-DPO syncing)",
    "use_weighting": "ours has no WPO weighting",
    "ld_alpha": "ours has no LD-DPO length weighting",
    "f_divergence_type": "ours has the reverse-KL DPO only",
    "f_alpha_divergence_coef": "ours has the reverse-KL DPO only",
    "discopop_tau": "ours has no DiscoPOP loss",
    "rpo_alpha": "ours has no RPO term (NLL of the chosen answers)",
    "loss_weights": "ours trains one loss",
    "tools": "ours renders no tool definitions",
    "use_logits_to_keep": "ours computes log-probs of completion positions only, always",
    "load_in_4bit": _NO_QUANT,
    "load_in_8bit": _NO_QUANT,
    "bnb_4bit_quant_type": _NO_QUANT,
    "bnb_4bit_quant_storage": _NO_QUANT,
    "use_bnb_nested_quant": _NO_QUANT,
    "lr_scheduler_kwargs": "ours' schedules take no extra arguments",
    "optim_args": "ours' AdamW takes only optim.b1, b2, eps and weight_decay",
    "eval_on_start": "ours evaluates before and after training when data.test_files is set",
}

# Keys read with no counterpart needed: they select what ours always does.
SILENT = frozenset({"do_train", "do_eval", "log_on_each_node", "disable_dropout"})

# Loss parameters and the loss that uses them.
LOSS_KEYS = {
    "label_smoothing": "dpo",
    "reference_free": "dpo",
    "mmpo_reward_epsilon": "mmpo",
    "mmpo_optimize_entropy": "mmpo",
    "mmpo_relu_coefficient": "mmpo",
    "mmpo_relu_epsilon": "mmpo",
    "gamma_beta_ratio": "simpo",
    "simpo_gamma": "simpo",
    "cpo_alpha": "simpo",
    "sft_weight": "simpo",
}


@dataclass(frozen=True)
class Skipped:
    """A recipe key (or part of one, like `dataset_mixer.X`) that was not carried over."""

    key: str
    value: Any
    reason: str


@dataclass
class Conversion:
    """What `convert_recipe` made of a recipe.

    `config` holds only the keys the recipe set (nested like our YAML),
    `sources` maps each dotted key to the recipe key(s) it came from, and
    `notes` are the assumptions the conversion had to make.
    """

    config: dict[str, dict[str, Any]]
    sources: dict[str, str]
    skipped: list[Skipped]
    notes: list[str]
    keys_read: int


# --------------------------------------------------------------------------- #
# Reading a recipe
# --------------------------------------------------------------------------- #
def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe file as a mapping; a UserError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file not found: '{path}'")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(
            f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}"
        ) from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty; expected a mapping of recipe keys")
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: a recipe must be a mapping of keys like model_name_or_path, beta, "
            f"learning_rate (an alignment-handbook / TRL recipe), got a {type(raw).__name__}"
        )
    return raw


# --------------------------------------------------------------------------- #
# Parsing single values: each returns the value or raises ValueError with the reason
# --------------------------------------------------------------------------- #
_TRUE = {"true", "yes", "y", "1", "on"}
_FALSE = {"false", "no", "n", "0", "off"}


def _as_bool(value: Any) -> bool:
    # HfArgumentParser's string_to_bool: recipes write yes/no as often as true/false.
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE | _FALSE:
        return str(value).strip().lower() in _TRUE
    raise ValueError("expected true or false")


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            # YAML 1.1 reads `5e-7` (no dot) as a string: recipes mean the number.
            return float(value)
        except ValueError:
            pass
    raise ValueError("expected a number")


def _as_int(value: Any) -> int:
    number = _as_float(value)
    if not number.is_integer():
        raise ValueError("expected a whole number")
    return int(number)


def _as_str(value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise ValueError("expected a string")
    return str(value)


def _as_str_list(value: Any) -> list[str]:
    if isinstance(value, str):
        # transformers accepts a comma-separated string for list arguments
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError("expected a list of strings")


def _is_off(value: Any) -> bool:
    """A value that asks for nothing: false, null, empty, 'no', 'none'."""
    if value is None or value is False:
        return True
    if isinstance(value, (str, list, dict, tuple)) and len(value) == 0:
        return True
    return isinstance(value, str) and value.strip().lower() in {"no", "none", "false"}


# --------------------------------------------------------------------------- #
# The conversion
# --------------------------------------------------------------------------- #
class _Converter:
    """Walks the recipe group by group; every key it reads is marked used."""

    def __init__(
        self, recipe: Mapping[str, Any], devices: int, train_rows: int | None, loss_name: str | None
    ):
        self.recipe = dict(recipe)
        self.devices = devices
        self.train_rows = train_rows
        self.loss_override = loss_name
        self.used: set[str] = set()
        self.config: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, str] = {}
        self.skipped: list[Skipped] = []
        self.notes: list[str] = []
        self.batch_size: int | None = None
        self.steps_per_epoch: int | None = None
        self.total_steps: int | None = None
        self.loss: str = "dpo"

    # -- bookkeeping -------------------------------------------------------- #
    def has(self, key: str) -> bool:
        return key in self.recipe

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.recipe.get(key, default)

    def get(self, key: str, parse: Callable[[Any], Any], default: Any = None) -> Any:
        """The recipe's value parsed; `default` when absent; None (and listed) when unusable."""
        if key not in self.recipe:
            return default
        value = self.raw(key)
        if isinstance(value, str) and value.strip().lower() in PLACEHOLDERS:
            self.skip(
                key,
                value,
                "a placeholder (the authors' launch scripts pass the real value on the "
                "command line): set it with a key=value override",
            )
            return None
        try:
            return parse(value)
        except ValueError as err:
            self.skip(key, value, str(err))
            return None

    def set(self, path: str, value: Any, source: str) -> None:
        *parents, leaf = path.split(".")
        node = self.config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        self.sources[path] = source

    def skip(self, key: str, value: Any, reason: str) -> None:
        self.used.add(key.split(".")[0].split("[")[0])
        self.skipped.append(Skipped(key, value, reason))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def origin(self, key: str, default: str = "TRL's default") -> str:
        """A value's source: the recipe key, or the library default it fell back to."""
        return key if self.has(key) else default

    # -- groups --------------------------------------------------------------- #
    def run(self) -> Conversion:
        self.model()
        self.lora()
        self.batch_and_steps()
        self.data()
        self.loss_section()
        self.optim()
        self.train()
        self.not_carried()
        self.unknown()
        order = {k: i for i, k in enumerate(self.recipe)}
        self.skipped.sort(key=lambda s: order.get(s.key.split(".")[0].split("[")[0], len(order)))
        return Conversion(
            config={s: self.config[s] for s in SECTIONS if s in self.config},
            sources=self.sources,
            skipped=self.skipped,
            notes=self.notes,
            keys_read=len(self.recipe),
        )

    def model(self) -> None:
        path = self.get("model_name_or_path", _as_str)
        if path:
            self.set("model.path", path, "model_name_or_path")
        tokenizer = self.get("tokenizer_name_or_path", _as_str)
        if tokenizer:
            self.set("data.tokenizer", tokenizer, "tokenizer_name_or_path")
        elif path:
            # The handbook tokenizes with the model's own tokenizer and chat template.
            self.set("data.tokenizer", path, "model_name_or_path (the model's own tokenizer)")
        revision = self.get("model_revision", _as_str)
        if revision not in (None, "main"):
            self.skip(
                "model_revision",
                revision,
                "ours loads a hub id's main branch: download that revision and set model.path "
                "to the directory",
            )
        self.precision()
        remat = self.get("gradient_checkpointing", _as_bool)
        if remat is not None:
            self.set("model.remat", "full" if remat else "none", "gradient_checkpointing")
        kwargs = self.raw("gradient_checkpointing_kwargs")
        if remat and not _is_off(kwargs):
            self.skip(
                "gradient_checkpointing_kwargs",
                kwargs,
                "ours rematerialises each layer with jax.checkpoint (model.remat); torch's "
                "checkpoint options do not apply",
            )

    def precision(self) -> None:
        dtype_key = "dtype" if self.has("dtype") else "torch_dtype"  # TRL renamed it in 2025
        dtype = self.get(dtype_key, _as_str)
        bf16 = self.get("bf16", _as_bool)
        fp16 = self.get("fp16", _as_bool)
        if fp16 or dtype == "float16":
            key = "fp16" if fp16 else dtype_key
            self.skip(
                key,
                True if fp16 else dtype,
                "ours has no float16; model.compute_dtype bfloat16 is the nearest",
            )
        if bf16:
            self.set("model.compute_dtype", "bfloat16", "bf16")
        elif dtype == "bfloat16":
            self.set("model.compute_dtype", "bfloat16", f"{dtype_key} (the weights compute in it)")
        elif bf16 is False and not fp16:
            self.set("model.compute_dtype", "float32", "bf16: false (float32 compute)")
        elif dtype == "float32" and not fp16:
            self.set("model.compute_dtype", "float32", dtype_key)
        if dtype in ("bfloat16", "float16"):
            self.set(
                "model.param_dtype",
                "float32",
                f"ours: {dtype_key} {dtype} is the load dtype; float32 master weights as the "
                "handbook's mixed-precision runs keep (bfloat16 halves parameter memory)",
            )
        elif dtype == "float32":
            self.set("model.param_dtype", "float32", dtype_key)
        elif dtype is not None:
            self.skip(
                dtype_key,
                dtype,
                "ours stores parameters in model.param_dtype (float32 or bfloat16), whatever "
                "the checkpoint's dtype",
            )

    def lora(self) -> None:
        lora_keys = (
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "lora_modules_to_save",
            "lora_task_type",
            "use_rslora",
            "use_dora",
        )
        use_peft = self.get("use_peft", _as_bool, False)
        if not use_peft:
            present = [k for k in lora_keys if self.has(k)]
            for key in present:
                self.raw(key)
            if present:
                self.note("use_peft is false: the lora_* keys have no effect (full fine-tuning)")
            return
        values = {}
        for key, default in TRL_LORA_DEFAULTS.items():
            parse = _as_int if key == "lora_r" else _as_float
            value = self.get(key, parse)
            if not self.has(key):
                self.note(f"{key} not given: TRL's default {default:g}")
                value = default
            values[key] = value
        targets = self.lora_targets()
        rank, alpha, dropout = values["lora_r"], values["lora_alpha"], values["lora_dropout"]
        if rank is None or rank < 1 or not targets:
            why = "no usable lora_r" if rank is None or rank < 1 else "no target ours can adapt"
            self.skip("use_peft", True, f"LoRA not converted ({why}): full fine-tuning instead")
            return
        self.set("model.lora.rank", rank, self.origin("lora_r"))
        if alpha is not None:
            source = self.origin("lora_alpha")
            if self.get("use_rslora", _as_bool, False):
                # rsLoRA scales by alpha / sqrt(rank); ours by alpha / rank.
                alpha = alpha * math.sqrt(rank)
                source = "lora_alpha x sqrt(lora_r) (use_rslora: ours scales by alpha / rank)"
            self.set("model.lora.alpha", alpha, source)
        if dropout is not None and 0.0 <= dropout < 1.0:
            self.set("model.lora.dropout", dropout, self.origin("lora_dropout"))
        elif dropout is not None:
            self.skip("lora_dropout", dropout, "ours needs a dropout in [0, 1)")
        source = self.origin("lora_target_modules", "PEFT's default")
        self.set("model.lora.targets", targets, source)
        if self.get("use_dora", _as_bool, False):
            self.skip("use_dora", True, "ours has plain LoRA (no DoRA magnitude vector)")
        to_save = self.raw("lora_modules_to_save")
        if not _is_off(to_save):
            self.skip("lora_modules_to_save", to_save, "ours trains only the adapters under LoRA")
        task = self.raw("lora_task_type")
        if task not in (None, "CAUSAL_LM"):
            self.skip("lora_task_type", task, "ours trains causal LMs (CAUSAL_LM)")

    def lora_targets(self) -> list[str]:
        if not self.has("lora_target_modules"):
            self.note("lora_target_modules not given: PEFT's default for Llama, q_proj and v_proj")
            return list(PEFT_LLAMA_DEFAULT_TARGETS)
        names = self.get("lora_target_modules", _as_str_list)
        if names is None:
            return []
        if names in (["all-linear"], ["all_linear"]):
            return list(PEFT_TARGETS.values())
        ours = [PEFT_TARGETS[n] for n in names if n in PEFT_TARGETS]
        other = [n for n in names if n not in PEFT_TARGETS]
        if other:
            self.skip(
                "lora_target_modules",
                other,
                "ours puts adapters only on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                "down_proj",
            )
        return list(dict.fromkeys(ours))

    def batch_and_steps(self) -> None:
        per_device = self.get("per_device_train_batch_size", _as_int)
        if not self.has("per_device_train_batch_size"):
            per_device = HF_PER_DEVICE_BATCH
            self.note(f"per_device_train_batch_size not given: transformers' default {per_device}")
        accum = self.get("gradient_accumulation_steps", _as_int, 1)
        for key, value in (
            ("per_device_train_batch_size", per_device),
            ("gradient_accumulation_steps", accum),
        ):
            if value is not None and value < 1:
                self.skip(key, value, "must be >= 1")
        if per_device and accum and per_device >= 1 and accum >= 1:
            self.batch_size = per_device * accum * self.devices
            self.set(
                "data.batch_size",
                self.batch_size,
                f"per_device_train_batch_size {per_device} x gradient_accumulation_steps {accum} "
                f"x {self.devices} device(s)",
            )
            self.set("optim.grad_accum", accum, "gradient_accumulation_steps")
            self.note(
                f"Assumed {self.devices} device(s) (--devices): the recipe's global batch is "
                f"per-device batch x accumulation steps x devices = {self.batch_size} pairs; "
                f"on {self.devices} device(s) each holds {per_device} pair(s) per micro-batch."
            )
        if self.train_rows is not None and self.batch_size:
            if self.train_rows < self.batch_size:
                raise UserError(
                    f"--train-rows {self.train_rows} is fewer than one batch of "
                    f"{self.batch_size} pairs (data.batch_size): no step would run"
                )
            self.steps_per_epoch = self.train_rows // self.batch_size
        self.run_length()

    def run_length(self) -> None:
        max_steps = self.get("max_steps", _as_int)
        if max_steps is not None and max_steps > 0:
            self.total_steps = max_steps
            self.set("train.max_steps", max_steps, "max_steps")
            if self.has("num_train_epochs"):
                self.skip(
                    "num_train_epochs",
                    self.raw("num_train_epochs"),
                    "max_steps > 0 takes precedence, as in transformers",
                )
            return
        epochs = self.get("num_train_epochs", _as_float)
        if not self.has("num_train_epochs"):
            epochs = HF_EPOCHS
        if epochs is None:
            return
        if not self.has("num_train_epochs") and self.steps_per_epoch is not None:
            self.note("num_train_epochs not given: transformers' default 3")
        if epochs <= 0:
            self.skip("num_train_epochs", epochs, "must be > 0")
            return
        if self.steps_per_epoch is None:
            reason = (
                "the number of steps needs the number of training pairs: pass --train-rows N "
                "(or set train.max_steps); train.max_steps keeps our default 1000"
            )
            if self.has("num_train_epochs"):
                self.skip("num_train_epochs", epochs, reason)
            else:
                self.note(f"num_train_epochs not given (transformers' default 3): {reason}")
            return
        # The small tolerance keeps 2.0 x 574 from becoming 1149 through rounding.
        self.total_steps = max(1, math.ceil(epochs * self.steps_per_epoch - 1e-9))
        self.set(
            "train.max_steps",
            self.total_steps,
            f"num_train_epochs {epochs:g} x {self.steps_per_epoch} steps per epoch "
            f"(--train-rows {self.train_rows} // batch {self.batch_size}; ours drops each "
            "epoch's last partial batch)",
        )

    def data(self) -> None:
        formats = [k for k in ("dataset_mixture", "dataset_mixer", "dataset_name") if self.has(k)]
        for extra in formats[1:]:
            self.skip(extra, self.raw(extra), f"the recipe also gives {formats[0]}, which is used")
        if formats and formats[0] == "dataset_mixture":
            self.mixture_new()
        elif formats and formats[0] == "dataset_mixer":
            self.mixer_old()
        elif formats:
            self.dataset_name()
        self.lengths()
        data_seed = self.get("data_seed", _as_int)
        if data_seed is not None:
            self.set("data.seed", data_seed, "data_seed")

    def mixer_old(self) -> None:
        """alignment-handbook's `dataset_mixer: {id: fraction}` + `dataset_splits`."""
        mixer = self.raw("dataset_mixer")
        if not isinstance(mixer, dict) or not mixer:
            self.skip("dataset_mixer", mixer, "expected a mapping {dataset: fraction of its rows}")
            return
        # The handbook's default splits when the recipe names none.
        splits = self.get("dataset_splits", _as_str_list, ["train", "test"]) or []
        train_splits = [s for s in splits if "train" in s]
        test_splits = [s for s in splits if "test" in s and "train" not in s]
        other = [s for s in splits if s not in train_splits + test_splits]
        if other:
            self.skip("dataset_splits", other, "the handbook uses only *train* / *test* splits")
        mixture: dict[str, float] = {}
        for source, fraction in mixer.items():
            try:
                value = _as_float(fraction)
            except ValueError as err:
                self.skip(f"dataset_mixer.{source}", fraction, str(err))
                continue
            if not 0.0 < value <= 1.0:
                self.skip(
                    f"dataset_mixer.{source}",
                    fraction,
                    "ours keeps a fraction in (0, 1] of each source (0 keeps no rows; the "
                    "handbook cannot take more than all of them either)",
                )
                continue
            mixture[str(source)] = value
        self.dataset_configs()
        self.local_dirs(list(map(str, mixer)))
        if mixture and train_splits:
            self.set("data.mixture", mixture, "dataset_mixer")
            self.set("data.split", train_splits[0], "dataset_splits")
            if len(train_splits) > 1:
                self.skip(
                    "dataset_splits",
                    train_splits[1:],
                    f"data.mixture reads one split (data.split: {train_splits[0]}) of every "
                    "source; the handbook also concatenates these",
                )
        if test_splits:
            # The handbook does not subsample test splits: every source, whole.
            tests = [str(s) for s in mixer]
            self.set("data.test_files", tests if len(tests) > 1 else tests[0], "dataset_mixer")
            self.set("data.test_split", test_splits[0], "dataset_splits")
            if len(test_splits) > 1:
                self.skip(
                    "dataset_splits",
                    test_splits[1:],
                    f"ours reads one test split (data.test_split: {test_splits[0]})",
                )

    def dataset_configs(self) -> None:
        configs = self.raw("dataset_configs")
        if configs is None:
            return
        if not isinstance(configs, list) or any(c not in (None, "default") for c in configs):
            self.skip(
                "dataset_configs",
                configs,
                "ours loads each hub dataset's default config; load another config yourself and "
                "name its files in data.mixture",
            )

    def local_dirs(self, sources: Sequence[str]) -> None:
        for source in sources:
            looks_local = source.startswith(("/", ".", "~"))
            if looks_local and not source.lower().endswith((".jsonl", ".json", ".parquet")):
                self.note(
                    f"dataset {source} looks like a local directory (the handbook's "
                    "load_from_disk); ours reads .jsonl/.json/.parquet files and hub ids"
                )

    def mixture_new(self) -> None:
        """The handbook's newer `dataset_mixture: {datasets: [...], seed, test_split_size}`."""
        value = self.raw("dataset_mixture")
        entries = value.get("datasets") if isinstance(value, dict) else None
        if not isinstance(entries, list) or not entries:
            self.skip("dataset_mixture", value, "expected {datasets: [{id, split, weight}, ...]}")
            return
        mixture: dict[str, float] = {}
        split: str | None = None
        shuffled = False
        for i, entry in enumerate(entries):
            key = f"dataset_mixture.datasets[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                self.skip(key, entry, "expected a mapping with an id")
                continue
            source, entry_split = entry["id"], str(entry.get("split") or "train")
            if entry.get("config") not in (None, "default"):
                self.skip(key, entry, "ours loads each hub dataset's default config")
                continue
            if split is not None and entry_split != split:
                self.skip(
                    key,
                    {"id": source, "split": entry_split},
                    f"data.mixture reads every source with one split (data.split: {split})",
                )
                continue
            if source in mixture:
                self.skip(key, entry, "this dataset is already in data.mixture")
                continue
            weight = entry.get("weight")
            try:
                fraction = 1.0 if weight is None else _as_float(weight)
            except ValueError as err:
                self.skip(key, entry, f"weight: {err}")
                continue
            if not 0.0 < fraction <= 1.0:
                self.skip(key, entry, "ours keeps a fraction in (0, 1] of each source")
                continue
            split = entry_split
            mixture[source] = fraction
            shuffled = shuffled or fraction < 1.0
        if mixture:
            self.set("data.mixture", mixture, "dataset_mixture.datasets (id: weight)")
            self.set("data.split", split, "dataset_mixture.datasets (split)")
            self.local_dirs(list(mixture))
        if shuffled:
            self.note(
                "dataset_mixture weights < 1: the handbook keeps a shuffled subset "
                "(dataset_mixture.seed); ours keeps the first floor(fraction x rows) rows"
            )
        test_size = value.get("test_split_size")
        if test_size not in (None, 0):
            self.skip(
                "dataset_mixture.test_split_size",
                test_size,
                "ours does not split a test set off the training mixture: name test data in "
                "data.test_files (and data.test_split)",
            )

    def dataset_name(self) -> None:
        """TRL's script arguments: one hub dataset with a train and a test split."""
        name = self.get("dataset_name", _as_str)
        if not name:
            return
        if self.raw("dataset_config") not in (None, "default"):
            self.skip("dataset_config", self.recipe["dataset_config"], "ours loads the default one")
        self.set("data.train_files", name, "dataset_name")
        train_split = self.get("dataset_train_split", _as_str, "train")
        self.set("data.split", train_split, self.origin("dataset_train_split"))
        test_split = self.get("dataset_test_split", _as_str, "test")
        strategy = self.recipe.get("eval_strategy", self.recipe.get("evaluation_strategy", "no"))
        if strategy != "no":  # TRL's scripts evaluate only then
            self.set("data.test_files", name, "dataset_name")
            self.set("data.test_split", test_split, self.origin("dataset_test_split"))

    def lengths(self) -> None:
        max_length = self.get("max_length", _as_int)
        if max_length is not None:
            if max_length >= 2:
                self.set("data.max_length", max_length, "max_length")
            else:
                self.skip("max_length", max_length, "must be >= 2")
                max_length = None
        if self.has("max_prompt_length"):
            prompt = self.raw("max_prompt_length")
            if prompt is None:
                self.set("data.max_prompt_length", None, "max_prompt_length")
            else:
                prompt = self.get("max_prompt_length", _as_int)
                limit = max_length if max_length is not None else 1024
                if prompt is not None and 1 <= prompt < limit:
                    self.set("data.max_prompt_length", prompt, "max_prompt_length")
                elif prompt is not None:
                    self.skip(
                        "max_prompt_length",
                        prompt,
                        f"ours needs 1 <= max_prompt_length < max_length ({limit})",
                    )
        completion = self.raw("max_completion_length")
        if completion is not None:
            self.skip(
                "max_completion_length",
                completion,
                "ours limits each completion to data.max_length minus its prompt",
            )
        mode = self.raw("truncation_mode")
        if mode not in (None, "keep_end"):
            self.skip(
                "truncation_mode",
                mode,
                "ours cuts the prompt from the left (TRL's keep_end)",
            )

    def loss_section(self) -> None:
        self.loss, source = self.loss_name()
        self.set("loss.name", self.loss, source)
        for key, owner in LOSS_KEYS.items():
            if owner != self.loss and self.has(key) and not _is_off(self.recipe[key]):
                reason = f"only {owner} uses it; this recipe's loss is {self.loss}"
                self.skip(key, self.raw(key), reason)
            elif owner != self.loss:
                self.raw(key)
        beta = self.get("beta", _as_float)
        if beta is not None and beta <= 0:
            self.skip("beta", beta, "ours needs beta > 0; loss.beta keeps its default")
            beta = None
        if beta is not None:
            self.set("loss.beta", beta, "beta")
        self.average_logps()
        if self.loss == "dpo":
            self.dpo_keys()
        elif self.loss == "mmpo":
            self.mmpo_keys(beta)
        elif self.loss == "simpo":
            self.simpo_keys(beta)
        precompute = self.get("precompute_ref_log_probs", _as_bool)
        if precompute and getattr(LOSSES.get(self.loss), "reference_use", None) != "unused":
            self.set("model.reference", "precomputed", "precompute_ref_log_probs")

    def loss_name(self) -> tuple[str, str]:
        """Our loss and its source: objective_type (the MMPO fork), loss_type (TRL), else TRL's
        default sigmoid (DPO)."""
        objective = self.raw("objective_type")
        loss_type = self.raw("loss_type")
        if self.loss_override:
            for key in ("objective_type", "loss_type"):
                if self.has(key):
                    reason = f"replaced by the override loss.name={self.loss_override}"
                    self.skip(key, self.recipe[key], reason)
            return self.loss_override, "override"
        if isinstance(loss_type, list):
            if len(loss_type) != 1:
                self.unsupported("loss_type", loss_type, "a weighted sum of TRL losses")
            loss_type = loss_type[0]
        if objective is not None:
            by_objective = {s.objective_type: s.name for s in LOSSES.values() if s.objective_type}
            if objective not in by_objective:
                self.unsupported("objective_type", objective, "")
            if loss_type not in (None, "sigmoid"):
                self.unsupported("loss_type", loss_type, f"with objective_type {objective}")
            return by_objective[objective], "objective_type (the MMPO authors' fork)"
        if loss_type in (None, "sigmoid"):
            if self.has("gamma_beta_ratio"):
                return "simpo", "gamma_beta_ratio (the SimPO authors' recipe key)"
            return "dpo", "loss_type sigmoid" if loss_type else "TRL's default loss_type sigmoid"
        by_trl = {s.trl_loss_type: s.name for s in LOSSES.values() if s.trl_loss_type}
        if loss_type in by_trl:
            return by_trl[loss_type], f"loss_type {loss_type} (TRL's CPOTrainer)"
        self.unsupported("loss_type", loss_type, "")
        raise AssertionError("unreachable")

    def unsupported(self, key: str, value: Any, detail: str) -> None:
        detail = f" ({detail})" if detail else ""
        raise UserError(
            f"{key}: {flow_yaml(value)}{detail} has no counterpart here: ours has mmpo "
            "(objective_type: mmpo), dpo (loss_type: sigmoid) and simpo. Pass the override "
            "loss.name=mmpo|dpo|simpo to convert the rest of the recipe anyway."
        )

    def average_logps(self) -> None:
        average = self.get("average_logps", _as_bool)
        if average is None:
            return
        if getattr(LOSSES.get(self.loss), "averaged_only", False) and not average:
            self.skip(
                "average_logps",
                average,
                "ours' SimPO always averages the log-probs over completion tokens",
            )
            return
        self.set("loss.average_logps", average, "average_logps")

    def dpo_keys(self) -> None:
        smoothing = self.get("label_smoothing", _as_float)
        if smoothing is not None and 0.0 <= smoothing < 0.5:
            self.set("loss.label_smoothing", smoothing, "label_smoothing")
        elif smoothing is not None:
            self.skip("label_smoothing", smoothing, "ours needs it in [0, 0.5)")
        if self.get("reference_free", _as_bool):
            self.skip(
                "reference_free",
                True,
                "ours' DPO always has a reference; loss.name=simpo is reference-free",
            )

    def mmpo_keys(self, beta: float | None) -> None:
        epsilon = self.get("mmpo_reward_epsilon", _as_float)
        if epsilon is not None:
            self.set("loss.reward_epsilon", epsilon, "mmpo_reward_epsilon")
        relu = self.get("mmpo_relu_coefficient", _as_float)
        if relu:
            for key in ("mmpo_relu_coefficient", "mmpo_relu_epsilon"):
                if self.has(key):
                    self.skip(
                        key,
                        self.recipe[key],
                        "a later ReLU-margin variant of the authors' loss that the contract "
                        "(docs/losses.md) does not define",
                    )
        else:
            self.raw("mmpo_relu_epsilon")  # no effect with a zero coefficient
        entropy = self.get("mmpo_optimize_entropy", _as_bool)
        if entropy is False:
            self.set("loss.entropy_weight", 0.0, "mmpo_optimize_entropy: false")
        elif entropy:
            if beta is None:
                self.skip(
                    "mmpo_optimize_entropy",
                    True,
                    "the authors weight the entropy term by beta, which was not carried; set "
                    "loss.entropy_weight (and loss.entropy_estimator=score_function) yourself",
                )
            else:
                source = "mmpo_optimize_entropy (the authors' code weights it by beta)"
                self.set("loss.entropy_weight", beta, source)
                self.set("loss.entropy_estimator", "score_function", source)

    def simpo_keys(self, beta: float | None) -> None:
        ratio = self.get("gamma_beta_ratio", _as_float)
        gamma = self.get("simpo_gamma", _as_float)
        if gamma is not None:
            self.set("loss.gamma", gamma, "simpo_gamma")
            if ratio is not None:
                self.skip("gamma_beta_ratio", ratio, "simpo_gamma is given and is used")
        elif ratio is not None:
            scale = beta if beta is not None else LOSSES["simpo"].beta
            where = "beta" if beta is not None else "ours' default beta 2.0"
            self.set("loss.gamma", ratio * scale, f"gamma_beta_ratio {ratio:g} x {where}")
        for key in ("cpo_alpha", "sft_weight"):
            weight = self.get(key, _as_float)
            if weight:
                self.skip(key, weight, "ours is pure SimPO: no NLL term on the chosen answers")
        if self.recipe.get("loss_type") == "simpo" and not self.has("cpo_alpha"):
            self.note(
                "loss_type simpo: TRL's CPOTrainer adds cpo_alpha (default 1.0) x the NLL of the "
                "chosen answers; ours is pure SimPO (cpo_alpha 0)"
            )

    def optim(self) -> None:
        lr = self.get("learning_rate", _as_float)
        if lr is not None and lr > 0:
            self.set("optim.learning_rate", lr, "learning_rate")
        elif lr is not None:
            self.skip(
                "learning_rate", lr, "ours needs a learning rate > 0; keeps our default 5e-7"
            )
        self.schedule()
        decay = self.get("weight_decay", _as_float)
        if decay is not None and decay >= 0:
            self.set("optim.weight_decay", decay, "weight_decay")
            if decay > 0 and "lora" not in self.config.get("model", {}):
                self.note(
                    "weight_decay > 0: transformers exempts biases and norm weights from it; "
                    "ours decays every trained parameter"
                )
        elif decay is not None:
            self.skip("weight_decay", decay, "must be >= 0")
        if self.has("max_grad_norm"):
            norm = self.raw("max_grad_norm")
            # transformers turns clipping off with 0 or null; ours with <= 0
            norm = 0.0 if norm is None else self.get("max_grad_norm", _as_float)
            if norm is not None:
                self.set("optim.max_grad_norm", norm, "max_grad_norm")
        for key, ours in (("adam_beta1", "b1"), ("adam_beta2", "b2"), ("adam_epsilon", "eps")):
            value = self.get(key, _as_float)
            if value is None:
                continue
            ok = value > 0 if ours == "eps" else 0.0 <= value < 1.0
            if ok:
                self.set(f"optim.{ours}", value, key)
            else:
                self.skip(key, value, "must be > 0" if ours == "eps" else "must be in [0, 1)")
        self.optimizer()

    def schedule(self) -> None:
        name = self.get("lr_scheduler_type", _as_str)
        if not self.has("lr_scheduler_type"):
            name = "linear"
            self.set("optim.schedule", "linear", "transformers' default lr_scheduler_type")
        elif name in SCHEDULES:
            self.set("optim.schedule", SCHEDULES[name], "lr_scheduler_type")
        elif name is not None:
            self.skip(
                "lr_scheduler_type",
                name,
                "ours has cosine, linear and constant (after warmup) schedules; optim.schedule "
                "keeps our default cosine",
            )
        warmup_steps = self.get("warmup_steps", _as_int)
        ratio = self.get("warmup_ratio", _as_float)
        if name == "constant":
            # transformers' "constant" schedule ignores warmup.
            self.set("optim.warmup_steps", 0, "lr_scheduler_type constant (no warmup)")
            for key, value in (("warmup_steps", warmup_steps), ("warmup_ratio", ratio)):
                if value:
                    self.skip(key, value, "transformers' constant schedule has no warmup")
            return
        if warmup_steps is not None and warmup_steps > 0:
            self.set("optim.warmup_steps", warmup_steps, "warmup_steps")
            if ratio:
                self.skip("warmup_ratio", ratio, "warmup_steps > 0 wins, as in transformers")
            return
        if ratio is None or ratio == 0:
            if ratio == 0 or warmup_steps == 0:
                self.set("optim.warmup_steps", 0, "warmup_ratio" if ratio == 0 else "warmup_steps")
            return
        if not 0 < ratio <= 1:
            self.skip("warmup_ratio", ratio, "must be in [0, 1]")
        elif self.total_steps is None:
            self.skip(
                "warmup_ratio",
                ratio,
                "needs the run's total steps: give max_steps, or num_train_epochs with "
                "--train-rows N; or set optim.warmup_steps",
            )
        else:
            # transformers' get_warmup_steps: ceil(total x ratio)
            steps = math.ceil(self.total_steps * ratio - 1e-9)
            source = f"warmup_ratio {ratio:g} x {self.total_steps} steps"
            self.set("optim.warmup_steps", steps, source)

    def optimizer(self) -> None:
        name = self.get("optim", _as_str)
        if name is None or name in ADAMW_OPTIMS:
            if name is not None:
                self.note(f"optim {name}: ours is AdamW (optax.adamw)")
            return
        if name in LOW_PRECISION_ADAMW:
            self.note(
                f"optim {name}: ours is AdamW with float32 moments (no 8-bit or paged state; "
                "optim.mu_dtype=bfloat16 halves the first moment)"
            )
            return
        self.skip("optim", name, "ours is AdamW only")

    def train(self) -> None:
        seed = self.get("seed", _as_int)
        if seed is not None and 0 <= seed < 2**32:
            self.set("train.seed", seed, "seed")
            if "seed" not in self.config.get("data", {}):
                self.set("data.seed", seed, "seed (the shuffle order)")
        elif seed is not None:
            self.skip("seed", seed, "must be in [0, 2**32)")
        output_dir = self.get("output_dir", _as_str)
        if output_dir:
            self.set("train.output_dir", output_dir, "output_dir")
        self.logging()
        self.evaluation()
        self.saving()

    def steps_value(self, key: str, value: Any) -> int | None:
        """An `*_steps` value: an int, or a fraction (< 1) of the run's total steps."""
        try:
            number = _as_float(value)
        except ValueError as err:
            self.skip(key, value, str(err))
            return None
        if 0 < number < 1:
            if self.total_steps is None:
                self.skip(key, value, "a fraction of the total steps, which is not known")
                return None
            return max(1, math.ceil(number * self.total_steps))
        if number < 1 or not number.is_integer():
            self.skip(key, value, "expected a whole number >= 1 (or a fraction < 1)")
            return None
        return int(number)

    def steps_of(self, key: str) -> int | None:
        value = self.get(key, lambda v: v)
        return None if value is None else self.steps_value(key, value)

    def per_epoch(self, key: str, value: Any) -> int | None:
        if self.steps_per_epoch is None:
            self.skip(key, value, "once per epoch needs --train-rows N (the steps in an epoch)")
            return None
        return self.steps_per_epoch

    def logging(self) -> None:
        strategy = self.raw("logging_strategy", "steps")
        if strategy == "epoch":
            every = self.per_epoch("logging_strategy", strategy)
            if every:
                self.set("train.log_every", every, "logging_strategy epoch")
        elif strategy == "no":
            self.skip("logging_strategy", strategy, "ours always logs (train.log_every >= 1)")
        elif self.has("logging_steps"):
            every = self.steps_of("logging_steps")
            if every:
                self.set("train.log_every", every, "logging_steps")

    def evaluation(self) -> None:
        key = "eval_strategy" if self.has("eval_strategy") else "evaluation_strategy"
        strategy = self.raw(key, "no")
        steps_key = "eval_steps" if self.raw("eval_steps") is not None else "logging_steps"
        if strategy == "steps":
            # transformers evaluates every logging_steps when eval_steps is not given
            if self.recipe.get(steps_key) is None:
                source = f"{key} steps, transformers' default logging_steps"
                self.set("train.eval_every", 500, source)
                return
            every = self.steps_of(steps_key)
            if every:
                self.set("train.eval_every", every, f"{key} steps, {steps_key}")
        elif strategy == "epoch":
            every = self.per_epoch(key, strategy)
            if every:
                self.set("train.eval_every", every, f"{key} epoch")
        elif strategy == "no":
            if self.has(key):
                self.set("train.eval_every", 0, f"{key} no")
            if "test_files" in self.config.get("data", {}):
                self.note(
                    "no periodic eval: ours still evaluates data.test_files before and after "
                    "training"
                )
        else:
            self.skip(key, strategy, "ours evaluates every train.eval_every steps")

    def saving(self) -> None:
        strategy = self.raw("save_strategy")
        if strategy == "epoch":
            every = self.per_epoch("save_strategy", strategy)
            if every:
                self.set("train.save_every", every, "save_strategy epoch")
        elif strategy == "no":
            self.set("train.save_every", 0, "save_strategy no (ours saves at the end)")
        elif strategy in ("steps", None):
            if self.raw("save_steps") is not None:
                every = self.steps_of("save_steps")
                if every:
                    self.set("train.save_every", every, "save_steps")
            elif strategy == "steps":
                self.set("train.save_every", HF_SAVE_STEPS, "transformers' default save_steps")
        else:
            self.skip("save_strategy", strategy, "ours saves every train.save_every steps")
        if self.has("save_total_limit"):
            limit = self.raw("save_total_limit")
            if limit is None:
                self.skip(
                    "save_total_limit",
                    limit,
                    "transformers keeps every checkpoint; ours keeps the last "
                    "train.keep_checkpoints (default 2)",
                )
            else:
                limit = self.get("save_total_limit", _as_int)
                if limit is not None and limit >= 1:
                    self.set("train.keep_checkpoints", limit, "save_total_limit")
                elif limit is not None:
                    self.skip("save_total_limit", limit, "ours keeps at least one checkpoint")

    def not_carried(self) -> None:
        for key, reason in NOT_CARRIED.items():
            if key not in self.recipe or key in self.used:
                continue
            value = self.raw(key)
            if not _is_off(value):
                self.skip(key, value, reason)
        for key in SILENT:
            if key in self.recipe:
                self.raw(key)

    def unknown(self) -> None:
        for key, value in self.recipe.items():
            if key not in self.used:
                self.skip(
                    key,
                    value,
                    "not a key this converter knows (alignment-handbook, TRL DPO/CPO, SimPO or "
                    "the MMPO fork): check what it does and set the matching key by hand",
                )


def convert_recipe(
    recipe: Mapping[str, Any],
    *,
    devices: int = 1,
    train_rows: int | None = None,
    loss_name: str | None = None,
) -> Conversion:
    """Our config (only the keys the recipe sets) from an alignment-handbook / TRL recipe.

    `devices`: how many devices the recipe's per-device batch ran on (sets the
    global batch); `train_rows`: the number of training pairs (turns epochs into
    steps); `loss_name`: our loss, when an override sets it (then the recipe's
    own loss keys are not needed and an unsupported `loss_type` is no error).
    """
    if not isinstance(recipe, Mapping):
        raise UserError(
            f"a recipe must be a mapping of recipe keys, got a {type(recipe).__name__}"
        )
    if devices < 1:
        raise UserError(f"--devices {devices}: must be >= 1")
    if train_rows is not None and train_rows < 1:
        raise UserError(f"--train-rows {train_rows}: must be >= 1")
    return _Converter(recipe, devices, train_rows, loss_name).run()


# --------------------------------------------------------------------------- #
# Overrides, validation and output
# --------------------------------------------------------------------------- #
def finalize(
    conversion: Conversion, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], RunConfig]:
    """Applies `key=value` overrides, validates, and returns `(our keys, typed, as set; RunConfig)`.

    The returned mapping holds exactly the keys the recipe and the overrides set,
    converted to their declared types, so it loads back to the same RunConfig.
    """
    raw = apply_overrides(conversion.config, overrides)
    cfg = config_from_dict(raw)
    for item in overrides:
        conversion.sources[item.partition("=")[0].strip()] = "override"
    return _pick(cfg, raw), cfg


def _pick(node: Any, raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw_value in raw.items():
        value = getattr(node, key)
        if dataclasses.is_dataclass(value) and isinstance(raw_value, Mapping):
            out[key] = _pick(value, raw_value)
        else:
            out[key] = value
    return out


def flow_yaml(value: Any) -> str:
    """One value as a single line of YAML (flow style), without the document end marker."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False)
    return text.removesuffix("\n...\n").rstrip("\n")


def render_yaml(
    config: Mapping[str, Any],
    conversion: Conversion,
    recipe_name: str,
) -> str:
    """Our config as YAML: a header with assumptions and not-carried keys, then each value
    with a comment naming the recipe key it came from."""
    lines = [
        f"# Converted from {recipe_name} by `mmpo-jax convert-config`.",
        "# Each value's comment names the recipe key it came from; keys not set here keep",
        "# our defaults (`mmpo-jax config FILE` prints them all).",
    ]
    if conversion.notes:
        lines += ["#", "# Assumptions and notes:"]
        lines += [f"#   - {n}" for n in conversion.notes]
    n = len(conversion.skipped)
    lines += ["#", f"# Not carried over ({n} of the recipe's {conversion.keys_read} keys):"]
    if not conversion.skipped:
        lines.append("#   (none)")
    for s in conversion.skipped:
        lines.append(f"#   - {s.key}: {_shorten(flow_yaml(s.value))}")
        lines.append(f"#       {s.reason}")
    lines += _block(config, conversion.sources, "", 0)
    return "\n".join(lines) + "\n"


def _block(
    node: Mapping[str, Any], sources: Mapping[str, str], prefix: str, depth: int
) -> list[str]:
    lines = []
    indent = "  " * depth
    for key, value in node.items():
        path = f"{prefix}{key}"
        source = sources.get(path)
        comment = f"  # {source}" if source else ""
        if isinstance(value, Mapping) and value:
            lines.append(f"{indent}{flow_yaml(key)}:{comment}")
            lines += _block(value, sources, f"{path}.", depth + 1)
        else:
            lines.append(f"{indent}{flow_yaml(key)}: {flow_yaml(value)}{comment}")
    return lines


def _shorten(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_json(config: Mapping[str, Any], conversion: Conversion, recipe_name: str) -> dict[str, Any]:
    return {
        "recipe": recipe_name,
        "config": config,
        "sources": conversion.sources,
        "notes": conversion.notes,
        "not_carried": [
            {"key": s.key, "value": s.value, "reason": s.reason} for s in conversion.skipped
        ],
    }
