"""API keys (hashed) and the Idempotency-Key of job submissions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Written by hand to match storage/index/models.py at this revision; it must not import the models.
``jobs`` gains two nullable columns (plain ``ADD COLUMN``, fine on SQLite) and a unique index on
``(owner, idempotency_key)``: jobs submitted without a key hold NULL there, and NULLs never collide.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("label", sa.String(255), nullable=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.add_column("jobs", sa.Column("request_hash", sa.String(64), nullable=True))
    op.create_index("uq_jobs_owner_idempotency_key", "jobs", ["owner", "idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_jobs_owner_idempotency_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:  # SQLite cannot DROP COLUMN everywhere: batch mode
        batch.drop_column("request_hash")
        batch.drop_column("idempotency_key")
    op.drop_table("api_keys")
