"""The architecture matrix: which transformers causal-LM model types the capture exports exactly.

For every model type in transformers' causal-LM registry, :mod:`.tiny` derives a tiny seeded
config from the type's own config class, :mod:`.check` runs a real export through the worker code
and compares it with eager attention (``output_attentions=True``), and ``python -m
worker.archmatrix`` writes the admitted set (``storage/models/architectures.json``) and
docs/architectures.md from the results.
"""
