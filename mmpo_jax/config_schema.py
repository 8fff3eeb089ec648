"""The run config's sections: typed, frozen dataclasses, one per YAML section (`model`,
`data`, `loss`, `optim`, `mesh`, `train`), with their defaults, each key's help
(`mmpo_jax.config_fields.option`: the README's table is made of it) and choices, and
range checks (`validate`, raising a `ConfigError` that names the key). The `model`
section lives in `mmpo_jax.config_model`, re-exported here. `mmpo_jax.config` loads
the sections from YAML and overrides; `mmpo_jax.config_settle` fills what is left unset.

A key whose default depends on other keys is None (or `auto`) here and settled there;
`validate` checks what was written, so None passes it (the default is valid by
construction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmpo_jax.choices import TRACKERS
from mmpo_jax.config_fields import ConfigError, check as _check, option
from mmpo_jax.config_model import (  # noqa: F401  (re-exported: `from mmpo_jax.config_schema import ...`)
    LORA_BASE_NEEDS_LORA,
    LORA_TARGETS,
    MODEL_DIM_LIMITS,
    MODEL_DIM_MINIMUMS,
    LoraConfig,
    ModelConfig,
    ModelInit,
    model_dims_problem,
)
from mmpo_jax.losses.declarations import (
    CPO_LOSS_TYPES,
    DECLARATIONS,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    LOSS_NAMES,
    PER_TOKEN_LOSS_TYPES,
    dpo_type_problem,
    loss_name_hint,
    mixture,
)

__all__ = ["ConfigError", "DataConfig", "LORA_BASE_NEEDS_LORA", "LORA_TARGETS", "LossConfig", "MeshConfig",
           "MODEL_DIM_LIMITS", "MODEL_DIM_MINIMUMS", "LoraConfig", "ModelConfig", "ModelInit", "OptimConfig",
           "RunConfig", "TrainConfig", "model_dims_problem"]


@dataclass(frozen=True)
class DataConfig:
    """The preference data; `mmpo_jax/data/pipeline.py` says how each key is used.

    Sources: a `.jsonl`/`.json`/`.parquet` path, a list of them, a hub id, or
    `builtin:demo` / `builtin:demo-standard` (the shipped demo data).
    """

    train_files: str | list[str] | None = option(None, "the training pairs: a `.jsonl`/`.json`/`.parquet` path, a "
                                                 "list of them, a hub id, or `builtin:demo` (see Data)", shown="-")
    test_files: str | list[str] | None = option(None, "the test pairs, as train_files", shown="-")
    split: str = option("train", "hub split (and demo split) of train_files / mixture")
    test_split: str = option("test", "hub split (and demo split) of test_files")
    mixture: dict[str, float] | None = option(None, "{source: fraction of its rows to keep}, instead of "
                                              "train_files", shown="-")
    format: Literal["auto", "standard", "conversational"] = option("auto", "row format")
    tokenizer: str = option(
        "", "HF tokenizer dir or hub id, `.gguf`, `builtin:tiny`; unset: `model.path`'s tokenizer (its "
        "directory's files, a GGUF's embedded one), `builtin:tiny` for a random init (refused with a checkpoint)",
        shown="the model's own")
    chat_template: str | None = option(None, "a Jinja chat template (the text, or a file holding it) used instead "
                                       "of the tokenizer's, as TRL recipes' `chat_template`")
    max_length: int = option(1024, "TRL-style truncation: tokens of prompt + answer")
    max_prompt_length: int | None = option(512, "TRL-style truncation of the prompt; null: only max_length "
                                           "limits it")
    max_invalid_fraction: float = option(0.01, "bad-row limit: the fraction of rows that may be dropped")
    batch_size: int = option(8, "global preference pairs per optimizer step")
    seed: int = option(0, "shuffle seed")
    cache_dir: str | None = option(None, "null: datasets' cache (HF_DATASETS_CACHE); tokenized data goes to "
                                   "mmpo_jax_tokenized/ in it")
    packing: Literal["none", "packed", "shared_prompt"] = option(
        "none", "`none`: each sequence in its own row, padded to the batch's bucket; `packed`: the sequences of "
        "several pairs share rows of pack_length tokens; `shared_prompt`: as packed, each pair one sequence "
        "prompt | chosen | rejected (see Data)")
    pack_length: int | None = option(None, "tokens per packed row (null: 2 x max_length, the longest pair the "
                                     "truncation allows); unused by packing none", shown="2 x max_length")

    def validate(self, prefix: str) -> None:
        _check(self.max_length >= 2, prefix, "max_length", self.max_length, "must be >= 2")
        _check(self.pack_length is None or self.pack_length >= 2 * self.max_length, prefix, "pack_length",
               self.pack_length,
               f"must hold the longest pair data.max_length={self.max_length} allows ({2 * self.max_length} "
               f"tokens: prompt + chosen and prompt + rejected, each up to max_length); set "
               f"data.pack_length >= {2 * self.max_length} or lower data.max_length")
        # a row holds at most all of a batch's pairs: any more is padding, allocated for nothing
        # (data.pack_length=1e9 allocated rows of 4 GB each)
        fill = 2 * self.max_length * self.batch_size
        _check(self.pack_length is None or self.pack_length <= fill, prefix, "pack_length", self.pack_length,
               f"is longer than a whole batch fills (data.batch_size={self.batch_size} pairs x 2 x "
               f"data.max_length={self.max_length} = {fill} tokens): the rest of every row would be padding; "
               f"set data.pack_length <= {fill}")
        if self.max_prompt_length is not None:
            _check(
                1 <= self.max_prompt_length < self.max_length,
                prefix,
                "max_prompt_length",
                self.max_prompt_length,
                f"must be >= 1 and < max_length={self.max_length} (or null)",
            )
        _check(
            0.0 <= self.max_invalid_fraction <= 1.0,
            prefix,
            "max_invalid_fraction",
            self.max_invalid_fraction,
            "must be in [0, 1]",
        )
        _check(self.batch_size >= 1, prefix, "batch_size", self.batch_size, "must be >= 1")
        _check(0 <= self.seed < 2**32, prefix, "seed", self.seed, "must be in [0, 2**32)")
        for name in ("train_files", "test_files"):
            value = getattr(self, name)
            _check(
                value is None or (len(value) > 0 and all(v for v in ([value] if isinstance(value, str) else value))),
                prefix,
                name,
                value,
                "must name a file, a list of files or a hub id (or be null)",
            )
        if self.mixture is not None:
            _check(len(self.mixture) > 0, prefix, "mixture", self.mixture, "must name at least one source")
            for source, fraction in self.mixture.items():
                _check(
                    0.0 < fraction <= 1.0,
                    prefix,
                    f"mixture.{source}",
                    fraction,
                    "is the fraction of the source to keep: in (0, 1]",
                )
            if self.train_files is not None:
                raise ConfigError(
                    f"{prefix}: set either train_files or mixture, not both "
                    f"(train_files={self.train_files!r}, mixture={self.mixture!r})"
                )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a warmup-then-decay schedule and global-norm clipping."""

    learning_rate: float = option(5e-7, "AdamW's peak learning rate")
    schedule: Literal["cosine", "linear", "constant"] = option(
        "cosine", "`cosine`, `linear`, `constant` after warmup (as transformers' schedulers)")
    warmup_steps: int = option(0, "linear warmup steps")
    weight_decay: float = option(0.0, "decoupled weight decay")
    max_grad_norm: float = option(1.0, "global-norm clipping (<= 0 turns it off)")
    grad_accum: int = option(1, "micro-batches per optimizer step; data.batch_size pairs are split evenly")
    mu_dtype: Literal["float32", "bfloat16"] = option("float32", "AdamW first-moment dtype")
    b1: float = option(0.9, "AdamW beta1")
    b2: float = option(0.999, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")

    def validate(self, prefix: str) -> None:
        _check(self.learning_rate > 0, prefix, "learning_rate", self.learning_rate, "must be > 0")
        _check(self.warmup_steps >= 0, prefix, "warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.weight_decay >= 0, prefix, "weight_decay", self.weight_decay, "must be >= 0")
        _check(self.grad_accum >= 1, prefix, "grad_accum", self.grad_accum, "must be >= 1")
        _check(0 <= self.b1 < 1, prefix, "b1", self.b1, "must be in [0, 1)")
        _check(0 <= self.b2 < 1, prefix, "b2", self.b2, "must be in [0, 1)")
        _check(self.eps > 0, prefix, "eps", self.eps, "must be > 0")


@dataclass(frozen=True)
class LossConfig:
    """The preference loss; `docs/losses.md` defines each, `mmpo_jax.losses.declarations`
    declares which keys each reads and its defaults.

    `sft` is supervised fine-tuning on the chosen answers (the rejected are ignored):
    the token-mean NLL of the batch's chosen tokens (TRL SFTTrainer's), or with
    `average_logps: true` the mean over pairs of each answer's per-token NLL.
    """

    name: str = option(
        "mmpo", "`mmpo`, `dpo` (with TRL's loss types), `simpo`, `cpo`, `orpo` (TRL's CPO and ORPO), or `sft` "
        "(supervised fine-tuning on the chosen answers: the token-mean NLL, as TRL's SFTTrainer; rejected answers "
        "unused); `docs/losses.md` has each formula and source", choices=LOSS_NAMES, hint=loss_name_hint)
    beta: float | None = option(None, "reward scale; null: the loss's own; sft uses it only for the rewards/* "
                                "metrics when it has a reference", shown="0.1 / 2.0 for simpo")
    reward_epsilon: float = option(1.0, "MMPO reward offset of chosen")
    rejected_epsilon: float = option(0.1, "MMPO reward offset of rejected")
    norm_eps: float = option(1e-6, "MMPO min-max normalisation epsilon")
    aux_weight: float = option(1.0, "MMPO auxiliary `-log_sigmoid(s_w - s_l)` weight")
    normalize: Literal["minmax", "none"] = option("minmax", "MMPO reward normalisation over the global batch, "
                                                  "or `none`")
    entropy_weight: float = option(0.0, "MMPO entropy ablation: weight of the entropy bonus")
    entropy_estimator: Literal["token", "score_function"] = option(
        "token", "MMPO entropy ablation: its estimator (`token` or `score_function`)")
    loss_type: str | list[str] = option(
        "sigmoid", "dpo: one of TRL's DPO loss types (" + ", ".join(f"`{t}`" for t in DPO_LOSS_TYPES) + ") or a "
        "list, the weighted sum (`[sigmoid, sft]` is RPO); cpo: " + ", ".join(f"`{t}`" for t in CPO_LOSS_TYPES))
    loss_weights: list[float] | None = option(None, "dpo: the weights of a list of loss types", shown="all 1")
    label_smoothing: float = option(0.0, "dpo's `sigmoid` (conservative DPO), `robust`, `exo_pair` (> 0 there), "
                                    "`aot*`; cpo's `sigmoid`, `simpo`")
    f_divergence_type: str = option("reverse_kl", "dpo: f-DPO's divergence (`forward_kl`, `js_divergence`, "
                                    "`alpha_divergence`)", choices=F_DIVERGENCE_TYPES)
    f_alpha_divergence_coef: float = option(0.5, "dpo: f-DPO's alpha of `alpha_divergence`")
    discopop_tau: float = option(0.05, "dpo: DiscoPOP's temperature")
    use_weighting: bool = option(False, "dpo: WPO's per-pair weights (TRL's use_weighting) on every component")
    ld_alpha: float | None = option(None, "dpo: LD-DPO's weight of the longer answer's tail tokens, policy and "
                                    "reference alike (TRL's ld_alpha; null: off)")
    gamma: float | None = option(None, "SimPO target margin (TRL's `simpo_gamma`; simpo, cpo's simpo); null: the "
                                 "loss's own", shown="1.0 simpo / 0.5 cpo")
    cpo_alpha: float = option(1.0, "cpo: weight of the chosen answers' NLL")
    alphapo_alpha: float = option(0.0, "cpo: AlphaPO's reward shape (TRL's `alpha`; 0 = log-probs)")
    average_logps: bool | None = option(None, "length-averaged sequence log-probs; null: the loss's own",
                                        shown="false / true for simpo, orpo, cpo's ipo and simpo")

    def validate(self, prefix: str) -> None:
        spec = DECLARATIONS[self.name]
        _check(self.beta is None or self.beta > 0, prefix, "beta", self.beta, "must be > 0")
        _check(self.norm_eps > 0, prefix, "norm_eps", self.norm_eps, "must be > 0")
        _check(self.aux_weight >= 0, prefix, "aux_weight", self.aux_weight, "must be >= 0")
        _check(
            self.entropy_weight >= 0, prefix, "entropy_weight", self.entropy_weight, "must be >= 0"
        )
        _check(
            0.0 <= self.label_smoothing < 0.5,
            prefix,
            "label_smoothing",
            self.label_smoothing,
            "must be in [0, 0.5)",
        )
        _check(
            not (spec.averaged_only and self.average_logps is False),
            prefix,
            "average_logps",
            self.average_logps,
            f"{spec.title} always uses length-averaged log-probs; leave it unset or true",
        )
        _check(self.discopop_tau > 0, prefix, "discopop_tau", self.discopop_tau, "must be > 0")
        _check(self.cpo_alpha >= 0, prefix, "cpo_alpha", self.cpo_alpha, "must be >= 0")
        self._validate_loss_types(prefix)

    def _validate_loss_types(self, prefix: str) -> None:
        kinds = mixture(self)
        if self.name != "dpo":
            _check(not self.use_weighting, prefix, "use_weighting", self.use_weighting,
                   "is WPO's weighting of DPO's loss types: loss.name=dpo only")
            _check(self.ld_alpha is None, prefix, "ld_alpha", self.ld_alpha, "is LD-DPO's: loss.name=dpo only")
        if not kinds:
            _check(self.loss_type == "sigmoid" and self.loss_weights is None, prefix, "loss_type",
                   self.loss_type, f"loss.name={self.name} has no loss types (dpo and cpo have); "
                   "remove loss.loss_type and loss.loss_weights")
            _check(self.f_divergence_type == "reverse_kl", prefix, "f_divergence_type", self.f_divergence_type,
                   "applies to loss.name=dpo only")
            return
        if self.name == "cpo":
            _check(isinstance(self.loss_type, str) and self.loss_type in CPO_LOSS_TYPES, prefix, "loss_type",
                   self.loss_type, f"CPO takes one of {', '.join(CPO_LOSS_TYPES)} (no mixtures)")
            _check(self.loss_weights is None, prefix, "loss_weights", self.loss_weights,
                   "CPO has no mixtures; remove it")
            _check(self.f_divergence_type == "reverse_kl", prefix, "f_divergence_type", self.f_divergence_type,
                   "applies to loss.name=dpo only")
            return
        problem = dpo_type_problem(kinds, self.loss_weights, f_divergence_type=self.f_divergence_type,
                                   label_smoothing=self.label_smoothing, weighted=self.use_weighting)
        if problem is not None:
            key, rule = problem
            _check(False, prefix, key, getattr(self, key), rule)
        per_token = [k for k in kinds if k in PER_TOKEN_LOSS_TYPES]
        _check(not (per_token and self.average_logps), prefix, "average_logps", self.average_logps,
               f"loss_type {', '.join(per_token)} divides sequence sums by token counts itself; "
               "set loss.average_logps=false")
        if self.ld_alpha is not None:
            _check(0.0 <= self.ld_alpha <= 1.0, prefix, "ld_alpha", self.ld_alpha, "must be in [0, 1] (or null)")
            _check(not self.average_logps, prefix, "average_logps", self.average_logps,
                   "LD-DPO (loss.ld_alpha) weighs sequence sums; set loss.average_logps=false")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 means "all the devices the others leave"."""

    data: int = option(-1, "device mesh axis size: data parallelism (-1: all the devices the others leave)")
    fsdp: int = option(1, "device mesh axis size: parameters, gradients and optimizer state sharded")
    tensor: int = option(1, "device mesh axis size: tensor parallelism")

    def validate(self, prefix: str) -> None:
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            _check(value == -1 or value >= 1, prefix, name, value, "must be >= 1, or -1 for the rest")
        n_rest = [v for v in (self.data, self.fsdp, self.tensor) if v == -1]
        if len(n_rest) > 1:
            raise ConfigError(
                f"{prefix}: at most one of data, fsdp, tensor may be -1 "
                f"(got data={self.data}, fsdp={self.fsdp}, tensor={self.tensor})"
            )


DEFAULT_MAX_STEPS = 1000


@dataclass(frozen=True)
class TrainConfig:
    """The run: where it writes, how long it runs, its seed."""

    output_dir: str = option("runs/default", "the run's directory")
    max_steps: int | None = option(None, "the run's length in optimizer steps (give it or num_epochs; null: "
                                   f"{DEFAULT_MAX_STEPS}, or as many as num_epochs make)", shown=str(DEFAULT_MAX_STEPS))
    num_epochs: float | None = option(None, "or its length in passes over the kept training pairs (TRL's "
                                      "`num_train_epochs`, fractions too: give one of the two; the run resolves "
                                      "epochs to steps from the data and prints them)")
    seed: int = option(0, "seed")
    log_every: int = option(1, "metrics interval: to metrics.jsonl / TensorBoard every this many steps")
    eval_every: int = option(0, "eval interval on the test data (0: before and after training only)")
    eval_batches: int = option(0, "test batches per eval, at most (0: all)")
    save_every: int = option(0, "checkpoint interval (0: at the end only)")
    keep_checkpoints: int = option(2, "checkpoints kept")
    report_to: str | list[str] = option(
        help="trackers besides metrics.jsonl (always written): " + ", ".join(f"`{t}`" for t in TRACKERS)
        + " (TRL's report_to), or `none` (not even TensorBoard)", factory=lambda: ["tensorboard"])
    run_name: str = option("", "the trackers' run name (empty: the output directory's name)", shown='`""`')
    mlflow_tracking_uri: str = option("", "MLflow's tracking URI (empty: `MLFLOW_TRACKING_URI`, else MLflow's "
                                      "default ./mlruns)", shown='`""`')
    storage_timeout_s: float = option(
        300.0, "a `gs://` bucket that stops answering: how long each request to it, and the wait for a "
        "checkpoint save there, is retried before the run stops with one line naming the bucket and the step "
        "not saved (the checkpoints before it are intact; run again to resume). A bucket that cannot be "
        "reached when a command starts is said at once")

    @property
    def steps(self) -> int:
        """The run's length: `max_steps`, which a run resolves from `num_epochs` first."""
        assert self.max_steps is not None, "resolve train.num_epochs first (run_config.with_run_length)"
        return self.max_steps

    def validate(self, prefix: str) -> None:
        if self.max_steps is not None and self.num_epochs is not None:
            raise ConfigError(f"{prefix}: give train.max_steps={self.max_steps} or train.num_epochs="
                              f"{self.num_epochs:g}, not both (set the other to null)")
        _check(self.max_steps is None or self.max_steps >= 1, prefix, "max_steps", self.max_steps,
               "must be >= 1")
        _check(self.num_epochs is None or self.num_epochs > 0, prefix, "num_epochs", self.num_epochs,
               "must be > 0")
        _check(self.log_every >= 1, prefix, "log_every", self.log_every, "must be >= 1")
        for key in ("eval_every", "eval_batches", "save_every"):
            _check(getattr(self, key) >= 0, prefix, key, getattr(self, key), "must be >= 0")
        _check(self.keep_checkpoints >= 1, prefix, "keep_checkpoints", self.keep_checkpoints,
               "must be >= 1")
        _check(self.storage_timeout_s > 0, prefix, "storage_timeout_s", self.storage_timeout_s, "must be > 0")
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        unknown = [n for n in names if n not in (*TRACKERS, "none")]
        _check(not unknown, prefix, "report_to", self.report_to,
               f"unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)}, or none")
        _check("none" not in names or names == ["none"], prefix, "report_to", self.report_to,
               "none turns every tracker off: give it alone")
        _check(len(set(names)) == len(names), prefix, "report_to", self.report_to, "names a tracker twice")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = option(help="the model", factory=ModelConfig)
    data: DataConfig = option(help="the preference data", factory=DataConfig)
    loss: LossConfig = option(help="the loss", factory=LossConfig)
    optim: OptimConfig = option(help="the optimizer", factory=OptimConfig)
    mesh: MeshConfig = option(help="the device mesh", factory=MeshConfig)
    train: TrainConfig = option(help="the run", factory=TrainConfig)
