"""Shards of a bulk job: ``job_shards``, one row per range of micro-batches run by any worker.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04

Written by hand to match storage/index/models.py at this revision; it must not import the models.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def upgrade() -> None:
    when = sa.DateTime(timezone=True)
    op.create_table(
        "job_shards",
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_window", sa.Integer(), nullable=False),
        sa.Column("window_first_batch", sa.Integer(), nullable=False),
        sa.Column("first_batch", sa.Integer(), nullable=False),
        sa.Column("batches", sa.Integer(), nullable=False),
        sa.Column("units_total", sa.BigInteger(), nullable=False),
        sa.Column("units_done", sa.BigInteger(), nullable=False),
        sa.Column("tokens_planned", sa.BigInteger(), nullable=False),
        sa.Column("padded_tokens", sa.BigInteger(), nullable=False),
        sa.Column("tokens_done", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_worker", sa.String(255), nullable=True),
        sa.Column("last_worker", sa.String(255), nullable=True),
        sa.Column("heartbeat_at", when, nullable=True),
        sa.Column("error", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", when, nullable=False),
        sa.Column("updated_at", when, nullable=False),
        sa.Column("started_at", when, nullable=True),
        sa.Column("finished_at", when, nullable=True),
        sa.CheckConstraint(
            "state IN ({})".format(", ".join(f"'{s}'" for s in STATES)), name="ck_job_shards_state"
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_job_shards_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "shard", name="pk_job_shards"),
    )


def downgrade() -> None:
    op.drop_table("job_shards")
