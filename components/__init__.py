"""Kubeflow Pipelines components: thin typed signatures around the core library.

``components.stages`` holds one KFP v2 component per stage (dedup, split, train,
evaluate, export, deploy), each calling ``kaedama STAGE`` inside the job image;
``components.stages.build(image)`` makes them for one image.
"""
