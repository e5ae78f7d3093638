"""A quantized weight as plain tensors: codes, per-group scales and zero points, g_idx."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.formats import pack as packing
from lowbit.formats.integer import column_groups
from lowbit.scheme import Scheme


@dataclass
class QuantizedWeight:
    """``W_hat[r, c] = scale[r, g] * (codes[r, c] - zero[r, g])`` with ``g = g_idx[c]``."""

    scheme: Scheme
    codes: torch.Tensor  # (out, in) uint8
    scale: torch.Tensor  # (out, groups) float16/float32 as the scheme stores it
    zero: torch.Tensor  # (out, groups) uint8; constant 2^(b-1) for symmetric schemes
    g_idx: torch.Tensor | None = None  # (in,) int32, only when columns were reordered

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def column_groups(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return column_groups(self.shape[1], self.scheme).long()

    def dequantize(self) -> torch.Tensor:
        out_f, in_f = self.shape
        n_groups = self.scale.shape[1]
        if self.g_idx is None and self.scheme.granularity == "group":
            q = self.codes.reshape(out_f, n_groups, -1).float()
            w = self.scale.float()[..., None] * (q - self.zero.float()[..., None])
            return w.reshape(out_f, in_f)
        g = self.column_groups()
        s = self.scale.float()[:, g]
        z = self.zero.float()[:, g]
        return s * (self.codes.float() - z)

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Row blocks of a weight quantized as one (Linears that share an input).

        Each part owns its tensors (no views into the whole, no shared ``g_idx``):
        safetensors refuses to save tensors that share memory."""
        parts = zip(
            self.codes.split(sizes), self.scale.split(sizes), self.zero.split(sizes), strict=True
        )
        g = self.g_idx
        return [
            QuantizedWeight(
                self.scheme, c.clone(), s.clone(), z.clone(), g if g is None else g.clone()
            )
            for c, s, z in parts
        ]

    def bits_per_weight(self) -> float:
        bpw = self.scheme.bits_per_weight(*self.shape)
        if self.g_idx is not None:
            bpw += 32 / self.shape[0]  # one int32 per input column
        return bpw

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors stored on disk: packed codes, scales, zeros (asymmetric), g_idx."""
        out = {
            "qweight": packing.pack(self.codes, self.scheme.bits),
            "scales": self.scale.contiguous(),
        }
        if not self.scheme.symmetric:
            out["zeros"] = packing.pack(self.zero, self.scheme.bits)
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx.to(torch.int32).contiguous()
        return out

    @classmethod
    def from_tensors(
        cls, scheme: Scheme, shape: tuple[int, int], tensors: dict[str, torch.Tensor]
    ) -> QuantizedWeight:
        out_f, in_f = shape
        codes = packing.unpack(tensors["qweight"], scheme.bits, in_f)
        scale = tensors["scales"]
        if scheme.symmetric:
            zero = torch.full(scale.shape, 1 << (scheme.bits - 1), dtype=torch.uint8)
        else:
            zero = packing.unpack(tensors["zeros"], scheme.bits, scale.shape[1])
        return cls(scheme, codes, scale, zero, tensors.get("g_idx"))
