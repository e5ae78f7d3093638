"""lowbit's own CPU kernels (``gemv.cpp``, ``attention.cpp``), compiled at their first use and
cached.

The C++ sources are built once per source version and torch version with torch's extension
builder (a C++ compiler and ninja; about half a minute) into ``$LOWBIT_CACHE/kernels``, then
loaded as the ops ``torch.ops.lowbit_cpu.lut4_mm``, ``u8_mm``, ``a8_mm`` (products from packed
codes) and ``decode_attn`` (one decode step's attention over the cache positions in use). Each
op has variants - AVX-512 (``a8_mm`` also AVX-512 VNNI), AVX2+FMA, portable C++ - all compiled
into the one library; ``isa()`` names the best one this CPU runs (torch's own CPU capability
check, and the kernel's CPU flags for VNNI), and every call names its variant, so tests run each
path the CPU can execute.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from functools import cache
from pathlib import Path

import torch

from lowbit.errors import LowbitError

SOURCES = [Path(__file__).with_name(f) for f in ("gemv.cpp", "attention.cpp")]
ISAS = {"portable": 0, "avx2": 1, "avx512": 2, "avx512-vnni": 3}
# -fopenmp: at::parallel_for is inline, OpenMP in torch's CPU builds; without the flag its
# pragma is ignored and every product runs on one thread. The library then needs libgomp.so.1,
# which is torch's own, already loaded: one OpenMP runtime.
CFLAGS = ["-O3", "-std=c++17", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _flags() -> set[str]:
    try:  # Linux; elsewhere VNNI goes undetected and the AVX-512 variant runs
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _detected() -> str:
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if cap.startswith("AVX512"):
        return "avx512-vnni" if "avx512_vnni" in _flags() else "avx512"
    return "avx2" if cap.startswith("AVX2") else "portable"


def isa() -> str:
    """The variant kernels use: the fastest this CPU runs, or a lower one named by
    ``LOWBIT_CPU_ISA`` (portable, avx2, avx512, avx512-vnni)."""
    best = _detected()
    want = os.environ.get("LOWBIT_CPU_ISA")
    if not want:
        return best
    if want not in ISAS:
        raise LowbitError(f"LOWBIT_CPU_ISA={want!r}: choose one of {', '.join(ISAS)}")
    if ISAS[want] > ISAS[best]:
        raise LowbitError(f"LOWBIT_CPU_ISA={want}: this CPU runs at most {best}")
    return want


def runnable() -> list[str]:
    """Every variant this CPU can execute."""
    return [k for k, v in ISAS.items() if v <= ISAS[_detected()]]


def _cache_dir() -> Path:
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    key = b"".join(f.read_bytes() for f in SOURCES) + torch.__version__.encode() + \
        " ".join(CFLAGS + LDFLAGS).encode()
    tag = hashlib.sha256(key).hexdigest()[:12]
    return root / "kernels" / tag


@cache
def ops():
    """``torch.ops.lowbit_cpu``, building the library first if this version is not cached."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the pip package's binary, when not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    build = _cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    lib = build / "lowbit_cpu.so"
    if not lib.is_file():
        print("building lowbit's CPU kernels (once per version, about 30 s)...",
              file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name="lowbit_cpu", sources=[str(f) for f in SOURCES],
                           build_directory=str(build), extra_cflags=CFLAGS,
                           extra_ldflags=LDFLAGS, is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowbitError(f"could not build lowbit's CPU kernels ({first}); a C++ compiler "
                          "and ninja are needed, or choose --kernel dequant") from None
    _register_fakes()
    return torch.ops.lowbit_cpu


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing."""

    @torch.library.register_fake("lowbit_cpu::lut4_mm")
    def _(x, codes, table, scale, bias, group, isa):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("lowbit_cpu::u8_mm")
    def _(x, codes, scale, bias, group, isa):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("lowbit_cpu::a8_mm")
    def _(x, codes, scale, bias, group, bits, isa):
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("lowbit_cpu::decode_attn")
    def _(q, k, v, mask, scale, isa):
        return q.new_empty(*q.shape[:-1], v.shape[-1])
