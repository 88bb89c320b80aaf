"""Object storage and reuse: where a job's artifacts live, and identical jobs answered from the store.

``artifacts_key``: the store prefix of a finished job's artifacts
(``jobs/<id>`` on the file store, ``jobs/<id>/<attempt token>`` on S3); it is
written in the same update that marks the job succeeded (the commit point).
``reuse_key``: hash of the job's inputs and of every setting that changes its
arithmetic; ``reused_from``: the succeeded job whose artifacts this one shares.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("artifacts_key", sa.String(255), nullable=True))
        batch.add_column(sa.Column("reuse_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("reused_from", sa.Uuid(), nullable=True))
        batch.create_index("ix_jobs_reuse_key", ["reuse_key"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_reuse_key")
        batch.drop_column("reused_from")
        batch.drop_column("reuse_key")
        batch.drop_column("artifacts_key")
