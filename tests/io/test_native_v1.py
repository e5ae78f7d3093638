"""Folders written by lowbit's native format version 1 (before the one-core refactor) still load,
and compute exactly what they computed then.

``tests/data/native_v1`` was written by the version-1 code (``GENERATED_BY.txt``, run on the
commit before the refactor): a tiny Llama quantized with several methods and schemes, and the
logits each reloaded folder gave then on a fixed probe (``reference_logits.safetensors``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.io.native import load_quantized
from lowbit.runtime.qlinear import QuantModule

DATA = Path(__file__).resolve().parents[1] / "data" / "native_v1"
REF = load_file(str(DATA / "reference_logits.safetensors"))
FOLDERS = sorted(p.name for p in DATA.iterdir() if p.is_dir())


def test_the_fixture_is_version_1():
    assert len(FOLDERS) == 13
    for name in FOLDERS:
        desc = json.loads((DATA / name / "lowbit.json").read_text())
        assert desc["version"] == 1 and "recipe" not in desc


@pytest.mark.parametrize("name", FOLDERS)
def test_version_1_folders_load_and_compute_the_same(name):
    model, _ = load_quantized(DATA / name)
    assert sum(isinstance(m, QuantModule) for m in model.modules()) == 14
    with torch.no_grad():
        logits = model(input_ids=REF["probe"]).logits.float()
    assert torch.equal(logits, REF[name]), name


def test_unknown_versions_are_refused(tmp_path):
    import shutil

    from lowbit.errors import LowbitError

    shutil.copytree(DATA / "rtn-nf4-dq", tmp_path / "f")
    p = tmp_path / "f" / "lowbit.json"
    desc = json.loads(p.read_text())
    p.write_text(json.dumps(desc | {"version": 3}))
    with pytest.raises(LowbitError, match="version 3; this lowbit reads versions 1, 2"):
        load_quantized(tmp_path / "f")
