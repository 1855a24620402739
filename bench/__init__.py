"""Benchmark: qkvault's export path against the naive ``output_attentions=True`` + ``np.savez`` dump
and against a raw write of the same bytes to the same store (``python -m bench --help``).

Importing this package does nothing; the work starts in :func:`bench.cli.main`.
"""
