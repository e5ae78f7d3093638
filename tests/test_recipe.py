"""Recipes as data: YAML/JSON forms, the --method shorthand, round trips, and one-line errors."""

from __future__ import annotations

import json

import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.methods.base import STEPS
from lowbit.recipe import METHODS, Recipe, load_recipe, recipe_from_data, shorthand

YAML = """
steps:
  - awq: {n_grid: 10}
  - gptq:
      scheme: w4g64
      act_order: true
      ignore: []
      overrides:
        're:.*layers\\.0\\..*down_proj': w8
        lm_head: w8
calibration: {source: pydoc, samples: 16}
"""


def test_yaml_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(YAML)
    r = load_recipe(p)
    assert r.name == "awq+gptq" and r.scheme == "w4g64"
    awq, gptq = r.steps
    assert isinstance(awq, lowbit.AWQ) and awq.n_grid == 10
    assert isinstance(gptq, lowbit.GPTQ) and gptq.act_order is True and gptq.ignore == ()
    assert gptq.scheme_for("model.layers.0.mlp.down_proj") == "w8"
    assert gptq.scheme_for("model.layers.10.mlp.down_proj") == "w4g64"
    assert gptq.scheme_for("lm_head") == "w8"
    assert r.calibration == {"source": "pydoc", "samples": 16}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shorthand_round_trips_through_json(method, tmp_path):
    r = shorthand(method)
    d = r.to_dict()
    assert [s["step"] for s in d["steps"]] == list(METHODS[method])
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))
    assert load_recipe(p) == r
    assert recipe_from_data(d) == r


def test_every_step_round_trips_with_every_option():
    for name, cls in STEPS.items():
        step = cls()
        back = recipe_from_data({"steps": [step.to_dict()]}).steps[0]
        assert back == step and type(back) is cls, name


def test_step_forms():
    a = recipe_from_data(["rtn", {"gptq": None}, {"step": "rtn", "scheme": "w8"}])
    assert [s.step for s in a.steps] == ["rtn", "gptq", "rtn"] and a.steps[2].scheme == "w8"


def test_lowbit_json_reruns_its_recipe(tmp_path):
    desc = {"format": "lowbit-native", "version": 2,
            "recipe": shorthand("awq+gptq", "w3g64").to_dict()}
    p = tmp_path / "lowbit.json"
    p.write_text(json.dumps(desc))
    assert load_recipe(p) == shorthand("awq+gptq", "w3g64")
    p.write_text(json.dumps({"format": "lowbit-native", "version": 1}))
    with pytest.raises(LowbitError, match="records no recipe"):
        load_recipe(p)


@pytest.mark.parametrize("text,message", [
    ("steps: [foo]", "unknown step 'foo'; known: "),
    ("steps: [{gptq: {schem: w4g64}}]", "step 'gptq' has no option(s) 'schem'; its options: "),
    ("steps: [{gptq: {scheme: w9g64}}]", "integer schemes take 2..8 bits"),
    ("steps: [{gptq: {damp: high}}]", "gptq: damp must be a number"),
    ("steps: [{gptq: {act_order: 2}}]", "must be true or false"),
    ("steps: []", "at least one step"),
    ("{steps: [rtn], extra: 1}", "not extra"),
    ("steps: [{rtn: {overrides: [1, 2]}}]", "overrides map layer patterns to schemes"),
    ("steps: [rtn]\ncalibration: {samples: many}", "calibration samples must be a int"),
    ("steps: [\n", "not YAML"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(LowbitError, match=None) as e:
        load_recipe(p)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shorthand_refuses_flags_its_method_does_not_take():
    with pytest.raises(LowbitError,
                       match="--alpha is for smoothquant, smoothquant\\+gptq; gptq does not take"):
        shorthand("gptq", alpha=0.5)
    with pytest.raises(LowbitError,
                       match="--damp is for awq\\+gptq, gptq, smoothquant\\+gptq; rtn does not"):
        shorthand("rtn", damp=0.1)
    with pytest.raises(LowbitError, match="unknown method 'awq9'"):
        shorthand("awq9")
    assert shorthand("gptq", "w3g64", act_order=False).steps[0].act_order is False
    assert shorthand("smoothquant", alpha=0.8).steps[0].alpha == 0.8
    sq = shorthand("smoothquant+gptq", "w4g64a8", alpha=0.6, damp=0.02)
    assert [s.step for s in sq.steps] == ["smoothquant", "gptq"]
    assert sq.steps[0].alpha == 0.6 and sq.steps[1].damp == 0.02
    assert sq.steps[1].scheme == "w4g64a8"


def test_recipe_objects_are_values():
    r = Recipe((lowbit.GPTQ(overrides={"lm_head": "w8"}),))
    assert r == Recipe((lowbit.GPTQ(overrides=[("lm_head", "w8")]),))
    assert hash(r.steps[0]) == hash(lowbit.GPTQ(overrides={"lm_head": "w8"}))
