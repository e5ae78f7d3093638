"""Pruning on the protocol: magnitude, Wanda and SparseGPT at 50% unstructured, 2:4 and 4:8,
alone (weights kept in full precision) and before a rounder, evaluated as ``quality.py`` does
(perplexity, KL to the base, top-1 agreement on WikiText-2 windows 0..63; in-domain
calibration). ``bits/w+mask`` is what a compact store spends: the kept codes, the grid's
parameters and a 1-bit mask per weight (pruned-alone Linears counted as fp16 values).

    python benchmarks/pruning.py magnitude@0.5+none wanda@0.5+none sparsegpt@0.5+none \\
        sparsegpt@0.5+gptq:w4g64 gptq:w3g64 --json benchmarks/results/pruning.jsonl
"""

from __future__ import annotations

from quality import COLS, protocol, run_variants, variant_parser

from lowbit.cli.common import format_table

PRUNE_COLS = [*COLS[:3], ("pruned", "pruned", ".3f"), ("bpw_mask", "bits/w+mask", ".3f"),
              *COLS[3:]]


def main() -> None:
    a = variant_parser().parse_args()
    base, tok, ids, ev, blp, rows = protocol(a.eval_windows)
    del base
    run_variants(a.variants, rows, tok, ids, ev, blp, "wiki", a.calib_windows, a.json)
    print()
    print(format_table(rows, PRUNE_COLS))


if __name__ == "__main__":
    main()
