"""Batch-1 speed of lowbit's CPU runtime against fp32, bf16 and llama.cpp, in one run.

For each configuration, in its own process (so each peak RSS is its own), at 1 and at 2
threads: prefill of a 512-token prompt (WikiText, or the built-in text) and decode of 128 new
tokens (greedy, static KV cache), the bytes the Linears hold resident (stored codes plus the
kernel's packed copy) against their fp32 size, and the accuracy of the runtime itself: the
perplexity of the prompt's 512 tokens fed one at a time through the decode step (so
every product goes through the kernel) against the same tokens in one dense forward pass of
the decoded weights (the reference ``lowbit eval`` computes).

    python benchmarks/runtime_speed.py                 # eager one-token step
    python benchmarks/runtime_speed.py --compile       # torch.compile'd one-token step
    python benchmarks/runtime_speed.py --compile --threads 2 --repeat 3

Configurations: the fp32 and bf16 base (SmolLM2-135M); RTN w4g32 (symmetric, the grid of
llama.cpp's Q4_0), w4g64-asym, NF4 and w8 per channel through lowbit's kernels (lut4, u8:
``auto``), the integer ones with int8 activations (int4-a8, int8-a8: not exact, so the
perplexity columns matter), w4g32 with bf16 activations through lut4, int4-a8 and torch's
int4pack; w4g32 with the output layer in w8 too (auto and auto-a8); and the base exported
to GGUF F32 / Q8_0 / Q4_0 run by llama-cpp-python at the same threads (prompt evaluated in one call,
then one ``eval`` per new token). Ratios are against fp32, bf16 and llama.cpp's Q4_0 from the
same run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
PROMPT, NEW = 512, 128
PPL_TOKENS = 512


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
    ppl_step, ppl_dense = runtime_perplexity(m, prompt_ids()[:PPL_TOKENS])
    return {"prefill": t.prefill_tokens_per_s, "decode": t.decode_tokens_per_s,
            "kernel": dict(used), "linear_bytes": linear, "linear_fp32_bytes": fp32,
            "peak_rss_mb": peak_rss_bytes() / 2**20, "seconds": seconds,
            "ppl_step": ppl_step, "ppl_dense": ppl_dense}


def runtime_perplexity(model, ids) -> tuple[float, float]:
    """Perplexity of ``ids`` fed one token at a time through the decode step (each product
    through the layer's kernel), and in one dense forward pass (the decoded weights)."""
    import torch

    from lowbit.runtime.decode import Decoder

    ids = ids.reshape(1, -1)
    n = ids.shape[1]
    with torch.inference_mode():
        dense = model(input_ids=ids).logits[0, :-1].float()
        dec = Decoder(model, n)
        step = [dec.prefill(ids[:, :1])] + [dec.step(ids[0, i], i) for i in range(1, n - 1)]
        step = torch.cat(step).float()
    target = ids[0, 1:]

    def ppl(logits):
        return float(torch.nn.functional.cross_entropy(logits, target).exp())

    return ppl(step), ppl(dense)


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


def run_one(name: str, model, dtype: str, kernel: str, threads: int, gguf: bool = False,
            compile: bool = False) -> dict:
    """One configuration measured in a process of its own (``--one``): its result row."""
    cmd = [sys.executable, __file__, "--one", "--model", str(model), "--dtype", dtype,
           "--kernel", kernel, "--threads", str(threads)]
    cmd += ["--gguf"] if gguf else []
    cmd += ["--compile"] if compile else []
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{name}: failed\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--only", help="comma-separated configuration names to run (default: all)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every configuration this many times, interleaved, and keep each "
                         "one's fastest decode (this VM's speed drifts by up to 2x over minutes "
                         "with the host's load)")
    args = ap.parse_args()
    if args.one:
        args.threads = int(args.threads)
        return one(args)
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-speed-"))
    atexit.register(shutil.rmtree, tmp, True)  # scratch: gone when the run ends
    for scheme in ("w4g32", "w4g64-asym", "nf4", "w8"):
        subprocess.run(lowbit("quantize", "smollm2-135m", "--method", "rtn", "--scheme", scheme,
                              "--out", tmp / scheme, "--quiet"), check=True)
    # and w4g32 with the output layer in w8 as well (llama.cpp's Q4_0 files keep it in 6-8 bits)
    (tmp / "head8.yaml").write_text("steps:\n  - rtn:\n      scheme: w4g32\n      ignore: []\n"
                                    "      overrides: {lm_head: w8}\n")
    subprocess.run(lowbit("quantize", "--recipe", tmp / "head8.yaml", "--out", tmp / "head8",
                          "--quiet"), check=True)
    configs = [("fp32", "smollm2-135m", "fp32", "auto", False),
               ("bf16", "smollm2-135m", "bf16", "auto", False),
               ("w4g32 lut4", tmp / "w4g32", "fp32", "auto", False),
               ("w4g64-asym lut4", tmp / "w4g64-asym", "fp32", "auto", False),
               ("nf4 lut4", tmp / "nf4", "fp32", "auto", False),
               ("w8 u8", tmp / "w8", "fp32", "auto", False),
               ("w4g32 int4-a8", tmp / "w4g32", "fp32", "auto-a8", False),
               ("w8 int8-a8", tmp / "w8", "fp32", "auto-a8", False),
               ("w4g32 lut4 bf16", tmp / "w4g32", "bf16", "auto", False),
               ("w4g32 int4-a8 bf16", tmp / "w4g32", "bf16", "auto-a8", False),
               ("w4g32+head w8 lut4/u8", tmp / "head8", "fp32", "auto", False),
               ("w4g32+head w8 a8", tmp / "head8", "fp32", "auto-a8", False),
               ("w4g32 int4pack bf16", tmp / "w4g32", "bf16", "int4pack", False)]
    if not args.no_llamacpp:
        for qtype in ("F32", "Q8_0", "Q4_0"):
            f = tmp / f"{qtype}.gguf"
            subprocess.run(lowbit("export", "smollm2-135m", f, "--type", qtype, "--quiet"),
                           check=True)
            configs.append((f"llama.cpp {qtype}", f, "auto", "auto", True))
    if args.only:
        keep = {n.strip() for n in args.only.split(",")}
        configs = [c for c in configs if c[0] in keep or c[0] in ("fp32", "bf16")]
    rows = {}
    for rep in range(args.repeat):
        for threads in map(int, args.threads.split(",")):
            for name, model, dtype, kernel, gguf in configs:
                res = run_one(name, model, dtype, kernel, threads, gguf,
                              args.compile and not gguf)
                best = rows.get((name, threads))
                if best is None or res["decode"] > best["decode"]:
                    rows[(name, threads)] = res
                mem = (f"Linears {res['linear_bytes'] / res['linear_fp32_bytes']:.3f}x fp32  "
                       f"ppl step {res['ppl_step']:.4f} dense {res['ppl_dense']:.4f} "
                       f"({100 * (res['ppl_step'] / res['ppl_dense'] - 1):+.3f}%)"
                       if "linear_bytes" in res else "")
                print(f"{threads} thr  {name:22s} prefill {res['prefill']:7.1f} tok/s  decode "
                      f"{res['decode']:6.1f} tok/s  peak RSS {res['peak_rss_mb']:6.0f} MB  {mem}"
                      + (f"  (run {rep + 1})" if args.repeat > 1 else ""), flush=True)
    print("\nratios of decode tokens/s (same threads, same run"
          + (f", each configuration's fastest of {args.repeat})" if args.repeat > 1 else ")"))
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
