"""Rotations fused into the weights (QuaRot, SpinQuant with fixed rotations): the
full-precision model computes the same function, and its weights and activations have their
outliers spread over all channels, so they round with less error.

- R1, on the residual stream: every norm's scale is first folded into the Linears it feeds
  (the norms then multiply by 1), and the final norm's into lm_head; then, with an orthogonal
  ``Q`` of the hidden size, the embeddings become ``E Q``, every Linear reading the stream
  ``W Q``, every Linear writing it (attention's o_proj, the MLP's down_proj) ``Q^T W``, and
  lm_head ``W Q``. RMSNorm commutes with ``Q`` (it preserves the norm of x), which is why the
  scales go first. Tied embeddings are untied (lm_head then differs from ``E Q``) and the step's
  row says so.
- R2, per attention head: with an orthogonal ``R`` of the head size, each key/value head's
  value rows become ``R^T W_v`` and each query head's columns of o_proj ``W_o R``; the
  attention weights mix positions, not channels, so they commute with it.

- R4 (``online``), before the MLP's last Linear: its weight becomes ``W R4`` and its input is
  multiplied by ``R4`` at run time (``FastRotation``, O(n log n)), so the activations with this
  kind of model's largest outliers (down_proj's inputs) are spread before they are rounded
  (``w4a4``) and the weight is rotated on its input side too. The Linear keeps the rotation
  (``in_rotation``; a ``QLinear`` records it in ``lowbit.json``). It must be rounded onto a
  weight grid: its rotated weight alone is not the original function.

- Incoherence processing (``incoherent``, QuIP/QuIP#): every block Linear's weight becomes
  ``R_out W R_in``, its input is multiplied by ``R_in`` and its output by ``R_out`` at run time
  (its bias, added before, by ``R_out^T`` once), so the weight is incoherent on both sides and
  its entries round like Gaussian samples, without outliers. It changes each Linear alone, so
  it applies to every family with plain Linears (with ``r1: false, r2: false`` where R1 is
  refused). Linears reading one input share ``R_in`` (the driver measures one Hessian for them).

``Q``, ``R``, ``R4`` and ``R_in``/``R_out`` are randomised Hadamard matrices
(``lowbit.formats.hadamard``; a random orthogonal matrix where no Hadamard matrix of that size
is known), drawn from ``seed``, which the recipe in ``lowbit.json`` records. With the fused
rotations alone the rotated model is an ordinary checkpoint; with R4 or incoherence only
lowbit's native folder holds it.

Families whose blocks are ``h + attn(norm(h))`` and ``h + mlp(norm(h))`` with RMSNorm take R1
(llama, mistral, qwen2/3, gemma, phi3). LayerNorm subtracts the mean, which does not commute
with a rotation (OPT, GPT-2); Gemma 2/3 normalise the attention and MLP outputs before adding
them to the stream, with scales no Linear follows; mixture-of-experts blocks are not handled
yet: those are refused with the reason. R2 alone applies to every family with a separate or
fused v projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.arch import ArchSpec, get_blocks, head_dim, kv_heads, text_config
from lowbit.errors import LowbitError
from lowbit.formats.hadamard import FastRotation, rotation
from lowbit.methods.base import Transform, register
from lowbit.pipeline.plan import untie_head


@torch.no_grad()
def _cols(lin: nn.Module, m: Tensor) -> None:
    """W <- W m (the Linear's input is multiplied by m^-T)."""
    w = lin.weight.data
    w.copy_((w.double() @ m).to(w.dtype))


@torch.no_grad()
def _rows(lin: nn.Module, m: Tensor) -> None:
    """W <- m^T W and b <- m^T b (the Linear's output is multiplied by m)."""
    w = lin.weight.data
    w.copy_((m.T @ w.double()).to(w.dtype))
    if getattr(lin, "bias", None) is not None:
        lin.bias.data.copy_((m.T @ lin.bias.data.double()).to(lin.bias.dtype))


def r1_refusal(model: nn.Module, spec: ArchSpec) -> str | None:
    """Why R1 cannot be fused into this model, or None."""
    if spec.moe is not None:
        return f"{spec.family}: mixture-of-experts blocks are not rotated yet"
    block = get_blocks(model, spec)[0]
    norms = [block.get_submodule(n) for n in spec.norm_feeds]
    norms += [model.get_submodule(n) for n in spec.head_path[:1]]
    if any(isinstance(m, nn.LayerNorm) or getattr(m, "bias", None) is not None for m in norms):
        return (f"{spec.family}: LayerNorm subtracts the mean of x, which does not commute "
                "with a rotation")
    if spec.conv1d or spec.mlp_path is None or len(spec.head_path) != 1:
        return (f"{spec.family}: its blocks do not add attention and MLP outputs to the stream "
                "directly (Gemma 2/3 normalise them first, with scales no Linear follows)")
    return None


@torch.no_grad()
def fuse_norms(model: nn.Module, spec: ArchSpec) -> None:
    """Every norm's scale into the Linears it feeds, the final norm's into lm_head; the norms
    then multiply by 1."""
    off = spec.norm_offset
    head = model.get_output_embeddings()
    for block in get_blocks(model, spec):
        for norm, fed in spec.norm_feeds.items():
            mod = block.get_submodule(norm)
            g = off + mod.weight.data.double()
            for name in fed:
                _cols(block.get_submodule(name), torch.diag(g))
            mod.weight.data.fill_(1.0 - off)
    final = model.get_submodule(spec.head_path[0])
    _cols(head, torch.diag(off + final.weight.data.double()))
    final.weight.data.fill_(1.0 - off)


@torch.no_grad()
def rotate_stream(model: nn.Module, spec: ArchSpec, q: Tensor) -> None:
    """R1 (after ``fuse_norms``): embeddings ``E Q``, readers ``W Q``, writers ``Q^T W``."""
    emb = model.get_input_embeddings().weight.data
    emb.copy_((emb.double() @ q).to(emb.dtype))
    writers = (*spec.groups[1], *spec.groups[3])  # attention's and MLP's last Linears
    for block in get_blocks(model, spec):
        for fed in spec.norm_feeds.values():
            for name in fed:
                _cols(block.get_submodule(name), q)
        for name in writers:
            _rows(block.get_submodule(name), q)
    _cols(model.get_output_embeddings(), q)


def _value_rows(model: nn.Module, block: nn.Module) -> tuple[nn.Module, int] | None:
    """The Linear holding the value projection and the row where its values start."""
    cfg = text_config(model)
    attn = getattr(block, "self_attn", None)
    if attn is None:
        return None
    if hasattr(attn, "v_proj"):
        return attn.v_proj, 0
    if hasattr(attn, "qkv_proj"):  # phi3: [q | k | v] rows
        d = head_dim(cfg)
        kv = kv_heads(cfg)
        return attn.qkv_proj, (cfg.num_attention_heads + kv) * d
    return None


@torch.no_grad()
def rotate_heads(model: nn.Module, spec: ArchSpec, r: Tensor) -> None:
    """R2: each key/value head's value rows ``R^T W_v``, o_proj's columns per head ``W_o R``."""
    cfg = text_config(model)
    d, heads = r.shape[0], cfg.num_attention_heads
    kv = kv_heads(cfg)
    for block in get_blocks(model, spec):
        found = _value_rows(model, block)
        attn = block.self_attn
        o = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
        v, start = found  # type: ignore[misc]
        rows = v.weight.data[start : start + kv * d]
        rows.copy_(torch.einsum("ij,hik->hjk", r, rows.double().reshape(kv, d, -1))
                   .reshape(kv * d, -1).to(rows.dtype))
        if getattr(v, "bias", None) is not None:
            b = v.bias.data[start : start + kv * d]
            b.copy_((b.double().reshape(kv, d) @ r).reshape(-1).to(b.dtype))
        w = o.weight.data
        w.copy_((w.double().reshape(w.shape[0], heads, d) @ r).reshape(w.shape).to(w.dtype))


def r2_refusal(model: nn.Module, spec: ArchSpec) -> str | None:
    if spec.conv1d:
        return f"{spec.family}: the attention's Conv1D projections are not rotated yet"
    block = get_blocks(model, spec)[0]
    attn = getattr(block, "self_attn", None)
    if _value_rows(model, block) is None or not (hasattr(attn, "o_proj") or
                                                 hasattr(attn, "out_proj")):
        return f"{spec.family}: no value projection and o_proj found in the attention"
    return None


def rotate_input(lin: nn.Module, rot: FastRotation, r: Tensor) -> None:
    """R4 on one float Linear (``r``: ``rot``'s matrix): ``W <- W R`` and its input
    ``x -> x R`` from now on (a pre-hook; the quantized module that replaces it takes
    ``in_rotation`` over)."""
    _cols(lin, r)
    lin.in_rotation = rot
    lin.register_forward_pre_hook(lambda m, args: (m.in_rotation(args[0]), *args[1:]))


def rotate_output(lin: nn.Module, rot: FastRotation, r: Tensor) -> None:
    """Incoherence's output side on one float Linear (``r``: ``rot``'s matrix):
    ``W <- R W``, ``b <- R b`` and its output ``y -> y R`` from now on (a hook the quantized
    module takes over)."""
    _rows(lin, r.T)
    lin.out_rotation = rot
    lin.register_forward_hook(lambda m, args, out: m.out_rotation(out))


def online_refusal(model: nn.Module, spec: ArchSpec) -> str | None:
    if spec.moe is not None or spec.conv1d or spec.mlp_path is None:
        return f"{spec.family}: no single MLP down projection to rotate online"
    return None


@register
@dataclass(frozen=True)
class Rotate(Transform):
    """R1 on the residual stream and R2 per attention head, fused (see the module docstring).
    ``targets``/``ignore`` do not apply: a rotation changes every Linear on its path."""

    step = "rotate"
    r1: bool = True
    r2: bool = True
    online: bool = False  # R4 before the MLP's last Linear, applied at run time
    incoherent: bool = False  # both sides of every block Linear, at run time (QuIP#)
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.r1 or self.r2 or self.online or self.incoherent):
            raise LowbitError("rotate: r1, r2, online and incoherent are all off; nothing to "
                              "rotate")

    def _online_linears(self, spec: ArchSpec) -> tuple[str, ...]:
        if self.incoherent:
            return spec.linears
        return spec.groups[3][:1] if self.online else ()

    def check_plan(self, model: nn.Module, plan) -> None:
        """Before any work: the Linears rotated online must be rounded onto a grid, and no
        other step may scale their inputs through the Linear before them."""
        names = self._online_linears(plan.spec)
        if not names:
            return
        what = "incoherent" if self.incoherent else "online"
        for full, la in plan.layers.items():
            if la.local in names and la.step.kind != "rounder":
                raise LowbitError(f"rotate: {what}: {full} must be rounded onto a weight grid, "
                                  f"not replaced by {la.step.step}")
        have = {(la.block, la.local) for la in plan.layers.values()}
        for b in range(len(get_blocks(model, plan.spec))):
            for n in names:
                if (b, n) not in have:
                    raise LowbitError(f"rotate: {what}: {n} of block {b} is not quantized; its "
                                      "rotated weight is saved only as a grid weight")
        scaling = [t.step for t in plan.transforms if t.step in ("awq", "smoothquant")]
        if scaling:
            raise LowbitError(f"rotate: {what}: {scaling[0]} scales a Linear's input through "
                              "the layer before it, which a rotation at run time between them "
                              "breaks; use the fused rotations alone")

    def needs_data(self) -> bool:
        return False

    def transform(self, ctx, plan) -> list[dict]:
        return []  # the whole model was rotated before the first block (transform_model)

    @torch.no_grad()
    def transform_model(self, model: nn.Module, spec: ArchSpec) -> list[dict]:
        """Rotate ``model`` in place; one log row."""
        for on, refusal in ((self.r1, r1_refusal), (self.r2, r2_refusal)):
            why = refusal(model, spec) if on else None
            if why:
                raise LowbitError(f"rotate: {why}; r1: false / r2: false leave it out")
        row: dict = {"seed": self.seed}
        if self.r1:
            head, emb = model.get_output_embeddings(), model.get_input_embeddings()
            row["untied"] = head.weight.data_ptr() == emb.weight.data_ptr()
            untie_head(model)
            fuse_norms(model, spec)
            q, row["r1"] = rotation(emb.weight.shape[1], self.seed)
            rotate_stream(model, spec, q)
        if self.r2:
            r, row["r2"] = rotation(head_dim(text_config(model)), self.seed + 1)
            rotate_heads(model, spec, r)
        if self.online and not self.incoherent:
            why = online_refusal(model, spec)
            if why:
                raise LowbitError(f"rotate: {why}; online: false leaves it out")
        if self.incoherent and (spec.conv1d or spec.moe is not None):
            raise LowbitError(f"rotate: incoherent: {spec.family}'s "
                              f"{'Conv1D projections' if spec.conv1d else 'experts'} are not "
                              "rotated yet")
        names = self._online_linears(spec)
        made: dict[tuple[int, int], tuple[FastRotation, Tensor]] = {}  # one per width and seed

        def rot_of(n: int, seed: int) -> tuple[FastRotation, Tensor]:
            if (n, seed) not in made:
                made[n, seed] = FastRotation(n, seed), rotation(n, seed)[0]
            return made[n, seed]

        for block in get_blocks(model, spec):
            for name in names:
                lin = block.get_submodule(name)
                out, inp = lin.weight.shape
                rot, r = rot_of(inp, self.seed + 2)
                rotate_input(lin, rot, r)
                if self.incoherent:
                    rotate_output(lin, *rot_of(out, self.seed + 3))
        if names:
            row["incoherent" if self.incoherent else "r4"] = rot.desc
        return [row]
