"""qkvault REST API (FastAPI). Imports neither torch nor transformers.

Run with ``uvicorn --factory api.app:create_app``; nothing happens at import time.
"""
