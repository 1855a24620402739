"""Model facts read without torch: where a model comes from and what its config says (``facts``),
and the architecture matrix's verdicts per model type (``architectures`` over
``architectures.json``, written by ``python -m worker.archmatrix``)."""
