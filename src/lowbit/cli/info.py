"""``lowbit info``: what a quantized folder holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from lowbit.cli.common import check_outputs, dump_json, echo
from lowbit.errors import LowbitError


@click.command("info")
@click.argument("path", type=click.Path())
@click.option("--verify", is_flag=True,
              help="the full check: every file's size and sha256 against lowbit.json, every "
                   "layer decoded (sizes against its scheme, finite weights)")
@click.option("--json", "json_path", type=click.Path(),
              help="write the description as JSON (- for standard output)")
def command(path, verify, json_path):
    """What a lowbit output folder holds: recipe, schemes per layer, size, calibration."""
    from lowbit.io.native import read_description
    from lowbit.jobs import scheme_label, verify_job

    check_outputs(json_path=json_path)
    p = Path(path)
    if not p.exists():
        raise LowbitError(f"{path} does not exist")
    if not p.is_dir():
        raise LowbitError(f"{path} is not a folder")
    desc = read_description(p)
    checked = verify_job(p) if verify else None
    size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    layers = desc.get("layers", {})
    kinds = Counter(i.get("grid") or i.get("kind") or (i.get("scheme") or {}).get("name")
                    for i in layers.values())
    label = scheme_label(desc) or "(full precision)"
    echo(f"{path}: {desc.get('method')} {label} from {desc.get('base_model')}", json_path)
    mix = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    echo(f"  layers: {len(layers)}" + (f" ({mix}), bits/weight "
                                        f"{desc.get('bits_per_weight', 0):.3f}" if layers else
                                        " quantized")
         + f", {size / 2**20:.1f} MiB on disk", json_path)
    kernels = layer_kernels(layers)
    if kernels:
        echo("  CPU kernels: " + ", ".join(f"{k} {n}" for k, n in kernels.most_common()),
             json_path)
    steps = (desc.get("recipe") or {}).get("steps")
    if steps:
        echo("  recipe: " + " -> ".join(_step_label(s) for s in steps), json_path)
    if desc.get("calibration"):
        c = desc["calibration"]
        echo(f"  calibration: {c['source']}, {c['windows']}x{c['seq_len']} from window "
             f"{c['offset']}", json_path)
    if checked:
        echo(f"  verified: {checked['files']} files (size, sha256), {checked['layers']} "
             "quantized layers decode to finite weights", json_path)
    dump_json(json_path, desc | {"bytes_on_disk": size, "kernels": dict(kernels)} |
              ({"verified": checked} if checked else {}))


def layer_kernels(layers: dict) -> Counter:
    """How many weight-only layers each CPU kernel multiplies (``lowbit.runtime.kernels``),
    from the records alone; the int8 and FP8 modules (``kind``) name their own."""
    from lowbit.formats.grids import grid_from_info
    from lowbit.runtime.kernels import kernel_for

    out: Counter = Counter()
    for info in layers.values():
        if "kind" in info:
            out[f"{info['kind']} ({info.get('kernel', 'auto')})"] += 1
        elif "grid" in info:
            try:
                out[kernel_for(grid_from_info(info), tuple(info["shape"]))] += 1
            except LowbitError:
                out["?"] += 1
    return out


def _step_label(s: dict) -> str:
    out = s["step"]
    if s.get("scheme"):
        out += f" {s['scheme']}"
    if s["step"] == "prune":
        out += f" {s['method']} {s['sparsity']}" + (" owl" if s.get("owl") else "")
    if s["step"] == "prune-structured":
        out += f" {s['ratio']:g}"
    if s.get("overrides"):
        out += f" ({len(s['overrides'])} override(s))"
    return out
