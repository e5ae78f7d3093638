"""Hadamard matrices against their definition (entries +-1, H H^T = n I) for the widths of
the supported families, the orders no construction here gives, and the seeded rotations."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.hadamard import FastRotation, factor, hadamard, paley, rotation

# SmolLM2 (576, 1536, head 64), Qwen2.5-0.5B (896, 4864), Llama-3-8B (4096, 14336), Llama-2-7B
# (11008), Phi-3-mini (3072, 8192), Gemma-2-2B (2304, 9216), and Paley's small orders
WIDTHS = [1, 2, 4, 12, 20, 28, 36, 64, 192, 576, 640, 896, 1536, 2304, 3072]
BIG = [4864, 9216, 11008, 14336]


@pytest.mark.parametrize("n", WIDTHS)
def test_hadamard_matrices_meet_the_definition(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert bool(((h == 1) | (h == -1)).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", BIG)
def test_large_widths_factor_into_a_paley_order_times_a_power_of_two(n):
    m, k = factor(n)
    assert m * 2**k == n
    base = paley(m) if m > 2 else torch.ones(1, 1, dtype=torch.float64)
    rows = torch.randperm(m, generator=torch.Generator().manual_seed(0))[:64]  # a sample of rows
    assert bool(((base == 1) | (base == -1)).all())
    assert torch.equal(base[rows] @ base.T, m * torch.eye(m, dtype=torch.float64)[rows])


@pytest.mark.parametrize("n", [3, 9, 172])
def test_orders_without_a_construction_here_have_none(n):
    assert factor(n) is None and hadamard(n) is None


def test_paley_gives_nothing_for_non_paley_orders():
    assert paley(16) is None and paley(40) is None  # 15, 39 not prime; 7, 19 are 3 mod 4


def test_rotations_are_orthogonal_seeded_and_say_what_they_are():
    eye = torch.eye(576, dtype=torch.float64)
    q, what = rotation(576, 0)
    assert what == "hadamard 36x2^4"
    torch.testing.assert_close(q @ q.T, eye, rtol=0, atol=1e-12)
    assert torch.equal(q, rotation(576, 0)[0]) and not torch.equal(q, rotation(576, 1)[0])
    assert bool((q.abs() == 1 / 24).all())  # a Hadamard matrix over sqrt(576), signs flipped
    r, what = rotation(172, 3)
    assert what == "random orthogonal"
    torch.testing.assert_close(r @ r.T, torch.eye(172, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(LowbitError, match="positive size"):
        rotation(0, 0)


@pytest.mark.parametrize("n", [*WIDTHS, 172, 4864])
def test_the_fast_transform_is_the_rotation(n):
    """``FastRotation`` (butterflies and one small product) multiplies by exactly the matrix
    ``rotation`` builds, over any leading shape, to fp32 rounding; widths without a Hadamard
    matrix fall back to the dense product, and say so."""
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    fast = FastRotation(n, 5)
    q, what = rotation(n, 5)
    assert fast.desc == what and fast.fast == (what != "random orthogonal")
    got = fast(x.float())
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), x @ q, rtol=0, atol=5e-6 * float(x.abs().max()))
    assert fast.info() == {"kind": "hadamard", "size": n, "seed": 5}
