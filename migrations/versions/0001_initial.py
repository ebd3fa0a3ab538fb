"""Initial schema: server config, trusted certificates, projects.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "config",
        sa.Column("key", sa.String(), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "certificates",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
        sa.Column("type", sa.String(), nullable=False, server_default="client"),
        sa.Column("name", sa.String(), nullable=False, server_default=""),
        sa.Column("certificate", sa.Text(), nullable=False),
        sa.Column("restricted", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("projects", sa.Text(), nullable=False, server_default="[]"),
    )
    projects = op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("config", sa.Text(), nullable=False, server_default="{}"),
    )
    op.bulk_insert(
        projects,
        [{"id": 1, "name": "default", "description": "Default LXD project",
          "config": '{"features.images":"true","features.networks":"true","features.profiles":"true","features.storage.volumes":"true"}'}],
    )


def downgrade() -> None:
    op.drop_table("projects")
    op.drop_table("certificates")
    op.drop_table("config")
