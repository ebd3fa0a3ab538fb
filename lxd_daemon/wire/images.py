"""Request models for /1.0/images and /1.0/images/aliases (LXD's shared/api/image.go names)."""

from __future__ import annotations

from typing import Any

from pydantic import StrictBool, StrictStr

from lxd_daemon import names
from lxd_daemon.wire import Name, Request


class ImageAlias(Request):
    name: Name(names.alias) = ""
    description: StrictStr = ""


class ImagePut(Request):
    auto_update: StrictBool = False
    properties: dict[StrictStr, StrictStr] | None = None
    public: StrictBool = False
    expires_at: StrictStr | None = None
    profiles: list[StrictStr] | None = None


class ImagesPostSource(Request):
    type: StrictStr = ""
    mode: StrictStr = ""
    name: StrictStr = ""
    url: StrictStr = ""
    fingerprint: StrictStr = ""
    alias: StrictStr = ""
    server: StrictStr = ""
    protocol: StrictStr = ""
    secret: StrictStr = ""
    certificate: StrictStr = ""
    image_type: StrictStr = ""
    project: StrictStr = ""


class ImagesPost(ImagePut):
    filename: StrictStr = ""
    source: ImagesPostSource | None = None
    compression_algorithm: StrictStr = ""
    aliases: list[ImageAlias] | None = None


class ImageExportPost(Request):
    """POST /1.0/images/{fp}/export: push the image to another server {images_push_relay}."""

    target: StrictStr = ""
    secret: StrictStr = ""
    certificate: StrictStr = ""
    aliases: list[ImageAlias] | None = None
    project: StrictStr = ""
    profiles: list[StrictStr] | None = None


class ImageAliasesEntryPut(Request):
    description: StrictStr = ""
    target: StrictStr = ""


class ImageAliasesPost(ImageAliasesEntryPut):
    name: Name(names.alias) = ""
    type: StrictStr = ""


class ImageAliasesEntryPost(Request):
    name: Name(names.alias) = ""


def present(model: Request, key: str) -> bool:
    return key in model.model_fields_set


__all__ = ["Any", "ImageAlias", "ImagePut", "ImagesPost", "ImagesPostSource", "ImageExportPost",
           "ImageAliasesEntryPut",
           "ImageAliasesPost", "ImageAliasesEntryPost", "present"]
