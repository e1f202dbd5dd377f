"""epiflow.cliargs: flags, settings, argv and schema from one dataclass declaration (issue #18)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import jsonschema
import pytest

from epiflow.cliargs import (add_config_args, add_io_args, argv_string, config_from_args, legacy_keys,
                             schema_properties, setting, to_argv)
from epiflow.errors import ConfigError


@dataclass
class Demo:
    epochs: float = setting(3, "passes", exclusive_min=0)
    max_steps: int | None = setting(None, "cap", min=1, aliases=("--finetune-steps",))
    head: str = setting("linear", "classifier", choices=("linear", "mlp"))
    genes: list[str] | None = setting(None, "genes")
    k: list[int] = setting(default_factory=lambda: [10, 20], help="top k", min=1)
    holdout: list[str] | None = setting(None, "held out", repeat=True)
    figures: bool = setting(True, "figures")
    svg: bool = setting(False, "svg")
    secret: int = setting(7, "API only", cli=False)


def _parser(**kw):
    p = argparse.ArgumentParser(prog="demo", exit_on_error=False)
    add_config_args(p, Demo, **kw)
    return p


def test_flags_parse_into_settings_with_defaults():
    args = _parser().parse_args(["--max-steps", "5", "--genes", "A,B", "--k", "1,2,3", "--holdout", "x",
                                 "--holdout", "y", "--no-figures", "--svg"])
    cfg = config_from_args(Demo, args)
    assert cfg == Demo(epochs=3, max_steps=5, head="linear", genes=["A", "B"], k=[1, 2, 3], holdout=["x", "y"],
                       figures=False, svg=True, secret=7)
    assert config_from_args(Demo, _parser().parse_args([])) == Demo()
    assert config_from_args(Demo, _parser().parse_args(["--max-steps", "none"])).max_steps is None


def test_alias_and_per_verb_default():
    assert _parser().parse_args(["--finetune-steps", "4"]).max_steps == 4
    assert _parser(defaults={"epochs": 9}).parse_args([]).epochs == 9
    assert "--secret" not in _parser().format_help()
    assert legacy_keys(Demo) == {"finetune_steps": "max_steps"}


def test_bounds_and_types_fail_with_the_field_named():
    with pytest.raises(ConfigError, match=r"max_steps \(--max-steps\) must be >= 1, got 0"):
        config_from_args(Demo, _parser().parse_args(["--max-steps", "0"]))
    with pytest.raises(ConfigError, match=r"epochs .* must be > 0"):
        config_from_args(Demo, _parser().parse_args(["--epochs", "0"]))
    with pytest.raises(ConfigError, match=r"k \(--k\) must be >= 1"):
        config_from_args(Demo, _parser().parse_args(["--k", "3,0"]))
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parser().parse_args(["--epochs", "three"])
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _parser().parse_args(["--head", "forest"])


def test_to_argv_round_trips_through_the_parser():
    values = {"epochs": 2.5, "max_steps": 7, "head": "mlp", "genes": ["A", "B C"], "k": [5], "holdout": ["p", "q"],
              "figures": False, "svg": True, "enabled": True, "datasets": ["x"], "secret": 1}
    argv = to_argv(Demo, values)
    assert "--enabled" not in argv and "--secret" not in argv  # not flags of the verb
    cfg = config_from_args(Demo, _parser().parse_args(argv))
    assert cfg == Demo(epochs=2.5, max_steps=7, head="mlp", genes=["A", "B C"], k=[5], holdout=["p", "q"],
                       figures=False, svg=True)
    assert to_argv(Demo, {"max_steps": None}) == []
    assert "'A,B C'" in argv_string(Demo, {"genes": ["A", "B C"]})
    # an empty list is not silently the verb's default (null is)
    for key in ("genes", "k", "holdout"):
        with pytest.raises(ConfigError, match=f"'{key}' is an empty list"):
            to_argv(Demo, {key: []})


def test_schema_properties_validate_like_the_flags():
    schema = {"type": "object", "additionalProperties": False, "properties": schema_properties(Demo)}
    jsonschema.validate({"epochs": 1, "max_steps": None, "head": "mlp", "k": [1], "figures": False}, schema)
    for bad in ({"epochs": 0}, {"max_steps": 0}, {"head": "forest"}, {"k": [0]}, {"figures": "yes"},
                {"secret": 3}, {"k": []}, {"genes": []}, {"holdout": []}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_io_flags_are_the_same_names_with_former_aliases():
    p = argparse.ArgumentParser(exit_on_error=False)
    add_io_args(p)
    a = p.parse_args(["--input", "c", "--checkpoint", "m.pth", "--out-dir", "o", "--dataset", "a,b"])
    assert (a.corpus, a.checkpoint, a.out, a.dataset, a.df) == ("c", "m.pth", "o", "a,b", None)
    a = p.parse_args(["--corpus", "c", "--checkpoint", "m.pth", "--out", "o"])
    assert (a.corpus, a.out) == ("c", "o")
