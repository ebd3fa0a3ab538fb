"""The trust store's table (SQLAlchemy Core). The schema is owned by the migrations:
migrations/versions/0001_initial.py made the table, 0006_certificates.py added `created_at`.

The table is declared with the other tables of migration 0001 in lxd_daemon.db.models; the
trust store uses it under this name.
"""

from __future__ import annotations

from lxd_daemon.db.models import certificates

__all__ = ["certificates"]
