"""Whole jobs on paths, as the command line runs them: load a model, quantize it with a recipe and
save it; evaluate; export; collect an importance matrix; profile activations. Each validates
what it can before any long run and returns plain data for display."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.recipe import Recipe

SERVING_FORMATS = ("compressed-tensors", "gptq", "awq")
OUTPUT_FORMATS = ("auto", "native", *SERVING_FORMATS)


@dataclass(frozen=True)
class Calibration:
    """Which calibration windows to use: a source (``builtin``, ``self``, ``pydoc`` or a text
    file), how many windows of how many tokens, and the first window."""

    source: str = "builtin"
    samples: int = 128
    seq_len: int = 512
    offset: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise LowbitError(f"--calib-samples must be at least 1, not {self.samples}")
        if self.seq_len < 2:
            raise LowbitError(f"--seq-len must be at least 2, not {self.seq_len}")
        if self.offset < 0:
            raise LowbitError(f"--calib-offset must not be negative, not {self.offset}")

    def windows(self, model, tokenizer, progress: bool = True):
        from lowbit.calib import calib_windows

        return calib_windows(self.source, model, tokenizer, self.samples, self.seq_len,
                             self.offset, progress=progress)

    def to_dict(self) -> dict:
        return asdict(self)


def check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise LowbitError(f"--chunk must be at least 1, not {chunk}")


def check_tp(tp: int) -> None:
    if tp < 1:
        raise LowbitError(f"--tp must be at least 1, not {tp}")


def serving_preflight(model, plan, fmt: str, tp: int) -> list[str]:
    """``--format`` checks on shapes, in seconds, before calibration: one grid for all layers
    (compressed-tensors: one per set of Linears that vLLM fuses), act-order's g_idx only where
    the format keeps it, W8A8 schemes only where the format has
    their layout, tensor-parallel splits. Returns notes."""
    if fmt == "native":
        return []
    if fmt not in SERVING_FORMATS:
        raise LowbitError(f"unknown output format {fmt!r}; known: {', '.join(OUTPUT_FORMATS)} "
                          "(gguf: use lowbit export)")
    if any(getattr(t, "online", False) or getattr(t, "incoherent", False)
           for t in plan.transforms):
        raise LowbitError("the recipe rotates Linears' inputs at run time (--rotate-online, "
                          "--incoherence), and transformers does not apply compressed-tensors' "
                          "transform_config on load; --format native holds it, --rotate "
                          "alone (fused) exports everywhere")
    from lowbit.io.serving.targets import check_target, model_shapes

    owners = list(plan.layers.values())
    shapes, heads = model_shapes(model)
    replacers = {la.step for la in owners if la.step.kind == "replacer"}
    for step in replacers:
        if step.step != "w8a8":
            raise LowbitError(f"{fmt} has no layout for {step.step} layers; save the native "
                              "format")
        check_target(shapes, step.scheme, fmt, tp, heads=heads).raise_errors()
    if replacers:
        if len({la.step for la in owners}) > 1:  # a second replacer, or rounders beside it
            raise LowbitError(f"--format {fmt} takes one scheme for all Linears; save the "
                              "native format")
        return []
    grids = {la.grid for la in owners}
    if len(grids) > 1:
        from lowbit.io.serving.checkpoint import fused_mismatch, get_format

        if not get_format(fmt).mixed:
            raise LowbitError(f"--format {fmt} takes one scheme for all Linears, this recipe "
                              f"uses {len(grids)} ({', '.join(sorted(g.name for g in grids))}); "
                              "compressed-tensors holds several, or save the native format")
        bad = fused_mismatch(model, {n: la.grid.name for n, la in plan.layers.items()})
        if bad:
            raise LowbitError(f"--format {fmt}: vLLM fuses Linears that read one input into one "
                              f"matrix of one scheme, and {bad}; give each such set one scheme "
                              "(as --target-bpw does), or save the native format")
    notes: list[str] = []
    for grid in sorted(grids, key=lambda g: g.name):
        mine = [la for la in owners if la.grid == grid]
        local = {re.sub(r"^.*?\.\d+\.", "", n) for n, la in plan.layers.items() if la.grid == grid}
        g_idx = any(
            la.step.step == "gptq" and la.step.act_order_for(la.grid) and
            not la.step.static_groups and la.grid.column_groups and la.grid.group_size is not None
            for la in mine
        )
        rep = check_target({k: v for k, v in shapes.items() if k in local} or shapes, grid, fmt,
                           tp, act_order=g_idx, heads=heads)
        rep.raise_errors()
        notes += [n for n in rep.notes if n not in notes]
    return notes


def choose_format(model, plan, fmt: str, tp: int,
                  note: Callable[[str], None] = lambda _m: None) -> str:
    """The output format, checked before calibration. ``auto``: compressed-tensors (which
    transformers, vLLM and SGLang load) when it holds the recipe, else lowbit's native folder,
    saying why; with ``--tp`` above 1 the checkpoint is for serving, so compressed-tensors must
    hold it."""
    if not plan.layers:  # pruned only (--method none): nothing a serving format quantizes
        if fmt not in ("auto", "native") or tp != 1:
            raise LowbitError(f"--format {fmt}: the recipe quantizes no Linear (pruning "
                              "alone); save the native format, or add a rounder (--method "
                              "gptq) for a serving checkpoint")
        return "native"
    if fmt == "auto" and tp == 1:
        try:
            # kernel notes (Marlin) are for those who asked for a serving format
            serving_preflight(model, plan, "compressed-tensors", tp)
        except LowbitError as e:
            note(f"format: native (compressed-tensors cannot hold this recipe: {e})")
            return "native"
        return "compressed-tensors"
    fmt = "compressed-tensors" if fmt == "auto" else fmt
    for n in serving_preflight(model, plan, fmt, tp):
        note(n)
    return fmt


def quantize_job(
    model_arg: str,
    recipe: Recipe,
    out: str | Path,
    calibration: Calibration,
    fmt: str = "auto",
    tp: int = 1,
    overwrite: bool = False,
    chunk: int = 8,
    progress: bool = True,
    note: Callable[[str], None] = lambda _m: None,
    dtype: str = "auto",
    eval_windows: int = 0,
    eval_data: str = "builtin",
    resume: str = "auto",
):
    """Load (in ``dtype``), plan, calibrate, quantize, save. Every finished block is written
    to ``OUT.lowbit-resume`` (removed once the output is saved): a run killed part way goes on
    from there when started again (``resume``: ``auto`` when the checkpoint is of the same
    run, ``require``, ``never``). Returns (model, tokenizer,
    result, meta). ``eval_windows`` > 0: perplexity, KL and top-1 of the quantized model on
    that many windows of ``eval_data``, against the base log-probabilities taken from the same
    model before quantizing (no second copy in memory); recorded as ``eval`` in lowbit.json
    and the model card."""
    from lowbit.api import describe, plan, quantize, save
    from lowbit.eval.base_cache import HeldLogprobs
    from lowbit.io.native import check_writable
    from lowbit.models import DTYPE_NAMES, check_seq_len, load_model, model_dtype, parse_dtype

    parse_dtype(dtype)  # a bad name fails before loading
    if fmt not in OUTPUT_FORMATS:
        raise LowbitError(f"unknown output format {fmt!r}; known: {', '.join(OUTPUT_FORMATS)} "
                          "(gguf: use lowbit export)")
    check_chunk(chunk)
    if eval_windows < 0:
        raise LowbitError(f"--eval takes a number of windows (0: none), not {eval_windows}")
    check_tp(tp)
    if recipe.needs_data() or eval_windows > 0:
        check_seq_len(model_arg, calibration.seq_len)
    from lowbit.pipeline.dist import barrier, init_from_env

    out = Path(out)
    rank, ranks = init_from_env()  # one process, or one of torchrun's (``lowbit.pipeline.dist``)
    if rank:  # rank 0 reports and writes
        progress, note = False, lambda _m: None
    check_writable(out, overwrite)
    ck = _checkpoint_for(model_arg, out, dtype, resume, note)
    t0 = time.perf_counter()
    model, tok = load_model(model_arg, dtype)
    p = plan(model, recipe)
    fmt = choose_format(model, p, fmt, tp, note)
    if p.cache is not None and fmt != "native":
        from lowbit.io.serving.ct_kv import kv_note

        if (msg := kv_note(fmt, p.cache.format)) is not None:
            note(msg)
    windows, record = None, None
    if p.needs_data:
        if rank:
            barrier()  # rank 0 makes (and caches) the windows first: sampled text is costly
        windows, record = calibration.windows(model, tok, progress)
        if not rank and ranks > 1:
            barrier()
        # the recipe as it ran: with the calibration it used, so that it re-runs the same
        recipe = Recipe(recipe.steps, calibration.to_dict() | {"source": record["source"]})
    base_lp, ev = None, None
    if eval_windows > 0 and not rank:
        from lowbit.calib import check_disjoint
        from lowbit.calib import eval_windows as read_eval_windows

        seq = calibration.seq_len
        check_disjoint(record, eval_data, eval_windows, seq)
        ev = read_eval_windows(eval_data, tok, eval_windows, seq)
        base_lp = HeldLogprobs(model, ev)
    try:
        res = quantize(model, recipe, windows, chunk=chunk, progress=progress, checkpoint=ck)
        meta = describe(res, recipe, base_model=str(model_arg), calibration=record,
                        dtype=DTYPE_NAMES.get(model_dtype(model), "fp32"))
        meta["output_format"] = fmt
        if base_lp is not None:
            from lowbit.api import checkpoint_dtype
            from lowbit.eval.metrics import evaluate
            from lowbit.io.serving.checkpoint import round_unquantized

            if fmt != "native":
                round_unquantized(model, set(res.weights), checkpoint_dtype(model_dtype(model)))

            r = evaluate(model, ev, base=base_lp, progress=progress)
            meta["eval"] = {k: r[k] for k in ("ppl", "kl_mean", "kl_p99", "top1")} | {
                "data": eval_data, "windows": eval_windows, "seq_len": seq}
        if not rank:
            save(out, model, tok, res, meta, fmt=fmt, overwrite=overwrite)
        barrier()
    except BaseException as e:  # noqa: BLE001 - re-raised, saying what a rerun can use
        if ck.finished:
            e.add_note(f"{ck.finished} finished blocks are kept in {ck.folder}: the same "
                       "command goes on from there, --no-resume starts over")
        elif ck.trained:
            e.add_note(f"{ck.trained} is kept in {ck.folder}: the same command goes on from "
                       "there, --no-resume starts over")
        else:
            ck.clear()  # nothing worth keeping
        raise
    ck.clear()  # the output is whole: the run needs no going back to
    if ranks > 1:
        barrier()
        if not rank:
            ck.folder.parent.rmdir()
    meta["seconds"] = time.perf_counter() - t0
    meta["checkpoint_seconds"] = round(ck.seconds, 3)
    if ck.resumed_blocks:
        meta["resumed_blocks"] = ck.resumed_blocks
    return model, tok, res, meta


def resume_folder(out: Path) -> Path:
    """Where a quantize job writing ``out`` keeps its finished blocks until it is saved."""
    return out.with_name(out.name + ".lowbit-resume")


def _checkpoint_for(model_arg: str, out: Path, dtype: str, resume: str, note):
    """The job's checkpoint, fingerprinted by the model's files and the load dtype (the
    pipeline adds the recipe, the windows and the versions); ``--resume`` without one fails
    here, before the model loads."""
    from lowbit.eval.base_cache import model_fingerprint
    from lowbit.models import parse_dtype, resolve
    from lowbit.pipeline.checkpoint import RunCheckpoint
    from lowbit.pipeline.dist import world

    rank, ranks = world()
    folder = resume_folder(out)
    if ranks > 1:  # each process its own (they may be on different machines)
        folder = folder / f"rank-{rank}"
    if resume == "require" and not (folder / "state.json").is_file():
        raise LowbitError(f"cannot resume: no checkpoint in {folder} (no run writing {out} "
                          "was interrupted)")
    files = model_fingerprint(resolve(model_arg))
    fp = {"model files": hashlib.sha256(files.encode()).hexdigest()[:24],
          "dtype": str(parse_dtype(dtype))}
    return RunCheckpoint(folder, fp, mode=resume, note=note)


SPEED_PROMPT_TOKENS, SPEED_NEW_TOKENS = 512, 128  # `--speed`: prefill, then batch-1 decode


def eval_job(model_arg: str, data: str, windows: int, seq_len: int, base_arg: str | None,
             speed: bool, progress: bool = True, dtype: str = "auto", batch: int = 1,
             base_cache: bool = True, note: Callable[[str], None] = lambda _m: None,
             kernel: str = "auto", compile: bool = False, llamacpp: bool = False) -> dict:
    """Perplexity (and KL / top-1 against a base) of a model or a quantized folder. The base's
    log-probabilities are cached on disk (``lowbit.eval.base_cache``): evaluating N models
    against one base runs the base once. ``llamacpp``: a GGUF file's logits come from
    llama.cpp (llama-cpp-python), the statistics are computed the same way."""
    import torch

    from lowbit.calib import check_disjoint
    from lowbit.eval.metrics import current_rss_bytes, evaluate, model_bytes, peak_rss_bytes
    from lowbit.io.native import read_description
    from lowbit.models import (
        check_seq_len,
        is_lowbit_dir,
        load_model,
        resolve,
    )

    if batch < 1:
        raise LowbitError(f"--batch must be at least 1, not {batch}")
    if windows < 1 or seq_len < 2:
        raise LowbitError(f"--windows must be at least 1 and --seq-len at least 2, not "
                          f"{windows} and {seq_len}")
    from lowbit.runtime.kernels import check_kernel_name, kernels_by_kind, prepare_kernels

    check_kernel_name(kernel)
    check_seq_len(model_arg, seq_len)
    if llamacpp:
        if speed:
            raise LowbitError("--speed measures lowbit's runtime; for llama.cpp's speed run "
                              "lowbit generate FILE.gguf")
        return _eval_llamacpp(model_arg, data, windows, seq_len, base_arg, progress, dtype,
                              base_cache, note)
    if speed:
        check_seq_len(model_arg, min(seq_len, SPEED_PROMPT_TOKENS) + SPEED_NEW_TOKENS)
    path = resolve(model_arg)
    desc = read_description(path) if is_lowbit_dir(path) else {}
    check_disjoint(desc.get("calibration"), data, windows, seq_len)
    rss0 = current_rss_bytes()
    model, tok = load_model(model_arg, dtype, cache_weights=True)
    used = prepare_kernels(model, kernel)
    rss1 = current_rss_bytes()
    ev, base = _eval_windows_and_base(data, tok, windows, seq_len,
                                      model.get_input_embeddings().num_embeddings, base_arg,
                                      dtype, base_cache, note)
    res = evaluate(model, ev, base=base, batch=batch, progress=progress)
    if base is not None:
        res["base_windows_run"] = base.computed
    res |= {
        "model": str(model_arg),
        "data": data,
        "model_bytes": model_bytes(model),
        "load_rss_bytes": rss1 - rss0,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if desc:
        res |= {"method": desc.get("method"), "scheme": scheme_label(desc),
                "bpw": desc.get("bits_per_weight")}
    res["kernel"] = dict(used)
    res["kernel_by_layer"] = kernels_by_kind(model)
    if speed:
        from lowbit.runtime.decode import measure_speed

        t = measure_speed(model, ev[0, :SPEED_PROMPT_TOKENS], SPEED_NEW_TOKENS, compile=compile)
        res |= {"prefill_tokens_per_s": t.prefill_tokens_per_s, "compiled": compile,
                "decode_tokens_per_s": t.decode_tokens_per_s,
                "speed_prompt_tokens": t.prompt_tokens, "speed_new_tokens": SPEED_NEW_TOKENS,
                "threads": torch.get_num_threads(),
                "peak_rss_mb": peak_rss_bytes() / 2**20}
    return res


def kv_calibration(model, tok, progress: bool = False):
    """Windows float8 KV-cache scales are measured on: 4 self-generated windows of 256 tokens
    (the model's own text, never an evaluated one)."""
    from lowbit.calib import calib_windows

    return calib_windows("builtin", model, tok, 4, 256, progress=progress)[0]


def kv_setup(model, tok, name: str | None, progress: bool = False, calib=None):
    """(KVSpec or None, float8 scales or None) of the KV cache a model runs with: ``name``
    when given (``fp16``/``none``: the full-precision cache), else the format the model's folder
    records (``kv_cache``, chosen when it was quantized). Float8 scales: the recorded ones for
    the recorded format, else measured now on ``calib`` (default: ``kv_calibration``)."""
    from lowbit.formats.kv import parse_kv
    from lowbit.methods.kvcache import scales_from_data
    from lowbit.runtime.kvcache import calibrate_kv

    record = getattr(model, "kv_cache_record", None) or {}
    if name is None:
        name = record.get("format")
    spec = None if name is None else parse_kv(name)
    if spec is None or not spec.quantized:
        return None, None
    if spec.fp8 is None:
        return spec, None
    if record.get("format") == spec.name and record.get("scales"):
        return spec, scales_from_data(record["scales"])
    if calib is None:
        calib = kv_calibration(model, tok, progress)
    return spec, calibrate_kv(model, spec, calib)


def kv_eval_job(model_arg: str, data: str, windows: int, seq_len: int, specs: list[str],
                prefill: int | None, progress: bool = True, dtype: str = "auto",
                batch: int = 1) -> list[dict]:
    """``lowbit eval --kv``: one row per KV-cache format (``lowbit.eval.kv``); float8 scales
    come from ``kv_calibration``."""
    from lowbit.calib import check_disjoint
    from lowbit.eval.kv import kv_evaluate
    from lowbit.formats.kv import parse_kv
    from lowbit.io.native import read_description
    from lowbit.models import check_seq_len, is_lowbit_dir, load_model, resolve

    parsed = [parse_kv(s) for s in specs]  # every name checked before any work
    if windows < 1 or seq_len < 4:
        raise LowbitError(f"--windows must be at least 1 and --seq-len at least 4, not "
                          f"{windows} and {seq_len}")
    check_seq_len(model_arg, seq_len)
    path = resolve(model_arg)
    desc = read_description(path) if is_lowbit_dir(path) else {}
    check_disjoint(desc.get("calibration"), data, windows, seq_len)
    model, tok = load_model(model_arg, dtype, cache_weights=True)
    ev, _ = _eval_windows_and_base(data, tok, windows, seq_len,
                                   model.get_input_embeddings().num_embeddings, None, dtype,
                                   False, lambda _m: None)
    if not all(spec.quantized for spec in parsed):
        raise LowbitError("--kv lists quantized formats; each row is compared with the "
                          "full-precision cache already")
    recorded = (getattr(model, "kv_cache_record", None) or {}).get("format")
    calib = kv_calibration(model, tok, progress) \
        if any(s.fp8 and s.name != recorded for s in parsed) else None
    rows = []
    for spec in parsed:
        _, scales = kv_setup(model, tok, spec.name, progress, calib)
        rows.append({"model": str(model_arg), "data": data} |
                    kv_evaluate(model, ev, spec, scales, prefill, progress, batch))
    return rows


def verify_job(path: str | Path) -> dict:
    """The full check of a folder lowbit wrote: every file lowbit.json records has its size and
    sha256, every layer's stored tensors have the sizes its grid gives and the model's shapes,
    and every weight decodes to finite values."""
    from lowbit.formats.grid_base import all_finite
    from lowbit.io.native import read_description
    from lowbit.models import load_model
    from lowbit.runtime.qlinear import QuantModule

    path = Path(path)
    desc = read_description(path)
    if not desc.get("files"):
        raise LowbitError(f"{path}: lowbit.json records no checksums (an older lowbit wrote "
                          "it); nothing to verify the files against")
    model, _ = load_model(path)  # checks every file's size and sha256 before reading a tensor
    layers = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantModule):
            layers += 1
            if not all_finite(mod.dequantized_weight()):
                raise LowbitError(f"{path}: layer {name} decodes to non-finite weights")
    for name, t in model.state_dict().items():
        if not all_finite(t):
            raise LowbitError(f"{path}: tensor {name} holds non-finite values")
    return {"files": len(desc["files"]), "layers": layers}


def scheme_label(desc: dict) -> str | None:
    """A lowbit.json's scheme as one string (version 1 recorded a dict)."""
    s = desc.get("scheme")
    return s.get("name") if isinstance(s, dict) else s


def source_gguf_of(model_arg: str, note: Callable[[str], None]) -> Path | None:
    """The GGUF file a model argument comes from: the file itself, or a lowbit folder's base."""
    from lowbit.models import is_lowbit_dir, resolve

    path = resolve(model_arg)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if is_lowbit_dir(path):
        from lowbit.io.native import read_description

        base = read_description(path).get("base_model")
        if base:
            try:
                return source_gguf_of(base, note)
            except LowbitError as e:
                note(f"the base model {base} of {model_arg} is not readable ({e}); the "
                     "tokenizer is written from the folder's own tokenizer files")
    return None


def export_job(model_arg: str, out: str | Path, fmt: str = "gguf", qtype: str = "Q4_K_M",
               imatrix_path: str | None = None, overwrite: bool = False, progress: bool = True,
               tp: int = 1, dtype: str = "auto",
               note: Callable[[str], None] = lambda _m: None,
               budget: tuple[dict, int | None, float | None] | None = None) -> dict:
    """A model or quantized folder as GGUF for llama.cpp, or a lowbit folder as a serving
    checkpoint (compressed-tensors, GPTQ, AWQ). ``dtype``: the model's load dtype (GGUF), or
    the dtype of a serving checkpoint's unquantized tensors (``auto``: the dtype the model
    was quantized in when it was 16-bit, else fp16). ``budget``: (sensitivity, target bytes,
    target bits per weight): GGUF with the block Linears' types chosen to that size
    (``analyze.ggml_allocation``), and beside it llama-quantize's ``--tensor-type-file`` of the
    same choice (OUT with the suffix ``.tensor-types.txt``)."""
    from lowbit.models import parse_dtype

    parse_dtype(dtype)
    check_tp(tp)
    types = None
    if budget is not None:
        if fmt != "gguf":
            raise LowbitError("--target-bpw / --target-size with lowbit export choose GGUF types; "
                              "for a serving checkpoint use lowbit quantize --target-bpw")
        from lowbit.analyze import budget_bytes, ggml_allocation

        sens, size, bpw = budget
        types = ggml_allocation(sens, budget_bytes(sens, bpw, size))
        tfile = Path(out).with_suffix(".tensor-types.txt")
        if tfile.exists() and not overwrite:
            raise LowbitError(f"{tfile} exists (--overwrite replaces it)")
    if fmt in SERVING_FORMATS:
        return _export_serving(model_arg, Path(out), fmt, overwrite, tp, dtype)
    if fmt != "gguf":
        raise LowbitError(f"unknown export format {fmt!r}; known: gguf, "
                          f"{', '.join(SERVING_FORMATS)}")
    from lowbit.arch import language_model
    from lowbit.io.gguf.export import check_gguf_output, export_gguf, gguf_arch
    from lowbit.io.gguf.imatrix import load_imatrix
    from lowbit.io.gguf.presets import NATIVE, get_preset
    from lowbit.models import load_model

    if qtype.lower() != NATIVE:
        get_preset(qtype)  # unknown type names fail before any loading
    out = Path(out)
    check_gguf_output(out, overwrite)
    im = load_imatrix(imatrix_path) if imatrix_path else None
    source = source_gguf_of(model_arg, note)
    model, tok = load_model(model_arg, dtype)
    gguf_arch(model)
    if language_model(model) is not model:
        note("GGUF holds the language model; llama.cpp reads the vision tower and projector "
             "from a separate mmproj file (llama.cpp's convert_hf_to_gguf.py --mmproj)")
    res = export_gguf(model, tok, out, qtype, imatrix=im, source_gguf=source, progress=progress,
                      type_overrides=types)
    kv = getattr(model, "kv_cache_record", None)
    if kv:  # a runtime setting in llama.cpp: say which
        from lowbit.formats.kv import llamacpp_cache_flags

        flags, differs = llamacpp_cache_flags(kv["format"])
        res["llama_cpp_cache_flags"] = flags
        note(f"{model_arg} was quantized for a {kv['format']} KV cache; llama.cpp's nearest: "
             f"{flags}" + (f" ({differs})" if differs else ""))
    res |= {"model": str(model_arg), "imatrix_file": imatrix_path, "source_gguf": source}
    if types is not None:
        from collections import Counter

        from lowbit.analyze import tensor_type_file
        from lowbit.io.atomic import atomic_output

        with atomic_output(tfile, folder=False) as tmp:
            tmp.write_text(tensor_type_file(res["type_overrides"]))
        res["allocation"] = {"tensor_type_file": str(tfile),
                             "types": dict(Counter(types.values()).most_common())}
    return res


def _export_serving(model_arg: str, out: Path, fmt: str, overwrite: bool, tp: int,
                    dtype: str) -> dict:
    from lowbit.io.native import check_writable, read_description
    from lowbit.io.serving import quantized_weights, write_checkpoint
    from lowbit.io.serving.targets import check_target, model_heads
    from lowbit.models import is_lowbit_dir, load_model, resolve

    check_writable(out, overwrite)
    path = resolve(model_arg)
    meta = read_description(path) if is_lowbit_dir(path) else {"base_model": str(model_arg)}
    if meta.get("layers") and any(i.get("conv1d") for i in meta["layers"].values()):
        raise LowbitError(f"{fmt} export is for nn.Linear models, not GPT-2's Conv1D layers")
    model, tok = load_model(model_arg)
    weights = quantized_weights(model)
    if not weights:
        raise LowbitError(
            f"--format {fmt} exports a quantized model: give a lowbit output folder (from "
            "`lowbit quantize`) or a compressed-tensors/GPTQ/AWQ checkpoint"
        )
    from lowbit.formats.weight import GridWeight

    grids = {w.grid for w in weights.values() if isinstance(w, GridWeight)}
    notes: list[str] = []
    if len(grids) == 1:
        act = any(w.g_idx is not None for w in weights.values() if isinstance(w, GridWeight))
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        rep = check_target(shapes, next(iter(grids)), fmt, tp, act_order=act,
                           heads=model_heads(model))
        rep.raise_errors()
        notes = rep.notes
    res = write_checkpoint(out, fmt, model, tok, weights, meta, overwrite=overwrite,
                           dtype=serving_dtype(dtype, meta.get("dtype")))
    return res | {"model": str(model_arg), "notes": notes, "tp": tp}


def serving_dtype(dtype: str, recorded: str | None) -> str:
    """write_checkpoint's dtype for unquantized tensors: the one asked for, or (``auto``) the
    dtype the model was quantized in when it was bf16, else fp16 (what serving stacks run)."""
    if dtype == "auto":
        from lowbit.api import checkpoint_dtype

        return checkpoint_dtype(recorded)
    from lowbit.models import DTYPE_NAMES, parse_dtype

    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[
        DTYPE_NAMES[parse_dtype(dtype)]]


def imatrix_job(model_arg: str, out: str | Path, calibration: Calibration, chunk: int = 8,
                progress: bool = True, dtype: str = "auto", overwrite: bool = False) -> dict:
    from lowbit.io.gguf.imatrix import check_imatrix_output, collect_imatrix, save_imatrix
    from lowbit.models import check_seq_len, load_model

    out = Path(out)
    check_imatrix_output(out, overwrite)
    check_chunk(chunk)
    check_seq_len(model_arg, calibration.seq_len)
    t0 = time.perf_counter()
    model, tok = load_model(model_arg, dtype)
    windows, record = calibration.windows(model, tok, progress)
    im = collect_imatrix(model, windows, chunk=chunk, progress=progress,
                         dataset=str(record["source"]))
    save_imatrix(im, out)
    return {
        "out": str(out),
        "format": "dat" if out.suffix == ".dat" else "gguf",
        "entries": len(im.data),
        "calibration": record,
        "seconds": time.perf_counter() - t0,
    }


def inspect_job(model_arg: str, calibration: Calibration, stats_path: str | None = None,
                ratio: float = 20.0, chunk: int = 8, progress: bool = True, dtype: str = "auto"):
    """Activation statistics of every block Linear's input (collected, or read from a saved
    file) and the outlier profile. Returns (rows, stats, spec)."""
    from lowbit.arch import spec_for
    from lowbit.models import check_seq_len, load_model
    from lowbit.pipeline.driver import observe_model
    from lowbit.pipeline.stats import load_stats, outlier_profile

    if not stats_path:
        check_seq_len(model_arg, calibration.seq_len)
    model, tok = load_model(model_arg, dtype)
    spec = spec_for(model)
    if stats_path:
        stats = load_stats(Path(stats_path))
    else:
        windows, _ = calibration.windows(model, tok, progress)
        stats = observe_model(model, spec, windows, {"absmax", "mean_abs", "token_absmax"},
                              chunk=chunk, progress=progress)
    rows = outlier_profile(stats, spec.blocks, spec.groups, ratio)
    order = {n: i for i, n in enumerate(spec.linears)}  # MoE experts: after the table's
    rows.sort(key=lambda r: (r["block"], order.get(r["feeds"][0], len(order)), r["feeds"][0]))
    return rows, stats, spec


def _eval_windows_and_base(data, tok, windows, seq_len, vocab, base_arg, dtype, base_cache,
                           note):
    """The evaluation windows (checked against the model's vocabulary) and the base's
    log-probabilities over them (cached on disk), or None without a base."""
    from lowbit.calib import eval_windows
    from lowbit.eval.base_cache import base_logprobs, model_fingerprint
    from lowbit.models import cache_dir, load_model, parse_dtype, resolve

    ev = eval_windows(data, tok, windows, seq_len)
    if int(ev.max()) >= vocab:
        raise LowbitError(f"the tokenizer produces ids beyond the model's vocabulary ({vocab})")
    if not base_arg:
        return ev, None
    key = f"{model_fingerprint(resolve(base_arg))}\ndtype={parse_dtype(dtype)}"
    return ev, base_logprobs(lambda: load_model(base_arg, dtype)[0], ev, vocab,
                             key if base_cache else None, cache_dir(), note)


def _eval_llamacpp(model_arg, data, windows, seq_len, base_arg, progress, dtype, base_cache,
                   note) -> dict:
    from transformers import AutoTokenizer

    from lowbit.eval.llamacpp import llamacpp_logits, load_llama
    from lowbit.eval.metrics import evaluate_logits, peak_rss_bytes
    from lowbit.models import BUILTIN_MODELS, builtin_path, resolve

    path = builtin_path(model_arg) if str(model_arg) in BUILTIN_MODELS else resolve(model_arg)
    if not (path.is_file() and path.suffix == ".gguf"):
        raise LowbitError(f"--llamacpp evaluates a .gguf file, not {model_arg}")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    llm = load_llama(path, n_ctx=seq_len)
    ev, base = _eval_windows_and_base(data, tok, windows, seq_len, llm.n_vocab(), base_arg,
                                      dtype, base_cache, note)
    res = evaluate_logits(llamacpp_logits(llm), ev, base, progress=progress)
    if base is not None:
        res["base_windows_run"] = base.computed
    return res | {"model": str(model_arg), "data": data, "kernel": {"llama.cpp": 1},
                  "peak_rss_bytes": peak_rss_bytes()}


def analyze_job(model_arg: str, schemes: list[str], calibration: Calibration, chunk: int = 8,
                progress: bool = True, dtype: str = "auto", method: str = "rtn",
                hessian: Calibration | None = None) -> dict:
    """Each block Linear's measured sensitivity at each scheme (``lowbit.analyze.measure``),
    with the model and calibration it was measured on. ``method``: the rounder the candidates
    are rounded with; ``hessian``: the windows whose input statistics it rounds with (default:
    the calibration windows, on which the KL is measured)."""
    from lowbit.analyze import measure
    from lowbit.models import check_seq_len, load_model

    check_seq_len(model_arg, calibration.seq_len)
    if hessian is not None:
        check_seq_len(model_arg, hessian.seq_len)
    model, tok = load_model(model_arg, dtype)
    windows, record = calibration.windows(model, tok, progress)
    calib, hrecord = (None, None) if hessian is None else hessian.windows(model, tok, progress)
    sens = measure(model, windows, schemes, chunk=chunk, progress=progress, method=method,
                   calib=calib)
    return sens | {"base_model": str(model_arg), "dtype": dtype, "calibration": record} | (
        {} if hrecord is None else {"hessian_calibration": hrecord})


def generate_job(model_arg: str, prompt: str, max_new_tokens: int = 64, *,
                 temperature: float = 0.0, seed: int = 0, kernel: str = "auto",
                 compile: bool = False, dtype: str = "auto", chat: bool = False,
                 threads: int | None = None,
                 on_text: Callable[[str], None] | None = None, kv: str | None = None) -> dict:
    """Continue ``prompt`` (through the tokenizer's chat template with ``chat``), streaming the
    new text to ``on_text``; a GGUF file runs in llama.cpp (llama-cpp-python). ``kv``: a
    quantized KV-cache format (``lowbit.formats.kv``)."""
    session = TextGenerator(model_arg, kernel=kernel, compile=compile, dtype=dtype,
                            threads=threads, kv=kv)
    return session.run(prompt, max_new_tokens, temperature=temperature, seed=seed, chat=chat,
                       on_text=on_text)


class TextGenerator:
    """A model loaded once for generation (``lowbit chat`` runs many prompts through one)."""

    def __init__(self, model_arg: str, *, kernel: str = "auto", compile: bool = False,
                 dtype: str = "auto", threads: int | None = None, kv: str | None = None) -> None:
        import torch

        from lowbit.formats.kv import parse_kv
        from lowbit.models import BUILTIN_MODELS, load_model, resolve
        from lowbit.runtime.kernels import check_kernel_name, prepare_kernels

        check_kernel_name(kernel)
        self.kv = None if kv is None else parse_kv(kv)
        if self.kv is not None and not self.kv.quantized:
            self.kv = None  # fp16 / none: the ordinary cache
        if self.kv is not None and compile:
            raise LowbitError("--kv runs the model's own forward pass with lowbit's quantized "
                              "cache; --compile compiles the static-cache step, not that")
        if threads is not None:
            if threads < 1:
                raise LowbitError(f"--threads must be at least 1, not {threads}")
            torch.set_num_threads(threads)
        self.model_arg, self.compile, self.threads = model_arg, compile, threads
        path = resolve(model_arg)
        named_file = str(model_arg) not in BUILTIN_MODELS  # built-in: converted, as lowbit's
        self.gguf = path if named_file and path.is_file() and path.suffix == ".gguf" else None
        if self.gguf is not None:
            from lowbit.eval.llamacpp import load_llama

            if self.kv is not None:
                raise LowbitError("--kv quantizes lowbit's cache; for a GGUF file use "
                                  "llama.cpp's --cache-type-k / --cache-type-v")
            self.llm = load_llama(self.gguf, n_ctx=2048, n_threads=threads)
            self.used = {"llama.cpp": 1}
            return
        # layers without a kernel of their own (FP8, MX 6/8-bit) keep their decoded weight;
        # the others drop it (QLinear.use_kernel)
        self.model, self.tok = load_model(model_arg, dtype, cache_weights=True)
        self.used = dict(prepare_kernels(self.model, kernel))
        self.kv, self.kv_scales = kv_setup(self.model, self.tok, kv)
        if self.kv is not None and compile:
            raise LowbitError(f"{model_arg} runs with a {self.kv.name} KV cache (recorded when "
                              "it was quantized); --compile compiles the static-cache step: "
                              "add --kv fp16 to compile with the full-precision cache")
        from lowbit.runtime.decode import generate

        # one token through the model: kernels built, weights decoded - part of loading, not of
        # the first prompt's prefill time
        for _ in generate(self.model, torch.zeros(1, 1, dtype=torch.long), 1):
            pass

    def run(self, prompt: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
            seed: int = 0, chat: bool = False, history: list[dict] | None = None,
            on_text: Callable[[str], None] | None = None) -> dict:
        """``history``: the earlier turns of a chat (role/content messages), extended with
        this turn."""
        import torch

        from lowbit.runtime.decode import Timing, generate

        if max_new_tokens < 1:
            raise LowbitError(f"--max-new-tokens must be at least 1, not {max_new_tokens}")
        emit = on_text or (lambda _t: None)
        if self.gguf is not None:
            return self._run_llamacpp(prompt, max_new_tokens, temperature, seed, chat, emit,
                                      history)
        ids = _prompt_ids(self.tok, prompt, chat, history)
        stop = {t for t in [self.tok.eos_token_id, *_extra_stops(self.tok)] if t is not None}
        timing, new = Timing(), []
        text = Detokenizer(self.tok)
        cache = None
        if self.kv is not None:
            from lowbit.runtime.kvcache import QuantKVCache

            cache = QuantKVCache(self.model, self.kv, scales=self.kv_scales)
        for t in generate(self.model, ids, max_new_tokens, temperature=temperature, seed=seed,
                          stop=stop, compile=self.compile, timing=timing, cache=cache):
            new.append(t)
            emit(text.add(t))
        emit(text.flush())
        reply = self.tok.decode(new, skip_special_tokens=True)
        if history is not None:
            history += [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": reply}]
        out = {"model": str(self.model_arg), "prompt_tokens": timing.prompt_tokens,
               "new_tokens": len(new),
               "text": reply,
               "prefill_tokens_per_s": timing.prefill_tokens_per_s,
               "decode_tokens_per_s": timing.decode_tokens_per_s,
               "kernel": self.used, "threads": torch.get_num_threads()}
        if cache is not None:
            out |= {"kv": self.kv.name, "kv_bytes": cache.nbytes()}  # type: ignore[union-attr]
        return out

    def _run_llamacpp(self, prompt, max_new_tokens, temperature, seed, chat, emit,
                      history) -> dict:
        llm = self.llm
        messages = [*(history or []), {"role": "user", "content": prompt}]
        if chat:
            stream = llm.create_chat_completion(messages,
                                                max_tokens=max_new_tokens,
                                                temperature=temperature, seed=seed,
                                                stream=True)
            pieces = (c["choices"][0]["delta"].get("content", "") for c in stream)
        else:
            stream = llm.create_completion(prompt, max_tokens=max_new_tokens,
                                           temperature=temperature, seed=seed, stream=True)
            pieces = (c["choices"][0]["text"] for c in stream)
        text = []
        t0 = time.perf_counter()
        for p in pieces:
            text.append(p)
            emit(p)
        if history is not None:
            history += [messages[-1], {"role": "assistant", "content": "".join(text)}]
        return {"model": str(self.model_arg), "text": "".join(text), "kernel": self.used,
                "seconds": time.perf_counter() - t0, "threads": self.threads}


def _prompt_ids(tok, prompt: str, chat: bool, history: list[dict] | None = None):
    import torch

    if not chat:
        return tok(prompt, return_tensors="pt").input_ids
    if not getattr(tok, "chat_template", None):
        raise LowbitError("this model's tokenizer has no chat template")
    ids = tok.apply_chat_template([*(history or []), {"role": "user", "content": prompt}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    return torch.as_tensor(ids).reshape(1, -1)


def _extra_stops(tok) -> list[int]:
    """The chat templates' end-of-turn tokens, where the vocabulary has them."""
    vocab = tok.get_vocab()
    return [vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
            if t in vocab]


class Detokenizer:
    """Text of a growing token list, handed out as it becomes final (a piece of a multi-byte
    character is held back until the character is whole)."""

    def __init__(self, tok) -> None:
        self.tok, self.ids, self.sent = tok, [], 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        out, self.sent = text[self.sent:], len(text)
        return out

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        out, self.sent = text[self.sent:], len(text)
        return out
