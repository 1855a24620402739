"""qkvault worker: the only package that imports torch.

``worker.app`` (the Celery app factory) stays torch-free so the API can enqueue by task name.
"""
