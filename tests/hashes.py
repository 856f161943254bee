"""Made-up 64-bit hashes for tests of the pair search."""

from __future__ import annotations

import random


def planted_hashes(rnd: random.Random, bases: int, max_distance: int) -> list[int]:
    """``bases`` random hashes, each followed by neighbours at distance 0..``max_distance``.

    Planting neighbours up to beyond the search threshold makes both misses and false
    hits at the boundary show.
    """
    hashes = []
    for _ in range(bases):
        base = rnd.getrandbits(64)
        hashes.append(base)
        for d in range(max_distance + 1):
            hashes.append(base ^ sum(1 << b for b in rnd.sample(range(64), d)))
    return hashes
