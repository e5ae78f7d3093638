"""Serving checkpoints of one quantized model: size on disk, load time and perplexity through
transformers' loader and through lowbit's.

    python benchmarks/serving.py --scheme w4g64 --calib-windows 128 --eval-windows 64

Quantizes the default model with GPTQ (act-order with static groups, so every layout can hold
it), writes the native folder and the compressed-tensors, GPTQ and AWQ checkpoints, and an
fp16 transformers copy of the base for scale. transformers (with compressed-tensors) loads
the compressed-tensors checkpoint on CPU; it loads GPTQ/AWQ only through GPU kernel packages
(gptqmodel, autoawq) not installed here, so those two are loaded by lowbit's importer.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit import data
from lowbit.cli.common import format_table
from lowbit.eval.metrics import evaluate
from lowbit.models import load_model

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
COLS = [
    ("what", "checkpoint", ""),
    ("loader", "loaded by", ""),
    ("mib", "MiB on disk", ".1f"),
    ("load_s", "load s", ".1f"),
    ("ppl", "ppl", ".3f"),
]


def disk_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default="w4g64")
    ap.add_argument("--calib-windows", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--out-dir", type=Path, help="keep the folders here (default: temporary)")
    ap.add_argument("--json", type=Path, help="append one JSON line per row")
    a = ap.parse_args()

    import transformers as tf

    work = a.out_dir or Path(tempfile.mkdtemp(prefix="lowbit-serving-"))
    if not a.out_dir:  # a scratch folder goes when the run ends
        atexit.register(shutil.rmtree, work, True)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2-135m")
    ids = data.tokenize(tok, data.read_text(WIKI))
    ev = data.windows(ids, a.eval_windows, 512)
    cal = data.windows(ids, a.calib_windows, 512, start=100)

    base_dir = work / "base-fp16"
    model.to(torch.float16).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model.float()
    rows = [{"what": "base fp16 (transformers)", "loader": "-", "mib": disk_mib(base_dir)}]

    res = lowbit.quantize(model, [lowbit.GPTQ(scheme=a.scheme, static_groups=True)], cal)
    meta = {"base_model": "smollm2-135m"}
    for fmt in ("native", "compressed-tensors", "gptq", "awq"):
        lowbit.save(work / fmt, model, tok, res, meta, fmt=fmt, overwrite=True)
    ref = evaluate(model, ev, desc="in-memory")["ppl"]
    print(f"GPTQ {a.scheme} (static groups), in memory: ppl {ref:.3f}", flush=True)
    del model

    def hf_load():
        return tf.AutoModelForCausalLM.from_pretrained(work / "compressed-tensors",
                                                        dtype=torch.float32)

    loads = [("native", "lowbit", lambda: load_model(work / "native")[0])]
    loads += [("compressed-tensors", "transformers", hf_load)]
    loads += [(f, "lowbit", lambda f=f: load_model(work / f)[0])
              for f in ("compressed-tensors", "gptq", "awq")]
    for what, loader, fn in loads:
        m, secs = timed(fn)
        r = evaluate(m, ev, desc=f"{what}/{loader}")
        rows.append({"what": what, "loader": loader, "mib": disk_mib(work / what), "load_s": secs,
                     "ppl": r["ppl"]})
        print(format_table([rows[-1]], COLS).splitlines()[-1], flush=True)
        del m
    print()
    print(format_table(rows, COLS))
    print(f"in-memory quantized model ppl {ref:.3f}; eval windows {a.eval_windows}, "
          f"calibration wiki x{a.calib_windows}; folders in {work}")
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r | {"scheme": a.scheme, "in_memory_ppl": ref}) + "\n")


if __name__ == "__main__":
    main()
