"""``lowbit quantize``: a recipe (or its ``--method/--scheme`` shorthand) on a model, saved."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from lowbit.cli.common import calibration, calibration_options, dtype_option, dump_json, echo, note
from lowbit.errors import LowbitError

# flags that configure a method's step: CLI option name -> step option
STEP_FLAGS = {"act_order": "act_order", "static_groups": "static_groups", "damp": "damp",
              "alpha": "alpha", "threshold": "threshold", "int8_kernel": "kernel"}


def build_recipe(recipe_path, method, scheme, flags: dict):
    """The recipe of the command line: a file, or the shorthand with the flags given."""
    from lowbit.recipe import load_recipe, shorthand

    given = {STEP_FLAGS[k]: v for k, v in flags.items() if v is not None}
    if recipe_path:
        extra = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        extra += [o for o, v in (("--method", method), ("--scheme", scheme)) if v is not None]
        if extra:
            raise LowbitError(f"--recipe gives the steps; drop {', '.join(extra)} (or edit the "
                              "recipe)")
        return load_recipe(recipe_path)
    return shorthand(method, scheme, **given)


@click.command("quantize")
@click.argument("model", required=False)
@click.option("--recipe", "recipe_path", type=click.Path(),
              help="a recipe file (YAML or JSON); a lowbit.json re-runs the recipe it records")
@click.option("--method", default=None,
              help="shorthand for a recipe: rtn, gptq, hqq, awq, awq+gptq, smoothquant, w8a8, "
                   "llm-int8 [default: gptq]")
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
@click.option("--alpha", type=float, default=None,
              help="smoothquant: migration strength [default: 0.5]")
@click.option("--threshold", type=float, default=None,
              help="llm-int8: |x| above which an input column stays in full precision "
                   "[default: 6.0]")
@click.option("--int8-kernel", default=None,
              help="w8a8, smoothquant, llm-int8: auto, onednn, int_mm or emulate [default: auto]")
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
            act_order, static_groups, damp, alpha, threshold, int8_kernel, eval_windows,
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
             "alpha": alpha, "threshold": threshold, "int8_kernel": int8_kernel}
    recipe = build_recipe(recipe_path, method, scheme, flags)
    base = _recorded_base(recipe_path)
    model = model or base or "smollm2-135m"
    calib_req = calibration(calib, calib_samples, calib_offset, seq_len, recipe.calibration)
    _, _, res, meta = quantize_job(model, recipe, out, calib_req, fmt=fmt, tp=tp,
                                   overwrite=overwrite, chunk=chunk, progress=not quiet,
                                   note=note, dtype=dtype, eval_windows=eval_windows,
                                   eval_data=eval_data,
                                   resume={None: "auto", True: "require", False: "never"}[resume])
    from lowbit.pipeline.dist import world

    if world()[0]:
        return  # rank 0 reports
    losses = [r for r in res.rows if "loss" in r and "rtn_loss" in r]
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
    mix = ", ".join(f"{n} {s}" for s, n in schemes.most_common()) or recipe.scheme
    echo(f"wrote {out} ({meta['output_format']}): {recipe.name}, {len(res.weights)} layers "
         f"({mix}), "
         f"{res.bits_per_weight():.3f} bits/weight, {meta['seconds']:.0f} s", json_path)
    if losses:
        echo(f"layer loss below RTN's in {summary['layers_below_rtn']}/{len(losses)} layers",
             json_path)
    if "eval" in meta:
        e = meta["eval"]
        echo(f"eval on {e['windows']}x{e['seq_len']} tokens of {e['data']}: ppl {e['ppl']:.3f}, "
             f"KL {e['kl_mean']:.4f}, top-1 {e['top1']:.3f}", json_path)
    dump_json(json_path, summary)


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
