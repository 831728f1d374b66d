"""Typed configs: YAML + key=value overrides, and one-line errors naming the bad key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from plural_diffusion.toyworld.ratings import ToyWorldConfig
from reward_models.config import load_config, parse_overrides, to_dict
from reward_models.errors import UserError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Job:
    name: str = "run"
    epochs: int = 3
    mode: Literal["fast", "full"] = "full"
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("epochs: 10\noptim:\n  lr: 3e-4\n")
    cfg = load_config(Job, path, ["optim.betas=[0.5, 0.9]", "tags=[a, b]", "limit=7"])
    assert cfg.epochs == 10 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.5, 0.9)
    assert cfg.tags == ["a", "b"] and cfg.limit == 7 and cfg.name == "run"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("epochs=ten", "config key 'epochs': expected an integer"),
        ("epochs=1.5", "config key 'epochs': expected an integer"),
        ("mode=slow", "config key 'mode': expected one of ['fast', 'full']"),
        ("optim.betas=[1]", "config key 'optim.betas': expected 2 items"),
        ("optim=3", "config key 'optim': expected a mapping"),
        ("epochs", "is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config(Job, None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(Job, tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="not found"):
        load_config(Job, tmp_path / "missing.yaml")


def test_nested_list_of_dataclasses_round_trips():
    cfg = load_config(ToyWorldConfig, None, ["n_raters=12"])
    again = load_config(ToyWorldConfig, None, [])
    again.n_raters = 12
    assert to_dict(cfg) == to_dict(again)
    assert cfg.clusters[2].name == "vivid"


def test_parse_overrides_builds_a_tree():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}


@dataclass
class Precision:
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    note: str = ""
    checkpointing: bool = False


@pytest.mark.parametrize("word", ["no", "yes", "on", "off", "y", "n", "No"])
def test_yaml_11_boolean_words_are_strings_for_string_fields(tmp_path, word):
    # YAML 1.1 reads no/yes/on/off as booleans: `mixed_precision=no` was refused as False
    assert load_config(Precision, None, [f"note={word}"]).note == word
    path = tmp_path / "p.yaml"
    path.write_text(f"note: {word}\nmixed_precision: no\n")
    cfg = load_config(Precision, path)
    assert cfg.note == word and cfg.mixed_precision == "no"


def test_every_mixed_precision_value_is_writable_as_key_value():
    from plural_diffusion.train_config import TrainConfig

    for value in ("no", "bf16", "fp16"):
        cfg = load_config(TrainConfig, None, [f"mixed_precision={value}"])
        assert cfg.mixed_precision == value


def test_bool_fields_still_read_yaml_11_words_and_true_false():
    on = load_config(Precision, None, ["checkpointing=on"])
    off = load_config(Precision, None, ["checkpointing=false"])
    assert on.checkpointing is True and off.checkpointing is False
    with pytest.raises(UserError, match="expected true/false"):
        load_config(Precision, None, ["checkpointing=maybe"])


@pytest.mark.parametrize(
    ("overrides", "every"),
    [
        ([], 1),  # DRaFT saves every epoch: the expert selection sees each taste's peak
        (["method=ddpo"], 4),  # DDPO's 56 epochs, every fourth
        (["save_every=3"], 3),  # the top-level value overrides both
        (["method=ddpo", "save_every=2"], 2),
    ],
)
def test_the_toy_configs_checkpoints_are_the_methods_own_unless_set(overrides, every):
    from plural_diffusion.configs import CONFIGS
    from plural_diffusion.train_config import TrainConfig

    cfg = load_config(TrainConfig, CONFIGS / "toy.yaml", overrides)
    assert cfg.checkpoint_every == every
    assert cfg.lora.shared_expert is False  # no block shared by the experts, either method


@pytest.mark.parametrize(
    ("overrides", "looks"),
    [
        ([], 0.0),  # the selection is by reward alone (README: 0.05 was a trade, not a gain)
        (["method=ddpo"], 0.0),
        (["draft.select_looks=0.05"], 0.05),  # the method's own when the top level is unset
        (["method=ddpo", "draft.select_looks=0.05"], 0.0),
        (["select_looks=0.2"], 0.2),  # the top-level value overrides both
        (["method=ddpo", "select_looks=0.1"], 0.1),
        (["select_looks=0"], 0.0),  # 0 is off, not unset
    ],
)
def test_the_toy_configs_looks_share_is_the_methods_own_unless_set(overrides, looks):
    from plural_diffusion.configs import CONFIGS
    from plural_diffusion.train_config import TrainConfig

    assert load_config(TrainConfig, CONFIGS / "toy.yaml", overrides).looks_share == looks


def test_a_looks_share_outside_zero_to_one_is_refused():
    from plural_diffusion.train_config import TrainConfig, check_options

    for overrides in (["select_looks=1"], ["draft.select_looks=-0.1"], ["ddpo.select_looks=2"]):
        cfg = load_config(TrainConfig, None, overrides)
        with pytest.raises(UserError, match="select_looks=.*: a share of the best checkpoint's"):
            check_options(cfg, cpu=True)


def test_a_checkpoint_interval_below_one_is_refused():
    from plural_diffusion.train_config import TrainConfig, check_options

    for overrides in (["save_every=-1"], ["draft.save_every=0"], ["ddpo.save_every=0"]):
        cfg = load_config(TrainConfig, None, overrides)
        with pytest.raises(UserError, match="epochs between checkpoints, >= 1"):
            check_options(cfg, cpu=True)
