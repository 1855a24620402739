"""The SQL index: jobs (the source of truth for job state) and the chunks written for them.

SQLite (WAL) or PostgreSQL through SQLAlchemy 2 and Alembic::

    index = Index(settings.database_url)
    index.migrate()
    job = index.create_job(spec=..., owner="alice", store_url_for=..., max_attempts=3)

Nothing connects at import time; the engine is created on first use.
"""

from storage.bundle.records import ChunkRecord
from storage.index.records import TERMINAL_STATES, JobRecord, JobState
from storage.index.repo import Index

__all__ = ["TERMINAL_STATES", "ChunkRecord", "Index", "JobRecord", "JobState"]
