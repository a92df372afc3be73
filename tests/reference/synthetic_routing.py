"""numpy statement of the native synthetic routing (native/src/routing_synth.c), the oracle its tests compare with.

Shape legend: L = layers, E = experts, A = experts per position, U = experts any k consecutive positions use.

Layer l has a ring: a random order of the E experts (Fisher-Yates on a splitmix64 stream). Position p uses the A
experts ring[(start(p) + i) % E], i < A, with start(p) = floor(p (U - A) / (k - 1)); their scores are
(0.5 + u) / A with u in [0, 1) from a hash of (seed, layer, position, expert); every other expert scores 0.
"""
from __future__ import annotations

import numpy as np

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix(x: int) -> int:
    """splitmix64's output function of x + golden."""
    z = (x + GOLDEN) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def counts(n_expert: int, tls: float, cls: float) -> tuple[int, int]:
    """(A, U) for a stated TLS and CLS-k (rounded to whole experts, as the C code does with lround)."""
    A = int(np.floor((1.0 - tls) * n_expert + 0.5))
    U = int(np.floor((1.0 - cls) * n_expert + 0.5))
    return A, U


def ring(n_expert: int, seed: int, layer: int) -> list[int]:
    r = list(range(n_expert))
    st = mix(seed) ^ (((layer + 1) * 0xD1B54A32D192ED03) & M64)
    for i in range(n_expert - 1, 0, -1):
        j = mix(st) % (i + 1)
        st = (st + GOLDEN) & M64
        r[i], r[j] = r[j], r[i]
    return r


def scores(n_expert: int, tls: float, cls: float, k: int, seed: int, layer: int, positions) -> np.ndarray:
    """float32 [T, E]: the scores of `layer` at each position."""
    A, U = counts(n_expert, tls, cls)
    rg = ring(n_expert, seed, layer)
    out = np.zeros((len(positions), n_expert), np.float32)
    for t, p in enumerate(positions):
        start = p * (U - A) // (k - 1)
        key = mix((mix((seed + layer) & M64) + p) & M64)
        for i in range(A):
            e = rg[(start + i) % n_expert]
            u = (mix((key + e) & M64) >> 40) * 2.0 ** -24
            out[t, e] = np.float32((0.5 + u) / A)
    return out
