"""Trusted certificates: when each was added (the table itself is from 0001).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Unix time the certificate was trusted; NULL for rows from before this migration.
    with op.batch_alter_table("certificates") as batch:
        batch.add_column(sa.Column("created_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("certificates") as batch:
        batch.drop_column("created_at")
