"""Planted transformations of real Caltech-101 photos and the confirmation step.

Reports, for both hash recipes (full decode = imagehash reference, reduced decode):

* how often the reduced-decode phash equals the full-decode phash bit for bit;
* the brute-force phash candidates at t=4 on all of Caltech-101 (pairs, clusters,
  images, clusters spanning several labels) and that the exact search finds the same;
* recall at t=4 of planted copies (resize 50% and 25%, JPEG quality 25, brightness
  x1.1, 5% crop) and of the confirmation step on the found ones;
* the confirmation similarity of every Caltech candidate pair, how many the
  threshold confirms, and contact sheets of pairs (side by side PNGs) to look at.

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
from kaedama.dedup import DEFAULT_CONFIRM_THRESHOLD, DedupConfig, Rejected, run_local
from kaedama.hashcache import HashCache
from kaedama.hashing import HashRecipe, descriptor_similarities, hash_image_bytes
from kaedama.manifest import list_image_folder
from kaedama.neighbors import brute_force_pairs, find_pairs, hash_array

REPO = Path(__file__).resolve().parents[1]
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101"
RECIPES = {"full": HashRecipe(reduced_decode=False), "draft": HashRecipe()}


def hash_folder(root: Path, recipe: HashRecipe, cache: HashCache):
    """Records and rejected files of an image folder (cached by sha256 + recipe)."""
    records, rejected = [], []
    for row in list_image_folder(str(root)):
        data = Path(row.uri).read_bytes()
        try:
            records.append(hash_image_bytes(row.uri, row.label, data, recipe, cache=cache))
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
    full = records_by_recipe["full"]
    jpegs = [r for r in full if r.uri.lower().endswith((".jpg", ".jpeg"))]
    sample = random.Random(seed).sample(jpegs, min(n, len(jpegs)))
    out: dict[str, dict[str, list[tuple[int, float]]]] = {k: {} for k in RECIPES}
    by_uri = {name: {r.uri: r for r in recs} for name, recs in records_by_recipe.items()}
    for rec in sample:
        img = images.decode(Path(rec.uri).read_bytes())
        for tname, data in transformations(img).items():
            for rname, recipe in RECIPES.items():
                original = by_uri[rname][rec.uri]
                copy = hash_image_bytes("planted", rec.label, data, recipe)
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
    full, rejected = recs["full"]
    draft = {r.uri: r for r in recs["draft"][0]}
    report: dict = {"images": len(full), "rejected": len(rejected)}

    # 1. Reduced vs full decode agreement.
    dists = np.array([(r.hash ^ draft[r.uri].hash).bit_count() for r in full])
    reduced = np.array([min(r.width, r.height) >= 2 * 256 for r in full])
    report["recipe_agreement"] = {
        "all_images": float(np.mean(dists == 0)),
        "images_where_draft_reduces": int(reduced.sum()),
        "agreement_where_reduced": float(np.mean(dists[reduced] == 0)) if reduced.any() else None,
        "max_bits_differing": int(dists.max()),
    }

    # 2. Brute force at t on the full-decode recipe, and the exact search agrees.
    hashes = hash_array([r.hash for r in full])
    brute = brute_force_pairs(hashes, args.threshold)
    assert np.array_equal(brute, find_pairs(hashes, args.threshold)), "exact search differs"
    groups = components(len(full), brute)
    spanning = [g for g in groups if len({full[i].label for i in g}) > 1]
    report["caltech_candidates"] = {
        "pairs": len(brute),
        "clusters": len(groups),
        "images": sum(len(g) for g in groups),
        "clusters_spanning_labels": len(spanning),
        "spanning_label_sets": sorted(
            Counter(tuple(sorted({full[i].label for i in g})) for g in spanning).items()
        ),
        "exact_search_equals_brute_force": True,
    }

    # 3. Confirmation similarity of every candidate pair.
    sims = descriptor_similarities(
        [full[i].descriptor for i in brute[:, 0]], [full[j].descriptor for j in brute[:, 1]]
    )
    same_bytes = np.array([full[i].sha256 == full[j].sha256 for i, j, _ in brute.tolist()])
    thresholds = [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    report["caltech_confirmation"] = {
        "identical_bytes_pairs": int(same_bytes.sum()),
        "similarity_quantiles": np.quantile(sims, [0, 0.1, 0.25, 0.5, 0.75, 1]).round(3).tolist(),
        "confirmed_at": {str(t): int((sims >= t).sum()) for t in thresholds},
    }
    result = run_local(full, rejected, DedupConfig(reduced_decode=False))
    report["dedup_summary_full_recipe"] = {
        k: result.summary[k]
        for k in ("kept", "dropped", "rejected", "by_reason", "candidate_pairs", "confirmed_pairs")
    } | {"clusters": result.summary["clusters"], "conflicts": result.summary["conflict_clusters"]}

    # 4. Planted copies.
    planted = planted_stats(
        {"full": full, "draft": list(draft.values())}, args.planted, args.seed, args.threshold
    )
    table = {}
    for rname, per_t in planted.items():
        for tname, values in per_t.items():
            d = np.array([v[0] for v in values])
            s = np.array([v[1] for v in values])
            found = d <= args.threshold
            table.setdefault(tname, {})[rname] = {
                "hash_recall": float(found.mean()),
                "confirm_recall_of_found": float((s[found] >= DEFAULT_CONFIRM_THRESHOLD).mean())
                if found.any()
                else None,
                "end_to_end_recall": float((found & (s >= DEFAULT_CONFIRM_THRESHOLD)).mean()),
                "similarity_min": float(s.min()),
                "similarity_p01": float(np.quantile(s, 0.01)),
                "median_distance": float(np.median(d)),
            }
    report["planted"] = {
        "photos": args.planted,
        "confirm_threshold": DEFAULT_CONFIRM_THRESHOLD,
        "per_transformation": table,
    }
    all_s = np.array([v[1] for per_t in planted.values() for vs in per_t.values() for v in vs])
    report["planted"]["confirm_recall_at"] = {
        str(t): float((all_s >= t).mean()) for t in thresholds
    }

    if args.sheets:
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
