"""lowbit integer weights <-> the compressed-tensors ``pack-quantized`` layout (vLLM, SGLang,
transformers).

Per quantized Linear ``name``: ``name.weight_packed`` int32 (out, ceil(in * b / 32)),
``name.weight_scale`` (out, groups), ``name.weight_shape`` int64 [out, in] and, for asymmetric
schemes, ``name.weight_zero_point`` int32 packed along the output dim. The codes are written
by the library's own ``PackedQuantizationCompressor`` (dense int32 packing) and read back by
its ``unpack_from_int32``.

The library stores signed codes q_s in [-2^(b-1), 2^(b-1) - 1] and signed zero points; lowbit
stores unsigned codes q in [0, 2^b - 1] with zero 2^(b-1) for symmetric schemes. The map is
q_s = q - 2^(b-1), z_s = zero - 2^(b-1), so scale * (q_s - z_s) = scale * (q - zero) exactly.
A symmetric scheme has z_s = 0 and no zero-point tensor.

Not representable with the installed library (0.20): act-order weights with a ``g_idx``
(``actorder="group"`` was removed from its config schema; only ``"weight"``, which reorders
during calibration only, remains): export them as GPTQ, or quantize with ``--static-groups`` /
``--no-act-order``. lowbit's ``w*-tensor`` schemes are written as channel strategy with the
scale repeated per row (exact).

Float grids (FP8, NVFP4) are written by ``ct_float``, W8A8 modules by ``ct_int8``. Weights of
one scheme are one config group targeting ``Linear``; several schemes (mixed precision) are one
group per scheme targeting its layers by name, with each group's ``format`` and the top-level
``mixed-precision`` when the layouts differ. Import reads several groups when each is
weight-only (pack-quantized, FP8, NVFP4), matching names as the library does (exact, then
``re:``, then ``Linear``). Imported scales that are fp32 or bf16
give an ``IntGrid`` with ``scale_dtype="float32"`` (bf16 -> fp32 is exact).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowbit.errors import LowbitError
from lowbit.formats.integer import IntGrid
from lowbit.formats.weight import GridWeight
from lowbit.io.serving import ct_float, ct_int8
from lowbit.io.serving.base import int_weight, is_w8a8, stored_scale

name = "compressed-tensors"
quant_method = "compressed-tensors"
FORMAT = "pack-quantized"
mixed = True
_SCALE = {torch.float16: "float16", torch.float32: "float32"}


def _lib():
    try:
        from compressed_tensors.compressors.pack_quantized.base import (
            PackedQuantizationCompressor,
        )
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from compressed_tensors.quantization import (
            QuantizationArgs,
            QuantizationConfig,
            QuantizationScheme,
        )
    except ImportError:
        raise LowbitError(
            "the compressed-tensors format needs the library: pip install compressed-tensors"
        ) from None
    return PackedQuantizationCompressor, unpack_from_int32, QuantizationArgs, QuantizationScheme, \
        QuantizationConfig


def format_of(w) -> str:
    """``pack-quantized`` for integer weights, ``int-quantized`` for W8A8 modules, else the
    float format (``ct_float``)."""
    if int_weight(w) is not None:
        return FORMAT
    if is_w8a8(w):
        return ct_int8.format_of(w)
    fmt = ct_float.format_of(w) if isinstance(w, GridWeight) else None
    if fmt is None:
        raise LowbitError(
            f"{getattr(w, 'name', type(w).__name__)} weights have no compressed-tensors "
            "layout; it holds integer schemes (w2..w8), fp8-e4m3 (channel, tensor, b128), "
            "nvfp4 and W8A8 (smoothquant, w8a8); GGUF (--format gguf) re-encodes any model"
        )
    return fmt


def check(name: str, w) -> None:
    """Raise when ``w`` cannot be written as compressed-tensors."""
    try:
        format_of(w)
    except LowbitError as e:
        raise LowbitError(f"{name}: {e}") from None
    if int_weight(w) is not None and w.g_idx is not None:
        raise LowbitError(
            f"{name}: act-order weights (g_idx) are not representable in compressed-tensors "
            "(its 'group' actorder was removed); export as --format gptq, or quantize with "
            "--static-groups or --no-act-order"
        )


def quant_args(grid: IntGrid):
    _, _, QuantizationArgs, _, _ = _lib()
    grouped = grid.granularity == "group"
    return QuantizationArgs(
        num_bits=grid.bits,
        type="int",
        symmetric=grid.symmetric,
        strategy=grid.granularity,  # group, channel or tensor: the library's names too
        group_size=grid.group if grouped else None,
    )


def _scheme(w) -> tuple[str, object, object]:
    """(format, weight args, input-activation args) of one weight."""
    fmt = format_of(w)
    if fmt == FORMAT:
        return fmt, quant_args(w.grid), None
    if is_w8a8(w):
        args, acts = ct_int8.quant_args(w.act, "int" if fmt == ct_int8.FORMAT else "float")
        return fmt, args, acts
    return fmt, ct_float.quant_args(w.grid), None


def quantization_config(weights: dict, ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json, built by the library's own classes: one
    config group targeting every ``Linear`` when all weights share a scheme; else one group per
    scheme (most layers first) targeting its layers by name (``weights``' keys, as stored), each
    group with its own format when they differ (``mixed-precision``)."""
    _, _, _, QuantizationScheme, QuantizationConfig = _lib()
    by: dict[str, tuple[tuple, list[str]]] = {}
    for name, w in weights.items():
        sch = _scheme(w)
        key = "|".join(a.model_dump_json() if a is not None else "-" for a in sch[1:]) + sch[0]
        by.setdefault(key, (sch, []))[1].append(name)
    groups = sorted(by.values(), key=lambda g: (-len(g[1]), g[1][0]))
    formats = {sch[0] for sch, _ in groups}
    mixed = len(formats) > 1
    config_groups = {
        f"group_{i}": QuantizationScheme(
            targets=["Linear"] if len(groups) == 1 else sorted(names), weights=args,
            input_activations=acts, format=fmt if mixed else None)
        for i, ((fmt, args, acts), names) in enumerate(groups)}
    cfg = QuantizationConfig(
        config_groups=config_groups,
        format="mixed-precision" if mixed else formats.pop(),
        quantization_status="compressed",
        ignore=sorted(ignore),
    )
    return cfg.model_dump(mode="json")


def extra_files(qcfg: dict) -> dict[str, str]:
    return {}


def layer_tensors(name: str, w) -> dict[str, torch.Tensor]:
    """Compress one weight with the library's compressor and check it kept lowbit's codes."""
    check(name, w)
    if is_w8a8(w):
        return ct_int8.layer_tensors(name, w)
    if int_weight(w) is None:
        return ct_float.layer_tensors(name, w)
    Compressor, unpack, _, QuantizationScheme, _ = _lib()
    grid: IntGrid = w.grid
    off = 1 << (grid.bits - 1)
    qs = QuantizationScheme(targets=["Linear"], weights=quant_args(grid))
    scale = stored_scale(w)
    zero = w.params["zero"]
    if grid.granularity == "tensor":  # one scale (and zero) for the tensor: shape (1,)
        scale, zero = scale.reshape(-1)[:1].contiguous(), zero.reshape(-1)[:1]
    # the exact lowbit W_hat: scale * (q - zero) is exact in float32 for b <= 8 and fp16 scales,
    # so the library's round(W_hat / scale) + z_s gives back q_s exactly
    sd = {"weight": w.dequantize(), "weight_scale": scale}
    if not grid.symmetric:
        sd["weight_zero_point"] = (zero.to(torch.int16) - off).to(torch.int8)
    out = Compressor.compress(sd, qs)
    got = unpack(out["weight_packed"], grid.bits, w.shape).to(torch.int16) + off
    if not torch.equal(got, w.codes.to(torch.int16)):
        raise LowbitError(f"{name}: compressed-tensors packing changed the codes")
    res = {f"{name}.{k}": v.contiguous() for k, v in out.items() if k != "weight"}
    res[f"{name}.weight_scale"] = scale
    return res


def grid_of(args: dict, scale: torch.Tensor) -> IntGrid:
    """The IntGrid for a config group's ``weights`` args (integer pack-quantized)."""
    if args.get("type") != "int" or args.get("strategy") not in ("group", "channel", "tensor"):
        raise LowbitError(
            f"compressed-tensors weights {args.get('type')}/{args.get('strategy')} are not "
            "supported for import; lowbit reads int group/channel/tensor pack-quantized"
        )
    grouped = args["strategy"] == "group"
    return IntGrid(
        bits=int(args["num_bits"]),
        granularity=args["strategy"],
        group=int(args["group_size"]) if grouped else 0,
        symmetric=bool(args.get("symmetric", True)),
        scale_dtype=_SCALE.get(scale.dtype, "float32"),  # type: ignore[arg-type]
    )


def read_layer(name: str, t: dict[str, torch.Tensor], args: dict) -> GridWeight:
    """One Linear's tensors (without the ``name.`` prefix) -> an integer GridWeight."""
    _, unpack, _, _, _ = _lib()
    scale = t["weight_scale"]
    if scale.dtype not in _SCALE:
        scale = scale.float()  # bfloat16 -> float32 is exact
    if "weight_g_idx" in t:
        raise LowbitError(f"{name}: compressed-tensors g_idx (actorder=group) is not supported")
    grid = grid_of(args, scale)
    shape = tuple(int(x) for x in t["weight_shape"].tolist())
    if grid.granularity == "tensor":
        scale = scale.reshape(1, 1).expand(shape[0], 1).contiguous()
    off = 1 << (grid.bits - 1)
    codes = (unpack(t["weight_packed"], grid.bits, shape).to(torch.int16) + off).to(torch.uint8)
    if grid.symmetric:
        zero = torch.full(scale.shape, float(off))
    else:
        zp = t["weight_zero_point"]
        if grid.granularity == "tensor":
            zs = zp.reshape(1, 1).expand(shape[0], 1)
        else:
            zs = unpack(zp, grid.bits, scale.shape, packed_dim=0)
        zero = (zs.to(torch.int16) + off).float()
    return GridWeight(grid, codes, {"scale": scale.float(), "zero": zero})


def _read_w8a8(tensors: dict, args: dict, acts: dict) -> dict:
    if not acts:
        raise LowbitError("int-quantized without input_activations is weight-only int8: "
                          "lowbit reads W8A8 from int-quantized")
    names = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
    out = {}
    for n in names:
        parts = {k[len(n) + 1 :]: tensors.pop(k) for k in list(tensors)
                 if k in (f"{n}.weight", f"{n}.weight_scale", f"{n}.input_scale")}
        out[n] = ct_int8.read_layer(n, parts, args, acts)
    return out


def _group_for(name: str, groups: list[dict]) -> dict:
    """The config group whose targets take Linear ``name``, by the library's precedence: an
    exact name before a ``re:`` pattern before the class name ``Linear``."""
    from compressed_tensors.utils.match import match_name

    def rank(targets: list[str]) -> int:
        if name in targets:
            return 0
        if any(t.startswith("re:") and match_name(name, t) for t in targets):
            return 1
        return 2 if "Linear" in targets else 3

    ranks = [rank(g.get("targets") or []) for g in groups]
    best = min(ranks)
    if best == 3:
        raise LowbitError(f"compressed-tensors: no config group targets {name}")
    if ranks.count(best) > 1:
        raise LowbitError(f"compressed-tensors: several config groups target {name} alike")
    return groups[ranks.index(best)]


WEIGHT_ONLY = (FORMAT, ct_float.FP8, ct_float.NVFP4)


def read_layers(tensors: dict[str, torch.Tensor], qcfg: dict) -> dict:
    """Every quantized Linear of a checkpoint (its tensors are popped from ``tensors``):
    GridWeights, or W8A8Linear modules for int-quantized. Several config groups (mixed
    precision) are read when each is weight-only and in a format lowbit reads."""
    fmt = qcfg.get("format")
    groups = list(qcfg.get("config_groups", {}).values())
    if not groups or any(not g.get("weights") for g in groups):
        raise LowbitError("compressed-tensors import needs config groups with weights")
    if len(groups) > 1:
        for g in groups:
            gf = g.get("format") or fmt
            if g.get("input_activations") or gf not in WEIGHT_ONLY:
                raise LowbitError(
                    "compressed-tensors import of several config groups takes weight-only "
                    f"groups in {', '.join(WEIGHT_ONLY)}, not {gf}"
                    + (" with activations" if g.get("input_activations") else ""))
        names = sorted(k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale"))
        stored, how = {}, {}
        for n in names:
            stored[n] = _pop_layer(tensors, n)
            g = _group_for(n, groups)
            how[n] = (read_layer if (g.get("format") or fmt) == FORMAT else ct_float.read_layer,
                      g["weights"])
        return StoredLayers(stored, lambda n, parts: how[n][0](n, parts, how[n][1]))
    if fmt not in (*WEIGHT_ONLY, ct_int8.FORMAT):
        raise LowbitError(
            f"compressed-tensors format {fmt!r} is not supported for import; lowbit reads "
            f"{FORMAT}, {ct_float.FP8}, {ct_float.NVFP4}, int-quantized (W8A8) and "
            "mixed-precision groups of the weight-only ones"
        )
    acts = groups[0].get("input_activations")
    if acts and fmt not in (ct_int8.FORMAT, ct_float.FP8):
        raise LowbitError(f"compressed-tensors {fmt} import is weight-only (no activation "
                          "quantization); W8A8 is read from int-quantized and float-quantized")
    args = groups[0]["weights"]
    if fmt == ct_int8.FORMAT or acts:
        return _read_w8a8(tensors, args, acts or {})
    # FP8 layers are the ones with a weight_scale beside a float8 weight
    key = ".weight_scale" if fmt == ct_float.FP8 else ".weight_packed"
    names = sorted(k[: -len(key)] for k in tensors if k.endswith(key))
    stored = {n: _pop_layer(tensors, n) for n in names}
    read = read_layer if fmt == FORMAT else ct_float.read_layer
    return StoredLayers(stored, lambda n, parts: read(n, parts, args))


def _pop_layer(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Layer ``name``'s weight tensors (``weight``, ``weight_*``), without the prefix."""
    keys = [k for k in tensors if k.startswith(name + ".") and
            k[len(name) + 1:].startswith("weight") and "." not in k[len(name) + 1:]]
    return {k[len(name) + 1:]: tensors.pop(k) for k in keys}


class StoredLayers(Mapping):
    """Layers as stored (packed), each decoded to its ``GridWeight`` when read and not kept:
    an 8B model's unpacked codes (one byte each) would take 7 GB at once."""

    def __init__(self, stored: dict[str, dict[str, torch.Tensor]], read) -> None:
        self.stored, self.read = stored, read

    def __getitem__(self, name: str):
        return self.read(name, dict(self.stored[name]))

    def __iter__(self):
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)

    def pop(self, name: str):
        """The layer decoded, its stored tensors dropped (a loader that keeps its own copy)."""
        return self.read(name, self.stored.pop(name))
