"""Lookup-table formats: NF4 (with QLoRA double quantization), normal-quantile grids, ternary.

A codebook is a sorted 1-D float32 tensor; a code is an index into it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.formats.grid_base import all_finite

NF4_OFFSET = 0.9677083  # QLoRA's outermost quantile level (bitsandbytes create_normal_map)
DQ_BLOCK = 256  # blocks of the second quantization level in QLoRA's double quantization


def nf4_codebook() -> Tensor:
    """The 16 NF4 values of QLoRA, ascending, in [-1, 1], with an exact zero at index 7.

    Asymmetric construction: 8 positive levels at the normal quantiles of probabilities evenly
    spaced from NF4_OFFSET down to 0.5 (exclusive), 7 negative levels from 8 such points, plus 0;
    then divided by the largest value.
    """
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.max()).to(torch.float32)


def quantile_codebook(bits: int, normalize: bool = True) -> Tensor:
    """Symmetric normal-quantile grid q_i = Phi^-1((2i+1) / 2^(bits+1)), i = 0..2^bits-1.

    Each level is the median of one of 2^bits equal-probability bins; there is no zero level.
    normalize=True divides by the largest level so the grid spans [-1, 1].
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"quantile_codebook: bits must be in 1..8, got {bits}")
    n = 1 << bits
    p = (2 * torch.arange(n, dtype=torch.float64) + 1) / (2 * n)
    q = torch.special.ndtri(p)
    if normalize:
        q = q / q.max()
    return q.to(torch.float32)


def dynamic_map_8bit() -> Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (256 sorted values in [-0.993, 1]).

    For k = 0..6 the decade [0.1, 1] * 10^(k-6) is cut into 2^k equal parts and the midpoint of
    each part is a level, with both signs; 0 and 1 complete the 256 values.
    """
    data = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, (1 << k) + 1, dtype=torch.float64)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)).tolist()
        data += means + [-m for m in means]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _check_codebook(codebook: Tensor) -> Tensor:
    if codebook.dim() != 1 or codebook.numel() < 2:
        raise ValueError("a codebook must be a 1-D tensor of at least 2 values")
    cb = codebook.to(torch.float64)
    if not bool((cb[1:] > cb[:-1]).all()):
        raise ValueError("a codebook must be strictly increasing")
    return cb


def _check_finite(x: Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what} needs a floating-point tensor, got {x.dtype}")
    if not all_finite(x):
        raise ValueError(f"{what} cannot hold NaN or inf; the input contains some")


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Index (uint8 if it fits, else int64) of the nearest codebook entry for each element.

    A value exactly halfway between two entries takes the lower index (the smaller value), as
    bitsandbytes' NF4 threshold comparisons do. Values beyond the ends take the end entries.
    """
    _check_finite(x, "nearest_code")
    cb = _check_codebook(codebook).to(x.device)
    mids = (cb[1:] + cb[:-1]) / 2
    idx = torch.searchsorted(mids, x.detach().to(torch.float64).contiguous())
    return idx.to(torch.uint8) if cb.numel() <= 256 else idx


def lookup(codes: Tensor, codebook: Tensor) -> Tensor:
    """Codebook values (float32) of the codes."""
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"lookup needs integer codes, got {codes.dtype}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= codebook.numel()):
        raise ValueError(f"codes must lie in [0, {codebook.numel() - 1}]")
    return codebook.to(device=c.device, dtype=torch.float32)[c]


def _blockwise_absmax(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(x as rows of `block`, fp32 absmax per row); the last row may be zero-padded."""
    flat = x.reshape(-1)
    pad = -flat.numel() % block
    rows = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    return rows, rows.abs().amax(dim=1)


def _quantize_rows(rows: Tensor, absmax: Tensor, codebook: Tensor) -> Tensor:
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return nearest_code(rows / safe[:, None], codebook)


def nf4_quantize(w: Tensor, block: int = 64, double_quant: bool = False) -> dict[str, Tensor]:
    """NF4 codes over blocks of `block` consecutive elements of w (row-major order).

    Returns {"codes": uint8 of w's shape (0..15), "absmax": fp32 per block}; with double_quant,
    "absmax" is replaced as in QLoRA/bitsandbytes: its mean is subtracted ("absmax_offset", fp32
    scalar), the result is coded with the 8-bit dynamic map ("absmax_codes", uint8) in blocks of
    DQ_BLOCK = 256 with an fp32 absmax each ("absmax_scale"); the last of those blocks may be
    partial. A block of zeros gets absmax 0 and the code of 0.0.
    """
    _check_finite(w, "NF4")
    if block < 1 or w.numel() % block:
        fits = [b for b in (16, 32, 64, 128, 256) if w.numel() % b == 0]
        raise ValueError(
            f"NF4 block size {block} does not divide the {w.numel()} elements; "
            f"sizes that divide it: {fits or 'none of 16, 32, 64, 128, 256'}"
        )
    rows, absmax = _blockwise_absmax(w.detach().to(torch.float32), block)
    codes = _quantize_rows(rows, absmax, nf4_codebook()).view(w.shape)
    if not double_quant:
        return {"codes": codes, "absmax": absmax}
    offset = absmax.mean()
    centred = absmax - offset
    dq_rows, dq_scale = _blockwise_absmax(centred, DQ_BLOCK)
    dq_codes = _quantize_rows(dq_rows, dq_scale, dynamic_map_8bit()).view(-1)[: absmax.numel()]
    return {
        "codes": codes,
        "absmax_codes": dq_codes,
        "absmax_scale": dq_scale,
        "absmax_offset": offset,
    }


def nf4_absmax(q: dict[str, Tensor]) -> Tensor:
    """The per-block absmax of an nf4_quantize result (reconstructed if double-quantized)."""
    if "absmax" in q:
        return q["absmax"]
    n = q["absmax_codes"].numel()
    scale = q["absmax_scale"].repeat_interleave(DQ_BLOCK)[:n]
    return lookup(q["absmax_codes"], dynamic_map_8bit()) * scale + q["absmax_offset"]


def nf4_dequantize(q: dict[str, Tensor]) -> Tensor:
    """float32 tensor of the original shape from an nf4_quantize result."""
    codes = q["codes"]
    absmax = nf4_absmax(q)
    if absmax.numel() == 0 or codes.numel() % absmax.numel():
        raise ValueError("NF4: the number of codes is not a multiple of the number of blocks")
    rows = lookup(codes, nf4_codebook()).view(absmax.numel(), -1)
    return (rows * absmax[:, None]).view(codes.shape)


def nf4_bits_per_weight(block: int = 64, double_quant: bool = False) -> float:
    """Storage per weight: 4-bit code + fp32 absmax per block, or with double quantization
    an 8-bit absmax code per block + an fp32 scale per DQ_BLOCK blocks (QLoRA: 4.127 at 64)."""
    if double_quant:
        return 4 + 8 / block + 32 / (block * DQ_BLOCK)
    return 4 + 32 / block


def ternary_quantize(w: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """BitNet b1.58 absmean ternary: gamma = mean|w| (at least eps), codes = clip(round(w/gamma)).

    Returns (int8 codes in {-1, 0, 1} of w's shape, fp32 scalar gamma). round() is half-to-even.
    """
    _check_finite(w, "ternary")
    wf = w.detach().to(torch.float32)
    gamma = wf.abs().mean().clamp(min=eps) if wf.numel() else torch.tensor(1.0)
    codes = torch.round(wf / gamma).clamp_(-1, 1).to(torch.int8)
    return codes, gamma


def ternary_dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """float32 codes * scale."""
    return codes.to(torch.float32) * scale.to(torch.float32)
