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
    assert text == config_to_yaml(original)
    assert _reloaded(text, tmp_path) == config_to_dict(original)
