"""Cleaning: exact and near-duplicates and label conflicts, with a review page.

Modules, in the order the job uses them:

``hashing``
    fingerprints of one image's bytes (sha256, perceptual hash, second-signal descriptor).
``hashcache``
    fingerprints kept between runs, keyed by sha256 and hash recipe.
``neighbors``
    the exact Hamming-radius pair search.
``sameshot``
    the same-shot test of candidate pairs (ORB keypoints, RANSAC homography; OpenCV,
    the ``clean`` extra, imported on first use).
``decisions``
    a person's decisions from the review page (a JSON file keyed by sha256).
``decide``
    the decisions (:class:`DedupConfig`, clusters, conflicts, manifest rows) and the
    Beam-free single-process run (:func:`run_local`).
``job``
    the job's step functions, shared by the Beam job (``beam/dedup.py``) and the
    in-process engine, and its outputs.
``review``
    the self-contained HTML review page and the printed summary.
"""
