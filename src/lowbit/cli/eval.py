"""``lowbit eval``: perplexity of a model or quantized folder, KL and top-1 against a base."""

from __future__ import annotations

import click

from lowbit.cli.common import dump_json, echo


@click.command("eval")
@click.argument("model", default="smollm2-135m")
@click.option("--data", default="builtin", show_default=True,
              help="evaluation text: builtin, pydoc, or a .txt/.jsonl file")
@click.option("--windows", default=64, show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--base", "base_arg", help="base model for KL divergence and top-1 agreement")
@click.option("--speed", is_flag=True, help="also measure batch-1 decoding speed")
@click.option("--json", "json_path", type=click.Path(),
              help="write the results as JSON (- for standard output)")
@click.option("--quiet", is_flag=True)
def command(model, data, windows, seq_len, base_arg, speed, json_path, quiet):
    """Perplexity of MODEL (a model or a quantized folder), and KL/top-1 against --base."""
    from lowbit.jobs import eval_job

    res = eval_job(model, data, windows, seq_len, base_arg, speed, progress=not quiet)
    parts = [f"ppl {res['ppl']:.3f}"]
    if "kl_mean" in res:
        parts += [f"KL {res['kl_mean']:.4f}", f"KL p99 {res['kl_p99']:.4f}",
                  f"top-1 {res['top1']:.3f}"]
    if "decode_tok_s" in res:
        parts.append(f"{res['decode_tok_s']:.1f} tok/s")
    parts.append(f"model {res['model_bytes'] / 2**20:.1f} MiB")
    echo(f"{model}: " + ", ".join(parts) + f" ({res['windows']}x{res['seq_len']} tokens)",
         json_path)
    dump_json(json_path, res)
