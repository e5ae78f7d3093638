"""GGUF files from lowbit's quantizers against llama.cpp's own, judged by llama.cpp.

    python benchmarks/gguf_vs_llamacpp.py --types Q8_0 Q4_K_M --windows 64 --calib-windows 128 \
        --json out.jsonl

For each type: lowbit's file without and with the importance matrix, and the file llama.cpp's
quantizer (`llama_model_quantize`, what `llama-quantize` runs) makes from an F32 GGUF of the
same model, without and with the same importance matrix. Reported: bits per weight (all
tensors, and the blocks' Linears), file size, perplexity through llama.cpp on the protocol's
WikiText-2 windows 0..N-1, whether llama.cpp chose the same type for every tensor, and the
share of tensors whose bytes are identical. The importance matrix is collected by lowbit on
the protocol's in-domain calibration windows 100.. of the same text. Needs llama-cpp-python.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's folder comes first on sys.path and its name would shadow the
# `gguf` package that lowbit and this script import
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import atexit  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from gguf import GGUFReader  # noqa: E402

from lowbit import data  # noqa: E402
from lowbit.cli import format_table  # noqa: E402
from lowbit.eval.llamacpp import llamacpp_perplexity, llamacpp_quantize  # noqa: E402
from lowbit.io.gguf.export import export_gguf  # noqa: E402
from lowbit.io.gguf.imatrix import collect_imatrix, load_imatrix, save_imatrix  # noqa: E402
from lowbit.models import DEFAULT_MODEL, builtin_path, load_model  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K"]
COLS = [
    ("type", "type", ""),
    ("maker", "made by", ""),
    ("imatrix", "imatrix", ""),
    ("bpw", "bits/w", ".3f"),
    ("bpw_linear", "bits/w lin", ".3f"),
    ("size_mb", "size MB", ".2f"),
    ("ppl", "ppl (llama.cpp)", ".3f"),
    ("same_types", "same types", ""),
    ("same_bytes", "same bytes", ".2f"),
    ("seconds", "quant s", ".0f"),
]


def file_stats(path: Path) -> tuple[dict, dict]:
    """(bits per weight figures, {tensor: (type, bytes)}) of a GGUF file."""
    r = GGUFReader(path)
    tensors = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}
    n = sum(int(t.n_elements) for t in r.tensors)
    b = sum(int(t.n_bytes) for t in r.tensors)
    lin = [t for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    n_l = sum(int(t.n_elements) for t in lin)
    b_l = sum(int(t.n_bytes) for t in lin)
    return {"bpw": 8 * b / n, "bpw_linear": 8 * b_l / n_l}, tensors


def compare(ours: dict, theirs: dict) -> tuple[str, float]:
    same_t = all(ours[k][0] == theirs.get(k, ("?",))[0] for k in ours)
    same_b = np.mean([ours[k][1] == theirs.get(k, (None, None))[1] for k in ours])
    return ("yes" if same_t and set(ours) == set(theirs) else "no"), float(same_b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows of 512")
    ap.add_argument("--calib-windows", type=int, default=128, help="imatrix windows from 100")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    ap.add_argument("--out-dir", type=Path, help="keep the files here (default: temporary)")
    ap.add_argument("--json", type=Path, help="append one JSON line per row")
    ap.add_argument("--imatrix", type=Path, help="reuse this imatrix.gguf instead of collecting")
    ap.add_argument("--only-imatrix", action="store_true",
                    help="only the files made with the imatrix, and no F32 row")
    args = ap.parse_args()

    t_all = time.perf_counter()
    work = args.out_dir or Path(tempfile.mkdtemp(prefix="lowbit-gguf-"))
    if not args.out_dir:  # a scratch folder goes when the run ends
        atexit.register(shutil.rmtree, work, True)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(DEFAULT_MODEL)
    source = builtin_path(DEFAULT_MODEL)
    ids = data.tokenize(tok, data.read_text(WIKI))
    ev = data.windows(ids, args.windows, 512)
    calib = data.windows(ids, args.calib_windows, 512, start=100)
    t0 = time.perf_counter()
    if args.imatrix:
        im = load_imatrix(args.imatrix)
    else:
        im = collect_imatrix(model, calib,
                             dataset=f"wikitext-2 test windows 100..{99 + len(calib)}")
        save_imatrix(im, work / "imatrix.gguf")
    im_seconds = time.perf_counter() - t0
    f32 = work / "model-F32.gguf"
    export_gguf(model, tok, f32, "F32", source_gguf=source, progress=False)

    def measure(path: Path, row: dict) -> dict:
        bits, tensors = file_stats(path)
        res = llamacpp_perplexity(path, ev, n_threads=args.threads)
        row |= bits | {"size_mb": path.stat().st_size / 1e6, "ppl": res["ppl"]}
        row["_tensors"] = tensors
        print(f"  {row['type']} {row['maker']} imatrix={row['imatrix']}: ppl {row['ppl']:.3f}",
              flush=True)  # fmt: skip
        return row

    rows = [] if args.only_imatrix else [
        measure(f32, {"type": "F32", "maker": "lowbit", "imatrix": "-", "seconds": 0.0})]
    for qtype in args.types:
        for use_im in (True,) if args.only_imatrix else (False, True):
            imx = im if use_im else None
            tag = "yes" if use_im else "no"
            ours = work / f"lowbit-{qtype}{'-imat' if use_im else ''}.gguf"
            t0 = time.perf_counter()
            export_gguf(model, tok, ours, qtype, imatrix=imx, source_gguf=source, progress=False)
            a = measure(ours, {"type": qtype, "maker": "lowbit", "imatrix": tag,
                               "seconds": time.perf_counter() - t0})  # fmt: skip
            theirs = work / f"llamacpp-{qtype}{'-imat' if use_im else ''}.gguf"
            t0 = time.perf_counter()
            llamacpp_quantize(f32, theirs, qtype, imatrix=im.data if use_im else None)
            b = measure(theirs, {"type": qtype, "maker": "llama.cpp", "imatrix": tag,
                                 "seconds": time.perf_counter() - t0})  # fmt: skip
            a["same_types"], a["same_bytes"] = compare(a["_tensors"], b["_tensors"])
            rows += [a, b]
    for r in rows:
        r.pop("_tensors", None)
    print(format_table(rows, COLS))
    meta = {
        "model": DEFAULT_MODEL,
        "eval_windows": args.windows,
        "calib_windows": args.calib_windows,
        "imatrix_seconds": im_seconds,
        "llama_threads": args.threads,
        "total_seconds": time.perf_counter() - t_all,
    }
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r | meta) + "\n")


if __name__ == "__main__":
    main()
