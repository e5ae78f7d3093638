"""Batch-1 speed of lowbit's CPU runtime against fp32, bf16 and llama.cpp, in one run.

For each configuration, in its own process (so each peak RSS is its own), at 1 and at 2
threads: prefill of a 512-token prompt (WikiText, or the built-in text) and decode of 128 new
tokens (greedy, static KV cache), and the bytes the Linears hold resident (stored codes plus the
kernel's packed copy) against their fp32 size.

    python benchmarks/runtime_speed.py                 # eager one-token step
    python benchmarks/runtime_speed.py --compile       # torch.compile'd one-token step

Configurations: the fp32 and bf16 base (SmolLM2-135M), RTN w4g32 (symmetric, the grid of
llama.cpp's Q4_0) and w8 per channel through their kernels and through ``--kernel dequant``,
and the base exported to GGUF F32 / Q8_0 / Q4_0 run by llama-cpp-python at the same threads
(prompt evaluated in one call, then one ``eval`` per new token). Ratios are against fp32 and
against llama.cpp's Q4_0 from the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
PROMPT, NEW = 512, 128


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *map(str, args)]


def prompt_ids():
    from lowbit.calib import eval_windows
    from lowbit.models import load_model

    _, tok = load_model("smollm2-135m")
    data = str(WIKI) if WIKI.is_file() else "builtin"
    return eval_windows(data, tok, 1, PROMPT)[0]


def measure_lowbit(model: str, dtype: str, kernel: str, threads: int, compile: bool) -> dict:
    import torch

    from lowbit.eval.metrics import peak_rss_bytes
    from lowbit.models import load_model
    from lowbit.runtime.decode import measure_speed
    from lowbit.runtime.kernels import prepare_kernels
    from lowbit.runtime.qlinear import QLinear, QuantModule

    torch.set_num_threads(threads)
    m, _ = load_model(model, dtype)
    used = prepare_kernels(m, kernel)
    t0 = time.perf_counter()
    t = measure_speed(m, prompt_ids(), NEW, compile=compile)  # kernels are built in its warm-up
    seconds = time.perf_counter() - t0
    linear = fp32 = 0
    for mod in m.modules():
        if isinstance(mod, QuantModule):
            linear += mod.storage_bytes() + (mod.kernel_bytes() if isinstance(mod, QLinear)
                                             else 0)
            fp32 += 4 * mod.out_features * mod.in_features
        elif isinstance(mod, torch.nn.Linear) and mod.weight.data_ptr() != \
                m.get_input_embeddings().weight.data_ptr():
            linear += mod.weight.numel() * mod.weight.element_size()
            fp32 += 4 * mod.weight.numel()
    return {"prefill": t.prefill_tokens_per_s, "decode": t.decode_tokens_per_s,
            "kernel": dict(used), "linear_bytes": linear, "linear_fp32_bytes": fp32,
            "peak_rss_mb": peak_rss_bytes() / 2**20, "seconds": seconds}


def measure_llamacpp(path: str, threads: int) -> dict:
    import numpy as np

    from lowbit.eval.llamacpp import load_llama
    from lowbit.eval.metrics import peak_rss_bytes

    ids = prompt_ids().tolist()
    llm = load_llama(path, n_ctx=PROMPT + NEW, n_threads=threads)
    llm.eval(ids[:8])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t0
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(NEW - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode = time.perf_counter() - t0
    return {"prefill": PROMPT / prefill, "decode": (NEW - 1) / decode,
            "kernel": {"llama.cpp": 1}, "peak_rss_mb": peak_rss_bytes() / 2**20}


def one(args) -> None:
    if args.gguf:
        res = measure_llamacpp(args.model, args.threads)
    else:
        res = measure_lowbit(args.model, args.dtype, args.kernel, args.threads, args.compile)
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--kernel", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    if args.one:
        args.threads = int(args.threads)
        return one(args)
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-speed-"))
    for scheme in ("w4g32", "w8"):
        subprocess.run(lowbit("quantize", "smollm2-135m", "--method", "rtn", "--scheme", scheme,
                              "--out", tmp / scheme, "--quiet"), check=True)
    configs = [("fp32", "smollm2-135m", "fp32", "auto", False),
               ("bf16", "smollm2-135m", "bf16", "auto", False),
               ("w4g32 int4pack", tmp / "w4g32", "auto", "int4pack", False),  # fp32 activations
               ("w4g32 dequant", tmp / "w4g32", "auto", "dequant", False),
               ("w8 int8pack", tmp / "w8", "auto", "int8pack", False),
               ("w4g32 int4pack bf16", tmp / "w4g32", "bf16", "auto", False)]
    if not args.no_llamacpp:
        for qtype in ("F32", "Q8_0", "Q4_0"):
            f = tmp / f"{qtype}.gguf"
            subprocess.run(lowbit("export", "smollm2-135m", f, "--type", qtype, "--quiet"),
                           check=True)
            configs.append((f"llama.cpp {qtype}", f, "auto", "auto", True))
    rows = {}
    for threads in map(int, args.threads.split(",")):
        for name, model, dtype, kernel, gguf in configs:
            cmd = [sys.executable, __file__, "--one", "--model", str(model), "--dtype", dtype,
                   "--kernel", kernel, "--threads", str(threads)]
            cmd += ["--gguf"] if gguf else []
            cmd += ["--compile"] if args.compile and not gguf else []
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{name}: failed\n{r.stderr[-2000:]}")
            rows[(name, threads)] = json.loads(r.stdout.strip().splitlines()[-1])
            res = rows[(name, threads)]
            mem = (f"Linears {res['linear_bytes'] / res['linear_fp32_bytes']:.3f}x fp32"
                   if "linear_bytes" in res else "")
            print(f"{threads} thr  {name:22s} prefill {res['prefill']:7.1f} tok/s  decode "
                  f"{res['decode']:6.1f} tok/s  peak RSS {res['peak_rss_mb']:6.0f} MB  {mem}",
                  flush=True)
    print("\nratios of decode tokens/s (same threads, same run)")
    for threads in map(int, args.threads.split(",")):
        base = rows[("fp32", threads)]["decode"]
        bf16 = rows[("bf16", threads)]["decode"]
        q4 = rows.get(("llama.cpp Q4_0", threads), {}).get("decode")
        for name, *_ in configs:
            d = rows[(name, threads)]["decode"]
            extra = f"  {d / q4:.2f}x llama.cpp Q4_0" if q4 else ""
            print(f"{threads} thr  {name:22s} {d / base:.2f}x fp32  {d / bf16:.2f}x bf16{extra}")


if __name__ == "__main__":
    main()
