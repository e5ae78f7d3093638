"""``lowbit quantize``: a recipe (or its ``--method/--scheme`` shorthand) on a model, saved."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from lowbit.cli.common import calibration, calibration_options, dtype_option, dump_json, echo, note
from lowbit.errors import LowbitError

# flags that configure a method's step: CLI option name -> step option
STEP_FLAGS = {"act_order": "act_order", "static_groups": "static_groups", "damp": "damp",
              "iters": "iters", "tokens": "tokens",
              "alpha": "alpha", "threshold": "threshold", "int8_kernel": "kernel"}


class TokenCount(click.ParamType):
    """A token count: a whole number, or one with a K or M suffix (``2M`` = 2,000,000)."""

    name = "tokens"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper()
        mult = {"K": 1000, "M": 1000_000}.get(text[-1:], 1)
        try:
            n = float(text[:-1] if mult > 1 else text) * mult
        except ValueError:
            n = -1
        if n < 1 or n != int(n):
            self.fail(f"{value!r} is not a token count (e.g. 262144, 500K, 2M)", param, ctx)
        return int(n)


def build_recipe(recipe_path, method, scheme, flags: dict, rotate: int | None = None,
                 online: bool = False, incoherent: bool = False, fused: bool = True,
                 kv: str | None = None, prune: str | None = None,
                 sparsity: str | None = None, structured: float | None = None,
                 owl: bool = False):
    """The recipe of the command line: a file, or the shorthand with the flags given
    (``rotate``: the seed of a rotate step put first, None for none; ``fused``: R1 and R2 in
    it, ``online``: R4, ``incoherent``: incoherence processing; ``kv``: a KV-cache format, a
    ``kv`` step last; ``prune``/``sparsity``: a prune step before the rounder, alone with
    method ``none``; ``structured``: a prune-structured step first)."""
    from lowbit.formats.kv import parse_kv
    from lowbit.recipe import load_recipe, pruned, rotated, shorthand, shrunk, with_kv


    given = {STEP_FLAGS[k]: v for k, v in flags.items() if v is not None}
    if recipe_path:
        extra = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        extra += [o for o, v in (("--method", method), ("--scheme", scheme)) if v is not None]
        extra += ["--rotate/--incoherence"] if rotate is not None else []
        extra += ["--kv"] if kv is not None else []
        extra += ["--prune/--sparsity/--owl"] if prune is not None or sparsity is not None \
            or owl else []
        extra += ["--prune-structured"] if structured is not None else []
        if extra:
            raise LowbitError(f"--recipe gives the steps; drop {', '.join(extra)} (or edit the "
                              "recipe)")
        return load_recipe(recipe_path)
    if (sparsity is not None or owl) and prune is None:
        raise LowbitError(f"{'--sparsity' if sparsity is not None else '--owl'} goes with "
                          "--prune magnitude|wanda|sparsegpt")
    if method == "none":
        if prune is None and structured is None:
            raise LowbitError("--method none quantizes nothing: give --prune or "
                              "--prune-structured (the weights stay in full precision)")
        extra = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        extra += ["--scheme"] if scheme is not None else []
        if extra:
            raise LowbitError(f"--method none rounds nothing; drop {', '.join(extra)}")
        recipe = None
    else:
        recipe = shorthand(method, scheme, **given)
    if prune is not None:
        recipe = pruned(recipe, prune, sparsity or "0.5", owl)
    if structured is not None:
        recipe = shrunk(recipe, structured)
    recipe = recipe if rotate is None else rotated(recipe, rotate, online, incoherent, fused)
    if kv is not None and online:  # R3: an integer cache stores keys and values rotated
        spec = parse_kv(kv)
        kv = f"{spec.name}-h" if spec.quantized and spec.fp8 is None and not spec.rotate else kv
    return recipe if kv is None else with_kv(recipe, kv)


@click.command("quantize")
@click.argument("model", required=False)
@click.option("--recipe", "recipe_path", type=click.Path(),
              help="a recipe file (YAML or JSON); a lowbit.json re-runs the recipe it records")
@click.option("--method", default=None,
              help="shorthand for a recipe: rtn, gptq, hqq, autoround, qat, awq, awq+gptq, "
                   "smoothquant, smoothquant+gptq, w8a8, llm-int8; none: only --prune "
                   "[default: gptq]")
@click.option("--scheme", default=None,
              help="w4g64, w4g64-asym, w3g64-mse, w8, nf4, mxfp4, nvfp4 ... (README lists them); "
                   "w8a8 and smoothquant: w8a8, w8a8-static, w7a8, w8a8-fp8 ... "
                   "[default: w4g64, w8a8 for the 8-bit methods]")
@calibration_options()
@click.option("--act-order/--no-act-order", default=None,
              help="gptq: round columns by decreasing Hessian diagonal [default: on for "
                   "integer schemes]")
@click.option("--static-groups/--no-static-groups", default=None,
              help="gptq with act-order: groups keep their columns, no g_idx, every format "
                   "holds it [default: on; off keeps a g_idx, --format gptq only]")
@click.option("--damp", type=float, default=None,
              help="gptq: damping, fraction of the mean Hessian diagonal [default: 0.01]")
@click.option("--iters", type=int, default=None,
              help="autoround: optimisation steps per block [default: 200]")
@click.option("--tokens", type=TokenCount(), default=None,
              help="qat: distillation tokens, e.g. 262144, 500K, 2M [default: 256K]")
@click.option("--alpha", type=float, default=None,
              help="smoothquant: migration strength [default: 0.5]")
@click.option("--threshold", type=float, default=None,
              help="llm-int8: |x| above which an input column stays in full precision "
                   "[default: 6.0]")
@click.option("--int8-kernel", default=None,
              help="w8a8, smoothquant, llm-int8: auto, onednn, int_mm or emulate [default: auto]")
@click.option("--prune", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), default=None,
              help="drop weights before rounding: magnitude, wanda (|w| x input norm, per "
                   "row) or sparsegpt (OBS update; with gptq in the same sweep)")
@click.option("--sparsity", default=None,
              help="with --prune: the fraction dropped (0.5) or N:M kept (2:4, 4:8) "
                   "[default: 0.5]")
@click.option("--owl", is_flag=True,
              help="with --prune and a fraction: OWL's ratio per block (blocks with more "
                   "outlier weights pruned less, the mean kept)")
@click.option("--prune-structured", "structured", type=float, default=None,
              help="remove this share of the model's parameters as whole MLP channels (the "
                   "same number per block; the output Linear refitted on the calibration "
                   "inputs): a smaller dense model, e.g. 0.25")
@click.option("--rotate", is_flag=True,
              help="rotate the model first (Hadamard R1 on the residual stream, R2 per "
                   "attention head, fused into the weights: the same function, fewer outliers)")
@click.option("--rotate-online", is_flag=True,
              help="with --rotate: also a Hadamard before each MLP down projection, applied "
                   "to its input at run time (R4; native folders only); with an integer --kv "
                   "format, R3 too: the cache stores keys and values rotated per head (-h)")
@click.option("--incoherence", is_flag=True,
              help="QuIP#-style: every block Linear's weight rotated on both sides, its input "
                   "and output rotated at run time (with or without --rotate; native folders "
                   "only)")
@click.option("--rotate-seed", type=int, default=0, show_default=True,
              help="seed of the rotations' random signs (recorded in lowbit.json)")
@click.option("--kv", default=None,
              help="the KV-cache format the model runs with, recorded in the output: fp8 "
                   "(scales measured on the calibration windows; compressed-tensors writes "
                   "kv_cache_scheme for vLLM), fp8-head, int8, kivi-k4v4-r128 ... (README)")
@click.option("--target-bpw", type=float, default=None,
              help="mixed precision: a scheme per block Linear (from --candidates) with the "
                   "least measured KL whose stored bytes (scales included) average at most "
                   "this many bits per weight; the rest of the recipe as given")
@click.option("--target-size", default=None,
              help="as --target-bpw, for a size of the block Linears' stored tensors: 60MB, "
                   "57MiB, 1.5GB or bytes")
@click.option("--sensitivity", "sensitivity_path", type=click.Path(),
              help="with --target-*: the measurements of lowbit analyze --json [default: "
                   "measured now, on 4 windows of 128 tokens of the calibration text]")
@click.option("--candidates", default=None,
              help="with --target-* and no --sensitivity: the schemes to choose from "
                   "[default: w2g64,w3g64,w4g64,w8]")
@click.option("--eval", "eval_windows", type=int, default=0, show_default=True,
              help="also evaluate the result on this many windows of --eval-data (perplexity, "
                   "KL and top-1 against the model before quantizing); recorded in lowbit.json "
                   "and the model card")
@click.option("--eval-data", default="builtin", show_default=True,
              help="evaluation text for --eval: builtin, pydoc, or a .txt/.jsonl file")
@click.option("--chunk", default=8, show_default=True, help="windows per forward pass")
@click.option("--out", required=True, type=click.Path(), help="output folder")
@click.option("--format", "fmt", default="auto", show_default=True,
              help="auto: compressed-tensors (loads in transformers, vLLM, SGLang) when it holds "
                   "the recipe, else native (lowbit's own folder; says why); or native, "
                   "compressed-tensors, gptq, awq")
@click.option("--tp", default=1, show_default=True,
              help="with --format: tensor-parallel degree the checkpoint must split into")
@click.option("--overwrite", is_flag=True, help="replace an existing output folder")
@click.option("--resume/--no-resume", default=None,
              help="finished blocks are kept in OUT.lowbit-resume until the output is saved; "
                   "a run started again after a crash goes on from there when it is the same "
                   "run (model files, recipe, calibration, dtype, versions) [default: resume "
                   "when it is]; --resume fails unless it can, --no-resume starts over")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="calibrate in this many processes, each on a share of the windows "
                   "(torch.distributed, gloo); the same as torchrun --nproc-per-node N -m "
                   "lowbit quantize ...")
@click.option("--json", "json_path", type=click.Path(),
              help="write the results as JSON (- for standard output)")
@click.option("--quiet", is_flag=True, help="no progress bars")
@dtype_option("dtype to load and quantize the model in (statistics are fp32): auto = the "
              "checkpoint's own (config.json; GGUF files load in fp32)")
def command(model, recipe_path, method, scheme, calib, calib_samples, calib_offset, seq_len,
            act_order, static_groups, damp, iters, tokens, alpha, threshold, int8_kernel, prune,
            sparsity, owl, structured, rotate,
            rotate_online, incoherence, rotate_seed, kv, target_bpw,
            target_size, sensitivity_path, candidates, eval_windows,
            eval_data, chunk, out, fmt, tp, overwrite, resume, nproc, json_path, quiet, dtype):
    """Quantize MODEL (default: the built-in smollm2-135m, or the base model of a --recipe
    lowbit.json) and save it to --out."""
    from lowbit.cli.common import check_outputs
    from lowbit.eval.metrics import peak_rss_bytes
    from lowbit.jobs import quantize_job

    check_outputs(json_path=json_path)
    if nproc != 1:
        from lowbit.cli.launch import launch

        return launch(nproc)  # this command line again, in nproc processes
    flags = {"act_order": act_order, "static_groups": static_groups, "damp": damp,
             "iters": iters, "tokens": tokens, "alpha": alpha, "threshold": threshold,
             "int8_kernel": int8_kernel}
    if rotate_online and not rotate:
        raise LowbitError("--rotate-online adds to the fused rotations: give --rotate too")
    recipe = build_recipe(recipe_path, method, scheme, flags,
                          rotate_seed if rotate or incoherence else None, rotate_online,
                          incoherence, rotate, kv, prune, sparsity, structured, owl)
    base = _recorded_base(recipe_path)
    model = model or base or "smollm2-135m"
    calib_req = calibration(calib, calib_samples, calib_offset, seq_len, recipe.calibration)
    budget = None
    if target_bpw is not None or target_size is not None or sensitivity_path or candidates:
        recipe, budget = _allocate(model, recipe, calib_req, target_bpw, target_size,
                                   sensitivity_path, candidates, quiet, dtype)
    _, _, res, meta = quantize_job(model, recipe, out, calib_req, fmt=fmt, tp=tp,
                                   overwrite=overwrite, chunk=chunk, progress=not quiet,
                                   note=note, dtype=dtype, eval_windows=eval_windows,
                                   eval_data=eval_data,
                                   resume={None: "auto", True: "require", False: "never"}[resume])
    from lowbit.pipeline.dist import world

    if world()[0]:
        return  # rank 0 reports
    # a pruned layer's loss counts its pruning too: RTN of the dense weight is no yardstick
    losses = [r for r in res.rows if "loss" in r and "rtn_loss" in r and "pruner" not in r]
    schemes = Counter(w.grid.name for w in res.weights.modules().values()
                      if hasattr(w, "grid"))
    summary = meta | {
        "out": str(out),
        "peak_rss_bytes": peak_rss_bytes(),
        "storage_bytes": res.storage_bytes(),
        "layers": len(res.weights),
        "schemes": dict(schemes),
    }
    if losses:
        summary["layers_below_rtn"] = sum(r["loss"] <= r["rtn_loss"] for r in losses)
    if budget is not None:
        summary["budget"] = budget
        if res.storage_bytes() > budget["target_bytes"]:
            note(f"the quantized layers hold {res.storage_bytes():,} bytes, above the budget of "
                 f"{budget['target_bytes']:,} (the method stores more than RTN: act-order's "
                 "g_idx?)")
    mix = ", ".join(f"{n} {s}" for s, n in schemes.most_common()) or recipe.scheme
    pruned = [r for r in res.rows if "pruner" in r]
    if pruned:
        numel = [r["shape"][0] * r["shape"][1] for r in pruned]
        share = sum(r["pruned"] * n for r, n in zip(pruned, numel, strict=True)) / sum(numel)
        summary["pruned_layers"], summary["pruned"] = len(pruned), share
    shrink = next((r for r in res.rows if r.get("step") == "prune-structured"
                   and "parameters_after" in r), None)
    if shrink:
        summary["parameters"], summary["parameters_after"] = (shrink["parameters"],
                                                              shrink["parameters_after"])
        echo(f"MLP channels: {shrink['channels_kept']} of {shrink['channels']} kept per block; "
             f"parameters {shrink['parameters']:,} -> {shrink['parameters_after']:,} "
             f"({shrink['removed']:.1%} fewer)", json_path)
    if not res.weights:
        what = f"{len(pruned)} layers pruned ({share:.1%} of their weights zero, the rest in " \
            "full precision)" if pruned else "in full precision"
        echo(f"wrote {out} ({meta['output_format']}): {recipe.name}, {what}, "
             f"{meta['seconds']:.0f} s", json_path)
    else:
        echo(f"wrote {out} ({meta['output_format']}): {recipe.name}, {len(res.weights)} layers "
             f"({mix}), {res.bits_per_weight():.3f} bits/weight"
             + (f", {share:.1%} of the weights pruned" if pruned else "")
             + f", {meta['seconds']:.0f} s", json_path)
    if losses:
        echo(f"layer loss below RTN's in {summary['layers_below_rtn']}/{len(losses)} layers",
             json_path)
    if "kv_cache" in meta:
        kv = meta["kv_cache"]
        echo(f"KV cache: {kv['format']}" + (f", float8 scales of {len(kv['scales'])} layers "
             "measured on the quantized model" if "scales" in kv else ""), json_path)
    if "eval" in meta:
        e = meta["eval"]
        echo(f"eval on {e['windows']}x{e['seq_len']} tokens of {e['data']}: ppl {e['ppl']:.3f}, "
             f"KL {e['kl_mean']:.4f}, top-1 {e['top1']:.3f}", json_path)
    dump_json(json_path, summary)


def parse_size(text: str) -> int:
    """Bytes from 60MB, 57MiB, 1.5GB, 2e6 or a plain number."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([kKMGT]i?B|B)?\s*", str(text))
    if not m:
        raise LowbitError(f"--target-size: {text!r} is not a size (60MB, 57MiB, 1.5GB, bytes)")
    unit = m.group(2) or "B"
    power = " kMGT".index(unit[0].replace("K", "k")) if unit != "B" else 0
    base = 1024 if "i" in unit else 1000
    return int(float(m.group(1)) * base ** power)


def _allocate(model, recipe, calib_req, target_bpw, target_size, sensitivity_path,
              candidates, quiet, dtype):
    """The recipe with a scheme per block Linear for the budget, and what the choice costs."""

    from lowbit.analyze import budget_bytes, budget_recipe, choose, read_sensitivity, summary
    from lowbit.cli.analyze import DEFAULT_SCHEMES
    from lowbit.jobs import Calibration, analyze_job

    if (target_bpw is None) == (target_size is None):
        raise LowbitError("give one of --target-bpw and --target-size (--sensitivity and "
                          "--candidates only go with them)")
    if any(s.step == "rotate" for s in recipe.steps):
        raise LowbitError("a size budget measures each layer's sensitivity on the model as "
                          "loaded, and a rotation changes every weight first: --rotate with "
                          "--target-bpw/--target-size is not supported yet")
    if sensitivity_path and candidates:
        raise LowbitError("--candidates are measured now; a --sensitivity file has its own")
    size = None if target_size is None else parse_size(target_size)
    budget_recipe(recipe, {})  # a recipe the choice cannot go into fails now
    if sensitivity_path:
        sens = read_sensitivity(sensitivity_path)
        if sens.get("base_model") not in (None, str(model)):
            note(f"{sensitivity_path} was measured on {sens['base_model']}, not {model}")
    else:
        names = [s.strip() for s in (candidates or DEFAULT_SCHEMES).split(",") if s.strip()]
        cal = Calibration(calib_req.source, 4, 128, calib_req.offset)
        # each candidate rounded as the recipe will round it: GPTQ recovers a different share
        # of each layer's error than RTN (BENCHMARKS.md: 38.7 against 43.3 at 3.5 bits)
        rounder = next(st for st in recipe.steps if st.kind == "rounder")
        method = "gptq" if rounder.step == "gptq" else "rtn"
        note(f"measuring each layer at {', '.join(names)} rounded by {method} on 4 x 128 tokens"
             + (f" (Hessians from the {calib_req.samples} calibration windows)"
                if method != "rtn" else "") + " (lowbit analyze; --sensitivity reuses a "
             "measurement)")
        sens = analyze_job(model, names, cal, progress=not quiet, dtype=dtype, method=method,
                           hessian=calib_req if method != "rtn" else None)
    target = budget_bytes(sens, target_bpw, size)
    choice = choose(sens, target)
    info = summary(sens, choice) | {"target_bytes": target, "target_bpw": target_bpw,
                                    "measured_with": sens.get("method", "rtn")}
    note(f"chose {', '.join(f'{n} x {s}' for s, n in info['schemes'].items())}: "
         f"{info['bits_per_weight']:.3f} bits/weight, predicted KL {info['predicted_kl']:.4f}")
    return budget_recipe(recipe, choice), info


def _recorded_base(recipe_path) -> str | None:
    """The base model a lowbit.json recipe was run on (re-running it needs no MODEL)."""
    if not recipe_path or Path(recipe_path).suffix != ".json":
        return None
    import json

    try:
        d = json.loads(Path(recipe_path).read_text())
    except (OSError, ValueError):
        return None
    return d.get("base_model") if isinstance(d, dict) else None
