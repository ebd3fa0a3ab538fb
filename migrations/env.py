"""Alembic environment: the daemon passes the database URL through the Config object."""

from alembic import context
from sqlalchemy import create_engine

import lxd_daemon.images.models  # noqa: F401  (its tables join the metadata)
from lxd_daemon.db.models import metadata

config = context.config
target_metadata = metadata


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
    engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
