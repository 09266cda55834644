"""The exceptions idefics_kit raises.

Every error the SDK raises on purpose is an :class:`IdeficsKitError`, so one
``except IdeficsKitError`` catches them all. The tree::

    IdeficsKitError                 base class; never raised itself
    ├── UsageError                  the caller passed something wrong (fix the call)
    │   ├── InvalidParameterError   an option out of range or of the wrong type (also ValueError)
    │   ├── ConversationError       a conversation the model cannot take (also ValueError)
    │   └── ImageLoadError          an image source that cannot be read or decoded
    └── RuntimeFailure              the environment failed (fix the setup, not the call)
        ├── ModelLoadError          not a loadable IDEFICS-family checkpoint
        ├── DeviceError             a device or dtype that is not available here
        └── GenerationError         the model failed while generating

Misuse errors (``UsageError``) are raised before any model work, so a batch
with a bad item fails without having spent time on the good ones. Messages say
what was wrong, with which input, what was allowed and what was received.
"""

from __future__ import annotations

__all__ = [
    "ConversationError",
    "DeviceError",
    "GenerationError",
    "IdeficsKitError",
    "ImageLoadError",
    "InvalidParameterError",
    "ModelLoadError",
    "RuntimeFailure",
    "UsageError",
]


class IdeficsKitError(Exception):
    """Base class of every error idefics_kit raises on purpose."""


class UsageError(IdeficsKitError):
    """The call itself was wrong: change the arguments, not the environment."""


class InvalidParameterError(UsageError, ValueError):
    """A generation or loading parameter is out of range or of the wrong type.

    ``parameter`` names it, ``value`` is what was received.
    """

    def __init__(self, parameter: str, message: str, value: object = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value


class ConversationError(UsageError, ValueError):
    """A conversation that cannot be sent to the model.

    Empty, ending on a non-user turn, an image in the system prompt, a part of
    an unknown kind, or a malformed chat message.
    """


class ImageLoadError(UsageError):
    """An image source could not be read, decoded, or is too large.

    ``source`` describes which source failed (a path, a URL, ``"<bytes: N>"``).
    """

    def __init__(self, message: str, *, source: str) -> None:
        super().__init__(message)
        self.source = source


class RuntimeFailure(IdeficsKitError):
    """Something outside the call failed: files, hardware or the model."""


class ModelLoadError(RuntimeFailure):
    """The checkpoint could not be loaded, or is not an IDEFICS-family model."""


class DeviceError(RuntimeFailure):
    """The requested device or dtype is not available on this machine."""


class GenerationError(RuntimeFailure):
    """The model raised while generating; the original error is ``__cause__``."""
