"""``lowbit generate`` and ``lowbit chat``: text from a model or a quantized folder, streamed
as it is decoded (``lowbit.runtime.decode``), through the fastest kernel each layer allows."""

from __future__ import annotations

import click

from lowbit.cli.common import (
    check_outputs,
    compile_option,
    dtype_option,
    dump_json,
    kernel_option,
)


def _options(f):
    for opt in reversed([
        click.option("--max-new-tokens", default=128, show_default=True),
        click.option("--temperature", default=0.0, show_default=True,
                     help="0: the most likely token each step; above 0: sampled"),
        click.option("--seed", default=0, show_default=True, help="seed of the sampling"),
        click.option("--threads", type=int, help="CPU threads (default: torch's, the cores)"),
        kernel_option(),
        compile_option(),
        click.option("--kv", default=None,
                     help="a quantized KV cache (int8, fp8, kivi-k4v4-r128, kivi-k2v2-r128, "
                          "kvquant-k2v2-r128 ...; README): the model's own forward pass reads "
                          "it, not the compiled static-cache step"),
        dtype_option(),
    ]):
        f = opt(f)
    return f


def _stream(piece: str) -> None:
    click.echo(piece, nl=False)


@click.command("generate")
@click.argument("model", default="smollm2-135m")
@click.option("--prompt", required=True, help="the text to continue")
@click.option("--chat", is_flag=True, help="wrap the prompt in the tokenizer's chat template")
@_options
@click.option("--json", "json_path", type=click.Path(),
              help="write the text and the speed as JSON (- for standard output)")
def command(model, prompt, chat, max_new_tokens, temperature, seed, threads, kernel, compile_,
            kv, dtype, json_path):
    """Continue --prompt with MODEL (a model, a quantized folder or a GGUF file), streaming."""
    from lowbit.jobs import generate_job

    check_outputs(json_path=json_path)
    res = generate_job(model, prompt, max_new_tokens, temperature=temperature, seed=seed,
                       kernel=kernel, compile=compile_, dtype=dtype, chat=chat,
                       threads=threads, on_text=None if json_path == "-" else _stream, kv=kv)
    if json_path != "-":
        click.echo()
        if "decode_tokens_per_s" in res:
            click.echo(f"({res['new_tokens']} tokens; prefill {res['prefill_tokens_per_s']:.0f} "
                       f"tokens/s, decode {res['decode_tokens_per_s']:.1f} tokens/s, "
                       f"{res['threads']} threads)", err=True)
    dump_json(json_path, res)


@click.command("chat")
@click.argument("model", default="smollm2-135m")
@_options
def chat_command(model, max_new_tokens, temperature, seed, threads, kernel, compile_, kv,
                 dtype):
    """Talk with MODEL: each line you type is one user turn (the tokenizer's chat template);
    an empty line or end of input ends the chat. The conversation so far is each turn's
    context."""
    from lowbit.jobs import TextGenerator

    session = TextGenerator(model, kernel=kernel, compile=compile_, dtype=dtype,
                            threads=threads, kv=kv)
    history: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        session.run(line, max_new_tokens, temperature=temperature, seed=seed, chat=True,
                    history=history, on_text=_stream)
        click.echo()
