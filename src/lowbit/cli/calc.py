"""``lowbit calc``: memory of weights and KV cache from a model's config (``lowbit.calc``)."""

from __future__ import annotations

import click

from lowbit.cli.common import check_outputs, dump_json, echo


def _gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB ({n / 2**30:.3f} GiB)"


@click.command("calc")
@click.argument("model", default="smollm2-135m")
@click.option("--scheme", default=None,
              help="weight scheme of the block Linears (w4g64, nf4, w8 ...) [default: 16-bit]")
@click.option("--kv", default="fp16", show_default=True,
              help="KV-cache format: fp16, int8, fp8, kivi-k2v2-r128 ... (lowbit eval --kv)")
@click.option("--context", default=4096, show_default=True, help="tokens per sequence")
@click.option("--batch", default=1, show_default=True, help="sequences")
@click.option("--json", "json_path", type=click.Path(),
              help="write the figures as JSON (- for standard output)")
def command(model, scheme, kv, context, batch, json_path):
    """Memory of MODEL (a config.json, a checkpoint or lowbit folder, a GGUF file, a built-in
    name) at --scheme with a --kv cache of --batch x --context tokens, from its config alone."""
    from lowbit.calc import calc_path

    check_outputs(json_path=json_path)
    r = calc_path(model, scheme=scheme, kv=kv, context=context, batch=batch)
    echo("\n".join([
        f"{r['model']} ({r['model_type']}, {r['layers']} layers, {r['kv_heads']} KV heads of "
        f"{r['head_dim']})",
        f"weights ({r['scheme']} block Linears, the rest 16-bit): {_gb(r['weight_bytes'])}",
        f"KV cache ({r['kv']}, {r['kv_bytes_per_token']:.0f} bytes/token, fp16 "
        f"{r['kv_fp16_bytes_per_token']:.0f}): {_gb(r['kv_bytes_per_sequence'])} per sequence "
        f"of {context} tokens, {_gb(r['kv_bytes'])} for {batch}",
        f"total: {_gb(r['total_bytes'])}"]), json_path)
    dump_json(json_path, r)
