"""Keeping pulled images fresh and the remote cache small.

- `refresh(fp)`: ask the image's source (server, protocol, alias it was pulled by) for the image
  that alias names now; when that is a different image, pull it, give it the old image's aliases,
  cached flag, last use, profiles, and public and auto-update flags (auto_update on, as LXD does),
  then delete the old image. `POST /1.0/images/<fp>/refresh` (`lxc image refresh`) and the
  periodic auto-update run it.
- `auto_update()`: every image with `auto_update` and a source, each `images.auto_update_interval`
  hours (0 turns it off).
- `expire(now)`: cached images unused (last use, else upload time) for `images.remote_cache_expiry`
  days are deleted (0 keeps them), at start-up and daily after, as LXD does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from sqlalchemy import select, update

from lxd_daemon.errors import BadRequest
from lxd_daemon.images.models import images as images_table
from lxd_daemon.images.models import images_aliases
from lxd_daemon.util.tasks import cancel_and_wait

log = logging.getLogger("lxd.images")

TICK = 60.0
EXPIRE_EVERY = 86400.0
_I, _A = images_table.c, images_aliases.c


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


class Updater:
    def __init__(self, services):
        self.services = services
        self.images = services.images
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one refresh pass or expiry at a time

    # -- the periodic task -----------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="image-updater")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        started = last_update = time.monotonic()
        last_expire = None
        while True:
            now = time.monotonic()
            try:
                if last_expire is None or now - last_expire >= EXPIRE_EVERY:
                    last_expire = now
                    await self.expire()
                hours = _int(self.images.server.config.get("images.auto_update_interval"))
                if hours > 0 and now - last_update >= hours * 3600 and now > started:
                    last_update = now
                    await self.auto_update()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("image maintenance failed")
            await asyncio.sleep(TICK)

    # -- auto-update -----------------------------------------------------------------------
    async def auto_update(self) -> list[dict]:
        """Refresh every auto-updating image that has a source. Returns [{old, new}] per change."""
        rows = await self.images.db.run(lambda s: s.execute(
            select(_I.fingerprint, _I.project).where(_I.auto_update.is_(True), _I.source_server.is_not(None))).all())
        changed = []
        if not rows:
            return changed

        async def run(op):
            for fp, project in rows:
                try:
                    new = await self.refresh(fp, project=project, op=op)
                except Exception as e:  # one failing source must not stop the others
                    log.warning("image auto-update failed", extra={"fingerprint": fp, "err": str(e)})
                    continue
                if new is not None:
                    changed.append({"old": fp, "new": new})
            return {"images": changed}

        op = self.services.ops.create(description="Updating images", run=run, project="default")
        await op.done.wait()
        return changed

    async def refresh(self, fingerprint: str, *, project: str, op=None, requestor: dict | None = None) -> str | None:
        """The new image's fingerprint when the source has a newer one (the old image of the images
        `project` uses is then gone), None when it is up to date."""
        from lxd_daemon.images.remote.client import remote_for

        images = self.images
        eff = images.effective(project)
        old = await images.db.run(lambda s: images._find(s, fingerprint, project=eff))
        fp = old.fingerprint
        if not old.source_server or not old.source_alias:
            raise BadRequest(f"Image {fp} has no update source: it was not pulled from an image server by alias")
        source = {"server": old.source_server, "protocol": old.source_protocol or "lxd",
                  "certificate": old.source_certificate or "", "alias": old.source_alias,
                  "image_type": old.source_image_type or ""}
        async with self._lock:
            remote = remote_for(source)
            info = await remote.resolve(source["alias"], source["image_type"])
            if info.fingerprint == fp:
                self._result(op, False)
                return None
            new = await images.remote.obtain(remote, info, source["alias"], project=eff,
                                             certificate=source["certificate"],
                                             image_type=source["image_type"], auto_update=True,
                                             public=bool(old.public), op=op, cached=bool(old.cached),
                                             requestor=requestor)

            def move(session):
                new_id = session.execute(select(_I.id).where(_I.fingerprint == new, _I.project == eff)).scalar_one()
                session.execute(update(images_table).where(_I.id == new_id).values(
                    cached=bool(old.cached), last_used_at=old.last_used_at, auto_update=True,
                    public=bool(old.public), profiles=old.profiles or json.dumps(["default"])))
                session.execute(update(images_aliases).where(_A.image_id == old.id).values(image_id=new_id))

            await images.db.run(move)
            images._index.invalidate()
            await images.delete(fp, project=eff, requestor=requestor)
        log.info("image refreshed", extra={"fingerprint": fp, "new": new})
        self._result(op, True)
        self.services.events.lifecycle("image-refreshed", images.url(fp, project), requestor=requestor,
                                       project=project)
        return new

    @staticmethod
    def _result(op, refreshed: bool) -> None:
        if op is not None and not op.status.final:
            op.update_metadata({"refreshed": refreshed})

    # -- cache expiry ----------------------------------------------------------------------
    async def expire(self, now: float | None = None) -> list[str]:
        """Delete cached images unused for images.remote_cache_expiry days. Returns their fingerprints."""
        days = _int(self.images.server.config.get("images.remote_cache_expiry"))
        if days <= 0:
            return []
        now = time.time() if now is None else now
        rows = await self.images.db.run(lambda s: s.execute(
            select(_I.fingerprint, _I.project, _I.last_used_at, _I.uploaded_at).where(_I.cached.is_(True))).all())
        gone = []
        async with self._lock:
            for fp, project, last_used, uploaded in rows:
                since = last_used or uploaded or 0
                if since + days * 86400 > now:
                    continue
                try:
                    await self.images.delete(fp, project=project)
                except Exception as e:
                    log.warning("could not delete an expired cached image", extra={"fingerprint": fp, "err": str(e)})
                    continue
                log.info("deleted expired cached image", extra={"fingerprint": fp})
                gone.append(fp)
        return gone


__all__ = ["Updater"]
