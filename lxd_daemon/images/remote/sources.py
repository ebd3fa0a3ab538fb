"""A remote image source as requests carry it (ImagesPostSource / InstanceSource): checked, and
an instance create request turned into one from the local store once its image is pulled."""

from __future__ import annotations

from lxd_daemon.errors import BadRequest


def source_dict(src) -> dict:
    """A wire ImagesPostSource / InstanceSource (model or dict) as the dict `pull` takes."""
    get = src.get if isinstance(src, dict) else (lambda k, d="": getattr(src, k, d))
    return {k: get(k, "") or "" for k in ("server", "protocol", "alias", "fingerprint", "certificate",
                                            "secret", "image_type", "mode")}


REMOTE_KEYS = ("server", "protocol", "alias", "fingerprint", "certificate", "secret", "mode", "image_type")


def check_source(src) -> dict:
    """The checks a remote source gets before its operation starts (400s); returns it as a dict."""
    from lxd_daemon.images.remote.http import base_url

    source = source_dict(src)
    if source["protocol"] not in ("", "lxd", "simplestreams"):
        raise BadRequest(f"Unsupported image server protocol {source['protocol']!r} (lxd or simplestreams)")
    if source["mode"] not in ("", "pull"):
        raise BadRequest(f"Invalid source mode {source['mode']!r} for an image from a server (pull)")
    if not (source["alias"] or source["fingerprint"]):
        raise BadRequest("No image alias or fingerprint given (source.alias or source.fingerprint)")
    base_url(source["server"])
    return source


async def pulled_body(services, body, op, who, *, project: str):
    """An instance create request from an image server, with the image pulled into the images of
    `project` (the caller's; cached, as LXD marks images pulled for instances) and the source now
    naming it locally."""
    src = dict(body.source)
    fp = await services.images.pull(check_source(src), project=project, cached=True, op=op, requestor=who)
    local = {k: v for k, v in src.items() if k not in REMOTE_KEYS}
    local.update(type="image", fingerprint=fp)
    return body.model_copy(update={"source": local})
