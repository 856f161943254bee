"""Cleaning beyond duplicates: label errors, outliers, low-information and unwanted images.

Runs after :mod:`kaedama.dedup` on its manifest (``kaedama clean``); each module is
usable on its own, so the dedup job can call the same functions.

``config``
    :class:`CleanConfig`, mirrored by the command's flags.
``embedcache``
    embeddings kept between runs, keyed by sha256 and model (no torch).
``embed``
    :func:`embedding_model` (a frozen timm backbone and its preprocessing) and batched
    embedding of the images the cache misses (torch).
``lowinfo``
    near-uniform, very dark or bright, tiny and extreme-aspect images, by cheap
    statistics (no model).
``labels``
    label errors: confident learning on out-of-fold probabilities of linear probes.
``outliers``
    images far from the rest of their label (kNN distance, robust z-score).
``junk``
    the wanted/unwanted classifier trained on examples a person removed.
``decide``
    findings -> flagged or dropped manifest rows, findings list, summary counts.
``job``
    the stage's run: scan each kept image once, the steps, the outputs.

The Beam side (``beam/embed.py``) computes the same embeddings with RunInference.
"""
