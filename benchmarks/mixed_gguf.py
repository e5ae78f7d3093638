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
from pathlib import Path

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


def export(*args) -> dict:
    r = subprocess.run(lowbit("export", "smollm2-135m", *args, "--json", "-", "--quiet"),
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["Q3_K_M", "Q4_K_M"])
    ap.add_argument("--schemes", default="Q3_K,Q4_K,Q5_K,Q6_K,Q8_0")
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--json", help="append one JSON line per variant")
    ap.add_argument("--sensitivity", help="reuse (or, when missing, keep) the measurement here")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-mixed-gguf-"))
    try:
        sens_path = Path(a.sensitivity) if a.sensitivity else tmp / "sens.json"
        if sens_path.is_file():
            sens = json.loads(sens_path.read_text())
        else:
            base, tok = load_model("smollm2-135m")
            ids = data.tokenize(tok, data.read_text(WIKI))
            sens = measure(base, data.windows(ids, 4, 128, start=400), a.schemes.split(","))
            sens["base_model"] = "smollm2-135m"
            sens_path.write_text(json.dumps(sens))
        print(f"sensitivity: {len(sens['layers'])} layers x {len(sens['schemes'])} types on "
              f"{sens['tokens']} tokens in {sens['seconds']:.0f} s", flush=True)
        n_lin = sum(r["numel"] for r in sens["layers"].values())
        rows = []

        def linear_bytes(res: dict) -> int:  # the block Linears' bytes, as export counts them
            return round(res["bpw_linear"] * n_lin / 8)

        def evaluate(name: str, path: Path, res: dict, extra: dict) -> None:
            r = subprocess.run(lowbit("eval", path, "--llamacpp", "--base", "smollm2-135m",
                                      "--data", WIKI, "--windows", a.eval_windows, "--json", "-",
                                      "--quiet"), capture_output=True, text=True, check=True)
            ev = json.loads(r.stdout)
            nbytes = linear_bytes(res)
            row = {"variant": name, "linear_bytes": nbytes,
                   "bpw": 8 * nbytes / n_lin,
                   **{k: ev.get(k) for k in ("ppl", "kld_mean", "kld_p99", "same_top_p")},
                   **extra}
            rows.append(row)
            print(format_table([row], COLS).splitlines()[-1], flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")

        for preset in a.presets:
            ref, mixed = tmp / f"{preset}.gguf", tmp / f"{preset}-mixed.gguf"
            r_ref = export(ref, "--type", preset)
            r_mix = export(mixed, "--type", preset, "--target-size", linear_bytes(r_ref),
                           "--sensitivity", sens_path)
            evaluate(f"llama.cpp {preset}", ref, r_ref, {})
            evaluate(f"measured at {preset}'s size", mixed, r_mix,
                     {"types": r_mix["allocation"]["types"]})
        print()
        print(format_table(rows, COLS))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
