"""The streaming safetensors writer against the safetensors library (reader and writer)."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.io.shards import ShardWriter


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16_odd": torch.randn(3, 5, generator=g).bfloat16(),
        "b.f32": torch.randn(7, generator=g),
        "c.u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "d.i32": torch.randint(-9, 9, (2, 3), generator=g, dtype=torch.int32),
        "e.f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "f.bool": torch.tensor([True, False, True]),
        "g.empty": torch.zeros(0, 4),
        "h.i64_scalar": torch.tensor(12345678901, dtype=torch.int64),
        "i.f16_noncontig": torch.randn(4, 6, generator=g).half().T,
    }


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n])


def test_one_file_reads_back_like_the_library_writes(tmp_path):
    ts = _tensors()
    with ShardWriter(tmp_path, metadata={"format": "pt"}) as w:
        for k, v in ts.items():
            w.add(k, v)
    assert w.close() == ["model.safetensors"]
    got = load_file(str(tmp_path / "model.safetensors"))
    assert got.keys() == ts.keys()
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(_bytes(got[k]), _bytes(v)), k
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # the same dtype names and shapes as the library's own writer
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "ref.safetensors"),
              metadata={"format": "pt"})
    n, ours = _header(tmp_path / "model.safetensors")
    _, ref = _header(tmp_path / "ref.safetensors")
    assert {k: (v["dtype"], v["shape"]) for k, v in ours.items() if k != "__metadata__"} == \
        {k: (v["dtype"], v["shape"]) for k, v in ref.items() if k != "__metadata__"}
    # aligned: the data starts at a multiple of 8 and each tensor at a multiple of its size
    assert (8 + n) % 8 == 0
    for k, v in ours.items():
        if k != "__metadata__":
            assert v["data_offsets"][0] % ts[k].element_size() == 0, k
    assert not list(tmp_path.glob(".shard-*"))


def test_shards_and_index(tmp_path):
    ts = {f"layer.{i}.w": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    with ShardWriter(tmp_path, max_bytes=900) as w:
        for k, v in ts.items():
            w.add(k, v)
    files = w.close()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000
    for k, fn in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / fn))[k], ts[k])
    assert sorted(index["weight_map"]) == sorted(ts)


def test_refusals_and_no_debris_on_error(tmp_path):
    with pytest.raises(LowbitError, match="written twice"):
        with ShardWriter(tmp_path) as w:
            w.add("x", torch.zeros(2))
            w.add("x", torch.zeros(2))
    with pytest.raises(LowbitError, match="has no torch.complex64"):
        with ShardWriter(tmp_path) as w:
            w.add("z", torch.zeros(2, dtype=torch.complex64))
    assert list(tmp_path.iterdir()) == []
