"""The Python API: quantize any loaded transformers model with a recipe, and save the result.

    from lowbit import quantize, GPTQ, AWQ
    result = quantize(model, [AWQ(), GPTQ(scheme="w4g64",
                                          overrides={"re:.*layers\\.0\\..*down_proj": "w8"})],
                      calib)                       # calib: (n, seq_len) token ids, or None
    save("out/q", model, tokenizer, result)        # lowbit's native folder
    save("out/ct", model, tokenizer, result, fmt="compressed-tensors")

``quantize`` works in place: every quantized Linear becomes a runtime module (rounded ones a
``QLinear`` holding packed codes, swapped in as each block ends, which frees the float weights
as it goes), so the model evaluates as the quantized model; ``result.weights`` reads each layer
as its ``GridWeight`` (or runtime module) and is what is saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from lowbit.errors import LowbitError
from lowbit.pipeline.checkpoint import RunCheckpoint
from lowbit.pipeline.plan import Plan, Result, execute, make_plan
from lowbit.recipe import Recipe, load_recipe, recipe_from_data


def as_recipe(recipe: Any) -> Recipe:
    """A Recipe from a Recipe, a step, a list of steps (objects or data), a mapping, or the
    path of a YAML / JSON recipe file."""
    if isinstance(recipe, str | Path):
        return load_recipe(recipe)
    if hasattr(recipe, "step") and hasattr(recipe, "kind"):
        recipe = [recipe]
    return recipe_from_data(recipe)


def plan(model: nn.Module, recipe: Any) -> Plan:
    """Check family, step order, targets and every layer's shape against its grid, in seconds,
    before any long run."""
    return make_plan(model, list(as_recipe(recipe).steps))


def quantize(
    model: nn.Module,
    recipe: Any,
    calib: Tensor | None = None,
    *,
    chunk: int = 8,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
    checkpoint: str | Path | RunCheckpoint | None = None,
    resume: str = "auto",
) -> Result:
    """Quantize ``model`` in place with ``recipe``; ``calib`` are calibration windows ((n,
    seq_len) token ids), needed when a step or a grid asks for statistics. ``result.recipe`` is
    the recipe that ran.

    ``checkpoint``: a folder that receives every finished block; a run interrupted (killed,
    out of memory) and started again with the same folder, model, recipe and windows goes on
    from its first unfinished block and gives the same result bit for bit. ``resume``:
    ``auto`` (resume when the folder holds this run), ``require`` or ``never``. Given as a
    path, the folder is removed when the run completes; a ``RunCheckpoint`` is left to its
    owner (``lowbit.jobs.quantize_job`` removes it once the output is saved)."""
    r = as_recipe(recipe)
    p = make_plan(model, list(r.steps))
    ck = checkpoint
    if ck is not None and not isinstance(ck, RunCheckpoint):
        ck = RunCheckpoint(ck, mode=resume)
    res = execute(model, p, calib, chunk=chunk, progress=progress, on_row=on_row,
                  checkpoint=ck)
    if ck is not None and ck is not checkpoint:
        ck.clear()
    res.recipe = r
    return res


def describe(result: Result, recipe: Recipe, **meta: Any) -> dict:
    """What lowbit.json records about a run besides its layers."""
    return {
        "method": recipe.name,
        "scheme": recipe.scheme,
        "recipe": recipe.to_dict(),
        "bits_per_weight": result.bits_per_weight(),
        "quantize_seconds": result.seconds,
        **({"kv_cache": result.kv_cache} if result.kv_cache else {}),
        **meta,
    }


def checkpoint_dtype(dtype) -> str:
    """The dtype a serving checkpoint stores unquantized tensors in, for a model quantized in
    ``dtype`` (a torch dtype or its name): bfloat16 for bf16, else float16 (what serving stacks
    run)."""
    return "bfloat16" if str(dtype).removeprefix("torch.") in ("bf16", "bfloat16") else "float16"


def save(
    out: str | Path,
    model: nn.Module,
    tokenizer,
    result: Result,
    meta: dict | None = None,
    fmt: str = "native",
    overwrite: bool = False,
) -> Path:
    """Write the quantized model: ``native`` (lowbit's folder, any recipe) or a serving format
    (``compressed-tensors``, ``gptq``, ``awq``). ``layers.jsonl`` (one row per layer) and, when
    a step kept activation statistics, ``act_stats.safetensors`` go in the same atomic write."""
    from lowbit.arch import spec_for

    recipe = result.recipe
    meta = dict(meta or {})
    if recipe is not None and "recipe" not in meta:
        meta = describe(result, recipe) | meta
    rows = "".join(json.dumps(r, default=str) + "\n" for r in result.rows).encode()
    extra = {"layers.jsonl": rows}
    if result.stats:
        import tempfile

        from lowbit.pipeline.stats import save_stats

        with tempfile.TemporaryDirectory() as d:
            save_stats(Path(d) / "s.safetensors", result.stats)
            extra["act_stats.safetensors"] = (Path(d) / "s.safetensors").read_bytes()
    if fmt == "native":
        from lowbit.io.native import save_quantized

        conv1d = spec_for(model).conv1d
        return save_quantized(Path(out), model, tokenizer, result.weights.modules(), meta,
                              overwrite=overwrite, conv1d=conv1d, extra=extra)
    from lowbit.io.serving import write_checkpoint
    from lowbit.models import model_dtype

    write_checkpoint(Path(out), fmt, model, tokenizer, result.weights, meta, overwrite=overwrite,
                     extra={"layers.jsonl": rows},
                     dtype=checkpoint_dtype(model_dtype(model)))
    return Path(out)


__all__ = ["LowbitError", "Result", "as_recipe", "describe", "plan", "quantize", "save"]
