"""Peak memory of `lowbit quantize` on a real-sized model: a random-weight model built from a
real config (Llama-3.2-1B's, Qwen2.5-1.5B's, Llama-3.2-3B's, Llama-3-8B's), saved in bf16 as
such models ship (written a tensor at a time: the 8B model is 16 GB), quantized from the
command line in its own dtype (`--dtype auto`), each run in its own process.

    python benchmarks/real_size.py --config llama-3.2-1b --methods rtn gptq --calib-samples 16
    python benchmarks/real_size.py --config llama-3-8b --methods rtn --eval 2 \
        --check-exports --check-dtype bf16 --no-gguf
    python benchmarks/real_size.py --config llama-3.2-3b --methods gptq --calib-samples 4 \
        --eval 2 --check-exports

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
import math
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
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8,
                                   intermediate_size=8192, vocab_size=128256,
                                   tie_word_embeddings=True, rope_theta=500000.0,
                                   max_position_embeddings=131072, head_dim=128)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8,
                                 intermediate_size=14336, vocab_size=128256,
                                 tie_word_embeddings=False, rope_theta=500000.0,
                                 max_position_embeddings=8192, head_dim=128)),
}
SHARD_BYTES = 2 << 30


def build(name: str, out: Path) -> int:
    """Write the random-weight bf16 checkpoint one tensor at a time (an 8B model is never whole
    in memory): N(0, 0.02) weights as transformers initialises them, norms 1, in shards of
    2 GiB with their index, and the built-in model's tokenizer (its ids fit every vocabulary
    here); returns the bytes of its weights."""
    import transformers as tf
    from safetensors.torch import save_file

    from lowbit.models import load_model

    family, kw = CONFIGS[name]
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        cfg = tf.AutoConfig.for_model(family, **kw)
        cfg.dtype = torch.bfloat16
        with torch.device("meta"):
            meta = tf.AutoModelForCausalLM.from_config(cfg)
        shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        if cfg.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)
        shards: list[list[str]] = [[]]
        size = 0
        for k, shape in shapes.items():
            nb = 2 * math.prod(shape)
            if shards[-1] and size + nb > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append(k)
            size += nb
        g = torch.Generator().manual_seed(0)
        weight_map, total = {}, 0
        for i, keys in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for k in keys:
                if len(shapes[k]) == 1:  # norms (the family has no biases)
                    tensors[k] = torch.ones(shapes[k], dtype=torch.bfloat16)
                else:
                    tensors[k] = (torch.randn(shapes[k], generator=g) * 0.02).bfloat16()
                weight_map[k] = fname
                total += tensors[k].numel() * 2
            save_file(tensors, str(out / fname), metadata={"format": "pt"})
            del tensors
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        cfg.save_pretrained(out)
        load_model("smollm2-135m")[1].save_pretrained(out)
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
import sys, torch
ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
out, kind, dest, dtype = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
if kind == "transformers":
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=dt)
elif kind == "lowbit":
    from lowbit.models import load_model
    model = load_model(out, dtype)[0]
else:
    from lowbit.eval.llamacpp import llamacpp_perplexity
    from lowbit.eval.metrics import evaluate
    from lowbit.models import load_model
    torch.save({"llamacpp_ppl": llamacpp_perplexity(kind, ids)["ppl"],
                "lowbit_ppl": evaluate(load_model(out)[0], ids, progress=False)["ppl"]}, dest)
    sys.exit(0)
with torch.no_grad():
    torch.save(model(input_ids=ids).logits.float(), dest)
"""


def _check(args: list[str]) -> tuple[object, str | None]:
    dest = Path(args[2])
    r = subprocess.run([sys.executable, "-c", CHECK, *args], capture_output=True, text=True)
    if r.returncode:
        return None, r.stderr[-500:]
    return torch.load(dest), None


def check_exports(out: Path, dtype: str = "fp32", gguf: bool = True) -> dict:
    """transformers loads the folder (each model in its own process: an 8B model's two loads
    would not fit together; ``dtype`` bf16 for those); llama-cpp-python loads its Q4_K_M GGUF
    export."""
    res: dict = {}
    hf, err = _check([str(out), "transformers", str(out.parent / "hf.pt"), dtype])
    lb, err2 = _check([str(out), "lowbit", str(out.parent / "lb.pt"), dtype])
    if err or err2:
        res["transformers_error"] = err or err2
    else:
        res |= {"transformers_max_abs_diff": float((hf - lb).abs().max()),
                "logit_scale": float(lb.abs().max()),
                "logit_corr": float(torch.corrcoef(torch.stack([hf.flatten(),
                                                               lb.flatten()]))[0, 1])}
    if gguf:
        f = out.parent / f"{out.name}.gguf"
        subprocess.run(["lowbit", "export", str(out), str(f), "--type", "Q4_K_M",
                        "--overwrite", "--quiet"], check=True, capture_output=True)
        r, err = _check([str(out), str(f), str(out.parent / "gg.pt"), dtype])
        res |= r if r is not None else {"llamacpp_error": err}
    return res


def evaluate_out(out: Path, windows: int) -> dict:
    """`lowbit eval OUT` on the built-in evaluation text (not the calibration text): perplexity
    and the process's peak RSS."""
    r = run(["lowbit", "eval", str(out), "--data", "builtin", "--windows", str(windows),
             "--json", "-", "--quiet"])
    return {"eval_ppl": r["ppl"], "eval_peak_rss_bytes": r["peak_rss_bytes"],
            "eval_seconds": r["wall_s"]}


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
    ap.add_argument("--no-gguf", action="store_true", help="with --check-exports: skip GGUF")
    ap.add_argument("--check-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="dtype of the transformers/lowbit logits check (bf16 for 8B)")
    ap.add_argument("--eval", type=int, default=0, help="evaluate each output on N windows")
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
        if args.eval:
            row |= evaluate_out(out, args.eval)
            print(f"      eval ppl {row['eval_ppl']:.1f}, peak RSS "
                  f"{row['eval_peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
        if args.check_exports:
            row |= check_exports(out, args.check_dtype, not args.no_gguf)
            print(f"      {json.dumps({k: v for k, v in row.items() if k not in ('config',)})}",
                  flush=True)
        rows.append(row)
    if args.json:
        with args.json.open("a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
