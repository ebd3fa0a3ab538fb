"""Images: the local image store and aliases.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
        sa.Column("project", sa.String(), nullable=False, server_default="default"),
        sa.Column("filename", sa.String(), nullable=False, server_default=""),
        sa.Column("size", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("architecture", sa.String(), nullable=False, server_default=""),
        sa.Column("type", sa.String(), nullable=False, server_default="container"),
        sa.Column("layout", sa.String(), nullable=False, server_default="unified"),
        sa.Column("rootfs_format", sa.String(), nullable=False, server_default=""),
        sa.Column("compression", sa.String(), nullable=False, server_default=""),
        sa.Column("properties", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("profiles", sa.Text(), nullable=False, server_default='["default"]'),
        sa.Column("public", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("auto_update", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("cached", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Float(), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("uploaded_at", sa.Float(), nullable=True),
        sa.Column("last_used_at", sa.Float(), nullable=True),
        sa.Column("source_server", sa.String(), nullable=True),
        sa.Column("source_protocol", sa.String(), nullable=True),
        sa.Column("source_certificate", sa.Text(), nullable=True),
        sa.Column("source_alias", sa.String(), nullable=True),
        sa.Column("source_image_type", sa.String(), nullable=True),
    )
    op.create_table(
        "images_aliases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("project", sa.String(), nullable=False, server_default="default"),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.UniqueConstraint("project", "name"),
    )
    op.create_index("images_aliases_image_id", "images_aliases", ["image_id"])


def downgrade() -> None:
    op.drop_index("images_aliases_image_id", "images_aliases")
    op.drop_table("images_aliases")
    op.drop_table("images")
