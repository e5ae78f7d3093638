"""GGUF types chosen by measured sensitivity against llama.cpp's own mixes, at equal size.

    python benchmarks/mixed_gguf.py --presets Q3_K_M Q4_K_M --json out.jsonl

1. Sensitivity: ``lowbit.analyze.measure`` on SmolLM2 at llama.cpp's types (default Q3_K,
   Q4_K, Q5_K, Q6_K, Q8_0, each in llama.cpp's fallback type where a row does not fill its
   blocks), on 4 in-domain windows of 128 tokens (WikiText-2 test tokens from 51200), timed.
2. For each preset: the preset's GGUF (``lowbit export --type``); the bytes its block Linears
   take, read back from the file; the same file with the block Linears' types chosen for the
   least summed KL in exactly those bytes (``lowbit export --target-size``), every other tensor
   by the preset's rules. No importance matrix on either side.
3. Both evaluated by llama.cpp (``lowbit eval FILE --llamacpp``) on WikiText-2 windows 0..63 of
   512 tokens against the fp32 base: perplexity, KL divergence (mean, 99th percentile), same
   top token, as ``llama-perplexity --kl-divergence`` reports them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gguf import GGUFReader
from quality import WIKI

from lowbit import data
from lowbit.analyze import measure
from lowbit.cli.common import format_table
from lowbit.models import load_model

COLS = [("variant", "variant", ""), ("linear_bytes", "block Linear bytes", ",d"),
        ("bpw", "bits/w (Linears)", ".3f"), ("ppl", "ppl", ".3f"), ("kld_mean", "KLD", ".4f"),
        ("kld_p99", "KLD 99%", ".3f"), ("same_top_p", "same top", ".3f")]


def lowbit(*args) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *map(str, args)]


def linear_bytes(path: Path, names: set[str]) -> tuple[int, int]:
    """(bytes, weights) of the block Linears in a GGUF file."""
    ts = [t for t in GGUFReader(path).tensors if t.name in names]
    return sum(int(t.n_bytes) for t in ts), sum(int(t.n_elements) for t in ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["Q3_K_M", "Q4_K_M"])
    ap.add_argument("--schemes", default="Q3_K,Q4_K,Q5_K,Q6_K,Q8_0")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--json", help="append one JSON line per variant")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-mixed-gguf-"))
    try:
        base, tok = load_model("smollm2-135m")
        ids = data.tokenize(tok, data.read_text(WIKI))
        t0 = time.perf_counter()
        sens = measure(base, data.windows(ids, 4, 128, start=400), a.schemes.split(","))
        sens["base_model"] = "smollm2-135m"
        print(f"sensitivity: {len(sens['layers'])} layers x {len(sens['schemes'])} types on "
              f"{sens['tokens']} tokens in {time.perf_counter() - t0:.0f} s", flush=True)
        sens_path = tmp / "sens.json"
        sens_path.write_text(json.dumps(sens))
        from lowbit.io.gguf.export import tensor_namer

        namer = tensor_namer(base)
        names = {namer(n + ".weight") for n in sens["layers"]}
        rows = []

        def evaluate(name: str, path: Path, extra: dict) -> None:
            r = subprocess.run(lowbit("eval", path, "--llamacpp", "--base", "smollm2-135m",
                                      "--data", WIKI, "--windows", a.eval_windows, "--json", "-",
                                      "--quiet"), capture_output=True, text=True, check=True)
            ev = json.loads(r.stdout)
            nbytes, numel = linear_bytes(path, names)
            row = {"variant": name, "linear_bytes": nbytes, "bpw": 8 * nbytes / numel,
                   **{k: ev.get(k) for k in ("ppl", "kld_mean", "kld_p99", "same_top_p")},
                   **extra}
            rows.append(row)
            print(format_table([row], COLS).splitlines()[-1], flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")

        for preset in a.presets:
            ref = tmp / f"{preset}.gguf"
            subprocess.run(lowbit("export", "smollm2-135m", ref, "--type", preset, "--quiet"),
                           check=True)
            size = linear_bytes(ref, names)[0]
            mixed = tmp / f"{preset}-mixed.gguf"
            r = subprocess.run(lowbit("export", "smollm2-135m", mixed, "--type", preset,
                                      "--target-size", size, "--sensitivity", sens_path,
                                      "--json", "-", "--quiet"),
                               capture_output=True, text=True, check=True)
            types = json.loads(r.stdout)["allocation"]["types"]
            evaluate(f"llama.cpp {preset}", ref, {})
            evaluate(f"measured at {preset}'s size", mixed, {"types": types})
        print()
        print(format_table(rows, COLS))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
