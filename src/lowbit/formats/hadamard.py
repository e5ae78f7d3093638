"""Orthogonal rotations for QuaRot / SpinQuant / QuIP#-style incoherence: Hadamard matrices of
the widths language models use, randomised by a seeded sign flip, and their fast transform.

A Hadamard matrix ``H`` of order n has entries +-1 and ``H H^T = n I``; they exist only for
n = 1, 2 and multiples of 4. Widths are ``2^a * b`` with b odd (576 = 64 * 9, 1536 = 512 * 3,
640 = 128 * 5), so ``hadamard`` looks for a factor ``m = 2^c * b`` that Paley's constructions
give (from a prime q: order q + 1 when q = 3 mod 4, order 2 (q + 1) when q = 1 mod 4) and takes
``H_m (x) H_(2^(a-c))`` with Sylvester's doubling for the power of two: 576 = 36 * 16,
1536 = 12 * 128, 640 = 20 * 32, 14336 = 28 * 512, 11008 = 5504 * 2. Where no such factor
exists (odd widths, or 172 = 4 * 43), ``rotation`` falls back to a random orthogonal matrix
(QR of a seeded Gaussian) and says so in its description.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowbit.errors import LowbitError


def sylvester(k: int) -> Tensor:
    """The order-2^k Hadamard matrix ``[[H, H], [H, -H]]`` repeated (float64)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = the quadratic character of (j - i) mod q (0 on the diagonal)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)],
                       dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def paley(m: int) -> Tensor | None:
    """A Hadamard matrix of order m from Paley's constructions with a prime q, or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:  # Paley I: I + [[0, 1^T], [-1, Q]]
        q = m - 1
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:] = 1.0
        s[1:, 0] = -1.0
        s[1:, 1:] = _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:  # Paley II
        q = m // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:] = 1.0
        c[1:, 0] = 1.0
        c[1:, 1:] = _jacobsthal(q)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, one) + torch.kron((c == 0).double(), zero)
    return None


def factor(n: int) -> tuple[int, int] | None:
    """``(m, k)`` with ``n = m * 2^k`` and a Hadamard matrix of order m known here (m = 1, 2 or
    a Paley order; the smallest such m), or None."""
    if n < 1:
        return None
    a, b = 0, n
    while b % 2 == 0:
        a, b = a + 1, b // 2
    for c in range(a + 1):
        m = b << c
        if m <= 2 or paley(m) is not None:
            return m, a - c
    return None


def hadamard(n: int) -> Tensor | None:
    """A +-1 Hadamard matrix of order n (float64), or None when ``factor`` finds none."""
    f = factor(n)
    if f is None:
        return None
    m, k = f
    base = sylvester(1)[: m, : m] if m <= 2 else paley(m)
    return torch.kron(base, sylvester(k))


def _signs(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def rotation(n: int, seed: int) -> tuple[Tensor, str]:
    """An n x n orthogonal matrix (float64) and what it is: ``H diag(s) / sqrt(n)`` with random
    signs s from ``seed`` when a Hadamard matrix of order n is known, else a random orthogonal
    matrix (QR of a Gaussian from ``seed``, signs fixed so the draw is uniform)."""
    if n < 1:
        raise LowbitError(f"a rotation needs a positive size, not {n}")
    h = hadamard(n)
    if h is not None:
        m, k = factor(n)  # type: ignore[misc]
        return (h * _signs(n, seed) / math.sqrt(n),
                f"hadamard {m}x2^{k}" if m > 1 else f"hadamard 2^{k}")
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)), "random orthogonal"


class FastRotation:
    """``x -> x R`` with ``R = rotation(n, seed)[0]``, for rotations applied to activations at
    run time: ``R = (A (x) B) diag(s) / sqrt(n)`` with A the small Hadamard factor (order m)
    and B Sylvester's of order p = 2^k, so ``x (A (x) B)`` is ``A^T X B`` for x read as an
    m x p matrix X: k butterfly stages (the fast Walsh-Hadamard transform) and one m x m
    product, O(n (log n + m)) instead of n^2. Where ``rotation`` fell back to a random
    orthogonal matrix, the product is dense (and ``fast`` is False)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        f = factor(n)
        self.fast = f is not None
        if f is None:
            r, self.desc = rotation(n, seed)
            self._dense = r.float()
            return
        self.desc = f"hadamard {f[0]}x2^{f[1]}" if f[0] > 1 else f"hadamard 2^{f[1]}"
        m, k = f
        self.m, self.p = m, 1 << k
        self._signs = (_signs(n, seed) / math.sqrt(n)).float()
        self._a = (sylvester(1)[:m, :m] if m <= 2 else paley(m)).float()  # type: ignore[union-attr]

    def __call__(self, x: Tensor) -> Tensor:
        if not self.fast:
            return x @ self._dense.to(x.dtype)
        shape, dt = x.shape, x.dtype
        y = x.float().reshape(-1, self.m, self.p)
        h = 1
        while h < self.p:  # one butterfly stage: pairs (j, j + h) within blocks of 2h
            y = y.reshape(-1, self.m, self.p // (2 * h), 2, h)
            a, b = y[..., 0, :], y[..., 1, :]
            y = torch.stack((a + b, a - b), dim=-2)
            h *= 2
        y = y.reshape(-1, self.m, self.p)
        if self.m > 1:
            y = torch.einsum("im,bip->bmp", self._a, y)
        return (y.reshape(-1, self.n) * self._signs).reshape(shape).to(dt)

    def info(self) -> dict:
        return {"kind": "hadamard", "size": self.n, "seed": self.seed}
