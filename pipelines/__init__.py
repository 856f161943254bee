"""Kubeflow pipeline definitions wiring the components.

``pipelines.kaedama_pipeline.build_pipeline(image)``: dedup -> split -> train ->
evaluate -> export -> champion/challenger gate -> deploy. ``kaedama pipeline``
compiles, submits or runs it locally.
"""
