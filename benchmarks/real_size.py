"""Peak memory of `lowbit quantize` on a real-sized model: a random-weight model built from a
real config (Llama-3.2-1B's, or Qwen2.5-1.5B's), saved in bf16 as such models ship, quantized
from the command line in its own dtype (`--dtype auto`), each run in its own process.

    python benchmarks/real_size.py --config llama-3.2-1b --methods rtn gptq --calib-samples 16

Prints the bf16 size of the checkpoint, the peak RSS of each `lowbit quantize` process and
their ratio (the goal: at most 1.3x). Calibration is WikiText-2 text (a file), so no time goes
into sampling text from a random model. With ``--check-exports`` each output (the default
format: compressed-tensors) is then loaded, each in its own process, by transformers (logits
against lowbit's reload of the same folder) and, exported with ``lowbit export OUT F.gguf
--type Q4_K_M``, by llama-cpp-python (perplexity of one window beside lowbit's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"

CONFIGS = {
    # the published configs' shapes (hidden, layers, heads, KV heads, FFN, vocabulary, tying)
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8,
                                   intermediate_size=8192, vocab_size=128256,
                                   tie_word_embeddings=True, rope_theta=500000.0,
                                   max_position_embeddings=131072, head_dim=64)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2,
                                   intermediate_size=8960, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1000000.0,
                                   max_position_embeddings=32768)),
}


def build(name: str, out: Path) -> int:
    """Write the random-weight bf16 checkpoint (with the built-in model's tokenizer: its ids
    fit every vocabulary here); returns the bytes of its weights."""
    import transformers as tf

    from lowbit.models import load_model

    family, kw = CONFIGS[name]
    if not (out / "config.json").is_file():
        cfg = tf.AutoConfig.for_model(family, **kw)
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(out)
        load_model("smollm2-135m")[1].save_pretrained(out)
        del model
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    res = json.loads(r.stdout)
    res["wall_s"] = time.perf_counter() - t0
    return res


CHECK = """
import json, sys, torch
from lowbit.models import load_model
ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
out, kind = sys.argv[1], sys.argv[2]
if kind == "transformers":
    import transformers as tf
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # as lowbit
    lb = load_model(out)[0]
    with torch.no_grad():
        a, b = hf(input_ids=ids).logits.float(), lb(input_ids=ids).logits.float()
    print(json.dumps({"transformers_max_abs_diff": float((a - b).abs().max()),
                      "logit_scale": float(b.abs().max())}))
else:
    from lowbit.eval.llamacpp import llamacpp_perplexity
    from lowbit.eval.metrics import evaluate
    from lowbit.models import load_model
    ll = llamacpp_perplexity(sys.argv[3], ids)["ppl"]
    lb = evaluate(load_model(out)[0], ids, progress=False)["ppl"]
    print(json.dumps({"llamacpp_ppl": ll, "lowbit_ppl": lb}))
"""


def check_exports(out: Path) -> dict:
    """transformers loads the folder; llama-cpp-python loads its Q4_K_M GGUF export."""
    gguf = out.parent / f"{out.name}.gguf"
    res = {}
    r = subprocess.run([sys.executable, "-c", CHECK, str(out), "transformers"],
                       capture_output=True, text=True)
    res |= json.loads(r.stdout) if r.returncode == 0 else {"transformers_error": r.stderr[-500:]}
    subprocess.run(["lowbit", "export", str(out), str(gguf), "--type", "Q4_K_M", "--overwrite",
                    "--quiet"], check=True, capture_output=True)
    r = subprocess.run([sys.executable, "-c", CHECK, str(out), "gguf", str(gguf)],
                       capture_output=True, text=True)
    res |= json.loads(r.stdout) if r.returncode == 0 else {"llamacpp_error": r.stderr[-500:]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="llama-3.2-1b", choices=sorted(CONFIGS))
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/lowbit-real-size"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--check-exports", action="store_true")
    args = ap.parse_args()
    ckpt = args.dir / args.config
    size = build(args.config, ckpt)
    print(f"{args.config}: {size / 2**30:.2f} GiB of bf16 weights")
    rows = []
    for method in args.methods:
        out = args.dir / f"{args.config}-{method}"
        cmd = ["lowbit", "quantize", str(ckpt), "--method", method, "--scheme", args.scheme,
               "--out", str(out), "--overwrite", "--json", "-", "--quiet"]
        if method != "rtn":
            cmd += ["--calib", str(WIKI), "--calib-samples", str(args.calib_samples),
                    "--seq-len", str(args.seq_len)]
        res = run(cmd)
        row = {"config": args.config, "method": method, "scheme": args.scheme,
               "bf16_bytes": size, "peak_rss_bytes": res["peak_rss_bytes"],
               "ratio": res["peak_rss_bytes"] / size, "seconds": res["wall_s"],
               "calib_samples": args.calib_samples if method != "rtn" else 0}
        row["format"] = res.get("output_format")
        print(f"{method:5s} peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB = "
              f"{row['ratio']:.2f}x the bf16 weights, {row['seconds']:.0f} s, "
              f"{row['format']}", flush=True)
        if args.check_exports:
            row |= check_exports(out)
            print(f"      {json.dumps({k: v for k, v in row.items() if k not in ('config',)})}",
                  flush=True)
        rows.append(row)
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
