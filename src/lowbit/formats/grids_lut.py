"""Lookup-table grids: NF4 (optionally double-quantized as QLoRA / bitsandbytes), BitNet b1.58
ternary and SqueezeLLM per-row k-means tables.

Codes: NF4 and SqueezeLLM uint8 indices into the code book / the row's table; ternary int8 in
{-1, 0, 1} (stored as code + 1 in 2 bits).

Stored forms: ``nf4``: ``absmax`` fp32 (out, groups); ``nf4-dq``: ``absmax_codes`` uint8 (out,
groups) 8-bit dynamic-map codes, ``dq_block_scales`` fp32 (one per 256 absmaxes in row-major
order), ``dq_offset`` fp32 (1,), plus ``absmax`` fp32 if the codes do not rebuild it exactly;
``ternary``: ``gamma`` fp32 (1,); ``sq*``: ``tables`` fp16 (out, 2^bits), each row's centroids
(fp32 if fp16 is not exact).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.formats.codebooks import (
    DQ_BLOCK,
    dynamic_map_8bit,
    lookup,
    nearest_code,
    nf4_absmax,
    nf4_codebook,
    nf4_quantize,
    ternary_quantize,
)
from lowbit.formats.grid_base import (
    GridBase,
    Params,
    beyond,
    check_finite,
    divisors_message,
    fp16_if_exact,
    one_value,
    row_sensitivity,
)

NF4_GROUPS = (32, 64, 128, 256)
SQ_BITS = (2, 3, 4)
SQ_ITERS = 30  # Lloyd iterations of the SqueezeLLM k-means
_ROW_CHUNK = 256  # rows per k-means chunk (bounds memory on wide layers)


def _double_quantize(absmax: Tensor) -> dict[str, Tensor]:
    """bitsandbytes' second quantization level of a flat vector of block absmaxes.

    nf4_quantize with blocks of one element has exactly these absmaxes, so its double
    quantization is the one QLoRA applies to them.
    """
    q = nf4_quantize(absmax.reshape(-1), block=1, double_quant=True)
    del q["codes"]
    return q


class Nf4Grid(GridBase):
    """NF4 code book, fp32 absmax per block (``nf4``); ``nf4-dq`` double-quantizes the absmaxes.

    ``stored_scale_codes=True`` (default) chooses each code against the block scale that is
    stored (for NF4-DQ the double-quantized one: never a larger error per element than
    bitsandbytes); False chooses against the fp32 absmax as bitsandbytes does (bit-exact codes).
    """

    code_bits = 4
    allowed_groups = NF4_GROUPS
    group_keys = ("absmax", "absmax_raw", "absmax_code")

    def __init__(
        self, block: int = 64, double_quant: bool = False, stored_scale_codes: bool = True
    ) -> None:
        if block not in NF4_GROUPS:
            raise LowbitError(f"nf4 block sizes: {', '.join(map(str, NF4_GROUPS))}; not {block}")
        self.group_size = block
        self.double_quant = double_quant
        self.stored_scale_codes = stored_scale_codes
        self.stackable = not double_quant  # the second level spans the whole tensor
        self.name = "nf4" + ("-dq" if double_quant else "") + ("" if block == 64 else f"-g{block}")
        self.codebook = nf4_codebook()
        self._dyn = dynamic_map_8bit()
        cb = self.codebook
        self._halves = (float(cb[1] - cb[0]) / 2, float(cb[-1] - cb[-2]) / 2)

    def check(self, out_features: int, in_features: int) -> None:
        if in_features % self.group_size:
            raise LowbitError(
                f"{self.name}: block {self.group_size} does not divide the input dimension "
                f"{in_features}; nf4 blocks that do: {divisors_message(in_features, NF4_GROUPS)}"
            )
        super().check(out_features, in_features)

    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params:
        """NF4-DQ: offset and per-256-block scales of the second level, from w_full's absmaxes."""
        check_finite(w_full)
        if not self.double_quant:
            return {}
        out_f, in_f = w_full.shape
        self.check(out_f, in_f)
        n_groups = in_f // self.group_size
        absmax = w_full.detach().float().abs().reshape(out_f, n_groups, -1).amax(-1)
        dq = _double_quantize(absmax)
        per_block = dq["absmax_scale"].repeat_interleave(DQ_BLOCK)[: out_f * n_groups]
        return {
            "dq_scale": per_block.view(out_f, n_groups),
            "dq_offset": dq["absmax_offset"],
            "dq_block_scales": dq["absmax_scale"],
        }

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        check_finite(w)
        raw = w.detach().float().abs().amax(1, keepdim=True)
        params: Params = {"absmax_raw": raw}
        if not self.double_quant:
            params["absmax"] = raw
        elif ctx:
            s = ctx["dq_scale"][:, group : group + 1]
            off = ctx["dq_offset"]
            code = nearest_code((raw - off) / torch.where(s > 0, s, torch.ones_like(s)), self._dyn)
            params |= {
                "absmax_code": code,
                "absmax": lookup(code, self._dyn) * s + off,
                "dq_offset": off,
                "dq_block_scales": ctx["dq_block_scales"],
            }
        return params

    def finalize(self, params: Params) -> Params:
        """NF4-DQ fitted without ``prepare``: double-quantize all fp32 absmaxes now."""
        if not self.double_quant or "absmax" in params:
            return params
        raw = params["absmax_raw"]  # (rows, groups)
        dq = _double_quantize(raw)
        return params | {
            "absmax_code": dq["absmax_codes"].view(raw.shape),
            "absmax": nf4_absmax(dq).view(raw.shape),
            "dq_offset": dq["absmax_offset"],
            "dq_block_scales": dq["absmax_scale"],
        }

    def encode(self, x: Tensor, params: Params) -> Tensor:
        return nearest_code(self._scaled(x, params), self.codebook)

    def _scaled(self, x: Tensor, params: Params) -> Tensor:
        s = params["absmax" if self.stored_scale_codes else "absmax_raw"]
        return x.detach().float() / torch.where(s != 0, s, torch.ones_like(s))

    def saturated(self, x: Tensor, params: Params) -> Tensor:
        return beyond(self._scaled(x, params), -1.0, 1.0, *self._halves)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return lookup(codes, self.codebook) * params["absmax"]

    def stored(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        """The tensors as ``codebooks.nf4_quantize`` lays them out (for nf4_dequantize)."""
        if not self.double_quant:
            return {"codes": codes, "absmax": params["absmax"].reshape(-1)}
        return {
            "codes": codes,
            "absmax_codes": params["absmax_code"].reshape(-1),
            "absmax_scale": params["dq_block_scales"],
            "absmax_offset": params["dq_offset"],
        }

    def _rebuilt_absmax(self, codes: Tensor, block_scales: Tensor, offset: Tensor) -> Tensor:
        """(out, groups) absmax from its 8-bit codes, as ``fit`` computes it."""
        s = block_scales.repeat_interleave(DQ_BLOCK)[: codes.numel()].view(codes.shape)
        return lookup(codes, self._dyn) * s + offset

    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]:
        absmax = params["absmax"]
        if not self.double_quant:
            return {"absmax": absmax}
        out = {
            "absmax_codes": params["absmax_code"],
            "dq_block_scales": params["dq_block_scales"].float(),
            "dq_offset": params["dq_offset"].reshape(1).float(),
        }
        rebuilt = self._rebuilt_absmax(out["absmax_codes"], out["dq_block_scales"],
                                       out["dq_offset"])
        if not torch.equal(rebuilt, absmax):
            out["absmax"] = absmax
        return out

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params:
        if not self.double_quant:
            a = tensors["absmax"].float()
            return {"absmax": a, "absmax_raw": a}
        codes, scales = tensors["absmax_codes"], tensors["dq_block_scales"].float()
        offset = tensors["dq_offset"].float().reshape(())
        absmax = tensors.get("absmax")
        if absmax is None:
            absmax = self._rebuilt_absmax(codes, scales, offset)
        absmax = absmax.float()
        return {"absmax": absmax, "absmax_raw": absmax, "absmax_code": codes,
                "dq_offset": offset, "dq_block_scales": scales}

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        n = out_features * in_features
        if not self.double_quant:
            return 4 + 32 / self.group_size
        n_blocks = n // self.group_size
        n_dq = -(-n_blocks // DQ_BLOCK)
        return 4 + 8 / self.group_size + (32 * n_dq + 32) / n


class TernaryGrid(GridBase):
    """BitNet b1.58: gamma = mean|W| over the tensor (fp32), codes clip(round(w / gamma), -1, 1)."""

    name = "ternary"
    code_bits = 2
    signed_codes = True
    group_keys = ("gamma",)
    stackable = False

    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params:
        check_finite(w_full)
        return {"gamma": ternary_quantize(w_full)[1]}

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        check_finite(w)
        gamma = (ctx or {}).get("gamma")
        if gamma is None:
            gamma = ternary_quantize(w)[1]
        return {"gamma": gamma.reshape(1, 1).expand(w.shape[0], 1).clone()}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        v = x.detach().float() / params["gamma"]
        return torch.round(v).clamp_(-1, 1).to(torch.int8)

    def saturated(self, x: Tensor, params: Params) -> Tensor:
        return beyond(x.detach().float() / params["gamma"], -1.0, 1.0, 0.5, 0.5)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return codes.to(torch.float32) * params["gamma"]

    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]:
        one = one_value(params["gamma"])
        return {"gamma": one} if one is not None else {"p_gamma": params["gamma"]}

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params:
        if "gamma" in tensors:
            return {"gamma": tensors["gamma"].float().reshape(1, 1).expand(shape[0], 1).clone()}
        return {"gamma": tensors["p_gamma"].float()}

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return 2 + 32 / (out_features * in_features)


def weighted_kmeans_rows(
    w: Tensor, sensitivity: Tensor | None, k: int, iters: int = SQ_ITERS
) -> Tensor:
    """Per-row 1-D k-means (rows, k), ascending, minimising sum s * (w - c)^2 along each row.

    Deterministic: starts from the row's (2i+1)/(2k) quantiles, then ``iters`` Lloyd steps
    (assign to the nearest centroid, centroid = sensitivity-weighted mean); an empty cluster
    keeps its centroid. Rows whose sensitivity sums to 0 are weighted uniformly.
    """
    rows, n = w.shape
    s_all = row_sensitivity(sensitivity, rows, n)
    out = torch.empty(rows, k, dtype=torch.float64)
    pos = ((2 * torch.arange(k) + 1) * n) // (2 * k)
    for r0 in range(0, rows, _ROW_CHUNK):
        x = w[r0 : r0 + _ROW_CHUNK].detach().to(torch.float64)
        s = torch.ones_like(x) if s_all is None else s_all[r0 : r0 + _ROW_CHUNK]
        s = torch.where(s.sum(1, keepdim=True) > 0, s, torch.ones_like(s))
        c = x.sort(1).values[:, pos]
        sx = s * x
        for _ in range(iters):
            a = torch.searchsorted((c[:, 1:] + c[:, :-1]) / 2, x)
            num = torch.zeros_like(c).scatter_add_(1, a, sx)
            den = torch.zeros_like(c).scatter_add_(1, a, s)
            c = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), c).sort(1).values
        out[r0 : r0 + _ROW_CHUNK] = c
    return out


class SqueezeGrid(GridBase):
    """SqueezeLLM: per output row a table of 2^b centroids from sensitivity-weighted k-means over
    the whole row, stored in fp16 (``sq3``, ``sq4``); codes index the row's table."""

    row_keys = ("table",)
    needs_sensitivity = True

    def __init__(self, bits: int = 4) -> None:
        if bits not in SQ_BITS:
            allowed = ", ".join(map(str, SQ_BITS))
            raise LowbitError(f"SqueezeLLM grids take {allowed} bits (sq2, sq3, sq4); not {bits}")
        self.code_bits = bits
        self.name = f"sq{bits}"

    def _tables(self, w: Tensor, sensitivity: Tensor | None) -> Tensor:
        c = weighted_kmeans_rows(w, sensitivity, 1 << self.code_bits)
        return c.to(torch.float16).to(torch.float32)  # monotone rounding keeps rows sorted

    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params:
        check_finite(w_full)
        return {"table": self._tables(w_full, sensitivity)}

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        check_finite(w)
        table = (ctx or {}).get("table")
        if table is None:
            table = self._tables(w, weight)
        if table.shape[0] != w.shape[0]:
            raise LowbitError(f"{self.name}: fit needs all {table.shape[0]} rows, got {w.shape[0]}")
        return {"table": table}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        t = params["table"].to(torch.float64)
        mids = ((t[:, 1:] + t[:, :-1]) / 2).contiguous()
        return torch.searchsorted(mids, x.detach().to(torch.float64).contiguous()).to(torch.uint8)

    def saturated(self, x: Tensor, params: Params) -> Tensor:
        return torch.zeros(x.shape, dtype=torch.bool)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return params["table"].gather(1, codes.long())

    def store(self, params: Params, shape: tuple[int, int]) -> dict[str, Tensor]:
        return {"tables": fp16_if_exact(params["table"])}

    def load(self, tensors: dict[str, Tensor], shape: tuple[int, int]) -> Params:
        return {"table": tensors["tables"].float()}

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.code_bits + 16 * (1 << self.code_bits) / in_features
