"""Progress in tokens: a bulk job's real tokens (prompt + new) done and expected.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

Written by hand to match storage/index/models.py at this revision; it must not import the models.
Two ``BIGINT NOT NULL DEFAULT 0`` columns (plain ``ADD COLUMN``: existing rows read 0, as a
one-batch job always does).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("tokens_done", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("tokens_total", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # SQLite cannot DROP COLUMN everywhere: batch mode
        batch.drop_column("tokens_total")
        batch.drop_column("tokens_done")
