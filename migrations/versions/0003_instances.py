"""Instances, profiles, storage pools and their config and devices.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "storage_pools",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(), nullable=False, unique=True),
        sa.Column("driver", sa.String(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("config", sa.Text(), nullable=False, server_default="{}"),
    )
    profiles = op.create_table(
        "profiles",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(), nullable=False, unique=True),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("config", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("devices", sa.Text(), nullable=False, server_default="{}"),
    )
    op.bulk_insert(profiles, [{"id": 1, "name": "default", "description": "Default LXD profile",
                               "config": "{}", "devices": "{}"}])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(), nullable=False, unique=True),
        sa.Column("type", sa.String(), nullable=False, server_default="container"),
        sa.Column("architecture", sa.String(), nullable=False, server_default=""),
        sa.Column("ephemeral", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("stateful", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.String(), nullable=False),
        sa.Column("last_used_at", sa.String(), nullable=False, server_default=""),
        # 1 while the instance is being created: a start-up sweep removes rows left at 1 by a crash.
        sa.Column("pending", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("devices", sa.Text(), nullable=False, server_default="{}"),
    )
    op.create_table(
        "instances_config",
        sa.Column("instance_id", sa.Integer(), sa.ForeignKey("instances.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("key", sa.String(), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "instances_profiles",
        sa.Column("instance_id", sa.Integer(), sa.ForeignKey("instances.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("profile_id", sa.Integer(), sa.ForeignKey("profiles.id", ondelete="RESTRICT"),
                  primary_key=True),
        sa.Column("apply_order", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("instances_profiles")
    op.drop_table("instances_config")
    op.drop_table("instances")
    op.drop_table("profiles")
    op.drop_table("storage_pools")
