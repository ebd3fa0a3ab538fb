"""Instance snapshots, custom storage volumes and their snapshots, instance and volume backups.

Instance root volumes and image volumes have no rows of their own: they are described by the
instance and image records (one source of truth, nothing to get out of step after a crash).
Custom volumes are keyed by pool, project, type and name from the start (projects come later).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances_snapshots",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("instance_id", sa.Integer(), sa.ForeignKey("instances.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.String(), nullable=False),
        # RFC 3339, "" for never.
        sa.Column("expires_at", sa.String(), nullable=False, server_default=""),
        sa.Column("stateful", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("architecture", sa.String(), nullable=False, server_default=""),
        sa.Column("ephemeral", sa.Boolean(), nullable=False, server_default=sa.false()),
        # The instance's local config, devices and profile names when the snapshot was taken (JSON).
        sa.Column("config", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("devices", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("profiles", sa.Text(), nullable=False, server_default="[]"),
        sa.UniqueConstraint("instance_id", "name"),
    )
    op.create_table(
        "storage_volumes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("pool_id", sa.Integer(), sa.ForeignKey("storage_pools.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("project", sa.String(), nullable=False, server_default="default"),
        sa.Column("type", sa.String(), nullable=False, server_default="custom"),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("content_type", sa.String(), nullable=False, server_default="filesystem"),
        sa.Column("created_at", sa.String(), nullable=False),
        sa.Column("config", sa.Text(), nullable=False, server_default="{}"),
        sa.UniqueConstraint("pool_id", "project", "type", "name"),
    )
    op.create_table(
        "storage_volumes_snapshots",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("volume_id", sa.Integer(), sa.ForeignKey("storage_volumes.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.String(), nullable=False),
        sa.Column("expires_at", sa.String(), nullable=False, server_default=""),
        sa.Column("config", sa.Text(), nullable=False, server_default="{}"),
        sa.UniqueConstraint("volume_id", "name"),
    )
    op.create_table(
        "instances_backups",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("instance_id", sa.Integer(), sa.ForeignKey("instances.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("created_at", sa.String(), nullable=False),
        sa.Column("expires_at", sa.String(), nullable=False, server_default=""),
        sa.Column("instance_only", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("optimized_storage", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("compression_algorithm", sa.String(), nullable=False, server_default=""),
        sa.UniqueConstraint("instance_id", "name"),
    )
    op.create_table(
        "storage_volumes_backups",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("volume_id", sa.Integer(), sa.ForeignKey("storage_volumes.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("created_at", sa.String(), nullable=False),
        sa.Column("expires_at", sa.String(), nullable=False, server_default=""),
        sa.Column("volume_only", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("optimized_storage", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("compression_algorithm", sa.String(), nullable=False, server_default=""),
        sa.UniqueConstraint("volume_id", "name"),
    )


def downgrade() -> None:
    op.drop_table("storage_volumes_backups")
    op.drop_table("instances_backups")
    op.drop_table("storage_volumes_snapshots")
    op.drop_table("storage_volumes")
    op.drop_table("instances_snapshots")
