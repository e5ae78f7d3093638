"""Every command line in README.md runs, in order, exactly as written except for the model (a tiny
checkpoint instead of the built-in one) and the sizes (a few short windows); the recipe and the
Python example run too; and every scheme the README's table names goes through
quantize -> info -> eval -> reload."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
from cli_helpers import lowbit_cli

from lowbit.formats.grids import get_grid
from lowbit.formats.integer import IntGrid
from lowbit.models import load_model
from lowbit.runtime.qlinear import QLinear, QuantModule

README = Path(__file__).resolve().parents[1] / "README.md"
CALIBRATED = ("quantize", "imatrix", "inspect", "analyze", "compare")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def commands() -> list[list[str]]:
    out = []
    for block in blocks("sh"):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("lowbit "):
                out.append(shlex.split(line)[1:])
    return out


def _set(args: list[str], flag: str, value: str, keep: bool = False) -> list[str]:
    """``flag value`` in args: replaced (or left, with ``keep``) if present, else appended."""
    if flag in args:
        if not keep:
            args[args.index(flag) + 1] = value
        return args
    return [*args, flag, value]


def adapt(args: list[str], model: str, text: str) -> list[str]:
    """The README command on the tiny model with small sizes."""
    args = [model if a == "smollm2-135m" else a for a in args]
    cmd = args[0]
    rerun = "--recipe" in args and args[args.index("--recipe") + 1].endswith(".json")
    if cmd in (*CALIBRATED, "eval", "generate", "calc") and (len(args) == 1 or
                                                            args[1].startswith("--")):
        if not rerun:  # MODEL left to its default: the built-in model, here the tiny one
            args.insert(1, model)
    if cmd in CALIBRATED and not rerun:
        if "--calib" not in args:  # calibrate past the windows `eval` reads
            args = [*args, "--calib", text, "--calib-offset", "8"]
        args = _set(args, "--calib-samples", "4")
        args = _set(args, "--seq-len", "64")
        if "--tokens" in args:  # qat: a few steps
            args = _set(args, "--tokens", "256")
        if "--prune-structured" in args:  # the tiny model's MLPs are 1.5% of it
            args = _set(args, "--prune-structured", "0.005")
    if cmd == "eval":
        args = _set(args, "--data", text, keep=True)
        args = _set(args, "--windows", "2")
        args = _set(args, "--seq-len", "64")
    if cmd == "compare":
        args = _set(args, "--data", text, keep=True)
        args = _set(args, "--windows", "2")
        args = _set(args, "--eval-seq-len", "64")
    if cmd == "demo":
        args = [*args, "--model", model, "--calib-samples", "4", "--windows", "2", "--seq-len",
                "64"]
    return [*args, "--quiet"] if cmd in (*CALIBRATED, "eval", "export") else args


def test_readme_has_the_commands_it_documents():
    cmds = {c[0] for c in commands()}
    assert cmds == {"quantize", "info", "eval", "export", "imatrix", "inspect", "demo",
                    "generate", "analyze", "compare", "calc"}
    assert len(commands()) >= 20


def test_every_readme_command_runs(tiny_ckpt, tmp_path, monkeypatch):
    ckpt, text = tiny_ckpt
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(blocks("yaml")[0])
    ran = []
    for args in commands():
        run = adapt(args, str(ckpt), str(text))
        r = lowbit_cli(*run, ok=False)
        assert r.code == 0, f"README: lowbit {' '.join(args)}\nran: {run}\n{r.err[-3000:]}"
        ran.append(args[0])
    # the outputs are what the README says they are
    mixed, _ = load_model(tmp_path / "out/mixed")  # compressed-tensors, a group per scheme
    assert mixed.model.layers[0].mlp.down_proj.grid.name == "w8"
    assert mixed.lm_head.grid.name == "w8"
    assert mixed.model.layers[1].mlp.down_proj.grid.name == "w4g64"
    # the default output is compressed-tensors when it holds the recipe (GPTQ's default static
    # groups: no g_idx), native otherwise (NF4); the recorded recipe re-runs to the same bytes
    again = (tmp_path / "out/gptq-again/model.safetensors").read_bytes()
    assert again == (tmp_path / "out/gptq/model.safetensors").read_bytes()
    assert json.loads((tmp_path / "out/gptq/lowbit.json").read_text())["format"] == \
        "compressed-tensors"
    assert (tmp_path / "out/nf4/lowbit.safetensors").is_file()
    assert (tmp_path / "out/gptq.gguf").stat().st_size > 0
    ternary = json.loads((tmp_path / "out/ternary/lowbit.json").read_text())
    assert ternary["recipe"]["steps"][0]["step"] == "qat" and ternary["scheme"] == "ternary"
    assert (tmp_path / "out/ternary.gguf").stat().st_size > 0
    assert (tmp_path / "out/ct/config.json").is_file()
    assert (tmp_path / "out/channels.png").stat().st_size > 1000
    assert (tmp_path / "out/sens.png").stat().st_size > 1000
    report = json.loads((tmp_path / "out/report/report.json").read_text())["rows"]
    assert [r["name"] for r in report] == ["recipe", "gptq"]
    budget = json.loads((tmp_path / "out/mixed-3.5/lowbit.json").read_text())
    assert budget["bits_per_weight"] <= 3.5 and budget["recipe"]["steps"][0]["overrides"]
    assert budget["format"] == "compressed-tensors"  # one config group per scheme
    rotated = json.loads((tmp_path / "out/rotated/lowbit.json").read_text())
    assert rotated["recipe"]["steps"][0]["step"] == "rotate"
    online = json.loads((tmp_path / "out/w4a4/lowbit.json").read_text())
    assert "input_rotation" in online["layers"]["model.layers.0.mlp.down_proj"]
    assert online["kv_cache"]["format"] == "pertoken-k4v4-r128-h"  # R3 with --rotate-online
    kv = json.loads((tmp_path / "out/w4-fp8kv/config.json").read_text())["quantization_config"]
    assert kv["kv_cache_scheme"]["type"] == "float"
    incoherent = json.loads((tmp_path / "out/incoherent/lowbit.json").read_text())["layers"]
    assert "output_rotation" in incoherent["model.layers.0.self_attn.q_proj"]
    assert (tmp_path / "out/mixed.gguf").stat().st_size > 0
    assert len((tmp_path / "out/mixed.tensor-types.txt").read_text().splitlines()) == 14
    groups = json.loads((tmp_path / "out/mixed-3.5/config.json").read_text())[
        "quantization_config"]["config_groups"]
    assert len(groups) >= 2 and all(g["targets"] != ["Linear"] for g in groups.values())
    assert len(ran) == len(commands())


def test_python_example_runs(tiny_ckpt, tmp_path, monkeypatch):
    ckpt, _ = tiny_ckpt
    monkeypatch.chdir(tmp_path)
    code = blocks("python")[0].replace('"smollm2-135m"', repr(str(ckpt)))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["result"].weights["lm_head"].grid.name == "w8"
    assert (tmp_path / "out/py/lowbit.json").is_file()


def readme_schemes() -> list[str]:
    """The scheme names in the first column of the README's scheme table."""
    table = README.read_text().split("### Schemes", 1)[1].split("\n\n", 2)[1]
    names = []
    for line in table.splitlines()[2:]:
        first = line.split("|")[1]
        names += re.findall(r"`([a-z0-9-]+)`", first)
    return names


def test_the_scheme_table_lists_every_format():
    from lowbit.formats.grids import GRID_NAMES
    from lowbit.methods.w8a8 import W8A8_SCHEMES

    names = set(readme_schemes())
    assert {n for n in GRID_NAMES if n.count("-") < 2} <= names  # -tensor / -b128: suffixes
    assert {"w4g64", "w4g64-asym", "w3g64-asym-mse", "w8-tensor"} <= names
    assert set(W8A8_SCHEMES) - names <= {"w7a8-static"}


@pytest.mark.parametrize("scheme", readme_schemes())
def test_every_readme_scheme_quantizes_saves_and_reloads(tiny_ckpt, tmp_path, scheme):
    ckpt, text = tiny_ckpt
    w8a8 = scheme.startswith(("w8a8", "w7a8"))
    method = "w8a8" if w8a8 else "gptq" if scheme.startswith("sq") else "rtn"
    out = tmp_path / "q"
    lowbit_cli("quantize", ckpt, "--method", method, "--scheme", scheme, "--calib", text,
               "--calib-samples", "2", "--calib-offset", "2", "--seq-len", "64", "--out", out,
               "--quiet")
    info = lowbit_cli("info", out).out
    assert scheme in info
    ev = lowbit_cli("eval", out, "--data", text, "--windows", "1", "--seq-len", "64",
                    "--quiet").out
    assert "ppl" in ev and "nan" not in ev
    model, _ = load_model(out)
    mods = [m for m in model.modules() if isinstance(m, QuantModule)]
    assert len(mods) == 14
    if not w8a8:
        # a compressed-tensors checkpoint stores the grid, not how its scales were fitted
        want = get_grid(scheme)
        if (out / "model.safetensors").is_file() and isinstance(want, IntGrid):
            want = dataclasses.replace(want, clip="minmax")
        assert all(isinstance(m, QLinear) and m.grid == want for m in mods)
