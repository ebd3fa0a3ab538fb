"""Keep FastAPI from loading `pydantic.v1` (about 5 MiB resident) only to learn that no model is one.

FastAPI (0.1xx) asks, for every route parameter, whether its annotation is a pydantic v1 model,
and answers by importing `pydantic.v1`. This daemon defines no v1 model, and nothing can be an
instance or subclass of `pydantic.v1.BaseModel` while that module was never imported, so the
checks below give the same answers without the import; if something does import it, they defer
to it. Applied before any router is built (lxd_daemon/api/__init__.py); a FastAPI without these
helpers is left alone.
"""

from __future__ import annotations

import sys
from typing import Any


def _v1():
    return sys.modules.get("pydantic.v1")


def _is_v1_class(cls: Any) -> bool:
    v1 = _v1()
    return v1 is not None and isinstance(cls, type) and issubclass(cls, v1.BaseModel)


def _is_v1_instance(obj: Any) -> bool:
    v1 = _v1()
    return v1 is not None and isinstance(obj, v1.BaseModel)


def apply() -> None:
    try:
        from fastapi import encoders
        from fastapi._compat import shared
    except ImportError:  # pragma: no cover - another FastAPI layout: nothing to patch
        return
    for mod, name, fn in ((shared, "is_pydantic_v1_model_class", _is_v1_class),
                          (shared, "is_pydantic_v1_model_instance", _is_v1_instance),
                          (encoders, "is_pydantic_v1_model_instance", _is_v1_instance)):
        if callable(getattr(mod, name, None)):
            setattr(mod, name, fn)
