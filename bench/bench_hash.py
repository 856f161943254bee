"""Hashing throughput per core: kaedama's recipes vs imagehash on a full decode.

Two sets of real photos, both in memory (no disk I/O in the timings):

* ``hymenoptera``: the ~500 px ant/bee JPEGs as they are;
* ``phone``: 4000x3000-class JPEGs (quality 90) made by upscaling real photos, the
  size a phone uploads.

Methods, one process, images per second (median of ``--repeats`` runs, all methods
interleaved in each run so that load elsewhere hits them alike):

* ``decode_full``: :func:`kaedama.images.decode`, the floor for any full-decode hash;
* ``decode_draft``: the reduced colour JPEG decode (>= 256 px) alone, the floor of the
  ``exact`` recipe; ``decode_luma_draft``: the reduced luma-only decode, the floor of
  the default recipe;
* ``imagehash_full``: ``imagehash.phash(images.decode(data))``, what imgdupes does;
* ``kaedama_reference`` / ``kaedama_exact`` / ``kaedama_fast``:
  :func:`kaedama.dedup.hashing.hash_image_bytes` (sha256 + phash; the descriptor is made
  later, for candidate images only) with the imagehash reference recipe, the bit-exact
  recipe on the reduced decode (the former default) and the fast default.

Usage::

    nice -n 10 .venv/bin/python bench/bench_hash.py --repeats 5
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import imagehash
from PIL import Image

from kaedama import images
from kaedama.dedup.hashing import HashRecipe, hash_image_bytes

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"


def load_sets(n_small: int, n_phone: int) -> dict[str, list[bytes]]:
    paths = sorted(HYMENOPTERA.glob("*/*/*.jpg"))
    small = [p.read_bytes() for p in paths[:: max(1, len(paths) // n_small)][:n_small]]
    phone = []
    for data in small[:n_phone]:
        img = images.decode(data)
        scale = 4000 / max(img.size)
        big = img.resize(
            (round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC
        )
        buf = io.BytesIO()
        big.save(buf, "JPEG", quality=90)
        phone.append(buf.getvalue())
    return {"hymenoptera": small, "phone": phone}


# The reference (imagehash on a full decode), the bit-exact recipe on the >= 256 px
# reduced decode (the former default) and the fast default (luma plane, two-step resize).
RECIPES = {
    "reference": HashRecipe(reduced_decode=False, method="imagehash"),
    "exact": HashRecipe(method="exact"),
    "fast": HashRecipe(),
}


def methods():
    fast = RECIPES["fast"]
    return {
        "decode_full": lambda d: images.decode(d),
        "decode_draft": lambda d: images.decode(d, draft=fast.draft),
        "decode_luma_draft": lambda d: images.decode(d, draft=fast.draft, mode="L"),
        "imagehash_full": lambda d: imagehash.phash(images.decode(d)),
        **{
            f"kaedama_{name}": (lambda r: lambda d: hash_image_bytes("u", "l", d, r))(recipe)
            for name, recipe in RECIPES.items()
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=60, help="hymenoptera photos")
    parser.add_argument("--phone", type=int, default=8, help="upscaled phone-size photos")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sets = load_sets(args.small, args.phone)
    report: dict = {"repeats": args.repeats}
    for set_name, datas in sets.items():
        sizes = [images.probe(d) for d in datas]
        runs: dict[str, list[float]] = {name: [] for name in methods()}
        for _ in range(args.repeats):
            for name, fn in methods().items():
                start = time.perf_counter()
                for d in datas:
                    fn(d)
                runs[name].append(len(datas) / (time.perf_counter() - start))
        medians = {k: statistics.median(v) for k, v in runs.items()}
        reference = [hash_image_bytes("u", "l", d, RECIPES["reference"]).hash for d in datas]
        agreement = {}
        for name, recipe in RECIPES.items():
            bits = [
                (hash_image_bytes("u", "l", d, recipe).hash ^ ref).bit_count()
                for d, ref in zip(datas, reference, strict=True)
            ]
            agreement[name] = {
                "bit_equal": round(sum(b == 0 for b in bits) / len(bits), 3),
                "max_bits": max(bits),
            }
        report[set_name] = {
            "images": len(datas),
            "median_pixels": statistics.median(s.width * s.height for s in sizes),
            "images_per_s": {k: round(v, 1) for k, v in medians.items()},
            "agreement_with_reference": agreement,
            "speedup_kaedama_fast_vs_imagehash_full": round(
                medians["kaedama_fast"] / medians["imagehash_full"], 2
            ),
        }
        print(json.dumps({set_name: report[set_name]}), flush=True)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
