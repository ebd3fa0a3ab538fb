"""Images per project: the same fingerprint may be stored once in each project.

Revision ID: 0008
Revises: 0007

The images table's UNIQUE(fingerprint) becomes UNIQUE(project, fingerprint). SQLite can't change a
constraint in place, so the table is rebuilt (create-copy-drop-rename, as 0007 does; row ids are
kept, so the aliases that refer to them are untouched). The files under $LXD_DIR/images stay
content-addressed and shared by the rows of every project.
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_IMAGES = """CREATE TABLE {table} (
    id INTEGER NOT NULL PRIMARY KEY,
    fingerprint VARCHAR(64) NOT NULL,
    project VARCHAR DEFAULT 'default' NOT NULL,
    filename VARCHAR DEFAULT '' NOT NULL,
    size BIGINT DEFAULT '0' NOT NULL,
    architecture VARCHAR DEFAULT '' NOT NULL,
    type VARCHAR DEFAULT 'container' NOT NULL,
    layout VARCHAR DEFAULT 'unified' NOT NULL,
    rootfs_format VARCHAR DEFAULT '' NOT NULL,
    compression VARCHAR DEFAULT '' NOT NULL,
    properties TEXT DEFAULT '{{}}' NOT NULL,
    profiles TEXT DEFAULT '["default"]' NOT NULL,
    public BOOLEAN DEFAULT 0 NOT NULL,
    auto_update BOOLEAN DEFAULT 0 NOT NULL,
    cached BOOLEAN DEFAULT 0 NOT NULL,
    created_at FLOAT,
    expires_at FLOAT,
    uploaded_at FLOAT,
    last_used_at FLOAT,
    source_server VARCHAR,
    source_protocol VARCHAR,
    source_certificate TEXT,
    source_alias VARCHAR,
    source_image_type VARCHAR,
    {unique})"""
_COLUMNS = ("id, fingerprint, project, filename, size, architecture, type, layout, rootfs_format, compression, "
            "properties, profiles, public, auto_update, cached, created_at, expires_at, uploaded_at, "
            "last_used_at, source_server, source_protocol, source_certificate, source_alias, source_image_type")


def _rebuild(unique: str, where: str = "") -> None:
    op.execute(_IMAGES.format(table="_new_images", unique=unique))
    op.execute(f"INSERT INTO _new_images ({_COLUMNS}) SELECT {_COLUMNS} FROM images{where}")
    op.execute("DROP TABLE images")
    op.execute("ALTER TABLE _new_images RENAME TO images")


def upgrade() -> None:
    _rebuild("UNIQUE (project, fingerprint)")


def downgrade() -> None:
    op.execute("DELETE FROM images_aliases WHERE image_id IN (SELECT id FROM images WHERE project != 'default')")
    _rebuild("UNIQUE (fingerprint)", " WHERE project = 'default'")
