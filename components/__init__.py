"""Kubeflow Pipelines components: thin typed signatures around the core library.

Each component mirrors one stage's frozen config as its parameters and calls the
core (``kaedama.split``, ``kaedama.train``, ...). They arrive with the pipeline issue;
until then the stages run through ``kaedama STAGE`` and the job image.
"""
