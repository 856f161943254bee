"""Near-duplicate search alone: every pair of 64-bit hashes within Hamming distance t.

Compares, on the same arrays in one run:

* ``kaedama.dedup.neighbors.find_pairs`` (exact multi-index hashing, in memory);
* ``kaedama.dedup.neighbors.brute_force_pairs`` (numpy popcount over all pairs), timed on a
  subset and extrapolated to N^2 because the full million would take hours;
* faiss ``IndexBinaryMultiHash`` (4 tables of 16 bits, nflip=1: exact at t=4 by
  pigeonhole), when ``faiss-cpu`` is installed.

Two hash distributions: uniform random hashes, and "skewed" hashes made by flipping
8-20 random bits of real Caltech-101 phashes (real phashes share blocks far more than
random ones, which makes bigger buckets). Both get planted pairs at distances 0..6.

Usage::

    nice -n 10 .venv/bin/python bench/bench_search.py --n 1000000 --subset 50000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from kaedama.dedup.neighbors import brute_force_pairs, find_pairs

REPO = Path(__file__).resolve().parents[1]
CALTECH_CACHE = Path("/tmp/kaedama-bench/caltech_hash_cache.npz")


def uniform_hashes(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)


def skewed_hashes(n: int, rng: np.random.Generator) -> np.ndarray | None:
    """Real phashes with 8-20 random bits flipped each (None without the Caltech cache)."""
    if not CALTECH_CACHE.exists():
        return None
    from kaedama.dedup.hashcache import HashCache

    cache = HashCache.load(str(CALTECH_CACHE))
    seeds = np.array(sorted({v.hash for _, v in cache.items()}), dtype=np.uint64)
    out = seeds[rng.integers(0, seeds.size, size=n)]
    flips = rng.integers(8, 21, size=n)
    for k in range(20):
        bit = np.uint64(1) << rng.integers(0, 64, size=n).astype(np.uint64)
        out = np.where(k < flips, out ^ bit, out)
    return out


def plant_pairs(hashes: np.ndarray, pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Overwrite the second half of ``pairs`` random slots with copies 0..6 bits away."""
    slots = rng.choice(hashes.size, size=2 * pairs, replace=False)
    src, dst = slots[:pairs], slots[pairs:]
    out = hashes.copy()
    copy = out[src].copy()
    flips = rng.integers(0, 7, size=pairs)
    for k in range(6):
        bit = np.uint64(1) << rng.integers(0, 64, size=pairs).astype(np.uint64)
        copy = np.where(k < flips, copy ^ bit, copy)
    out[dst] = copy
    return out


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def faiss_pairs(hashes: np.ndarray, threshold: int) -> np.ndarray | None:
    """Self range-join with faiss IndexBinaryMultiHash; rows (i, j, dist), i < j."""
    try:
        import faiss
    except ImportError:
        return None
    if threshold != 4:
        return None  # the (4 tables x 16 bits, nflip=1) set-up is exact for t <= 4 only
    codes = hashes.astype(">u8").view(np.uint8).reshape(-1, 8)
    index = faiss.IndexBinaryMultiHash(64, 4, 16)
    index.nflip = 1
    index.add(codes)
    lims, dist, ids = index.range_search(codes, threshold + 1)  # strict "<" radius
    rows = np.repeat(np.arange(hashes.size), np.diff(lims.astype(np.int64)))
    ids = ids.astype(np.int64)
    keep = ids > rows
    out = np.stack([rows[keep], ids[keep], dist[keep]]).T.astype(np.int64)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--subset", type=int, default=50_000)
    parser.add_argument("--planted", type=int, default=20_000)
    parser.add_argument("--threshold", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument(
        "--faiss-n", type=int, default=200_000, help="faiss runs on this prefix (it is slow)"
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    report: dict = {"n": args.n, "threshold": args.threshold, "repeats": args.repeats}
    datasets = {"uniform": uniform_hashes(args.n, rng), "skewed": skewed_hashes(args.n, rng)}
    for name, base in datasets.items():
        if base is None:
            continue
        hashes = plant_pairs(base, args.planted, rng)
        # Plant extra pairs inside the subset so that its exactness check has many pairs.
        hashes[: args.subset] = plant_pairs(hashes[: args.subset], args.subset // 25, rng)
        entry: dict = {}
        sub = hashes[: args.subset]
        bf_t, _, bf = timed(lambda s=sub: brute_force_pairs(s, args.threshold), args.repeats)
        mih_sub_t, _, mih_sub = timed(lambda s=sub: find_pairs(s, args.threshold), args.repeats)
        entry["subset"] = {
            "n": int(sub.size),
            "pairs": len(bf),
            "find_pairs_equals_brute_force": bool(np.array_equal(bf, mih_sub)),
            "brute_force_s": round(bf_t, 3),
            "find_pairs_s": round(mih_sub_t, 4),
        }
        full_t, times, found = timed(lambda h=hashes: find_pairs(h, args.threshold), args.repeats)
        entry["full"] = {
            "pairs": len(found),
            "find_pairs_s_median": round(full_t, 3),
            "find_pairs_s_runs": [round(t, 3) for t in times],
            "brute_force_s_extrapolated": round(bf_t * (args.n / sub.size) ** 2, 1),
        }
        if not args.no_faiss:
            f_sub = faiss_pairs(sub, args.threshold)
            if f_sub is not None:
                entry["subset"]["faiss_equals_brute_force"] = bool(np.array_equal(f_sub, bf))
                prefix = hashes[: args.faiss_n]
                f_t, _, f_full = timed(lambda h=prefix: faiss_pairs(h, args.threshold), 1)
                m_t, _, m_full = timed(lambda h=prefix: find_pairs(h, args.threshold), 1)
                entry["faiss"] = {
                    "n": int(prefix.size),
                    "faiss_multihash_s": round(f_t, 3),
                    "find_pairs_s": round(m_t, 3),
                    "faiss_equals_find_pairs": bool(np.array_equal(f_full, m_full)),
                }
        report[name] = entry
        print(json.dumps({name: entry}), flush=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
