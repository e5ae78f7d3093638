"""Bad and damaged inputs, table-driven: every command given a bad path, a damaged file, an
out-of-range number, conflicting options, a full disk ... ends in one line on stderr
(``error: ...``) with a non-zero exit code, no traceback, and nothing written or left behind.

Each case runs on a fresh copy of what it damages (a tiny float checkpoint, a native folder, a
compressed-tensors folder, a GGUF file, an importance matrix, statistics) in its own temporary
folder; after the run the folder's tree (names, sizes, modification times) is as it was: no
output, no partial output, no hidden temporary."""

from __future__ import annotations

import errno
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_helpers import lowbit_cli, one_line_error
from safetensors.torch import load_file, save_file

QUIET = ("--quiet",)
SMALL = ("--calib-samples", "2", "--seq-len", "32")


@pytest.fixture(scope="module")
def built(tiny_ckpt, tmp_path_factory):
    """What the cases copy and damage: the tiny checkpoint and calibration text, a native
    folder, a compressed-tensors folder, a GGUF file, an importance matrix, statistics."""
    ckpt, text = tiny_ckpt
    d = tmp_path_factory.mktemp("built")
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--format", "native",
               "--out", d / "native", "--quiet")
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "w4g32", "--format",
               "compressed-tensors", "--out", d / "ct", "--quiet")
    lowbit_cli("quantize", ckpt, "--method", "rtn", "--scheme", "fp8-e4m3", "--format",
               "native", "--out", d / "fp8", "--quiet")  # fp8-e5m2 codes are stored alike
    lowbit_cli("export", ckpt, d / "m.gguf", "--type", "F16", "--quiet")
    lowbit_cli("imatrix", ckpt, "--out", d / "im.gguf", "--calib", text, *SMALL, "--quiet")
    lowbit_cli("inspect", ckpt, "--calib", text, *SMALL, "--save-stats", d / "s.safetensors",
               "--quiet")
    return {"model": ckpt, "text": text, "native": d / "native", "ct": d / "ct", "fp8": d / "fp8",
            "gguf": d / "m.gguf", "im": d / "im.gguf", "stats": d / "s.safetensors"}


# ------------------------------------------------------------------ damage


def flip(rel: str, where: float = 0.5) -> Callable:
    """Invert one byte of a file (``where``: fraction of the file; tensor data is at the end)."""
    def f(p: dict, _mp) -> None:
        path = p["tmp"] / rel
        data = bytearray(path.read_bytes())
        data[int(len(data) * where)] ^= 0xFF
        path.write_bytes(bytes(data))
    return f


def truncate(rel: str, keep: float = 0.5) -> Callable:
    def f(p: dict, _mp) -> None:
        path = p["tmp"] / rel
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return f


def remove(rel: str) -> Callable:
    def f(p: dict, _mp) -> None:
        (p["tmp"] / rel).unlink()
    return f


def write(rel: str, content: str | bytes) -> Callable:
    def f(p: dict, _mp) -> None:
        path = p["tmp"] / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return f


def mkdir(rel: str) -> Callable:
    def f(p: dict, _mp) -> None:
        (p["tmp"] / rel).mkdir(parents=True)
    return f


def edit_json(rel: str, change: Callable[[dict], object], keep_digest: bool = False) -> Callable:
    """Edit a JSON file. A lowbit.json's own sha256 is dropped unless ``keep_digest`` (as in a
    folder of a lowbit that wrote none), so that the checks behind it are reached."""
    def f(p: dict, _mp) -> None:
        path = p["tmp"] / rel
        d = json.loads(path.read_text())
        change(d)
        if not keep_digest:
            d.pop("sha256", None)
        path.write_text(json.dumps(d))
    return f


def set_layer(key: str, value) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        d["layers"]["model.layers.0.self_attn.q_proj"][key] = value
    return change


def poison(tensor: str, value: float) -> Callable:
    """One non-finite value in a float checkpoint's tensor."""
    def f(p: dict, _mp) -> None:
        path = p["tmp"] / "model" / "model.safetensors"
        t = load_file(str(path))
        t[tensor].view(-1)[3] = value
        save_file(t, str(path), metadata={"format": "pt"})
    return f


def poison_gguf(tensor: str) -> Callable:
    """A NaN (f16 0x7e00) in the data of one tensor of the F16 GGUF."""
    def f(p: dict, _mp) -> None:
        from lowbit.io.gguf.check import check_gguf

        path = p["tmp"] / "m.gguf"
        info = check_gguf(path)
        at = info["data_offset"] + info["tensors"][tensor]["offset"] + 2 * 5
        data = bytearray(path.read_bytes())
        data[at : at + 2] = b"\x00\x7e"
        path.write_bytes(bytes(data))
    return f


def failing(target: str, exc: BaseException) -> Callable:
    """Make ``module.attr`` raise ``exc`` (a full disk, a missing permission, Ctrl-C ...)."""
    def f(_p: dict, mp) -> None:
        def boom(*_a, **_k):
            raise exc
        mp.setattr(target, boom)
    return f


def both(*fs: Callable) -> Callable:
    def f(p: dict, mp) -> None:
        for g in fs:
            g(p, mp)
    return f


def _mark_foreign_gguf(p: dict, _mp) -> None:
    """A GGUF lowbit did not write: the marker key renamed in place (same length)."""
    path = p["tmp"] / "m.gguf"
    data = path.read_bytes()
    assert b"general.quantized_by" in data
    path.write_bytes(data.replace(b"general.quantized_by", b"general.quantized_xx", 1))


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EACCES = PermissionError(errno.EACCES, "Permission denied")
SHARD = "lowbit.io.shards._Shard.finish"

# ------------------------------------------------------------------ the table
# (args with {placeholders}, distinctive part of the message, damage, exit code)
# {model} {native} {ct} {gguf} {im} {stats}: a fresh copy in the case's folder {tmp};
# {text}: the calibration text; {out}: where the output would go (must not appear)

Q = ("quantize", "{model}")
RTN = ("--method", "rtn", "--scheme", "w4g32")
QO = ("--out", "{out}", "--quiet")
EV = ("--data", "{text}", "--windows", "2", "--seq-len", "32", "--quiet")
CAL = ("--calib", "{text}", *SMALL)
Q_LAYER = "model.layers.0.self_attn.q_proj"

CASES = [
    # ---- quantize: the model
    ("q-missing-model", ("quantize", "{tmp}/nope", *RTN, *QO), "model not found", None),
    ("q-model-not-gguf", ("quantize", "{tmp}/m.bin", *RTN, *QO), "must be .gguf",
     write("m.bin", b"1234")),
    ("q-empty-gguf", ("quantize", "{tmp}/e.gguf", *RTN, *QO), "empty file", write("e.gguf", b"")),
    ("q-garbage-gguf", ("quantize", "{tmp}/g.gguf", *RTN, *QO), "corrupt GGUF",
     write("g.gguf", b"GGUF" + bytes(60))),
    ("q-truncated-gguf", ("quantize", "{gguf}", *RTN, *QO), "corrupt GGUF",
     truncate("m.gguf", 0.6)),
    ("q-nan-gguf", ("quantize", "{gguf}", *RTN, *QO), "blk.0.attn_q.weight",
     poison_gguf("blk.0.attn_q.weight")),
    ("q-nan-gguf-embedding", ("quantize", "{gguf}", *RTN, *QO), "token_embd.weight",
     poison_gguf("token_embd.weight")),
    ("q-empty-folder", ("quantize", "{tmp}/d", *RTN, *QO), "no config.json", mkdir("d")),
    ("q-corrupt-config", (*Q, *RTN, *QO), "config.json", write("model/config.json", "{not json")),
    ("q-config-no-type", (*Q, *RTN, *QO), "config.json", write("model/config.json", "{}")),
    ("q-config-list", (*Q, *RTN, *QO), "config.json", write("model/config.json", "[1, 2]")),
    ("q-truncated-weights", (*Q, *RTN, *QO), "model.safetensors",
     truncate("model/model.safetensors")),
    ("q-garbage-weights", (*Q, *RTN, *QO), "model.safetensors",
     write("model/model.safetensors", b"\xff" * 64)),
    ("q-empty-weights", (*Q, *RTN, *QO), "model.safetensors",
     write("model/model.safetensors", b"")),
    ("q-missing-weights", (*Q, *RTN, *QO), "no weights", remove("model/model.safetensors")),
    ("q-weights-folder", (*Q, *RTN, *QO), "model.safetensors",
     both(remove("model/model.safetensors"), mkdir("model/model.safetensors"))),
    ("q-nan-weight", (*Q, *RTN, *QO), f"{Q_LAYER}.weight", poison(f"{Q_LAYER}.weight",
                                                                  float("nan"))),
    ("q-inf-weight", (*Q, *RTN, *QO), "model.layers.1.mlp.down_proj.weight",
     poison("model.layers.1.mlp.down_proj.weight", float("inf"))),
    ("q-nan-embedding", (*Q, *RTN, *QO), "model.embed_tokens.weight",
     poison("model.embed_tokens.weight", float("nan"))),
    ("q-nan-norm", (*Q, *RTN, *QO), "model.norm.weight", poison("model.norm.weight",
                                                                float("-inf"))),
    # ---- quantize: options
    ("q-bad-method", (*Q, "--method", "awq9", *QO), "unknown method", None),
    ("q-bad-scheme", (*Q, "--method", "rtn", "--scheme", "w4q", *QO), "unknown scheme", None),
    ("q-bad-format", (*Q, *RTN, "--format", "onnx", *QO), "unknown output format", None),
    ("q-group-size", (*Q, "--method", "rtn", "--scheme", "w4g48", *QO), "group size 48", None),
    ("q-calib-samples-0", (*Q, "--method", "gptq", "--calib-samples", "0", *QO),
     "--calib-samples must be at least 1", None),
    ("q-calib-samples-neg", (*Q, "--method", "gptq", "--calib-samples", "-4", *QO),
     "--calib-samples must be at least 1", None),
    ("q-seq-len-1", (*Q, "--method", "gptq", "--seq-len", "1", *QO),
     "--seq-len must be at least 2", None),
    ("q-seq-len-beyond", (*Q, "--method", "gptq", "--calib", "{text}", "--seq-len", "99999",
                          *QO), "max_position_embeddings", None),
    ("q-calib-offset-neg", (*Q, "--method", "gptq", "--calib-offset", "-1", *QO),
     "--calib-offset must not be negative", None),
    ("q-chunk-0", (*Q, *RTN, "--chunk", "0", *QO), "--chunk must be at least 1", None),
    ("q-eval-neg", (*Q, *RTN, "--eval", "-1", *QO), "--eval takes", None),
    ("q-tp-0", (*Q, *RTN, "--tp", "0", *QO), "--tp must be at least 1", None),
    ("q-damp-rtn", (*Q, *RTN, "--damp", "0.1", *QO), "--damp is for", None),
    ("q-alpha-gptq", (*Q, "--method", "gptq", "--alpha", "0.5", *QO), "--alpha is for", None),
    ("q-recipe-and-method", (*Q, "--recipe", "{tmp}/r.yaml", "--method", "rtn", *QO),
     "--recipe gives the steps", write("r.yaml", "steps: [rtn]")),
    ("q-recipe-missing", (*Q, "--recipe", "{tmp}/r.yaml", *QO), "cannot read recipe", None),
    ("q-recipe-not-yaml", (*Q, "--recipe", "{tmp}/r.yaml", *QO), "not YAML",
     write("r.yaml", "steps: [rtn\n  - : :")),
    ("q-recipe-unknown-step", (*Q, "--recipe", "{tmp}/r.yaml", *QO), "r.yaml",
     write("r.yaml", "steps:\n  - frobnicate: {}\n")),
    ("q-recipe-bad-json", (*Q, "--recipe", "{tmp}/r.json", *QO), "not JSON",
     write("r.json", "{")),
    ("q-recipe-folder", (*Q, "--recipe", "{tmp}/r", *QO), "cannot read recipe", mkdir("r")),
    ("q-calib-missing", (*Q, "--method", "gptq", "--calib", "{tmp}/c.txt", *SMALL, *QO),
     "c.txt", None),
    ("q-calib-empty", (*Q, "--method", "gptq", "--calib", "{tmp}/c.txt", *SMALL, *QO),
     "holds no text", write("c.txt", " \n")),
    ("q-calib-folder", (*Q, "--method", "gptq", "--calib", "{tmp}/c", *SMALL, *QO), "c",
     mkdir("c")),
    ("q-calib-bad-jsonl", (*Q, "--method", "gptq", "--calib", "{tmp}/c.jsonl", *SMALL, *QO),
     "not JSON", write("c.jsonl", "{\"text\": 1\n")),
    ("q-calib-binary", (*Q, "--method", "gptq", "--calib", "{tmp}/c.txt", *SMALL, *QO),
     "not UTF-8", write("c.txt", b"\xff\xfe\x00\x81" * 50)),
    ("q-eval-data-missing", (*Q, *RTN, "--eval", "2", "--eval-data", "{tmp}/e.txt",
                             "--seq-len", "32", *QO), "e.txt", None),
    ("q-out-exists", (*Q, *RTN, *QO), "pass --overwrite", mkdir("out")),
    ("q-overwrite-foreign-folder", (*Q, *RTN, *QO, "--overwrite"), "not written by lowbit",
     write("out/notes.txt", "mine")),
    ("q-overwrite-foreign-file", (*Q, *RTN, *QO, "--overwrite"), "not written by lowbit",
     write("out", "mine")),
    ("q-overwrite-bad-lowbit-json", (*Q, *RTN, *QO, "--overwrite"), "not written by lowbit",
     write("out/lowbit.json", "[]")),
    ("q-out-under-file", (*Q, *RTN, "--out", "{tmp}/f/out", "--quiet"), "not a folder",
     write("f", "x")),
    ("q-json-folder-missing", (*Q, *RTN, *QO, "--json", "{tmp}/no/r.json"), "does not exist",
     None),
    ("q-json-under-file", (*Q, *RTN, *QO, "--json", "{tmp}/f/r.json"), "not a folder",
     write("f", "x")),
    ("q-json-is-folder", (*Q, *RTN, *QO, "--json", "{tmp}/j"), "is a folder", mkdir("j")),
    ("q-dtype", (*Q, *RTN, "--dtype", "int3", *QO), "Invalid value for '--dtype'", None),
    ("q-chunk-text", (*Q, *RTN, "--chunk", "many", *QO), "Invalid value for '--chunk'", None),
    ("q-no-out", (*Q, *RTN), "Missing option '--out'", None),
    ("q-unknown-option", (*Q, *RTN, "--frobnicate", *QO), "No such option", None),
    ("q-gptq-format-nf4", (*Q, "--method", "rtn", "--scheme", "nf4", "--format", "gptq", *QO),
     "gptq", None),
    ("q-disk-full", (*Q, *RTN, *QO), "No space left on device", failing(SHARD, ENOSPC)),
    ("q-no-permission", (*Q, *RTN, *QO), "Permission denied", failing(SHARD, EACCES)),
    ("q-disk-full-serving", (*Q, *RTN, "--format", "compressed-tensors", *QO),
     "No space left on device", failing(SHARD, ENOSPC)),
    ("q-interrupted", (*Q, *RTN, *QO), "interrupted", failing(SHARD, KeyboardInterrupt()), 130),
    ("q-internal-error", (*Q, *RTN, *QO), "internal error", failing(
        "lowbit.api.quantize", RuntimeError("boom")), 1),
    # ---- eval
    ("e-missing-model", ("eval", "{tmp}/nope", *EV), "model not found", None),
    ("e-windows-0", ("eval", "{model}", "--windows", "0"), "--windows must be at least 1",
     None),
    ("e-windows-neg", ("eval", "{model}", "--windows", "-2"), "--windows must be at least 1",
     None),
    ("e-seq-len-1", ("eval", "{model}", "--seq-len", "1"), "--seq-len at least 2", None),
    ("e-seq-len-beyond", ("eval", "{model}", "--data", "{text}", "--windows", "1", "--seq-len",
                          "99999"), "max_position_embeddings", None),
    ("e-batch-0", ("eval", "{model}", "--batch", "0"), "--batch must be at least 1", None),
    ("e-data-missing", ("eval", "{model}", "--data", "{tmp}/d.txt", "--windows", "1"),
     "d.txt", None),
    ("e-data-empty", ("eval", "{model}", "--data", "{tmp}/d.txt", "--windows", "1"),
     "holds no text", write("d.txt", "")),
    ("e-base-missing", ("eval", "{model}", *EV, "--base", "{tmp}/nope"), "model not found",
     None),
    ("e-json-folder-missing", ("eval", "{model}", *EV, "--json", "{tmp}/no/e.json"),
     "does not exist", None),
    ("e-dtype", ("eval", "{model}", "--dtype", "fp7"), "Invalid value for '--dtype'", None),
    ("e-native-flipped", ("eval", "{native}", *EV), "lowbit.safetensors",
     flip("native/lowbit.safetensors")),
    ("e-native-flipped-header", ("eval", "{native}", *EV), "lowbit.safetensors",
     flip("native/lowbit.safetensors", 0.0001)),
    ("e-native-truncated", ("eval", "{native}", *EV), "lowbit.safetensors",
     truncate("native/lowbit.safetensors")),
    ("e-native-no-weights", ("eval", "{native}", *EV), "lowbit.safetensors",
     remove("native/lowbit.safetensors")),
    ("e-native-no-config", ("eval", "{native}", *EV), "config.json",
     remove("native/config.json")),
    ("e-native-config-edited", ("eval", "{native}", *EV), "config.json",
     edit_json("native/config.json", lambda d: d.update(num_hidden_layers=1))),
    ("e-native-corrupt-json", ("eval", "{native}", *EV), "lowbit.json",
     write("native/lowbit.json", "{\"format\": ")),
    ("e-native-empty-json", ("eval", "{native}", *EV), "lowbit.json",
     write("native/lowbit.json", "")),
    ("e-native-json-list", ("eval", "{native}", *EV), "lowbit.json",
     write("native/lowbit.json", "[]")),
    ("e-native-version", ("eval", "{native}", *EV), "version 99",
     edit_json("native/lowbit.json", lambda d: d.update(version=99))),
    ("e-native-no-version", ("eval", "{native}", *EV), "version",
     edit_json("native/lowbit.json", lambda d: d.pop("version"))),
    ("e-native-no-layers", ("eval", "{native}", *EV), "layers",
     edit_json("native/lowbit.json", lambda d: d.pop("layers"))),
    ("e-native-layer-no-shape", ("eval", "{native}", *EV), Q_LAYER,
     edit_json("native/lowbit.json", lambda d: d["layers"][Q_LAYER].pop("shape"))),
    ("e-native-edited-bits", ("eval", "{native}", *EV), Q_LAYER,
     edit_json("native/lowbit.json", set_layer("grid", "w8g32"))),
    ("e-native-edited-bits-3", ("eval", "{native}", *EV), Q_LAYER,
     edit_json("native/lowbit.json", set_layer("grid", "w3g32"))),
    ("e-native-edited-group", ("eval", "{native}", *EV), Q_LAYER,
     edit_json("native/lowbit.json", set_layer("grid", "w4g64"))),
    ("e-native-edited-shape", ("eval", "{native}", *EV), Q_LAYER,
     edit_json("native/lowbit.json", set_layer("shape", [32, 64]))),
    ("e-native-unknown-grid", ("eval", "{native}", *EV), "unknown scheme",
     edit_json("native/lowbit.json", set_layer("grid", "w5q"))),
    ("e-native-grid-e4m3-to-e5m2", ("eval", "{fp8}", *EV), "edited or damaged",
     edit_json("fp8/lowbit.json", set_layer("grid", "fp8-e5m2"), keep_digest=True)),
    ("e-native-recipe-edited", ("info", "{native}"), "edited or damaged",
     edit_json("native/lowbit.json", lambda d: d.update(recipe="gptq"), keep_digest=True)),
    ("e-native-wrong-format", ("eval", "{native}", *EV), "not a lowbit-native folder",
     edit_json("native/lowbit.json", lambda d: d.update(format="other"))),
    ("e-native-edited-checksum", ("eval", "{native}", *EV), "lowbit.safetensors",
     edit_json("native/lowbit.json", lambda d: d["files"]["lowbit.safetensors"].update(
         sha256="0" * 64))),
    ("e-ct-flipped", ("eval", "{ct}", *EV), "model.safetensors", flip("ct/model.safetensors")),
    ("e-ct-no-weights", ("eval", "{ct}", *EV), "model.safetensors",
     remove("ct/model.safetensors")),
    ("e-ct-edited-bits", ("eval", "{ct}", *EV), "config.json",
     edit_json("ct/config.json", lambda d: d["quantization_config"]["config_groups"][
         "group_0"]["weights"].update(num_bits=8))),
    ("e-ct-version", ("eval", "{ct}", *EV), "version 99",
     edit_json("ct/lowbit.json", lambda d: d.update(version=99))),
    # ---- export
    ("x-missing-model", ("export", "{tmp}/nope", "{out}.gguf"), "model not found", None),
    ("x-bad-format", ("export", "{model}", "{out}", "--format", "onnx"),
     "unknown export format", None),
    ("x-bad-type", ("export", "{model}", "{out}.gguf", "--type", "Q9_X"), "Q9_X", None),
    ("x-out-exists", ("export", "{model}", "{tmp}/o.gguf"), "pass --overwrite",
     write("o.gguf", "x")),
    ("x-overwrite-foreign", ("export", "{model}", "{tmp}/o.gguf", "--overwrite"),
     "not written by lowbit", write("o.gguf", "mine")),
    ("x-overwrite-foreign-gguf", ("export", "{model}", "{gguf}", "--overwrite", "--quiet"),
     "not written by lowbit", _mark_foreign_gguf),
    ("x-out-folder", ("export", "{model}", "{tmp}/d", "--overwrite"), "is a folder",
     mkdir("d")),
    ("x-out-folder-missing", ("export", "{model}", "{tmp}/no/o.gguf"), "does not exist", None),
    ("x-out-under-file", ("export", "{model}", "{tmp}/f/o.gguf"), "not a folder",
     write("f", "x")),
    ("x-imatrix-missing", ("export", "{model}", "{out}.gguf", "--imatrix", "{tmp}/i.dat"),
     "i.dat", None),
    ("x-imatrix-garbage", ("export", "{model}", "{out}.gguf", "--imatrix", "{tmp}/i.dat"),
     "i.dat", write("i.dat", b"\x07\x00")),
    ("x-imatrix-truncated", ("export", "{model}", "{out}.gguf", "--imatrix", "{im}"),
     "im.gguf", truncate("im.gguf", 0.7)),
    ("x-json-folder-missing", ("export", "{model}", "{out}.gguf", "--json", "{tmp}/no/x.json"),
     "does not exist", None),
    ("x-disk-full", ("export", "{model}", "{out}.gguf", "--quiet"), "No space left on device",
     failing("lowbit.io.gguf.export._write", ENOSPC)),
    ("x-interrupted", ("export", "{model}", "{out}.gguf", "--quiet"), "interrupted",
     failing("lowbit.io.gguf.export._write", KeyboardInterrupt()), 130),
    ("x-serving-from-float", ("export", "{model}", "{out}", "--format", "gptq"),
     "exports a quantized model", None),
    ("x-serving-flipped", ("export", "{native}", "{out}", "--format", "compressed-tensors"),
     "lowbit.safetensors", flip("native/lowbit.safetensors")),
    ("x-serving-out-exists", ("export", "{native}", "{tmp}/o", "--format", "gptq"),
     "pass --overwrite", mkdir("o")),
    ("x-serving-disk-full", ("export", "{native}", "{out}", "--format", "gptq", "--quiet"),
     "No space left on device", failing(SHARD, ENOSPC)),
    ("x-tp-0", ("export", "{native}", "{out}", "--format", "gptq", "--tp", "0"),
     "--tp must be at least 1", None),
    ("x-gguf-flipped-source", ("export", "{native}", "{out}.gguf"), "lowbit.safetensors",
     flip("native/lowbit.safetensors")),
    # ---- info
    ("i-missing", ("info", "{tmp}/nope"), "nope", None),
    ("i-file", ("info", "{tmp}/f"), "is not a folder", write("f", "x")),
    ("i-no-lowbit-json", ("info", "{tmp}/d"), "lowbit.json", mkdir("d")),
    ("i-corrupt-json", ("info", "{native}"), "lowbit.json", write("native/lowbit.json", "{")),
    ("i-version", ("info", "{native}"), "version 99",
     edit_json("native/lowbit.json", lambda d: d.update(version=99))),
    ("i-verify-flipped", ("info", "{native}", "--verify"), "sha256",
     flip("native/lowbit.safetensors")),
    ("i-verify-truncated", ("info", "{native}", "--verify"), "lowbit.safetensors",
     truncate("native/lowbit.safetensors")),
    ("i-verify-missing-file", ("info", "{native}", "--verify"), "tokenizer.json",
     remove("native/tokenizer.json")),
    ("i-verify-edited-bits", ("info", "{native}", "--verify"), Q_LAYER,
     edit_json("native/lowbit.json", set_layer("grid", "w8g32"))),
    ("i-verify-ct-flipped", ("info", "{ct}", "--verify"), "model.safetensors",
     flip("ct/model.safetensors")),
    ("i-json-under-file", ("info", "{native}", "--json", "{tmp}/f/i.json"), "not a folder",
     write("f", "x")),
    # ---- imatrix
    ("m-missing-model", ("imatrix", "{tmp}/nope", "--out", "{out}.gguf", *CAL),
     "model not found", None),
    ("m-out-folder-missing", ("imatrix", "{model}", "--out", "{tmp}/no/i.gguf", *CAL),
     "does not exist", None),
    ("m-out-under-file", ("imatrix", "{model}", "--out", "{tmp}/f/i.gguf", *CAL),
     "not a folder", write("f", "x")),
    ("m-out-is-folder", ("imatrix", "{model}", "--out", "{tmp}/d", *CAL), "is a folder",
     mkdir("d")),
    ("m-calib-samples-0", ("imatrix", "{model}", "--out", "{out}.gguf", "--calib-samples", "0"),
     "--calib-samples must be at least 1", None),
    ("m-seq-len-beyond", ("imatrix", "{model}", "--out", "{out}.gguf", "--calib", "{text}",
                          "--seq-len", "99999"), "max_position_embeddings", None),
    ("m-out-exists", ("imatrix", "{model}", "--out", "{im}", *CAL),
     "exists; pass --overwrite", None),
    ("m-overwrite-not-an-imatrix", ("imatrix", "{model}", "--out", "{tmp}/notes.gguf", *CAL,
                                    "--overwrite"), "an importance matrix file",
     write("notes.gguf", "my notes")),
    ("m-chunk-0", ("imatrix", "{model}", "--out", "{out}.gguf", *CAL, "--chunk", "0"),
     "--chunk must be at least 1", None),
    ("m-disk-full", ("imatrix", "{model}", "--out", "{out}.gguf", *CAL, "--quiet"),
     "No space left on device", failing("lowbit.io.gguf.imatrix._write_gguf", ENOSPC)),
    # ---- inspect
    ("s-missing-model", ("inspect", "{tmp}/nope", *CAL), "model not found", None),
    ("s-stats-missing", ("inspect", "{model}", "--stats", "{tmp}/s.safetensors"),
     "s.safetensors", None),
    ("s-stats-corrupt", ("inspect", "{model}", "--stats", "{stats}"), "s.safetensors",
     truncate("s.safetensors")),
    ("s-plot-folder-missing", ("inspect", "{model}", *CAL, "--plot", "{tmp}/no/p.png"),
     "does not exist", None),
    ("s-save-stats-under-file", ("inspect", "{model}", *CAL, "--save-stats", "{tmp}/f/s.st"),
     "not a folder", write("f", "x")),
    ("s-ratio-0", ("inspect", "{model}", *CAL, "--ratio", "0"), "--ratio must be above 1",
     None),
    ("s-calib-samples-0", ("inspect", "{model}", "--calib-samples", "0"),
     "--calib-samples must be at least 1", None),
    ("s-unknown-layer", ("inspect", "{model}", *CAL, "--plot", "{out}.png", "--layer", "x.y",
                         "--quiet"), "no statistics for 'x.y'", None),
    # ---- demo
    ("d-calib-samples-0", ("demo", "--model", "{model}", "--calib-samples", "0"),
     "--calib-samples must be at least 1", None),
    ("d-windows-0", ("demo", "--model", "{model}", "--windows", "0"),
     "--windows must be at least 1", None),
    ("d-seq-len-1", ("demo", "--model", "{model}", "--seq-len", "1"), "--seq-len", None),
    ("d-bad-scheme", ("demo", "--model", "{model}", "--scheme", "w4q"), "unknown scheme", None),
    ("d-missing-model", ("demo", "--model", "{tmp}/nope"), "model not found", None),
    ("d-json-folder-missing", ("demo", "--model", "{model}", "--json", "{tmp}/no/d.json"),
     "does not exist", None),
    ("d-out-foreign", ("demo", "--model", "{model}", "--out", "{tmp}/o", "--windows", "1"),
     "not written by lowbit", write("o/mine.txt", "x")),
    # ---- the group
    ("unknown-command", ("frobnicate",), "No such command", None),
]


COPIES = ("model", "native", "fp8", "ct", "gguf", "im", "stats")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


def _fill(arg: str, paths: dict[str, Path]) -> str:
    for k, v in paths.items():
        arg = arg.replace("{" + k + "}", str(v))
    return arg


def test_the_table_is_large_and_distinct():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 90
    assert len({tuple(c[1]) + (c[0].split("-")[0],) for c in CASES}) >= 90
    assert {c[1][0] for c in CASES} >= {"quantize", "eval", "export", "info", "imatrix",
                                        "inspect", "demo"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, built, tmp_path, monkeypatch):
    name, args, message, damage, *rest = case
    code = rest[0] if rest else 2
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    work = tmp_path / "w"
    work.mkdir()
    paths = {"tmp": work, "out": work / "out", "text": built["text"]}
    used = " ".join(args)
    for k in COPIES:
        if "{" + k + "}" not in used:
            continue
        src = built[k]
        dst = work / src.name
        if k == "model":
            dst = work / "model"
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.txt"))
        else:
            shutil.copy2(src, dst)
        paths[k] = dst
    if damage is not None:
        damage(paths, monkeypatch)
    before = _tree(work)
    r = lowbit_cli(*[_fill(a, paths) for a in args], ok=False)
    assert "Traceback" not in r.err
    # notes said before the failure (format choices, kernels) are not part of the error
    r.err = "\n".join(line for line in r.err.splitlines() if not line.startswith("note: "))
    one_line_error(r, message, code=code)
    after = _tree(work)
    kept = re.search(r"finished blocks are kept in (\S+):", r.err)
    if kept:  # a run that failed after its blocks were done keeps them, and says so
        resume = Path(kept.group(1))
        assert resume.name == "out.lowbit-resume" and (resume / "state.json").is_file()
        after = {k: v for k, v in after.items() if not k.startswith("out.lowbit-resume")}
    assert after == before, f"{name}: the case's folder changed"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    """``lowbit --debug`` (or LOWBIT_DEBUG=1) prints the traceback, then the same one line and
    exit code."""
    args = ("quantize", tmp_path / "nope", "--method", "rtn", "--out", tmp_path / "o")
    plain = lowbit_cli(*args, ok=False)
    one_line_error(plain, "model not found")
    debug = lowbit_cli("--debug", *args, ok=False)
    assert debug.code == 2 and "Traceback" in debug.err
    assert debug.err.strip().splitlines()[-1] == plain.err.strip()
    monkeypatch.setenv("LOWBIT_DEBUG", "1")
    env = lowbit_cli(*args, ok=False)
    assert env.code == 2 and "Traceback" in env.err


def test_an_internal_error_is_one_line_with_exit_code_1(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    monkeypatch.setattr("lowbit.api.plan", lambda *a, **k: 1 / 0)
    r = lowbit_cli("quantize", tiny_ckpt[0], "--method", "rtn", "--out", tmp_path / "o",
                   ok=False)
    one_line_error(r, "internal error: ZeroDivisionError: division by zero (run with --debug",
                   code=1)
    assert list(tmp_path.iterdir()) == []
