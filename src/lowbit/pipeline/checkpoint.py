"""Crash safety: a run's finished blocks on disk, and going on from the first unfinished one.

After each block a ``RunCheckpoint`` folder receives what the rest of the run needs from it:

- ``block-NNNNN.safetensors``: the block's quantized modules (each layer's stored tensors, its
  record in the metadata: what ``lowbit.json`` records), the block's other tensors (norms that
  a transform rescaled ...) and the statistics steps kept;
- ``inputs-NNNNN.safetensors``: the next block's inputs (every chunk of the main stream, and
  of the sample stream when a step has one) and torch's random-number state (the previous
  block's are kept too);
- ``state.json``, written last (atomically): how many blocks are finished, the rows logged so
  far, and the run's *fingerprint* (model, recipe, calibration windows, dtype, lowbit and torch
  versions ...).

A run given the folder again restores the finished blocks into the freshly loaded model (their
runtime modules rebuilt from the records, as a saved folder's are) and starts at the next block
from the stored inputs, so its result is the uninterrupted run's, bit for bit (on the same
machine and thread count: a matrix product's summation order may depend on them). The commit
point is ``state.json``: a run killed while writing a block's files resumes from the previous
block. With several processes (``lowbit.pipeline.dist``) each keeps its own folder (they may be
on different machines) and all go on from the smallest number of finished blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.formats.grids import grid_from_info
from lowbit.formats.pack import SAFETENSORS_DTYPES
from lowbit.pipeline.release import release, trim
from lowbit.pipeline.stats import stats_from_tensors, stats_tensors
from lowbit.runtime.modules import build_module
from lowbit.runtime.qlinear import QLinear, QuantModule

VERSION = 1
MODES = ("auto", "require", "never")
_STATE = "state.json"


def lowbit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:  # run from a source tree
        return "source"


def tensor_digest(t: Tensor) -> str:
    h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
    h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def model_digest(model: nn.Module, probe: int = 4096) -> str:
    """A cheap identity of a model's weights: every tensor's name, shape, dtype and its first
    and last ``probe`` values (reading a whole 16 GB model would take minutes; a different
    model or checkpoint differs in those)."""
    h = hashlib.sha256(model.config.to_json_string().encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        for part in (flat[:probe], flat[-probe:]):
            h.update(part.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


class RunCheckpoint:
    """The checkpoint folder of one run. ``mode``: ``auto`` resumes when the folder holds a
    run with the same fingerprint (and otherwise starts over, replacing it), ``require`` fails
    unless it can resume, ``never`` starts over."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, str] | None = None,
                 mode: str = "auto", note=None) -> None:
        if mode not in MODES:
            raise LowbitError(f"unknown resume mode {mode!r}; known: {', '.join(MODES)}")
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint or {})
        self.mode = mode
        self.note = note or (lambda _m: None)
        self.finished = 0
        self.rows: list[dict] = []
        self.extra: dict = {}
        self.resumed_blocks = 0
        self.seconds = 0.0  # spent writing checkpoints
        self.trained = ""  # what a whole-model step (qat) saved here, e.g. "training at step 40"

    # -- starting ---------------------------------------------------------------------------

    def _read_state(self) -> dict | None:
        f = self.folder / _STATE
        if not f.is_file():
            return None
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            self.note(f"checkpoint {self.folder} is unreadable ({e}); starting over")
            return None
        if not isinstance(state, dict) or state.get("version") != VERSION:
            self.note(f"checkpoint {self.folder} is of another lowbit version; starting over")
            return None
        return state

    def begin(self, fingerprint: dict[str, str]) -> int:
        """Complete the fingerprint with what the pipeline knows, compare it with the folder's,
        and return the number of finished blocks to restore (0: start over, folder emptied)."""
        self.fingerprint |= fingerprint
        state = None if self.mode == "never" else self._read_state()
        if state is not None:
            old = state.get("fingerprint", {})
            differ = sorted(k for k in self.fingerprint.keys() | old.keys()
                            if self.fingerprint.get(k) != old.get(k))
            if differ:
                msg = (f"checkpoint {self.folder} is of another run (its {', '.join(differ)} "
                       "differ)")
                if self.mode == "require":
                    raise LowbitError(f"cannot resume: {msg}; run without --resume to start "
                                      "over")
                self.note(f"{msg}; starting over")
                state = None
        if state is None:
            if self.mode == "require":
                raise LowbitError(f"cannot resume: no checkpoint in {self.folder}")
            self.clear()
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_state()
            return 0
        self.finished = self.resumed_blocks = int(state["blocks"])
        self.rows = list(state.get("rows", []))
        self.extra = dict(state.get("extra", {}))
        return self.finished

    def rewind(self, blocks: int) -> None:
        """Go on from block ``blocks`` (at most one before the last finished one: the ranks of a
        run agree on the smallest)."""
        if blocks < self.finished:
            self.finished = blocks
            self.rows = [r for r in self.rows if r.get("block") is None or r["block"] < blocks]
            self.resumed_blocks = blocks

    def restore_block(self, bi: int, block: nn.Module, prefix: str, weights, stats: dict) -> None:
        """Put finished block ``bi`` back: its runtime modules (registered in ``weights`` by full
        name; their stored tensors mapped from the file) and other tensors, and the statistics
        kept with it."""
        f = self._block_file(bi)
        tensors = self._install(f, block, prefix, weights)
        plain = {k[2:]: v for k, v in tensors.items() if k.startswith("p.")}  # copied in
        missing, unexpected = block.load_state_dict(plain, strict=False)
        if unexpected or any(not _is_quantized(block, k) for k in missing):
            raise LowbitError(f"{f}: does not match block {bi} of this model")
        stats |= stats_from_tensors({k[2:]: v.clone() for k, v in tensors.items()
                                     if k.startswith("s.")})

    def offload(self, bi: int, block: nn.Module, prefix: str, weights) -> None:
        """Swap block ``bi``'s runtime modules for the same modules over the tensors just
        written (mapped from the file, read back only when used): the quantized model held in
        memory shrinks to what is in use, and memory no longer grows with the model's size."""
        self._install(self._block_file(bi), block, prefix, weights)
        trim()

    def _block_file(self, bi: int) -> Path:
        return self.folder / f"block-{bi:05d}.safetensors"

    def _install(self, f: Path, block: nn.Module, prefix: str, weights) -> dict[str, Tensor]:
        """The block's runtime modules rebuilt over the file's (mapped) tensors and put in
        place; the file's other tensors are returned."""
        tensors, meta = map_safetensors(f)
        layers = json.loads(meta.get("layers", "{}"))
        old = []
        for local, info in layers.items():
            parts = {k.rsplit(".", 1)[1]: tensors.pop(k) for k in list(tensors)
                     if k.startswith(f"q.{local}.")}
            bias = parts.pop("bias", None)
            owner, _, child = local.rpartition(".")
            parent = block.get_submodule(owner) if owner else block
            old_mod = getattr(parent, child)
            if isinstance(getattr(old_mod, "weight", None), Tensor):
                old.append(old_mod.weight.data)
            try:
                if info.get("kind") is None:
                    module = QLinear.from_stored(grid_from_info(info), tuple(info["shape"]),
                                                 parts, bias)
                    module.set_rotations(info)
                else:
                    module = build_module(info, parts, bias)
            except (LowbitError, KeyError, ValueError) as e:
                raise LowbitError(f"{f}: layer {local}: {e}") from None
            setattr(parent, child, module)
            weights[f"{prefix}.{local}"] = module
        release(old)
        return tensors

    def inputs(self) -> tuple[list[Tensor] | None, list[Tensor] | None]:
        """The stored inputs of the first unfinished block (main, sample), and the random state
        as it was then."""
        if self.finished == 0:
            return None, None
        f = self.folder / f"inputs-{self.finished:05d}.safetensors"
        if not f.is_file():  # a data-free run stores none
            return None, None
        tensors, _ = map_safetensors(f)
        tensors = {k: v.clone() for k, v in tensors.items()}
        torch.set_rng_state(tensors.pop("rng"))
        main = [tensors[f"main.{i}"] for i in range(sum(k.startswith("main.") for k in tensors))]
        samp = [tensors[f"samp.{i}"] for i in range(sum(k.startswith("samp.") for k in tensors))]
        return main, samp or None

    # -- going on ---------------------------------------------------------------------------

    def save_block(self, bi: int, block: nn.Module, rows: list[dict], stats: dict,
                   main: list[Tensor] | None, samp: list[Tensor] | None,
                   extra: dict | None = None) -> None:
        """Block ``bi`` is finished: write it, the next block's inputs, then the state."""
        t0 = time.perf_counter()
        tensors: dict[str, Tensor] = {}
        layers = {}
        quant = {n: m for n, m in block.named_modules() if isinstance(m, QuantModule)}
        for local, mod in quant.items():
            layers[local] = mod.layer_info()
            for k, v in mod.to_tensors().items():
                tensors[f"q.{local}.{k}"] = v
            if getattr(mod, "bias", None) is not None:
                tensors[f"q.{local}.bias"] = mod.bias.data
        for k, v in block.state_dict().items():
            if not any(k.startswith(f"{q}.") for q in quant):
                tensors[f"p.{k}"] = v
        tensors |= {f"s.{k}": v for k, v in stats_tensors(stats).items()}
        _write(self.folder / f"block-{bi:05d}.safetensors", tensors,
               {"layers": json.dumps(layers)})
        if main is not None:
            inp = {f"main.{i}": h for i, h in enumerate(main)}
            inp |= {f"samp.{i}": h for i, h in enumerate(samp or [])}
            inp["rng"] = torch.get_rng_state()
            _write(self.folder / f"inputs-{bi + 1:05d}.safetensors", inp, {})
        self.finished = bi + 1
        self.rows.extend(rows)
        self.extra = dict(extra or {})
        self._write_state()
        # the previous block's inputs stay: with several processes, one may have committed a
        # block more than another when killed, and all go on from the same block
        stale = self.folder / f"inputs-{bi - 1:05d}.safetensors"
        stale.unlink(missing_ok=True)
        self.seconds += time.perf_counter() - t0

    def _write_state(self) -> None:
        state = {"version": VERSION, "fingerprint": self.fingerprint, "blocks": self.finished,
                 "rows": self.rows, "extra": self.extra}
        tmp = self.folder / f".{_STATE}.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / _STATE)

    def clear(self) -> None:
        """Remove the folder (the run's result is saved, or a new run starts)."""
        if self.folder.exists():
            shutil.rmtree(self.folder)


def _is_quantized(block: nn.Module, key: str) -> bool:
    owner = key.rpartition(".")[0]
    try:
        return isinstance(block.get_submodule(owner), QuantModule)
    except AttributeError:
        return False


def _write(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


_DTYPES = {name: dt for dt, name in SAFETENSORS_DTYPES.items()}


def map_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors of a safetensors file as views of a private memory map of it (nothing is
    read until used; pages read are file pages the kernel can drop again), and its metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
        whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
        meta = header.pop("__metadata__", None) or {}
        out = {}
        for name, rec in header.items():
            lo, hi = (8 + n + o for o in rec["data_offsets"])
            if hi > size:
                raise ValueError(f"{name} runs past the end of the file")
            dt = _DTYPES[rec["dtype"]]
            raw = whole[lo:hi]
            if lo % dt.itemsize:  # not aligned for a view: a copy
                raw = raw.clone()
            out[name] = raw.view(dt).reshape(rec["shape"])
        return out, meta
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise LowbitError(f"checkpoint file {path} is damaged ({e}); run with --no-resume "
                          "to start over") from None
