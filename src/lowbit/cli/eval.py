"""``lowbit eval``: perplexity of models or quantized folders; against a base, the statistics
``llama-perplexity --kl-divergence`` prints (KL divergence, Δp, same top token, ppl ratio)."""

from __future__ import annotations

import click

from lowbit.cli.common import (
    check_outputs,
    compile_option,
    dtype_option,
    dump_json,
    echo,
    format_table,
    kernel_option,
    note,
)

COLS = [("model", "model", ""), ("ppl", "ppl", ".3f"), ("ppl_ratio", "ppl/base", ".4f"),
        ("kld_mean", "KLD", ".4f"), ("kld_median", "KLD med", ".4f"),
        ("kld_p99", "KLD 99%", ".3f"), ("same_top_p", "same top", ".3f"),
        ("rms_dp", "RMS dp", ".4f"),
        ("prefill_tokens_per_s", "prefill tok/s", ".0f"), ("decode_tokens_per_s", "tok/s", ".1f"),
        ("mib", "MiB", ".1f")]


@click.command("eval")
@click.argument("models", nargs=-1)
@click.option("--data", default="builtin", show_default=True,
              help="evaluation text: builtin, pydoc, or a .txt/.jsonl file")
@click.option("--windows", default=64, show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--batch", default=1, show_default=True, help="windows per forward pass")
@click.option("--base", "base_arg", help="base model for KL divergence and top-1 agreement")
@click.option("--base-cache/--no-base-cache", default=True, show_default=True,
              help="keep the base's log-probabilities on disk (LOWBIT_CACHE) and reuse them")
@click.option("--speed", is_flag=True,
              help="also measure batch-1 speed: prefill of a 512-token prompt (the first "
                   "window), then 128 new tokens")
@kernel_option()
@compile_option()
@click.option("--llamacpp", is_flag=True,
              help="GGUF files: take the logits from llama.cpp (llama-cpp-python) instead of "
                   "lowbit's reading of the file; the same statistics")
@click.option("--kv", "kv_specs", default=None,
              help="score through a quantized KV cache instead: formats separated by commas "
                   "(int8, fp8, fp8-head, kivi-k4v4-r128, kivi-k2v2-r128, kvquant-k2v2-r128, "
                   "pertoken-k2v2-r128 ...); each window's first half is prefilled, then every "
                   "token is fed alone and predicts the next from the cache")
@click.option("--prefill", type=int, default=None,
              help="with --kv: tokens prefilled per window [default: half the window]")
@click.option("--json", "json_path", type=click.Path(),
              help="write the results as JSON (- for standard output): an object for one "
                   "model, a list for several")
@click.option("--quiet", is_flag=True)
@dtype_option()
def command(models, data, windows, seq_len, batch, base_arg, base_cache, speed, kernel,
            compile_, llamacpp, kv_specs, prefill, json_path, quiet, dtype):
    """Perplexity of each MODEL (models or quantized folders; default: the built-in model),
    and KL/top-1 against --base, whose log-probabilities are computed once for all."""
    from lowbit.jobs import eval_job

    check_outputs(json_path=json_path)
    if kv_specs is not None or prefill is not None:
        return _kv(models, data, windows, seq_len, kv_specs, prefill, base_arg, speed, llamacpp,
                   json_path, quiet, dtype, batch)
    results = []
    for model in models or ("smollm2-135m",):
        res = eval_job(model, data, windows, seq_len, base_arg, speed, progress=not quiet,
                       dtype=dtype, batch=batch, base_cache=base_cache, note=note,
                       kernel=kernel, compile=compile_, llamacpp=llamacpp)
        results.append(res | ({"mib": res["model_bytes"] / 2**20} if "model_bytes" in res
                              else {}))
    first = results[0]
    echo(format_table(results, [c for c in COLS if any(c[0] in r for r in results)]) +
         f"\n({first['windows']} windows x {first['seq_len']} tokens of {data})", json_path)
    for r in results:
        r.pop("mib", None)
    dump_json(json_path, results[0] if len(results) == 1 else results)


KV_COLS = [("model", "model", ""), ("kv", "KV cache", ""), ("ppl", "ppl", ".3f"),
           ("ppl_fp_cache", "ppl fp cache", ".3f"), ("ppl_ratio", "ratio", ".4f"),
           ("kld_mean", "KLD", ".4f"), ("same_top_p", "same top", ".3f"),
           ("kv_bytes_per_token", "bytes/token", ".0f"),
           ("kv_bytes_ratio_fp16", "x fp16", ".3f"), ("decode_tokens_per_s", "tok/s", ".1f")]


def _kv(models, data, windows, seq_len, kv_specs, prefill, base_arg, speed, llamacpp,
        json_path, quiet, dtype, batch) -> None:
    from lowbit.errors import LowbitError
    from lowbit.jobs import kv_eval_job

    if not kv_specs:
        raise LowbitError("--prefill goes with --kv FORMAT")
    if base_arg or speed or llamacpp:
        raise LowbitError("--kv compares each cache with the same model's full-precision cache; "
                          "--base, --speed and --llamacpp do not go with it")
    specs = [s for s in kv_specs.split(",") if s.strip()]
    rows = []
    for model in models or ("smollm2-135m",):
        rows += kv_eval_job(model, data, windows, seq_len, specs, prefill, not quiet, dtype,
                            batch)
    echo(format_table(rows, KV_COLS) + f"\n({windows} windows x {seq_len} tokens of {data}, "
         f"scored after a prefill of {rows[0]['prefill']})", json_path)
    dump_json(json_path, rows[0] if len(rows) == 1 else rows)
