"""Preflight for a serving target: can the format hold the scheme, do the shapes fit its
kernels, and does every tensor-parallel shard hold whole packed words and whole groups?

Runs on shapes only (seconds, before calibration). Rules implemented, with their source:

- Format capacity (this package's writers): GPTQ 2/4/8-bit (fp16 scales, both dims divisible
  by 32/b); AWQ GEMM 4-bit, grouped, no act-order, out_features % 8; compressed-tensors
  pack-quantized 2..8-bit, no act-order (g_idx removed from compressed-tensors 0.20's schema),
  FP8 E4M3 / NVFP4 (``float-quantized`` / ``nvfp4-pack-quantized``) and W8A8 int8
  (``int-quantized``: int8 per-channel weights, not packed).
- Marlin (vLLM ``marlin_utils``: ``GPTQ_MARLIN_MIN_THREAD_N = 64``,
  ``GPTQ_MARLIN_MIN_THREAD_K = 128``, ``MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]``,
  4/8-bit; GPTQ-Marlin symmetric only, AWQ-Marlin 4-bit with zero points): per shard,
  out % 64 == 0, in % 128 == 0, in % group == 0. A layer Marlin refuses is served by the
  slower fallback kernels (exllama/gptq, AWQ GEMM, compressed-tensors' other WNA16 kernels):
  reported as a note, an error only with ``require_marlin``.
- Tensor parallel degree N (vLLM/SGLang Megatron-style sharding): attention heads % N == 0 and
  KV heads divisible by N or N by KV heads (replicated); column-parallel Linears (q/k/v,
  gate/up, fused qkv/gate_up) split the output dim: out % N == 0 and every shard holds whole
  packed words of anything packed along the output dim (GPTQ qzeros: 32/b, AWQ: 8,
  compressed-tensors asymmetric zero points: 32/b); row-parallel Linears (o/down and their
  aliases) split the input dim: in % N == 0, each shard holds whole groups (in/N % group == 0)
  and whole packed words along the input dim (GPTQ qweight 32/b; compressed-tensors
  weight_packed 32/b).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowbit.arch import text_config
from lowbit.errors import LowbitError
from lowbit.formats.grid_base import WeightGrid
from lowbit.formats.integer import IntGrid
from lowbit.io.serving.base import W8A8_SCHEMES

FORMAT_BITS = {"gptq": (2, 4, 8), "awq": (4,), "compressed-tensors": (2, 3, 4, 5, 6, 7, 8)}
MARLIN = {"bits": (4, 8), "group_sizes": (-1, 32, 64, 128), "n": 64, "k": 128}
# Linear name endings (inside a block) split by tensor parallelism along the input dim
ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "fc2", "attn.c_proj", "mlp.c_proj", "dense")


@dataclass
class Preflight:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def raise_errors(self) -> None:
        if self.errors:
            more = f" (and {len(self.errors) - 3} more)" if len(self.errors) > 3 else ""
            raise LowbitError("; ".join(self.errors[:3]) + more)


def _formats_for(bits: int) -> str:
    return ", ".join(f for f, b in FORMAT_BITS.items() if bits in b) + ", gguf"


def check_target(
    shapes: dict[str, tuple[int, int]],
    grid: WeightGrid | str,
    fmt: str,
    tp: int = 1,
    act_order: bool = False,
    heads: tuple[int, int] | None = None,
    require_marlin: bool = False,
) -> Preflight:
    """``shapes``: Linear name -> (out, in) of the Linears to quantize (one block is enough);
    ``grid``: the weights' WeightGrid, or a scheme name (``w4g64``, ``nvfp4``, and the W8A8
    names ``w8a8`` / ``w8a8-static``, which have no grid); ``heads``: (attention heads, KV
    heads) for the TP head checks."""
    rep = Preflight()
    if fmt not in FORMAT_BITS:
        rep.errors.append(f"unknown format {fmt!r}; known: gguf, {', '.join(FORMAT_BITS)}")
        return rep
    if isinstance(grid, str):
        key = grid.strip().lower()
        if key in W8A8_SCHEMES or key in ("w7a8", "w7a8-static") or key.startswith("w8a8-fp8"):
            return _check_w8a8(rep, shapes, key, fmt, tp, heads)
        from lowbit.formats.grids import get_grid

        try:
            grid = get_grid(grid)
        except LowbitError as e:
            rep.errors.append(str(e))
            return rep
    if not isinstance(grid, IntGrid):
        if fmt == "compressed-tensors" and _float_ok(grid):
            return _check_float(rep, shapes, grid, tp, heads)
        rep.errors.append(f"{fmt} holds {_holds(fmt)}, not {grid.name}; use compressed-tensors "
                          "for fp8-e4m3/nvfp4/w8a8, gguf for any scheme")
        return rep
    if grid.act_bits is not None:
        rep.errors.append(f"{fmt} holds weight-only integer schemes; {grid.name} also rounds "
                          "activations at run time, which only lowbit's native folder records")
        return rep
    b = grid.bits
    if b not in FORMAT_BITS[fmt]:
        rep.errors.append(f"{fmt} cannot hold {b}-bit weights; formats that can: {_formats_for(b)}")
        return rep
    grouped = grid.granularity == "group"
    gs = grid.group if grouped else -1
    if fmt == "awq" and not grouped:
        rep.errors.append(f"awq needs grouped scales (w4gN), not {grid.name}")
    if act_order and grouped and fmt in ("awq", "compressed-tensors"):
        rep.errors.append(
            f"{fmt} cannot hold act-order weights (g_idx); use --format gptq, "
            "or --static-groups / --no-act-order"
        )
    if tp < 1:
        rep.errors.append(f"--tp must be >= 1, not {tp}")
        return rep
    _check_heads(rep, tp, heads)
    pack = 32 // b if 32 % b == 0 else 32
    out_pack = {"gptq": pack, "awq": 8}.get(fmt, 1)
    if fmt == "compressed-tensors" and not grid.symmetric:
        out_pack = pack
    in_pack = {"gptq": pack, "compressed-tensors": pack}.get(fmt, 1)
    marlin_bad = []
    for name, (out_f, in_f) in shapes.items():
        row = name.endswith(ROW_PARALLEL)
        if fmt == "gptq" and (in_f % pack or out_f % pack):
            rep.errors.append(f"{name} {out_f}x{in_f}: gptq packs {pack} codes per word "
                              f"along both dims")
        if fmt == "awq" and out_f % 8:
            rep.errors.append(f"{name} {out_f}x{in_f}: awq packs 8 output columns per word")
        if grouped and in_f % gs:
            rep.errors.append(f"{name}: group size {gs} does not divide in_features {in_f}")
        o, i = out_f, in_f
        if tp > 1:
            dim, size = ("in", in_f) if row else ("out", out_f)
            if size % tp:
                rep.errors.append(f"tp={tp}: {name} {dim}_features {size} does not split "
                                  f"into {tp}")
                continue
            if row:
                i = in_f // tp
                if grouped and i % gs:
                    rep.errors.append(f"tp={tp}: {name} shards of {i} input columns split "
                                      f"groups of {gs}")
                if i % in_pack:
                    rep.errors.append(f"tp={tp}: {name} shards of {i} input columns split "
                                      f"{fmt}'s packed words ({in_pack} codes)")
            else:
                o = out_f // tp
                if o % out_pack:
                    rep.errors.append(f"tp={tp}: {name} shards of {o} output columns split "
                                      f"{fmt}'s packed words ({out_pack} codes)")
        why = _marlin_refuses(fmt, grid, gs, o, i, act_order)
        if why:
            marlin_bad.append(f"{name} ({why})")
    if marlin_bad:
        msg = (f"Marlin kernels refuse {len(marlin_bad)} Linear(s): {', '.join(marlin_bad[:4])}"
               f"{' ...' if len(marlin_bad) > 4 else ''}; vLLM serves them with its slower "
               "fallback kernels")
        (rep.errors if require_marlin else rep.notes).append(msg)
    return rep


def _holds(fmt: str) -> str:
    if fmt == "compressed-tensors":
        return ("integer schemes (w2..w8), fp8-e4m3 (channel, -tensor, -b128), nvfp4 and W8A8 "
                "(w8a8, w8a8-static, w8a8-fp8, w8a8-fp8-static)")
    return "integer schemes (w2..w8)"


def _check_w8a8(rep: Preflight, shapes, scheme: str, fmt: str, tp: int, heads) -> Preflight:
    """W8A8 in compressed-tensors ``int-quantized`` / ``float-quantized`` (FP8): 8-bit weights
    per output channel, nothing packed or grouped, so only the TP splits themselves (and the
    heads) matter."""
    if fmt != "compressed-tensors":
        rep.errors.append(f"{fmt} holds {_holds(fmt)}, not {scheme}; use compressed-tensors "
                          "for w8a8, gguf for any scheme")
        return rep
    return _check_float(rep, shapes, None, tp, heads)


def _float_ok(grid) -> bool:
    from lowbit.formats.grids_fp import Fp8Grid, Nvfp4Grid

    return isinstance(grid, Nvfp4Grid) or (
        isinstance(grid, Fp8Grid) and grid.name.startswith("fp8-e4m3"))


def _check_heads(rep: Preflight, tp: int, heads) -> None:
    if heads and tp > 1:
        nh, nkv = heads
        if nh % tp:
            rep.errors.append(f"tp={tp}: {nh} attention heads do not split over {tp} ranks")
        if nkv % tp and tp % nkv:
            rep.errors.append(f"tp={tp}: {nkv} KV heads neither split over nor replicate to "
                              f"{tp} ranks")


def _check_float(rep: Preflight, shapes, grid, tp: int, heads) -> Preflight:
    """FP8 / NVFP4 (or W8A8: ``grid`` None) in compressed-tensors: NVFP4 needs in % 16 per
    shard (its scale blocks); FP8 128x128 blocks must not straddle a shard (vLLM's block-FP8
    rule); channel and tensor FP8 and W8A8 split anywhere."""
    if tp < 1:
        rep.errors.append(f"--tp must be >= 1, not {tp}")
        return rep
    _check_heads(rep, tp, heads)
    gname = "w8a8" if grid is None else grid.name
    block = 16 if gname == "nvfp4" else (128 if gname.endswith("-b128") else 1)
    for name, (out_f, in_f) in shapes.items():
        if gname == "nvfp4" and in_f % 16:
            rep.errors.append(f"{name} {out_f}x{in_f}: nvfp4 needs in_features % 16")
            continue
        if tp == 1:
            continue
        row = name.endswith(ROW_PARALLEL)
        dim, size = ("in", in_f) if row else ("out", out_f)
        if size % tp:
            rep.errors.append(f"tp={tp}: {name} {dim}_features {size} does not split into {tp}")
        elif (row or block == 128) and (size // tp) % block:
            rep.errors.append(f"tp={tp}: {name} shards of {size // tp} {dim}put columns split "
                              f"{gname}'s blocks of {block}")
    return rep


def _marlin_refuses(fmt, scheme: IntGrid, gs: int, o: int, i: int, act_order: bool) -> str:
    if scheme.bits not in MARLIN["bits"] or (fmt == "awq" and scheme.bits != 4):
        return f"{scheme.bits}-bit"
    if gs not in MARLIN["group_sizes"]:
        return f"group size {gs}"
    if fmt == "gptq" and not scheme.symmetric:
        return "asymmetric GPTQ"
    if act_order and gs == -1:
        return "act-order with per-channel scales"
    if o % MARLIN["n"]:
        return f"out {o} % {MARLIN['n']}"
    if i % MARLIN["k"]:
        return f"in {i} % {MARLIN['k']}"
    return ""


def model_heads(model) -> tuple[int, int] | None:
    """(attention heads, KV heads) from the model's config, for the TP head checks."""
    cfg = text_config(model)
    nh = getattr(cfg, "num_attention_heads", None)
    return (nh, getattr(cfg, "num_key_value_heads", None) or nh) if nh else None


def model_shapes(model) -> tuple[dict[str, tuple[int, int]], tuple[int, int] | None]:
    """(Linear name -> (out, in) for block 0's Linears of an unquantized model, heads)."""
    from lowbit.arch import block_linears, get_blocks, get_weight, spec_for

    spec = spec_for(model)
    block = get_blocks(model, spec)[0]
    shapes = {n: tuple(get_weight(m, spec).shape) for n, m in block_linears(block, spec).items()}
    return shapes, model_heads(model)  # type: ignore[return-value]
