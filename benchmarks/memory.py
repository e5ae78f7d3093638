"""Peak RSS of GPTQ quantization for the default model and for the same model with its
decoder blocks doubled: the driver holds one block's activations, so the difference should
be about the extra weights, not more.

    python benchmarks/memory.py [--calib-samples 32]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from lowbit.models import load_model


def doubled_checkpoint(target: Path) -> int:
    model, tok = load_model("smollm2-135m")
    layers = model.model.layers
    new = []
    for layer in layers:
        new += [layer, copy.deepcopy(layer)]
    for i, layer in enumerate(new):
        layer.self_attn.layer_idx = i
    model.model.layers = type(layers)(new)
    model.config.num_hidden_layers = len(new)
    model.config.layer_types = None
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return sum(p.numel() for p in model.parameters())


def peak_of(cmd: list[str]) -> tuple[int, float]:
    """Run a command; return the child's peak RSS in bytes and its JSON seconds."""
    with tempfile.NamedTemporaryFile(suffix=".json") as js:
        subprocess.run(cmd + ["--json", js.name], check=True)
        secs = json.loads(Path(js.name).read_text())["seconds"]
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=32)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "doubled"
        n_params = doubled_checkpoint(ck)
        base = [sys.executable, "-m", "lowbit.cli", "quantize", "--method", "gptq", "--scheme",
                "w4g64", "--calib", "pydoc", "--calib-samples", str(a.calib_samples), "--quiet",
                "--overwrite"]
        rows = []
        # RUSAGE_CHILDREN reports the largest child so far: run the smaller model first
        for name, model in (("smollm2-135m (30 blocks)", "smollm2-135m"),
                            (f"doubled (60 blocks, {n_params / 1e6:.0f}M params)", str(ck))):
            peak, secs = peak_of(base + [model, "--out", str(Path(d) / "q")])
            rows.append((name, peak, secs))
            print(f"{name}: peak RSS {peak / 2**20:.0f} MiB, {secs:.0f} s", flush=True)
        print(f"difference: {(rows[1][1] - rows[0][1]) / 2**20:.0f} MiB "
              f"(extra fp32 weights: {(n_params - 134.5e6) * 4 / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
