"""Pages of tensors mapped from files given back: ``page_out`` and ``release`` act on the
tensor's own bytes (a view of a mapped file gives back its part only), measured in the
mapping's resident size (/proc/self/smaps)."""

from __future__ import annotations

import sys

import pytest
import torch

from lowbit.pipeline.release import page_out, release

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux madvise")
MB = 1 << 20


def resident_mb(path) -> float:
    rss, inside = 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if "-" in parts[0] and not parts[0].endswith(":"):
            inside = len(parts) >= 6 and parts[5] == str(path)
        elif inside and parts[0] == "Rss:":
            rss += int(parts[1])
    return rss / 1024


def test_a_view_gives_back_its_own_pages_only(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(bytes(range(256)) * (64 * MB // 256))
    t = torch.from_file(str(f), shared=True, size=64 * MB, dtype=torch.uint8)
    assert int(t[1::4096].sum()) > 0 and resident_mb(f) == pytest.approx(64, abs=1)
    if page_out([t[: 16 * MB]]) == 0:
        pytest.skip("MADV_PAGEOUT unsupported by this kernel")
    assert resident_mb(f) == pytest.approx(48, abs=1)  # the other 48 MB stay
    assert release([t[16 * MB : 40 * MB]]) == 24 * MB
    assert resident_mb(f) == pytest.approx(24, abs=1)
    assert int(t[1::4096].sum()) > 0 and resident_mb(f) == pytest.approx(64, abs=1)  # re-read
