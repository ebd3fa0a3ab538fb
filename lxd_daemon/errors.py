"""Error kinds shared by services and routes; the API renders each as LXD's error envelope."""

from __future__ import annotations


class LXDError(Exception):
    """An error with an HTTP status. Services raise these; the API renders them."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(LXDError):
    status = 400


class Forbidden(LXDError):
    status = 403


class NotFound(LXDError):
    status = 404


class MethodNotAllowed(LXDError):
    status = 405


class Conflict(LXDError):
    status = 409


class PreconditionFailed(LXDError):
    status = 412


class TooLarge(LXDError):
    status = 413


class NotImplementedYet(LXDError):
    status = 501


class Unavailable(LXDError):
    status = 503
