"""Engine and transaction handling.

All database work runs on one dedicated thread: SQLite takes one writer at a time anyway,
and the event loop never blocks on a query or an fsync. Every call to Database.run() is one
transaction: it commits as a whole or not at all. Callbacks get a SQLAlchemy Core Connection
(named `session` by most of them): the daemon never loads sqlalchemy.orm (6 MiB resident).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.exc import SQLAlchemyError

from lxd_daemon.errors import InsufficientStorage, out_of_space

T = TypeVar("T")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    # In WAL mode NORMAL keeps every committed transaction across a process crash (kill -9);
    # only a power loss can drop the last few.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


class Database:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.engine = create_engine(f"sqlite:///{self.path}", future=True)
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db")

    def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(connection, *args) in one transaction, on the calling thread.

        A full disk under the database (SQLITE_FULL) rolls the transaction back and becomes a
        507 naming the database; errors of fn's own file work (OSError) pass unchanged."""
        try:
            with self.engine.begin() as conn:
                return fn(conn, *args, **kwargs)
        except (SQLAlchemyError, sqlite3.Error) as e:
            if out_of_space(e):
                raise InsufficientStorage(
                    f"No space left on the storage holding the database ({self.path.parent})") from None
            raise

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(connection, *args) in one transaction on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(self.run_sync, fn, *args, **kwargs)
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()
