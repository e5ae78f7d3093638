"""Reading GGUF files safely: a bounded walk over the header before anything else reads it.

`check_gguf` validates a file's structure (magic, version, every length and count against
the bytes that remain, value types, tensor shapes, types, alignment and data extents) without
allocating more than the file holds, so a truncated or corrupt file gives one clear
LowbitError rather than a crash, a huge allocation or a hang. `open_gguf` then hands the file
to `gguf.GGUFReader`; `read_tensor` decodes one tensor to float32.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

MAGIC = b"GGUF"
MAX_DIMS = 4
MAX_NAME = 64  # GGML_MAX_NAME: llama.cpp refuses longer tensor names
MAX_DEPTH = 4  # nesting of arrays inside arrays
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class _Bad(Exception):
    """A structural problem, turned into a LowbitError naming the file."""


def _type_sizes() -> dict[int, tuple[int, int]]:
    from gguf import GGML_QUANT_SIZES

    return {int(t): v for t, v in GGML_QUANT_SIZES.items()}


class _Walker:
    def __init__(self, buf) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise _Bad(
                f"truncated: {what} at byte {self.pos} needs {n} bytes, file has {self.size}"
            )
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} at byte {start} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            start = self.take(_SCALARS[vtype], what)
            return bytes(self.buf[start : start + _SCALARS[vtype]])
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise _Bad(f"{what}: unknown value type {vtype}")
        if depth >= MAX_DEPTH:
            raise _Bad(f"{what}: arrays nested deeper than {MAX_DEPTH}")
        atype = self.u32(f"element type of {what}")
        count = self.u64(f"element count of {what}")
        if atype in _SCALARS:
            self.take(count * _SCALARS[atype], f"{count} elements of {what}")
            return None
        if atype not in (_STRING, _ARRAY):
            raise _Bad(f"{what}: unknown array element type {atype}")
        # every string or array element takes at least 8 bytes: refuse impossible counts early
        if count * 8 > self.size - self.pos:
            raise _Bad(f"truncated: {what} claims {count} elements, too many for the file")
        for i in range(count):
            self.value(atype, f"element {i} of {what}", depth + 1)
        return None


def scan(buf) -> dict:
    """Validate GGUF bytes; returns {"version", "alignment", "kv" (key -> value type),
    "strings" (key -> value of the string keys), "tensors", "data_offset"}."""
    w = _Walker(buf)
    start = w.take(4, "magic")
    if bytes(buf[start : start + 4]) != MAGIC:
        raise _Bad("not a GGUF file (bad magic)")
    version = w.u32("version")
    if version not in (2, 3):
        raise _Bad(f"unsupported GGUF version {version} (expected 2 or 3, little-endian)")
    n_tensors = w.u64("tensor count")
    n_kv = w.u64("key/value count")
    if n_kv * 13 > w.size - w.pos or n_tensors * 25 > w.size - w.pos:
        raise _Bad(f"truncated: header claims {n_kv} keys and {n_tensors} tensors")
    keys: dict[str, int] = {}
    strings: dict[str, str] = {}
    alignment = 32
    for i in range(n_kv):
        key = w.string(f"key {i}")
        if key in keys:
            raise _Bad(f"duplicate key {key!r}")
        vtype = w.u32(f"type of {key!r}")
        keys[key] = vtype
        raw = w.value(vtype, f"value of {key!r}")
        if vtype == _STRING:
            strings[key] = raw
        if key == "general.alignment":
            if vtype != 4:
                raise _Bad("general.alignment must be a uint32")
            alignment = _U32.unpack(raw)[0]
            if alignment == 0 or alignment & (alignment - 1):
                raise _Bad(f"general.alignment {alignment} is not a power of two")
    sizes = _type_sizes()
    tensors: dict[str, dict] = {}
    for i in range(n_tensors):
        name = w.string(f"name of tensor {i}")
        if len(name.encode()) >= MAX_NAME:
            raise _Bad(f"tensor name {name[:70]!r} is longer than {MAX_NAME - 1} bytes")
        if name in tensors:
            raise _Bad(f"duplicate tensor {name!r}")
        n_dims = w.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = [w.u64(f"dimension of {name!r}") for _ in range(n_dims)]
        ttype = w.u32(f"type of {name!r}")
        offset = w.u64(f"offset of {name!r}")
        if ttype not in sizes:
            raise _Bad(f"tensor {name!r} has unknown ggml type {ttype}")
        blk, tsize = sizes[ttype]
        if 0 in dims:  # legal for ggml, never a weight: the decoders cannot reshape it
            raise _Bad(f"tensor {name!r} has an empty dimension {dims}")
        if dims[0] % blk:
            raise _Bad(f"tensor {name!r}: row of {dims[0]} not a multiple of block size {blk}")
        if offset % alignment:
            raise _Bad(f"tensor {name!r}: data offset {offset} not aligned to {alignment}")
        n = 1
        for d in dims:
            n *= d
        tensors[name] = {"dims": dims, "type": ttype, "offset": offset, "nbytes": n // blk * tsize}
    data_offset = -(-w.pos // alignment) * alignment
    for name, t in tensors.items():
        end = data_offset + t["offset"] + t["nbytes"]
        if end > w.size:
            raise _Bad(f"truncated: data of tensor {name!r} ends at byte {end}, file has {w.size}")
    return {
        "version": version,
        "alignment": alignment,
        "kv": keys,
        "strings": strings,
        "tensors": tensors,
        "data_offset": data_offset,
    }


def check_gguf(path: str | Path) -> dict:
    """Validate a GGUF file's structure; a LowbitError (one sentence) when it is not sound."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                raise LowbitError(f"{p}: empty file, not a GGUF model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return scan(m)
    except OSError as e:
        raise LowbitError(f"cannot read {p}: {e.strerror or e}") from None
    except _Bad as e:
        raise LowbitError(f"{p}: corrupt GGUF file: {e}") from None


def open_gguf(path: str | Path):
    """`gguf.GGUFReader` for a file that `check_gguf` accepted."""
    from gguf import GGUFReader

    check_gguf(path)
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, struct.error, OverflowError, TypeError) as e:
        raise LowbitError(f"{path}: corrupt GGUF file: {e}") from None


def read_tensor(reader, name: str) -> np.ndarray:
    """One tensor decoded to float32, numpy shape (rows, cols) as stored."""
    for t in reader.tensors:
        if t.name == name:
            return _decode(t)
    raise LowbitError(f"no tensor {name!r} in the GGUF file")


def _decode(t) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if qtype == GGMLQuantizationType.F32:
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.F16:
        return np.asarray(t.data).view(np.float16).astype(np.float32).reshape(shape)
    return dequantize(np.asarray(t.data), qtype).astype(np.float32).reshape(shape)


def check_gguf_finite(path: str | Path) -> None:
    """Refuse a GGUF file whose tensors decode to NaN or inf (damaged data: the structure
    ``check_gguf`` validates can be sound), naming the first such tensor."""
    reader = open_gguf(path)
    for t in reader.tensors:
        w = _decode(t)
        if not np.isfinite(w).all():
            n_nan, n_inf = int(np.isnan(w).sum()), int(np.isinf(w).sum())
            raise LowbitError(f"{path}: tensor {t.name} holds {n_nan} NaN and {n_inf} inf "
                              "values; refusing a damaged model")
