"""Integer and lookup-table grids: the integer ``Scheme`` adapter, NF4 (optionally double-
quantized as QLoRA / bitsandbytes), BitNet b1.58 ternary and SqueezeLLM per-row k-means tables.

Codes: integer schemes uint8 in [0, 2^b - 1]; NF4 and SqueezeLLM uint8 indices into the code
book / the row's table; ternary int8 in {-1, 0, 1} (stored as code + 1 in 2 bits).
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
    add_saturated,
    check_finite,
    divisors_message,
    n_beyond,
    row_sensitivity,
    zero_count,
)
from lowbit.formats.integer import dequantize, fit_qparams, quantize
from lowbit.scheme import Scheme, check_group

NF4_GROUPS = (32, 64, 128, 256)
SQ_BITS = (2, 3, 4)
SQ_ITERS = 30  # Lloyd iterations of the SqueezeLLM k-means
_ROW_CHUNK = 256  # rows per k-means chunk (bounds memory on wide layers)


class IntGrid(GridBase):
    """Adapter over an integer ``Scheme`` (``w4g64``, ``w3g64-asym``, ``w8``, ``w8-tensor``)."""

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme
        self.name = scheme.name
        self.code_bits = scheme.bits
        self.group_size = scheme.group_size if scheme.granularity == "group" else None

    def check(self, out_features: int, in_features: int) -> None:
        if self.group_size is not None:
            check_group(self.group_size, in_features)
        super().check(out_features, in_features)

    def prepare(self, w_full: Tensor, sensitivity: Tensor | None = None) -> Params:
        """Per-tensor schemes: the one scale and zero point of the whole weight."""
        check_finite(w_full)
        if self.scheme.granularity != "tensor":
            return {}
        wf = w_full.detach().float()
        s = row_sensitivity(sensitivity, *wf.shape)
        cw = None if s is None else s.float().reshape(1, -1)
        scale, zero = fit_qparams(wf.reshape(1, -1), self.scheme, cw)
        return {"scale": scale, "zero": zero}

    def fit(
        self, w: Tensor, weight: Tensor | None = None, *, ctx: Params | None = None, group: int = 0
    ) -> Params:
        check_finite(w)
        wf = w.detach().float()
        if self.scheme.granularity == "tensor":
            if not ctx:
                ctx = self.prepare(wf)
            scale = ctx["scale"].reshape(1, 1).expand(wf.shape[0], 1).clone()
            zero = ctx["zero"].reshape(1, 1).expand(wf.shape[0], 1).clone()
        else:
            scale, zero = fit_qparams(wf, self.scheme, weight)
        return {"scale": scale, "zero": zero, "saturated": zero_count()}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        xf = x.detach().float()
        s, z = params["scale"], params["zero"]
        add_saturated(params, n_beyond(xf / s + z, 0, self.scheme.qmax, 0.5, 0.5))
        return quantize(xf, s, z, self.scheme.bits).to(torch.uint8)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return dequantize(codes.float(), params["scale"], params["zero"])

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.scheme.bits_per_weight(out_features, in_features)


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

    def __init__(
        self, block: int = 64, double_quant: bool = False, stored_scale_codes: bool = True
    ) -> None:
        if block not in NF4_GROUPS:
            raise LowbitError(f"nf4 block sizes: {', '.join(map(str, NF4_GROUPS))}; not {block}")
        self.group_size = block
        self.double_quant = double_quant
        self.stored_scale_codes = stored_scale_codes
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
        params: Params = {"absmax_raw": raw, "saturated": zero_count()}
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

    def finalize(self, params_by_group: list[Params]) -> list[Params]:
        """NF4-DQ fitted without ``prepare``: double-quantize all fp32 absmaxes now."""
        if not self.double_quant or all("absmax" in p for p in params_by_group):
            return params_by_group
        raw = torch.cat([p["absmax_raw"] for p in params_by_group], 1)  # (rows, groups)
        dq = _double_quantize(raw)
        stored = nf4_absmax(dq).view(raw.shape)
        codes = dq["absmax_codes"].view(raw.shape)
        return [
            p
            | {
                "absmax_code": codes[:, g : g + 1],
                "absmax": stored[:, g : g + 1],
                "dq_offset": dq["absmax_offset"],
                "dq_block_scales": dq["absmax_scale"],
            }
            for g, p in enumerate(params_by_group)
        ]

    def encode(self, x: Tensor, params: Params) -> Tensor:
        s = params["absmax" if self.stored_scale_codes else "absmax_raw"]
        v = x.detach().float() / torch.where(s != 0, s, torch.ones_like(s))
        add_saturated(params, n_beyond(v, -1.0, 1.0, *self._halves))
        return nearest_code(v, self.codebook)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return lookup(codes, self.codebook) * params["absmax"]

    def stored(self, codes: Tensor, params_by_group: list[Params]) -> dict[str, Tensor]:
        """The tensors as ``codebooks.nf4_quantize`` lays them out (for nf4_dequantize)."""
        if not self.double_quant:
            absmax = torch.cat([p["absmax"] for p in params_by_group], 1)
            return {"codes": codes, "absmax": absmax.reshape(-1)}
        acodes = torch.cat([p["absmax_code"] for p in params_by_group], 1)
        p0 = params_by_group[0]
        return {
            "codes": codes,
            "absmax_codes": acodes.reshape(-1),
            "absmax_scale": p0["dq_block_scales"],
            "absmax_offset": p0["dq_offset"],
        }

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
        gamma = gamma.reshape(1, 1).expand(w.shape[0], 1).clone()
        return {"gamma": gamma, "saturated": zero_count()}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        v = x.detach().float() / params["gamma"]
        add_saturated(params, n_beyond(v, -1.0, 1.0, 0.5, 0.5))
        return torch.round(v).clamp_(-1, 1).to(torch.int8)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return codes.to(torch.float32) * params["gamma"]

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

    allowed_groups = ()

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
        return {"table": table, "saturated": zero_count()}

    def encode(self, x: Tensor, params: Params) -> Tensor:
        t = params["table"].to(torch.float64)
        mids = ((t[:, 1:] + t[:, :-1]) / 2).contiguous()
        return torch.searchsorted(mids, x.detach().to(torch.float64).contiguous()).to(torch.uint8)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return params["table"].gather(1, codes.long())

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return self.code_bits + 16 * (1 << self.code_bits) / in_features
