"""Rotations (QuaRot-style R1 + R2, fused) on the protocol: the rotated fp32 model's
perplexity against the base (the rotation must change nothing), then weight-only variants with
and without the rotation, side by side (``quality.py``'s evaluation: perplexity, KL to the
base, top-1 agreement on WikiText-2 windows 0..63; in-domain calibration).

    python benchmarks/rotation.py gptq:w4g64 rotate+gptq:w4g64 gptq:w3g64 rotate+gptq:w3g64 \\
        --json benchmarks/results/rotation.jsonl
"""

from __future__ import annotations

import time

from quality import COLS, evaluate_against, protocol, run_variants, variant_parser
from variants import parse_variant

from lowbit.arch import spec_for
from lowbit.cli.common import format_table
from lowbit.methods.rotate import Rotate
from lowbit.models import load_model


def main() -> None:
    a = variant_parser().parse_args()
    base, tok, ids, ev, blp, rows = protocol(a.eval_windows)
    steps = [Rotate()]  # and each other rotate step the variants use, once
    for v in a.variants:
        first = parse_variant(v).steps[0]
        if isinstance(first, Rotate) and first not in steps:
            steps.append(first)
    for step in steps:  # the rotated model must compute what the base computes
        rot, _ = load_model("smollm2-135m")
        t0 = time.perf_counter()
        info = step.transform_model(rot, spec_for(rot))[0]
        parts = [p for p, on in (("R1", step.r1), ("R2", step.r2), ("R4 online", step.online),
                                 ("incoherent", step.incoherent)) if on]
        rows.append({"variant": f"rotated fp32 ({', '.join(parts)})", "calib": "-",
                     "bpw": 32.0, "seconds": time.perf_counter() - t0,
                     **evaluate_against(rot, ev, blp)})
        print(f"rotation: {info}", flush=True)
        del rot
    print(format_table(rows, COLS), flush=True)
    run_variants(a.variants, rows, tok, ids, ev, blp, "wiki", a.calib_windows, a.json)
    print()
    print(format_table(rows, COLS))


if __name__ == "__main__":
    main()
