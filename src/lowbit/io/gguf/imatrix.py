"""Importance matrices as llama.cpp makes and reads them.

An importance matrix holds, for each weight matrix of the blocks (llama.cpp's tensor name, as
the exporter writes it: `blk.0.attn_q.weight`, phi3's fused `blk.0.attn_qkv.weight` ...), the
mean of x^2 over calibration tokens for each input column. It is collected by the shared
sequential driver: the diagonal of the Hessian 2·XᵀX/n, halved.

Files: the GGUF imatrix that `llama-imatrix` writes by default (general.type "imatrix",
`imatrix.datasets` / `imatrix.chunk_count` / `imatrix.chunk_size`, tensors `NAME.in_sum2` =
sum of x^2 and `NAME.counts` = tokens), or, for a path ending in `.dat`, the legacy binary
layout (int32 entry count; per entry int32 name length, name, int32 ncall, int32 nval, nval
float32 = mean x^2 · ncall; then int32 chunk count, int32 length and the dataset name).
`llama-quantize --imatrix` reads both.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFValueType, GGUFWriter
from torch import nn

from lowbit.arch import block_linears, get_blocks, language_model, spec_for
from lowbit.errors import LowbitError
from lowbit.io.gguf.export import tensor_namer
from lowbit.pipeline.driver import observe_model


@dataclass
class Imatrix:
    data: dict[str, np.ndarray]  # llama.cpp tensor name -> mean x^2 per input column
    counts: dict[str, int]  # calibration tokens behind each entry
    chunks: int = 0  # calibration windows
    chunk_size: int = 0  # tokens per window
    datasets: list[str] = field(default_factory=list)


def collect_imatrix(
    model: nn.Module,
    windows: torch.Tensor,
    chunk: int = 8,
    progress: bool = True,
    dataset: str = "",
) -> Imatrix:
    """Run the calibration windows through the model with the shared driver's observer
    (``observe_model``; weights are left unchanged) and keep each Linear's per-column mean of
    x^2: the diagonal of its input Hessian 2 X^T X / n, halved."""
    model = language_model(model)  # the names of the language model, as export writes it
    to_gguf = tensor_namer(model)  # names are llama.cpp's: refuse what the exporter cannot write
    spec = spec_for(model)
    for mod in block_linears(get_blocks(model, spec)[0], spec).values():
        if not isinstance(getattr(mod, "weight", None), torch.Tensor):
            raise LowbitError("compute the importance matrix on the unquantized model")
    stats = observe_model(model, spec, windows, {"hessian"}, chunk=chunk, progress=progress)
    data: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for full, st in stats.items():
        key = to_gguf(f"{full}.weight")
        data[key] = (torch.diagonal(st.h) / 2).numpy().astype(np.float32).copy()
        counts[key] = int(st.n)
    return Imatrix(
        data, counts, int(windows.shape[0]), int(windows.shape[1]), [dataset] if dataset else []
    )


def save_imatrix(im: Imatrix, path: str | Path) -> None:
    """Write a GGUF imatrix, or the legacy format when the path ends in `.dat`."""
    from lowbit.io.atomic import atomic_output

    p = Path(path)
    with atomic_output(p, folder=False) as tmp:
        if p.suffix == ".dat":
            tmp.write_bytes(_legacy_bytes(im))
        else:
            _write_gguf(im, tmp)


def _write_gguf(im: Imatrix, path: Path) -> None:
    w = GGUFWriter(path, arch="")
    w.kv_data[0].pop("general.architecture", None)  # llama-imatrix writes no architecture
    w.add_string("general.type", "imatrix")
    w.add_key_value(
        "imatrix.datasets",
        list(im.datasets) or ["unknown"],  # gguf-py cannot write an empty array
        GGUFValueType.ARRAY,
        sub_type=GGUFValueType.STRING,
    )
    w.add_uint32("imatrix.chunk_count", im.chunks)
    w.add_uint32("imatrix.chunk_size", im.chunk_size)
    for name in sorted(im.data):
        v = np.asarray(im.data[name], dtype=np.float32).reshape(1, -1)
        n = im.counts.get(name, 0)
        w.add_tensor(f"{name}.in_sum2", (v * np.float32(n)).astype(np.float32))
        w.add_tensor(f"{name}.counts", np.array([[n]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _legacy_bytes(im: Imatrix) -> bytes:
    names = sorted(im.data)
    out = [struct.pack("<i", len(names))]
    size = max(im.chunk_size, 1)
    for name in names:
        v = np.asarray(im.data[name], dtype=np.float32).reshape(-1)
        ncall = -(-im.counts.get(name, 0) // size)
        b = name.encode()
        out += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, v.size)]
        # llama.cpp stores mean * ncall and divides by ncall when reading (ncall 0: as is)
        out.append((v * np.float32(ncall if ncall > 0 else 1)).astype("<f4").tobytes())
    ds = (im.datasets[-1] if im.datasets else "").encode()
    out += [struct.pack("<ii", im.chunks, len(ds)), ds]
    return b"".join(out)


OURS = "an importance matrix file"  # the --overwrite rule, for messages


def is_imatrix(path: Path) -> bool:
    """A file that reads as an importance matrix (GGUF or legacy): what ``--overwrite`` may
    replace."""
    try:
        load_imatrix(path)
    except LowbitError:
        return False
    return True


def check_imatrix_output(out: Path, overwrite: bool) -> None:
    """Before the run: ``out`` can be written, and an existing file there is replaced only
    with ``overwrite`` and only when it is an importance matrix."""
    from lowbit.io.atomic import check_output_file, check_replaceable

    check_output_file(out, "importance matrix")
    check_replaceable(out, overwrite, is_imatrix, OURS)


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF or legacy imatrix file (as `llama-quantize` does); clear errors if corrupt."""
    p = Path(path)
    try:
        head = p.open("rb").read(4)
    except OSError as e:
        raise LowbitError(f"cannot read {p}: {e.strerror or e}") from None
    if head == b"GGUF":
        return _load_gguf(p)
    return _load_legacy(p)


def _load_gguf(p: Path) -> Imatrix:
    from lowbit.io.gguf.check import open_gguf

    r = open_gguf(p)
    f = r.fields
    sums, cnts = {}, {}
    for t in r.tensors:
        arr = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = arr
        elif t.name.endswith(".counts"):
            cnts[t.name[: -len(".counts")]] = arr
    if not sums or set(sums) != set(cnts):
        raise LowbitError(f"{p}: not an imatrix file (needs matching NAME.in_sum2 / NAME.counts)")
    data, counts = {}, {}
    for name, s in sums.items():
        c = cnts[name].reshape(-1)
        rows = s.reshape(c.size, -1)
        safe = np.where(c > 0, c, 1)[:, None]
        data[name] = np.where(c[:, None] > 0, rows / safe, 1.0).astype(np.float32).reshape(-1)
        counts[name] = int(round(float(c.max())))
    ds = f["imatrix.datasets"].contents() if "imatrix.datasets" in f else []
    chunks = int(f["imatrix.chunk_count"].contents()) if "imatrix.chunk_count" in f else 0
    size = int(f["imatrix.chunk_size"].contents()) if "imatrix.chunk_size" in f else 0
    return Imatrix(data, counts, chunks, size, list(ds))


def _load_legacy(p: Path) -> Imatrix:
    raw = p.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(raw):
            raise LowbitError(f"{p}: not an imatrix file (truncated at {what}, byte {pos})")
        pos += n
        return raw[pos - n : pos]

    (n_entries,) = struct.unpack("<i", take(4, "entry count"))
    if n_entries < 1 or n_entries * 12 > len(raw):
        raise LowbitError(f"{p}: not an imatrix file (entry count {n_entries})")
    data, counts = {}, {}
    for i in range(n_entries):
        (n,) = struct.unpack("<i", take(4, f"name length of entry {i}"))
        try:
            name = take(n, f"name of entry {i}").decode()
        except UnicodeDecodeError:
            raise LowbitError(f"{p}: not an imatrix file (entry {i} name is not text)") from None
        ncall, nval = struct.unpack("<ii", take(8, f"sizes of {name}"))
        if nval < 1:
            raise LowbitError(f"{p}: not an imatrix file (entry {name} has {nval} values)")
        v = np.frombuffer(take(4 * nval, f"values of {name}"), dtype="<f4").astype(np.float32)
        data[name] = v / np.float32(ncall) if ncall > 0 else v.copy()
        counts[name] = max(ncall, 0)
    chunks, datasets = 0, []
    if pos + 4 <= len(raw):
        (chunks,) = struct.unpack("<i", take(4, "chunk count"))
        if pos + 4 <= len(raw):
            (n,) = struct.unpack("<i", take(4, "dataset length"))
            if 0 < n <= len(raw) - pos:
                datasets.append(take(n, "dataset").decode(errors="replace"))
    return Imatrix(data, counts, chunks, 0, datasets)
