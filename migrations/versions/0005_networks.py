"""Managed networks (bridge, macvlan, physical): one row each, keyed by project and name.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "networks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project", sa.String(), nullable=False, server_default="default"),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("type", sa.String(), nullable=False, server_default="bridge"),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        # The network's config keys (JSON object of strings), `auto` already replaced.
        sa.Column("config", sa.Text(), nullable=False, server_default="{}"),
        # LXD's network status: "Created" (the only one without clustering).
        sa.Column("status", sa.String(), nullable=False, server_default="Created"),
        sa.UniqueConstraint("project", "name"),
    )


def downgrade() -> None:
    op.drop_table("networks")
