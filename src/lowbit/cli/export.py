"""``lowbit export``: GGUF for llama.cpp, or a serving checkpoint for vLLM / SGLang /
transformers."""

from __future__ import annotations

import time

import click

from lowbit.cli.common import check_outputs, dtype_option, dump_json, echo, note


@click.command("export")
@click.argument("model")
@click.argument("out", type=click.Path())
@click.option("--format", "fmt", default="gguf", show_default=True,
              help="gguf, compressed-tensors, gptq or awq")
@click.option("--type", "qtype", default="Q4_K_M", show_default=True,
              help="GGUF type: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_K_S, Q4_0, Q3_K_M, Q2_K, F16 ...; "
                   "native (MODEL a lowbit folder): each quantized Linear in the block type "
                   "that holds its own grid as it is (Q4_0 for w4g32, Q4_1 for w4g32-asym, "
                   "Q8_0 for w8 ...), the other tensors by that type's rules")
@click.option("--imatrix", "imatrix_path", type=click.Path(),
              help="importance matrix file (GGUF or legacy .dat, from `lowbit imatrix` or "
                   "llama-imatrix)")
@click.option("--target-bpw", type=float,
              help="GGUF: choose each block Linear's type (among the --sensitivity file's "
                   "llama.cpp candidates) for the least summed KL at this many bits per weight "
                   "over them; also writes OUT's llama-quantize --tensor-type-file")
@click.option("--target-size", help="GGUF: the same for a size of the block Linears (60MB, 57MiB)")
@click.option("--sensitivity", "sensitivity_path", type=click.Path(),
              help="lowbit analyze --json output measured with llama.cpp types (--schemes "
                   "Q3_K,Q4_K,Q5_K,Q6_K,Q8_0)")
@click.option("--tp", default=1, show_default=True,
              help="serving formats: check that this tensor-parallel degree splits every layer")
@dtype_option("GGUF: dtype to load the model in; serving formats: dtype of the unquantized "
              "tensors (auto = bf16 if the model was quantized in bf16, else fp16)")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--json", "json_path", type=click.Path(),
              help="write the results as JSON (- for standard output)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def command(model, out, fmt, qtype, imatrix_path, target_bpw, target_size, sensitivity_path, tp,
            dtype, overwrite, json_path, quiet):
    """Write MODEL (a model, a .gguf, or a quantized folder) as OUT: a GGUF file for llama.cpp,
    or (--format compressed-tensors|gptq|awq, MODEL a lowbit output folder) a checkpoint folder
    for vLLM, SGLang and transformers."""
    from lowbit.jobs import SERVING_FORMATS, export_job

    check_outputs(json_path=json_path)
    budget = None
    if target_bpw is not None or target_size is not None or sensitivity_path:
        budget = _budget(target_bpw, target_size, sensitivity_path)
    t0 = time.perf_counter()
    res = export_job(model, out, fmt, qtype, imatrix_path, overwrite, progress=not quiet, tp=tp,
                     dtype=dtype, note=note, budget=budget)
    if fmt in SERVING_FORMATS:
        echo(f"wrote {out}: {fmt} {res['scheme']}, {res['layers']} quantized Linears, "
             f"{res['tensor_bytes'] / 2**20:.1f} MiB of tensors in {len(res['shards'])} "
             f"shard(s), {time.perf_counter() - t0:.0f} s", json_path)
        for n in res["notes"]:
            note(n)
        dump_json(json_path, res)
        return
    mix = ", ".join(f"{r['tensors']} {t}" for t, r in sorted(res["types"].items()))
    echo(f"wrote {out}: {res['qtype']}{' with imatrix' if res['imatrix'] else ''}, "
         f"{res['file_bytes'] / 2**20:.1f} MiB, {res['bpw']:.3f} bits/weight "
         f"({res['bpw_linear']:.3f} over the blocks' Linears), tensors: {mix}, "
         f"{time.perf_counter() - t0:.0f} s", json_path)
    if res["note"]:  # which quantized tensors kept lowbit's codes, which were re-encoded
        note(res["note"])
    if res["imatrix_missing"]:
        note(f"the imatrix has no entry for {len(res['imatrix_missing'])} tensors")
    if "allocation" in res:
        a = res["allocation"]
        echo(f"block Linears: {', '.join(f'{n} {t}' for t, n in a['types'].items())}; "
             f"llama-quantize --tensor-type-file {a['tensor_type_file']}", json_path)
    dump_json(json_path, res)


def _budget(target_bpw, target_size, sensitivity_path):
    from lowbit.analyze import read_sensitivity
    from lowbit.cli.quantize import parse_size
    from lowbit.errors import LowbitError

    if (target_bpw is None) == (target_size is None) or not sensitivity_path:
        raise LowbitError("a GGUF size budget takes --sensitivity and one of --target-bpw and "
                          "--target-size")
    size = None if target_size is None else parse_size(target_size)
    return read_sensitivity(sensitivity_path), size, target_bpw
