"""`mmpo-jax convert-config` (alignment-handbook / TRL recipes -> our config) and the paper-shaped configs.

The recipes under tests/fixtures/recipes/ are hand-written in the shapes of
alignment-handbook's DPO recipes (old `dataset_mixer` and new `dataset_mixture`
formats) and its ORPO and SFT recipes, TRL's CPO/SimPO scripts and the MMPO authors'
fork of the handbook.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmpo_jax import cli, recipes
from mmpo_jax.config import config_to_dict, load_config, read_config_file
from mmpo_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).parent / "fixtures" / "recipes"
MODULE = "mmpo_jax.commands.convert_config"
# The authors' data: UltraFeedback-binarized train_prefs + Orca DPO pairs train_prefs.
PAPER_ROWS = 61_135 + 12_359


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """`mmpo-jax convert-config ARGS` through cli.main: (exit code, stdout, stderr)."""
    if MODULE not in cli.SUBCOMMANDS:  # until cli.py lists the command
        monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, MODULE))

    def run(*args: str) -> tuple[int, str, str]:
        code = cli.main(["convert-config", *map(str, args)])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def _skipped(conversion: recipes.Conversion) -> dict[str, str]:
    return {s.key: s.reason for s in conversion.skipped}


def _convert(name: str, **kwargs) -> recipes.Conversion:
    return recipes.convert_recipe(recipes.read_recipe(RECIPES / name), **kwargs)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #
def test_authors_recipe_converts_to_a_config_that_loads(run_cli, tmp_path):
    out = tmp_path / "run.yaml"
    code, stdout, stderr = run_cli(
        RECIPES / "mmpo_fork_smollm2.yaml", "--devices", 4, "--train-rows", PAPER_ROWS, "--out", out
    )
    assert code == 0 and stdout == ""
    assert "6 recipe key(s) not carried over" in stderr
    cfg = load_config(out)
    assert cfg.model.path == "HuggingFaceTB/SmolLM2-135M-Instruct" == cfg.data.tokenizer
    assert (cfg.model.param_dtype, cfg.model.compute_dtype, cfg.model.remat) == (
        "float32",
        "bfloat16",
        "none",
    )
    assert cfg.model.lora.rank == 0  # use_peft: false
    assert cfg.data.mixture == {
        "HuggingFaceH4/ultrafeedback_binarized": 1.0,
        "HuggingFaceH4/orca_dpo_pairs": 1.0,
    }
    assert (cfg.data.split, cfg.data.test_split) == ("train_prefs", "test_prefs")
    assert cfg.data.test_files == list(cfg.data.mixture)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (2312, 1800)
    # 4 pairs x 8 accumulation steps x 4 devices; 73,494 // 128 = 574 steps an epoch, 5 epochs
    assert (cfg.data.batch_size, cfg.optim.grad_accum) == (128, 8)
    assert (cfg.train.max_steps, cfg.optim.warmup_steps) == (2870, 287)
    assert (cfg.train.log_every, cfg.train.eval_every, cfg.train.save_every) == (5, 64, 574)
    assert (cfg.train.seed, cfg.data.seed, cfg.train.keep_checkpoints) == (42, 42, 2)
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.reward_epsilon) == ("mmpo", 0.1, 1.0)
    assert cfg.loss.average_logps is False  # `average_logps: no`
    assert (cfg.optim.learning_rate, cfg.optim.schedule) == (1e-4, "cosine")
    assert (cfg.train.report_to, cfg.train.run_name) == (["wandb"], "smollm2-135m-mmpo")
    text = out.read_text()
    header = text.split("\nmodel:")[0]
    for key in ("attn_implementation", "preprocessing_num_workers"):
        assert f"#   - {key}:" in header
    assert "ours picks its attention kernel with model.attention" in header
    assert "  batch_size: 128  # per_device_train_batch_size 4 x gradient_accumulation_steps 8" in text


def test_output_is_yaml_whose_comments_do_not_change_it(run_cli):
    args = (RECIPES / "dpo_handbook_lora.yaml", "--devices", 2)
    code, text, _ = run_cli(*args)
    assert code == 0
    code, as_json, _ = run_cli(*args, "--json")
    assert code == 0
    report = json.loads(as_json)
    assert yaml.safe_load(text) == report["config"]
    assert set(report) == {"recipe", "config", "sources", "notes", "not_carried"}
    assert report["sources"]["model.lora.rank"] == "lora_r"
    assert {"key": "optim", "value": "rmsprop", "reason": "ours is AdamW only"} in report["not_carried"]


# Every recipe style of the fixtures, with the override its conversion needs.
RECIPE_STYLES = {
    "dpo_handbook_lora.yaml": (),  # handbook, dataset_mixer
    "dpo_mixture.yaml": (),  # handbook, dataset_mixture
    "orpo_handbook.yaml": ("loss.name=orpo",),  # handbook ORPO: names no loss
    "sft_handbook.yaml": ("loss.name=sft",),  # handbook SFT: names no loss
    "mmpo_fork_smollm2.yaml": (),
    "mmpo_fork_placeholders.yaml": (),
    "simpo_cpo.yaml": (),  # TRL's CPO script, dataset_name
    "simpo_ratio.yaml": (),
    "ipo.yaml": (),  # TRL's DPOConfig
}
# The handbook's Zephyr template: line breaks, inside Jinja strings too, and quotes.
ZEPHYR_TEMPLATE = recipes.read_recipe(RECIPES / "orpo_handbook.yaml")["chat_template"]


def _config_cli(path: Path, capsys) -> tuple[int, str, str]:
    """`mmpo-jax config PATH` through cli.main: (exit code, stdout, stderr)."""
    code = cli.main(["config", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", list(RECIPE_STYLES))
def test_each_recipe_style_converts_to_a_file_mmpo_jax_config_loads(name, run_cli, tmp_path, capsys):
    """The issue's report: a multi-line chat_template broke out of the not-carried comments
    and `mmpo-jax config` refused the file. Now it is carried, written so it reads back
    equal, and padding_free / report_to are carried too."""
    recipe = recipes.read_recipe(RECIPES / name)
    recipe.update(chat_template=ZEPHYR_TEMPLATE, padding_free=True,
                  report_to=["tensorboard", "wandb", "comet_ml"])
    source, out = tmp_path / name, tmp_path / "run.yaml"
    source.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = run_cli(source, *RECIPE_STYLES[name], "--out", out)
    assert code == 0, err
    text = out.read_text()
    header, body = text.split("\nmodel:")
    assert all(line.startswith("#") for line in header.splitlines())
    assert "#   - report_to: [comet_ml]\n#       ours reports to tensorboard, mlflow, wandb" in header
    assert "chat_template" not in header and "padding_free" not in header
    assert "  chat_template: |-  # chat_template\n    {% for message in messages %}\n" in body
    assert "  packing: packed  # padding_free" in body
    code, shown, err = _config_cli(out, capsys)
    assert code == 0, err
    resolved = yaml.safe_load(shown)
    assert resolved["data"]["chat_template"] == ZEPHYR_TEMPLATE
    assert resolved["data"]["packing"] == "packed"
    assert resolved["train"]["report_to"] == ["tensorboard", "wandb"]


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages }}\n",  # a trailing line break: `|` keeps one
        "  {{ messages }}\n{{ eos_token }}",  # leading spaces: needs an indentation indicator
        "{{ messages }}\n\n\n",  # trailing blank lines: `|+` ends the document with `...`
        "{{ a }} \n{{ b }}",  # a trailing space, which a block scalar cannot hold
        "{{ a }}\r\n{{ b }}\r\n",  # Windows line breaks
        "\t{{ a }}\n{{ b }}",  # a tab
        "{{ '<\uff5cUser\uff5c>' }}\n{{ a }}\u2028",  # non-ASCII and a Unicode line break
        "# {{ a }}\n- {{ b }}: c",  # lines that look like YAML
        "{{ messages }}",  # one line
    ],
)
def test_a_chat_template_reads_back_equal_to_the_recipes(template):
    conversion = recipes.convert_recipe({"model_name_or_path": "m", "chat_template": template})
    config, _ = recipes.finalize(conversion)
    text = recipes.render_yaml(config, conversion, "r.yaml")
    assert yaml.safe_load(text)["data"]["chat_template"] == template
    assert conversion.sources["data.chat_template"] == "chat_template"


def test_values_in_comments_stay_on_comment_lines(run_cli, tmp_path, capsys):
    """A line break in a value, key or note would end its `#` line, the rest read as
    YAML: every kind of break, and the control characters YAML refuses, are escaped."""
    breaks = "one\ntwo\rthree\x85four\u2028five\u2029six\x07seven"
    recipe = {
        "model_name_or_path": "m",
        "dataset_mixer": {"./local\ndir": 1.0},  # a key in our config, and in a note
        "dataset_splits": ["train", f"dev{breaks}"],  # not carried, in a list
        "system_prompt": breaks,  # an unknown key's value
        f"odd{breaks}": 1,  # an unknown key
        "tools": [{"description": breaks}],  # a not-carried mapping
    }
    source, out = tmp_path / "recipe.yaml", tmp_path / "run.yaml"
    source.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, _, err = run_cli(source, "--out", out)
    assert code == 0, err
    text = out.read_text()
    header, body = text.split("\nmodel:")
    lines = header.split("\n")  # only \n: YAML also breaks lines at \r, \x85, \u2028, \u2029
    assert all(line.startswith("#") for line in lines)
    assert not any(ch in text for ch in "\r\x85\u2028\u2029\x07")
    assert "#   - system_prompt: \"one\\ntwo\\rthree\\Nfour\\Lfive" in header  # YAML's escapes
    assert "#   - oddone\\ntwo\\rthree\\x85four\\u2028five" in header  # Python's, in prose
    assert "#   - dataset ./local\\ndir looks like a local directory" in header
    loaded = yaml.safe_load(text)
    assert loaded["data"]["mixture"] == {"./local\ndir": 1.0}
    code, _, err = _config_cli(out, capsys)
    assert code == 0, err


def test_padding_free_report_to_and_run_name_map_to_ours():
    def convert(**recipe):
        conversion = recipes.convert_recipe({"model_name_or_path": "m", **recipe})
        recipes.finalize(conversion)  # validates
        return conversion

    packed = convert(padding_free="yes")
    assert packed.config["data"]["packing"] == "packed"
    assert packed.sources["data.packing"].startswith("padding_free")
    off = convert(padding_free=False)
    assert "packing" not in off.config["data"] and off.skipped == []
    assert _skipped(convert(padding_free="sometimes"))["padding_free"] == "expected true or false"

    def trackers(value):
        conversion = convert(report_to=value)
        return conversion.config.get("train", {}).get("report_to"), _skipped(conversion)

    assert trackers("wandb") == (["wandb"], {})
    assert trackers(["mlflow", "tensorboard", "mlflow"]) == (["mlflow", "tensorboard"], {})
    assert trackers("none") == trackers(["none"]) == trackers([]) == ("none", {})
    assert trackers(None) == (None, {})  # transformers' default, which changed: ours keeps its own
    value, skipped = trackers(["comet_ml", "wandb"])
    assert value == ["wandb"] and "ours reports to tensorboard, mlflow, wandb" in skipped["report_to"]
    value, skipped = trackers("comet_ml")
    assert value is None and "report_to" in skipped
    everything = convert(report_to="all")
    assert everything.config["train"]["report_to"] == ["tensorboard", "mlflow", "wandb"]
    assert any(note.startswith("report_to all:") for note in everything.notes)
    assert convert(run_name="zephyr-dpo").config["train"]["run_name"] == "zephyr-dpo"


def test_paper_config_agrees_with_the_converted_authors_recipe():
    """configs/smollm2-135m-mmpo.yaml holds what the converter makes of the authors' recipe."""
    conversion = _convert("mmpo_fork_smollm2.yaml", devices=4, train_rows=PAPER_ROWS)
    converted, _ = recipes.finalize(conversion)
    paper = config_to_dict(load_config(ROOT / "configs" / "smollm2-135m-mmpo.yaml"))
    checked = {
        "model": ["param_dtype", "compute_dtype", "remat"],
        "data": ["mixture", "split", "test_files", "test_split", "max_length",
                 "max_prompt_length", "batch_size", "seed", "tokenizer"],
        "loss": ["name", "beta", "reward_epsilon", "average_logps"],
        "optim": ["schedule", "warmup_steps", "grad_accum"],
        "train": ["max_steps", "seed", "log_every", "eval_every", "save_every"],
    }
    for section, keys in checked.items():
        for key in keys:
            assert converted[section][key] == paper[section][key], f"{section}.{key}"


def test_overrides_apply_after_the_conversion(run_cli):
    code, text, _ = run_cli(
        RECIPES / "mmpo_fork_smollm2.yaml", "data.batch_size=64", "optim.learning_rate=2e-6",
        "train.output_dir=runs/007",
    )
    assert code == 0
    assert "  batch_size: 64  # override" in text
    config = yaml.safe_load(text)
    assert config["optim"]["learning_rate"] == 2e-6
    assert config["train"]["output_dir"] == "runs/007"  # a string, as load_config keeps it


def test_a_bad_override_is_a_config_error(run_cli):
    code, _, err = run_cli(RECIPES / "mmpo_fork_smollm2.yaml", "data.batch_size=0")
    assert code == 2 and "data.batch_size=0: must be >= 1" in err
    code, _, err = run_cli(RECIPES / "mmpo_fork_smollm2.yaml", "other.yaml")
    assert code == 2 and "'other.yaml' is not a key=value override" in err


def test_a_recipe_that_is_not_a_mapping_is_a_user_error(run_cli, tmp_path):
    code, _, err = run_cli(RECIPES / "not_a_mapping.yaml")
    assert code == 2 and "a recipe must be a mapping" in err and "got a list" in err
    code, _, err = run_cli(tmp_path / "missing.yaml")
    assert code == 2 and "recipe file not found" in err
    with pytest.raises(UserError, match="got a list"):
        recipes.convert_recipe([{"beta": 0.1}])  # type: ignore[arg-type]


def test_an_unsupported_loss_stops_unless_an_override_names_ours(run_cli, tmp_path):
    recipe = tmp_path / "kto.yaml"
    recipe.write_text("model_name_or_path: m\nloss_type: kto_pair\nbeta: 0.1\n")
    code, _, err = run_cli(recipe)
    assert code == 2
    assert "loss_type: kto_pair" in err and "loss.name=mmpo|dpo|cpo|simpo|orpo|sft" in err
    code, text, _ = run_cli(recipe, "loss.name=dpo")
    assert code == 0
    assert "#   - loss_type: kto_pair\n#       replaced by the override loss.name=dpo" in text
    assert yaml.safe_load(text)["loss"] == {"name": "dpo", "beta": 0.1}


def test_trl_dpo_loss_types_and_mixtures_carry_over(run_cli):
    code, text, _ = run_cli(RECIPES / "ipo.yaml")
    assert code == 0 and yaml.safe_load(text)["loss"] == {"name": "dpo", "beta": 0.1, "loss_type": "ipo"}
    mixture = recipes.convert_recipe({
        "loss_type": ["sigmoid", "sft", "exo_pair"], "loss_weights": [1.0, 0.5, 0.2], "label_smoothing": 0.01,
        "f_divergence_type": "js_divergence", "f_alpha_divergence_coef": 0.3, "discopop_tau": 0.1})
    assert mixture.config["loss"] == {
        "name": "dpo", "loss_type": ["sigmoid", "sft", "exo_pair"], "loss_weights": [1.0, 0.5, 0.2],
        "label_smoothing": 0.01, "f_divergence_type": "js_divergence", "f_alpha_divergence_coef": 0.3,
        "discopop_tau": 0.1}
    _, cfg = recipes.finalize(mixture)  # validates
    assert cfg.loss.loss_type == ["sigmoid", "sft", "exo_pair"]
    # older TRL's rpo_alpha is the [sigmoid, sft] mixture
    rpo = recipes.convert_recipe({"rpo_alpha": 0.5})
    assert rpo.config["loss"] == {"name": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    wpo = recipes.convert_recipe({"use_weighting": True, "ld_alpha": 0.5})
    assert wpo.config["loss"] == {"name": "dpo", "use_weighting": True, "ld_alpha": 0.5}
    # TR-DPO's keys
    tr = recipes.convert_recipe({"sync_ref_model": True, "ref_model_mixup_alpha": 0.5, "ref_model_sync_steps": 64})
    assert tr.config["model"] == {"sync_reference": True, "reference_mixup_alpha": 0.5, "reference_sync_steps": 64}
    assert recipes.finalize(tr)[1].model.reference_sync_steps == 64
    # a list of one is that loss type
    one = recipes.convert_recipe({"loss_type": ["hinge"]})
    assert one.config["loss"] == {"name": "dpo", "loss_type": "hinge"}


def test_trl_cpo_recipes_become_cpo():
    cpo = recipes.convert_recipe({"loss_type": "ipo", "cpo_alpha": 0.5, "beta": 0.2, "alpha": 0.25})
    assert cpo.config["loss"] == {"name": "cpo", "beta": 0.2, "loss_type": "ipo", "cpo_alpha": 0.5,
                                  "alphapo_alpha": 0.25}
    _, cfg = recipes.finalize(cpo)
    assert cfg.loss.average_logps is True  # TRL's CPO averages for ipo
    default_alpha = recipes.convert_recipe({"loss_type": "simpo", "simpo_gamma": 0.7})
    assert default_alpha.config["loss"] == {"name": "cpo", "loss_type": "simpo", "gamma": 0.7}
    assert any("default 1.0" in note for note in default_alpha.notes)


# --------------------------------------------------------------------------- #
# The mapping rules
# --------------------------------------------------------------------------- #
def test_epochs_need_the_number_of_training_rows():
    conversion = _convert("mmpo_fork_smollm2.yaml", devices=4)
    skipped = _skipped(conversion)
    assert "--train-rows N" in skipped["num_train_epochs"]
    assert "total steps" in skipped["warmup_ratio"]
    assert "--train-rows N" in skipped["save_strategy"]
    assert "max_steps" not in conversion.config["train"]
    with pytest.raises(UserError, match="fewer than one batch of 128 pairs"):
        _convert("mmpo_fork_smollm2.yaml", devices=4, train_rows=100)


def test_devices_scale_the_global_batch_not_the_accumulation():
    one = _convert("mmpo_fork_smollm2.yaml")
    four = _convert("mmpo_fork_smollm2.yaml", devices=4)
    assert one.config["data"]["batch_size"] == 32 and four.config["data"]["batch_size"] == 128
    assert one.config["optim"]["grad_accum"] == four.config["optim"]["grad_accum"] == 8
    assert any("Assumed 1 device(s) (--devices)" in n for n in one.notes)


def test_placeholders_and_keys_outside_the_contract_are_listed():
    conversion = _convert("mmpo_fork_placeholders.yaml", devices=4, train_rows=PAPER_ROWS)
    skipped = _skipped(conversion)
    for key in ("beta", "mmpo_reward_epsilon", "output_dir"):
        assert skipped[key].startswith("a placeholder")
    assert "ReLU-margin" in skipped["mmpo_relu_coefficient"]
    assert "ReLU-margin" in skipped["mmpo_relu_epsilon"]
    assert "weight the entropy term by beta" in skipped["mmpo_optimize_entropy"]
    assert "learning rate > 0" in skipped["learning_rate"]
    assert "data.max_length minus its prompt" in skipped["max_completion_length"]
    assert any("looks like a local directory" in n for n in conversion.notes)
    assert any("optim adamw_8bit: ours is AdamW with float32 moments" in n for n in conversion.notes)
    _, cfg = recipes.finalize(conversion)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (64, 64.0)
    assert cfg.model.lora.targets == ["q", "k", "v", "o"]
    assert cfg.model.reference == "lora_base"  # TRL's reference under PEFT: adapters off
    assert (cfg.train.max_steps, cfg.optim.warmup_steps) == (1148, 115)


def test_entropy_flag_maps_to_the_authors_estimator():
    recipe = {"objective_type": "mmpo", "beta": 0.05, "mmpo_optimize_entropy": "yes"}
    loss = recipes.convert_recipe(recipe).config["loss"]
    assert (loss["entropy_weight"], loss["entropy_estimator"]) == (0.05, "score_function")
    off = {"objective_type": "mmpo", "mmpo_optimize_entropy": False}
    assert recipes.convert_recipe(off).config["loss"]["entropy_weight"] == 0.0


def test_handbook_lora_recipe():
    conversion = _convert("dpo_handbook_lora.yaml", devices=4)
    skipped = _skipped(conversion)
    model, optim, train = (conversion.config[s] for s in ("model", "optim", "train"))
    assert model["lora"] == {
        "rank": 16,
        "alpha": 32.0,
        "dropout": 0.05,
        "targets": ["q", "k", "v", "o", "gate", "up", "down"],  # all-linear
    }
    assert model["remat"] == "full" and "param_dtype" not in model
    assert "whatever the checkpoint's dtype" in skipped["torch_dtype"]  # auto
    assert train["max_steps"] == 400
    assert "max_steps > 0 takes precedence" in skipped["num_train_epochs"]
    assert optim["warmup_steps"] == 40 and "warmup_steps > 0 wins" in skipped["warmup_ratio"]
    assert (optim["weight_decay"], optim["b2"], optim["schedule"]) == (0.01, 0.98, "linear")
    # TRL 1.16's sigmoid ignores label_smoothing: the run that recipe trains has none
    assert conversion.config["loss"] == {"name": "dpo", "beta": 0.05, "label_smoothing": 0.0}
    assert any("TRL 1.16's sigmoid loss ignores it" in note for note in conversion.notes)
    assert conversion.config["data"]["mixture"] == {"HuggingFaceH4/ultrafeedback_binarized": 0.5}
    assert "fraction in (0, 1]" in skipped["dataset_mixer.my-org/empty"]
    assert train["save_every"] == 0  # save_strategy "no": ours saves at the end only
    assert "keeps the last train.keep_checkpoints" in skipped["save_total_limit"]
    assert skipped["optim"] == "ours is AdamW only"
    for key in ("hub_model_id", "push_to_hub"):
        assert "Hugging Face Hub" in skipped[key]
    assert skipped["mystery_knob"].startswith("not a key this converter knows")
    # evaluation_strategy epoch needs the steps in an epoch
    assert "--train-rows N" in skipped["evaluation_strategy"]
    # the not-carried list follows the recipe's key order
    order = list(recipes.read_recipe(RECIPES / "dpo_handbook_lora.yaml"))
    positions = [order.index(s.key.split(".")[0]) for s in conversion.skipped]
    assert positions == sorted(positions)


def test_new_mixture_format():
    conversion = _convert("dpo_mixture.yaml", devices=4, train_rows=PAPER_ROWS)
    skipped = _skipped(conversion)
    data, train = conversion.config["data"], conversion.config["train"]
    assert data["mixture"] == {"HuggingFaceH4/ultrafeedback_binarized": 0.25}
    assert data["split"] == "train_prefs" and "test_files" not in data
    assert "one split (data.split: train_prefs)" in skipped["dataset_mixture.datasets[1]"]
    assert "does not split a test set off" in skipped["dataset_mixture.test_split_size"]
    assert "keeps our default cosine" in skipped["lr_scheduler_type"]
    assert any("shuffled subset" in n for n in conversion.notes)
    steps = 3 * (PAPER_ROWS // 64)
    assert train["max_steps"] == steps
    assert train["save_every"] == -(-steps // 4)  # save_steps: 0.25 of the run
    assert (train["log_every"], train["eval_every"]) == (10, 100)
    recipes.finalize(conversion)  # validates


def test_trl_cpo_simpo_recipe():
    conversion = _convert("simpo_cpo.yaml", devices=4)
    _, cfg = recipes.finalize(conversion)
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.gamma) == ("simpo", 2.5, 1.375)
    assert cfg.model.reference == "none"
    assert (cfg.optim.schedule, cfg.optim.warmup_steps) == ("constant", 100)  # constant_with_warmup
    assert cfg.data.train_files == cfg.data.test_files == "HuggingFaceH4/ultrafeedback_binarized"
    assert (cfg.data.split, cfg.data.test_split) == ("train_prefs", "test_prefs")
    assert conversion.skipped == []  # cpo_alpha 0 is pure SimPO


def test_simpo_authors_keys():
    conversion = _convert("simpo_ratio.yaml")
    assert conversion.config["loss"] == {"name": "simpo", "beta": 2.0, "gamma": 1.0}
    assert "always averages" in _skipped(conversion)["average_logps"]
    cpo = recipes.convert_recipe({"loss_type": "simpo", "cpo_alpha": 1.0})
    assert cpo.config["loss"] == {"name": "cpo", "loss_type": "simpo", "cpo_alpha": 1.0}


def test_transformers_defaults_are_said_not_assumed_silently():
    conversion = recipes.convert_recipe({"model_name_or_path": "m"}, train_rows=1000)
    notes = " ".join(conversion.notes)
    assert "transformers' default 8" in notes and "transformers' default 3" in notes
    assert conversion.config["optim"]["schedule"] == "linear"  # transformers' default
    assert conversion.config["train"]["max_steps"] == 3 * (1000 // 8)
    assert conversion.config["loss"]["name"] == "dpo"
    assert conversion.sources["loss.name"] == "TRL's default loss_type sigmoid"


# --------------------------------------------------------------------------- #
# The paper-shaped configs
# --------------------------------------------------------------------------- #
PAPER_MODELS = {
    "smollm2-135m": "",
    "llama3.2-1b": "-lora",
    "llama3-8b": "-lora",
}
LOSSES = ("mmpo", "dpo", "simpo")


def _paper_path(model: str, loss: str) -> Path:
    return ROOT / "configs" / f"{model}-{loss}{PAPER_MODELS[model]}.yaml"


@pytest.mark.parametrize("model", list(PAPER_MODELS))
def test_paper_configs_load_and_twins_differ_only_in_loss_and_output_dir(model):
    loaded = {loss: load_config(_paper_path(model, loss)) for loss in LOSSES}
    rest = {}
    for loss, cfg in loaded.items():
        assert cfg.loss.name == loss
        assert cfg.train.output_dir == f"runs/{_paper_path(model, loss).stem}"
        d = config_to_dict(cfg)
        del d["loss"], d["train"]["output_dir"]
        d["model"].pop("reference")  # resolved from auto per loss: none for simpo
        rest[loss] = d
    assert rest["mmpo"] == rest["dpo"] == rest["simpo"]
    raw = {loss: read_config_file(_paper_path(model, loss)) for loss in LOSSES}  # with its base:
    for loss in LOSSES:
        assert raw[loss]["model"]["reference"] == "auto"
        del raw[loss]["loss"], raw[loss]["train"]["output_dir"]
    assert raw["mmpo"] == raw["dpo"] == raw["simpo"]  # as written, not only as resolved
    assert loaded["simpo"].model.reference == "none"
    cfg = loaded["mmpo"]
    assert cfg.data.mixture == {
        "HuggingFaceH4/ultrafeedback_binarized": 1.0,
        "HuggingFaceH4/orca_dpo_pairs": 1.0,
    }
    assert (cfg.data.batch_size, cfg.data.split, cfg.data.test_split) == (128, "train_prefs", "test_prefs")
    assert cfg.data.tokenizer == cfg.model.path
    if PAPER_MODELS[model]:
        assert cfg.model.lora.rank > 0
        assert loaded["mmpo"].model.reference == loaded["dpo"].model.reference == "lora_base"
    else:
        assert cfg.model.lora.rank == 0


def _values_without_a_source(path: Path, sources: tuple[str, ...]) -> list[str]:
    """The lines of a config file whose value's comment does not start with one of `sources`."""
    bad = []
    parents: dict[int, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        body = line.split("#")[0].rstrip()
        if not body.strip() or body.lstrip().startswith("-"):
            continue
        indent = len(body) - len(body.lstrip())
        key, _, value = body.strip().partition(":")
        parents[indent] = key
        if not value.strip():
            continue  # a section or a nested mapping (model.lora, data.mixture)
        if key == "name" or parents.get(indent - 2) == "mixture":
            continue  # the loss itself, and the mixture's entries under its comment
        if not line.partition("#")[2].strip().startswith(sources):
            bad.append(f"{path.name}:{n}: {line}")
    return bad


@pytest.mark.parametrize("model", list(PAPER_MODELS))
def test_paper_configs_say_where_each_value_comes_from(model):
    for loss in LOSSES:
        assert _values_without_a_source(_paper_path(model, loss), ("paper", "ours")) == []


@pytest.mark.parametrize("model,model_type", [("qwen3-0.6b", "qwen3"), ("gemma3-1b", "gemma3")])
def test_family_configs_load_their_model_and_say_where_each_value_comes_from(model, model_type):
    """The Qwen3 / Gemma 3 runs: MMPO and its DPO twin (only the loss and output dir
    differ), each value marked paper / recipe (TRL's DPO quick start) / ours."""
    paths = {loss: ROOT / "configs" / f"{model}-{loss}.yaml" for loss in ("mmpo", "dpo")}
    loaded = {loss: load_config(p) for loss, p in paths.items()}
    rest = []
    for loss, cfg in loaded.items():
        assert cfg.loss.name == loss and cfg.train.output_dir == f"runs/{model}-{loss}"
        assert _values_without_a_source(paths[loss], ("paper", "recipe", "ours")) == []
        d = config_to_dict(cfg)
        del d["loss"], d["train"]["output_dir"]
        rest.append(d)
    assert rest[0] == rest[1]
    cfg = loaded["mmpo"]
    assert cfg.data.tokenizer == cfg.model.path and cfg.model.lora.rank == 0
    assert cfg.model.path.lower().replace("-", "").startswith(
        {"qwen3": "qwen/qwen3", "gemma3": "google/gemma3"}[model_type])
