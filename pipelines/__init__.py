"""Kubeflow pipeline definitions wiring the components (dedup -> split -> train -> evaluate).

They arrive with the pipeline issue; ``kaedama pipeline`` says so until then.
"""
