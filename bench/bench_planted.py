"""Planted transformations of real Caltech-101 photos and the confirmation step.

Reports, for each hash recipe (``reference`` = imagehash on a full decode, the bits
imgdupes and imagededup compute; ``fast`` = kaedama's default: pHash of the JPEG's luma
plane on a >= 256 px reduced decode, two-step resize; ``exact`` = kaedama's bit-exact
pHash code on a >= 256 px reduced colour decode (the former default);
``imagehash_draft256`` = imagehash on that decode; ``fast_draft64`` = the default on a
>= 64 px reduced decode, half scale for Caltech's ~300 px photos):

* how often its phash equals the reference phash bit for bit (and within 2 bits), and
  that kaedama's pHash code gives imagehash's bits on the same decode;
* the brute-force phash candidates at t=4 on all of Caltech-101 (pairs, clusters,
  images, clusters spanning several labels), that the exact search finds exactly the
  same pairs (pair recall vs brute force over the same recipe), and how many of the
  reference recipe's pairs it shares;
* recall at t=4 of planted copies (resize 50% and 25%, JPEG quality 25, brightness
  x1.1, 5% crop) and of the confirmation step on the found ones;
* the confirmation similarity of every Caltech candidate pair, how many the
  threshold confirms, the dedup decisions with the defaults, and (``--sheets``)
  contact sheets of the reference recipe's pairs (side by side PNGs) to look at.

Usage::

    nice -n 10 .venv/bin/python bench/bench_planted.py --planted 300 --sheets /tmp/kaedama-sheets

Hashes are cached (kaedama's own HashCache) under ``--cache``, so a re-run only hashes
the planted copies.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kaedama import images
from kaedama.dedup.decide import DEFAULT_CONFIRM_THRESHOLD, DedupConfig, Rejected, run_local
from kaedama.dedup.hashcache import HashCache
from kaedama.dedup.hashing import HashRecipe, descriptor_similarities, hash_image_bytes
from kaedama.dedup.neighbors import brute_force_pairs, find_pairs, hash_array
from kaedama.manifest import list_image_folder

REPO = Path(__file__).resolve().parents[1]
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101"
RECIPES = {
    "reference": HashRecipe(reduced_decode=False, method="imagehash"),
    "fast": HashRecipe(),
    "exact": HashRecipe(method="exact"),
    "imagehash_draft256": HashRecipe(method="imagehash"),
    "fast_draft64": HashRecipe(draft_size=64),
}
REFERENCE = "reference"
# kaedama's exact pHash and imagehash's on the same decode: the bits must be equal.
SAME_DECODE = {"exact": "imagehash_draft256"}


def hash_folder(root: Path, recipe: HashRecipe, cache: HashCache):
    """Records and rejected files of an image folder (cached by sha256 + recipe)."""
    records, rejected = [], []
    for row in list_image_folder(str(root)):
        data = Path(row.uri).read_bytes()
        try:
            records.append(
                hash_image_bytes(row.uri, row.label, data, recipe, cache=cache, describe=True)
            )
        except images.ImageError as exc:
            rejected.append(Rejected(row.uri, row.label, exc.reason, exc.message, len(data)))
    return records, rejected


def components(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components (size >= 2) of the pair graph."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        groups.setdefault(c, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def transformations(img: Image.Image) -> dict[str, bytes]:
    """The planted copies of one photo, as JPEG bytes."""
    w, h = img.size
    dx, dy = round(w * 0.025), round(h * 0.025)  # 2.5% off each side: 5% of each dimension
    return {
        "resize50": _jpeg(img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS)),
        "resize25": _jpeg(img.resize((max(1, w // 4), max(1, h // 4)), Image.Resampling.LANCZOS)),
        "jpeg_q25": _jpeg(img, 25),
        "brightness1.1": _jpeg(ImageEnhance.Brightness(img).enhance(1.1)),
        "crop5": _jpeg(img.crop((dx, dy, w - dx, h - dy))),
    }


def planted_stats(records_by_recipe, n: int, seed: int, threshold: int):
    """Distance and similarity of every planted copy to its original, per recipe."""
    full = records_by_recipe[REFERENCE]
    jpegs = [r for r in full if r.uri.lower().endswith((".jpg", ".jpeg"))]
    sample = random.Random(seed).sample(jpegs, min(n, len(jpegs)))
    out: dict[str, dict[str, list[tuple[int, float]]]] = {k: {} for k in RECIPES}
    by_uri = {name: {r.uri: r for r in recs} for name, recs in records_by_recipe.items()}
    for rec in sample:
        img = images.decode(Path(rec.uri).read_bytes())
        for tname, data in transformations(img).items():
            for rname, recipe in RECIPES.items():
                original = by_uri[rname][rec.uri]
                copy = hash_image_bytes("planted", rec.label, data, recipe, describe=True)
                dist = (copy.hash ^ original.hash).bit_count()
                sim = float(descriptor_similarities([copy.descriptor], [original.descriptor])[0])
                out[rname].setdefault(tname, []).append((dist, sim))
    return out


def contact_sheet(pairs, path: Path, size: int = 160) -> None:
    """Render pairs side by side, one row each, captioned with distance and similarity."""
    sheet = Image.new("RGB", (2 * size + 10, len(pairs) * (size + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (a, b, dist, sim) in enumerate(pairs):
        top = row * (size + 18)
        for col, uri in enumerate((a, b)):
            img = images.decode(Path(uri).read_bytes())
            img.thumbnail((size, size))
            sheet.paste(img, (col * (size + 10), top + 16))
        caption = f"d={dist} sim={sim:.3f} {Path(a).parent.name}/{Path(a).name} | "
        caption += f"{Path(b).parent.name}/{Path(b).name}"
        draw.text((2, top + 2), caption[:60], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caltech", type=Path, default=CALTECH)
    parser.add_argument("--planted", type=int, default=300, help="photos to transform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=int, default=4)
    parser.add_argument("--cache", default="/tmp/kaedama-bench/caltech_hash_cache.npz")
    parser.add_argument("--sheets", type=Path, default=None, help="write contact-sheet PNGs here")
    args = parser.parse_args(argv)
    if not args.caltech.is_dir():
        print(f"Caltech-101 not found at {args.caltech}", file=sys.stderr)
        return 2

    cache = HashCache.load(args.cache)
    recs = {name: hash_folder(args.caltech, recipe, cache) for name, recipe in RECIPES.items()}
    cache.save(args.cache)
    full, rejected = recs[REFERENCE]
    report: dict = {
        "images": len(full),
        "rejected": len(rejected),
        "recipes": {name: recipe.key() for name, recipe in RECIPES.items()},
    }
    thresholds = [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    brute_by_recipe = {}
    for name, recipe in RECIPES.items():
        records = recs[name][0]
        assert [r.uri for r in records] == [r.uri for r in full]
        entry: dict = {}
        # 1. Agreement with the reference bits.
        dists = np.array(
            [(r.hash ^ f.hash).bit_count() for r, f in zip(records, full, strict=True)]
        )
        entry["agreement_with_reference"] = {
            "bit_equal": round(float(np.mean(dists == 0)), 4),
            "within_2_bits": round(float(np.mean(dists <= 2)), 4),
            "max_bits_differing": int(dists.max()),
        }
        if name in SAME_DECODE:
            twin = recs[SAME_DECODE[name]][0]
            entry["bit_equal_to_" + SAME_DECODE[name]] = round(
                float(np.mean([r.hash == t.hash for r, t in zip(records, twin, strict=True)])), 4
            )
        # 2. Brute force at t over this recipe, and the exact search agrees.
        hashes = hash_array([r.hash for r in records])
        brute = brute_force_pairs(hashes, args.threshold)
        exact = find_pairs(hashes, args.threshold)
        brute_by_recipe[name] = brute
        groups = components(len(records), brute)
        spanning = [g for g in groups if len({records[i].label for i in g}) > 1]
        ref_pairs = {(i, j) for i, j, _ in brute_by_recipe[REFERENCE].tolist()}
        own_pairs = {(i, j) for i, j, _ in brute.tolist()}
        entry["caltech_candidates"] = {
            "pairs": len(brute),
            "pair_recall_vs_brute_force": len(own_pairs & {(i, j) for i, j, _ in exact.tolist()})
            / max(1, len(own_pairs)),
            "exact_search_equals_brute_force": bool(np.array_equal(brute, exact)),
            "shared_with_reference": len(own_pairs & ref_pairs),
            "clusters": len(groups),
            "images": sum(len(g) for g in groups),
            "clusters_spanning_labels": len(spanning),
            "spanning_label_sets": sorted(
                Counter(tuple(sorted({records[i].label for i in g})) for g in spanning).items()
            ),
        }
        # 3. Confirmation similarity of every candidate pair, and the defaults' decisions.
        sims = descriptor_similarities(
            [records[i].descriptor for i in brute[:, 0]],
            [records[j].descriptor for j in brute[:, 1]],
        )
        same_bytes = [records[i].sha256 == records[j].sha256 for i, j, _ in brute.tolist()]
        entry["caltech_confirmation"] = {
            "identical_bytes_pairs": int(sum(same_bytes)),
            "similarity_quantiles": np.quantile(sims, [0, 0.1, 0.25, 0.5, 0.75, 1])
            .round(3)
            .tolist(),
            "confirmed_at": {str(t): int((sims >= t).sum()) for t in thresholds},
        }
        config = DedupConfig(
            hash_method=recipe.method,
            reduced_decode=recipe.reduced_decode,
            draft_size=recipe.draft_size,
        )
        assert config.recipe() == recipe
        result = run_local(records, recs[name][1], config)
        entry["dedup_summary"] = {
            k: result.summary[k]
            for k in (
                "kept",
                "dropped",
                "rejected",
                "by_reason",
                "candidate_pairs",
                "confirmed_pairs",
                "clusters",
                "conflict_clusters",
            )
        }
        report[name] = entry

    # 4. Planted copies.
    planted = planted_stats(
        {name: r[0] for name, r in recs.items()}, args.planted, args.seed, args.threshold
    )
    for rname, per_t in planted.items():
        table = {}
        for tname, values in per_t.items():
            d = np.array([v[0] for v in values])
            s = np.array([v[1] for v in values])
            found = d <= args.threshold
            table[tname] = {
                "hash_recall": round(float(found.mean()), 4),
                "confirm_recall_of_found": round(
                    float((s[found] >= DEFAULT_CONFIRM_THRESHOLD).mean()), 4
                )
                if found.any()
                else None,
                "end_to_end_recall": round(
                    float((found & (s >= DEFAULT_CONFIRM_THRESHOLD)).mean()), 4
                ),
                "similarity_min": round(float(s.min()), 3),
                "similarity_p01": round(float(np.quantile(s, 0.01)), 3),
                "median_distance": float(np.median(d)),
            }
            if rname != REFERENCE:
                # Paired with the reference on the same copies: how many each finds alone.
                ref = np.array([v[0] for v in planted[REFERENCE][tname]]) <= args.threshold
                table[tname]["found_only_by_reference"] = int((ref & ~found).sum())
                table[tname]["found_only_by_this_recipe"] = int((found & ~ref).sum())
        all_s = np.array([v[1] for vs in per_t.values() for v in vs])
        report[rname]["planted"] = {
            "photos": args.planted,
            "confirm_threshold": DEFAULT_CONFIRM_THRESHOLD,
            "per_transformation": table,
            "confirm_recall_at": {str(t): round(float((all_s >= t).mean()), 4) for t in thresholds},
        }

    if args.sheets:
        brute = brute_by_recipe[REFERENCE]
        sims = descriptor_similarities(
            [full[i].descriptor for i in brute[:, 0]], [full[j].descriptor for j in brute[:, 1]]
        )
        order = np.argsort(sims)
        rows = [
            (full[i].uri, full[j].uri, int(d), float(sims[k]))
            for k in order.tolist()
            for i, j, d in [brute[k].tolist()]
        ]
        for start in range(0, len(rows), 12):
            contact_sheet(rows[start : start + 12], args.sheets / f"pairs_{start:03d}.png")
        report["sheets"] = str(args.sheets)
    print(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
