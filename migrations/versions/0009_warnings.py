"""Warnings: conditions the daemon found (`/1.0/warnings`, `lxc warning`).

Revision ID: 0009
Revises: 0008

One row per (type, project, entity): raising it again bumps `count`, `last_seen_at` and
`last_message`. `project` is NULL for a server-wide warning; `entity_url` is "" when the warning
is about no object in particular. Times are unix times (float); status and severity are LXD's
names (new|acknowledged|resolved, low|moderate|high).
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "warnings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("project", sa.String(), nullable=True),
        sa.Column("type", sa.String(), nullable=False),
        sa.Column("entity_type", sa.String(), nullable=False, server_default=""),
        sa.Column("entity_url", sa.String(), nullable=False, server_default=""),
        sa.Column("last_message", sa.Text(), nullable=False, server_default=""),
        sa.Column("count", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("first_seen_at", sa.Float(), nullable=False),
        sa.Column("last_seen_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("status", sa.String(), nullable=False, server_default="new"),
        sa.Column("severity", sa.String(), nullable=False, server_default="low"),
        sa.UniqueConstraint("uuid"),
    )
    op.create_index("warnings_by_key", "warnings", ["type", "project", "entity_url"])


def downgrade() -> None:
    op.drop_index("warnings_by_key", table_name="warnings")
    op.drop_table("warnings")
