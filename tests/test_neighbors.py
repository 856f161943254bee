"""Exactness of the Hamming-distance pair search against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaedama.dedup.neighbors import (
    block_keys,
    brute_force_pairs,
    find_pairs,
    hash_array,
    pairs_in_bucket,
)

U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


def _flip(h: int, positions: list[int]) -> int:
    for p in positions:
        h ^= 1 << p
    return h


@st.composite
def clustered_hashes(draw, max_size: int = 120) -> list[int]:
    """Random hashes plus copies with a few flipped bits, blanks and exact repeats."""
    seeds = draw(st.lists(U64, min_size=1, max_size=max_size // 3))
    out = list(seeds)
    for seed in seeds:
        for _ in range(draw(st.integers(0, 3))):
            flips = draw(st.lists(st.integers(0, 63), max_size=8))
            out.append(_flip(seed, flips))
    out += [0] * draw(st.integers(0, 6))
    out += [(1 << 64) - 1] * draw(st.integers(0, 3))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hashes=clustered_hashes(), threshold=st.integers(0, 10), extra_blocks=st.integers(0, 3))
def test_find_pairs_equals_brute_force(hashes, threshold, extra_blocks):
    arr = hash_array(hashes)
    expected = brute_force_pairs(arr, threshold)
    assert np.array_equal(find_pairs(arr, threshold), expected)
    # Every block plan is exact, not only the one the cost model picks.
    forced = find_pairs(arr, threshold, blocks=threshold + 1 + extra_blocks)
    assert np.array_equal(forced, expected)


@settings(max_examples=30, deadline=None)
@given(hashes=clustered_hashes(max_size=60), threshold=st.integers(0, 6))
def test_tiny_max_bucket_still_exact(hashes, threshold):
    arr = hash_array(hashes)
    got = find_pairs(arr, threshold, max_bucket=2)
    assert np.array_equal(got, brute_force_pairs(arr, threshold))


@settings(max_examples=200, deadline=None)
@given(a=U64, flips=st.lists(st.integers(0, 63), max_size=12), threshold=st.integers(0, 10))
def test_block_keys_pigeonhole(a, flips, threshold):
    b = _flip(a, flips)
    ka, kb = block_keys(a, threshold), block_keys(b, threshold)
    assert len(ka) == threshold + 1
    assert [k[0] for k in ka] == list(range(threshold + 1))
    if (a ^ b).bit_count() <= threshold:
        assert set(ka) & set(kb), "a pair within t must share a block"


def test_block_keys_cover_all_bits():
    # Reassembling the blocks gives the hash back: no bit is left out or counted twice.
    h = 0xF0E1D2C3B4A59687
    keys = block_keys(h, 4)
    rebuilt = 0
    total = 0
    for index, value in reversed(keys):
        rebuilt |= value << total
        total += 13 if index < 4 else 12
    assert total == 64 and rebuilt == h
    with pytest.raises(ValueError):
        block_keys(h, 64)


def test_all_zero_bucket_and_degenerate_inputs():
    # 300 blank images: every pair is a distance-0 pair; plus one near and one far hash.
    hashes = [0] * 300 + [0b111, (1 << 64) - 1]
    arr = hash_array(hashes)
    got = find_pairs(arr, 4, max_bucket=50)
    assert len(got) == 300 * 299 // 2 + 300  # blanks among themselves + each blank to 0b111
    assert np.array_equal(got, brute_force_pairs(arr, 4))
    assert find_pairs(hash_array([]), 4).shape == (0, 3)
    assert find_pairs(hash_array([5]), 4).shape == (0, 3)


def test_many_near_pairs_random():
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**63, size=400, dtype=np.uint64) * np.uint64(2)
    copies = [base]
    for flips in (1, 2, 3, 4, 5):
        mask = np.zeros_like(base)
        for _ in range(flips):
            mask |= np.uint64(1) << rng.integers(0, 64, size=base.size).astype(np.uint64)
        copies.append(base ^ mask)
    arr = np.concatenate(copies)
    for threshold in (0, 2, 4, 7):
        got = find_pairs(arr, threshold)
        assert np.array_equal(got, brute_force_pairs(arr, threshold))
    assert len(find_pairs(arr, 4)) >= 4 * 400  # the planted pairs are there


def test_output_format():
    arr = hash_array([0b1011, 0b0011, 0b1011, 1 << 40])
    got = find_pairs(arr, 1)
    assert got.dtype == np.int64
    assert got.tolist() == [[0, 1, 1], [0, 2, 0], [1, 2, 1]]


def test_multiword_hashes_equal_brute_force():
    rng = np.random.default_rng(3)
    hashes = [int(rng.integers(0, 2**62)) << 194 | int(rng.integers(0, 2**62)) for _ in range(80)]
    hashes += [_flip(h, [3, 100, 250]) for h in hashes[:40]]
    arr = hash_array(hashes, 256)
    assert arr.shape == (120, 4)
    for threshold in (0, 3, 6):
        got = find_pairs(arr, threshold)
        assert np.array_equal(got, brute_force_pairs(arr, threshold))
    assert len(find_pairs(arr, 3)) == 40


@settings(max_examples=40, deadline=None)
@given(hashes=clustered_hashes(max_size=40), threshold=st.integers(0, 8))
def test_pairs_in_bucket_matches_brute_force(hashes, threshold):
    items = [(f"gs://b/img{k:03d}.jpg", h) for k, h in enumerate(hashes)]
    got = pairs_in_bucket(items, threshold)
    expected = [
        (items[i][0], items[j][0], d)
        for i, j, d in brute_force_pairs(hash_array(hashes), threshold).tolist()
    ]
    assert got == sorted(expected)
    assert all(a < b for a, b, _ in got)
    # Same answer whatever the order of the bucket's members.
    assert pairs_in_bucket(list(reversed(items)), threshold) == got


def test_pairs_in_bucket_long_hashes_and_same_uri():
    h = (1 << 255) | 12345
    items = [("b", h), ("a", _flip(h, [0, 200])), ("c", _flip(h, [1, 2, 3, 4, 5])), ("a", h)]
    got = pairs_in_bucket(items, 4, max_bucket=2)
    assert ("a", "b", 0) in got and ("a", "b", 2) in got
    assert all(a != b for a, b, _ in got)
    assert not any("c" in (a, b) for a, b, _ in got)
