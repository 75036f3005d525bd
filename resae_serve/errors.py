"""Domain errors of resae-serve.

Every error the library raises on purpose derives from :class:`ResaeError`, so the CLI (and
later the gRPC interceptor) can tell a user mistake from a bug. Messages name the field, the
value and what is allowed, and say what to do next.
"""

from __future__ import annotations


class ResaeError(Exception):
    """Base class of every error resae-serve raises on purpose."""


class FetchError(ResaeError):
    """A package registry could not be reached or returned something unexpected."""


class ModelNotFoundError(ResaeError):
    """A model name or path resolves to nothing usable."""


class CorpusError(ResaeError):
    """A corpus is missing, unreadable or empty."""


class CaptureError(ResaeError):
    """Activation capture was asked for something the model or corpus cannot give."""


class ShardError(ResaeError):
    """An activation shard folder is missing, incomplete or inconsistent."""


class EngineRequestError(ResaeError):
    """The serving engine refused a request's values (its own checks of sampling values or
    prompt length); raised before any output of that request."""


class EngineDeadError(ResaeError):
    """The serving engine has stopped (its core process died or it was shut down); no request
    runs on it again."""
