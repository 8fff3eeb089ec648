"""`mmpo-jax config`: the resolved config, less what does not apply, still a valid config."""

from __future__ import annotations

from pathlib import Path

import yaml

from mmpo_jax import cli
from mmpo_jax.commands.show_config import INIT_UNUSED_COMMENT
from mmpo_jax.config import config_to_dict, config_to_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
TINY = str(ROOT / "configs" / "tiny.yaml")


def _printed(capsys, *items: str) -> str:
    assert cli.main(["config", *items]) == 0
    return capsys.readouterr().out


def _reloaded(text: str, tmp_path: Path) -> dict:
    """The printed text as `mmpo-jax train` would read it back: a config file."""
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    return config_to_dict(load_config(str(path), []))


def test_model_path_hides_model_init(capsys, tmp_path):
    """configs/demo.yaml loads its model from model.path (a GGUF): no model.init block,
    a comment in its place, and the text loads back as the same config."""
    text = _printed(capsys, DEMO)
    shown = yaml.safe_load(text)
    assert shown["model"]["path"] and "init" not in shown["model"]
    lines = text.splitlines()
    assert lines[lines.index("  path: " + shown["model"]["path"]) + 1] == "  " + INIT_UNUSED_COMMENT
    original = load_config(DEMO, [])
    assert _reloaded(text, tmp_path) == config_to_dict(original)
    # the run's config.yaml (compared on resume) keeps every key: only the display omits
    assert "  init:\n" in config_to_yaml(original)


def test_model_path_with_init_overrides_still_round_trips_the_rest(capsys, tmp_path):
    """model.init overrides are unused with a model.path: hidden, and everything else reloads."""
    text = _printed(capsys, DEMO, "model.init.hidden_size=128", "loss.beta=0.3")
    assert "hidden_size" not in text
    original = config_to_dict(load_config(DEMO, ["model.init.hidden_size=128", "loss.beta=0.3"]))
    reloaded = _reloaded(text, tmp_path)
    assert reloaded["loss"]["beta"] == 0.3
    original["model"].pop("init"), reloaded["model"].pop("init")
    assert reloaded == original


def test_random_init_shows_model_init(capsys, tmp_path):
    """configs/tiny.yaml (model.path "", a random init): the init block is shown, the
    text is config_to_yaml's exactly and loads back as the same config."""
    text = _printed(capsys, TINY)
    original = load_config(TINY, [])
    assert original.model.path == ""
    assert yaml.safe_load(text)["model"]["init"] == config_to_dict(original)["model"]["init"]
    assert INIT_UNUSED_COMMENT not in text
    # config_to_yaml's lines, less the loss keys MMPO does not read (a comment names them)
    full = config_to_yaml(original).splitlines()
    shown = [line for line in text.splitlines() if not line.startswith("  # unused by loss.name=mmpo: ")]
    assert len(shown) == len(text.splitlines()) - 1 and set(shown) <= set(full)
    assert _reloaded(text, tmp_path) == config_to_dict(original)


def test_a_dpo_config_shows_no_mmpo_keys(capsys, tmp_path):
    """`mmpo-jax config` of a DPO run listed MMPO's reward offsets and normalisation, which
    it never reads; they are left out (the run's config.yaml keeps them) and named once."""
    from mmpo_jax.losses.declarations import DECLARATIONS

    text = _printed(capsys, TINY, "loss.name=dpo")
    loss = yaml.safe_load(text)["loss"]
    assert set(loss) == set(DECLARATIONS["dpo"].config_keys)
    for key in ("reward_epsilon", "rejected_epsilon", "aux_weight", "normalize"):
        assert key not in loss
    assert "  # unused by loss.name=dpo: reward_epsilon, rejected_epsilon" in text
    assert _reloaded(text, tmp_path) == config_to_dict(load_config(TINY, ["loss.name=dpo"]))
    assert "reward_epsilon" in config_to_yaml(load_config(TINY, ["loss.name=dpo"]))


def test_what_a_tracker_is_sent_leaves_out_a_checkpoints_model_init():
    """MLflow / W&B params (`applicable_dict`, what the loop hands the trackers) listed the
    random-init shapes of a model read from model.path, which describe nothing."""
    from mmpo_jax.config import applicable_dict
    from mmpo_jax.train.trackers import flat_config

    params = flat_config(applicable_dict(load_config(DEMO, [])))
    assert "model.path" in params and not [k for k in params if k.startswith("model.init")]
    assert any(k.startswith("model.init.") for k in flat_config(applicable_dict(load_config(TINY, []))))
