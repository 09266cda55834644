"""The exceptions idefics_kit raises.

Every error the SDK raises on purpose is an :class:`IdeficsKitError`, so one
``except IdeficsKitError`` catches them all. The tree::

    IdeficsKitError                 base class; never raised itself
    ├── UsageError                  the caller passed something wrong (fix the call)
    │   ├── InvalidParameterError   an option out of range or of the wrong type (also ValueError)
    │   ├── ConversationError       a conversation the model cannot take (also ValueError)
    │   ├── ImageLoadError          an image source that cannot be read or decoded
    │   ├── TrainingDataError       fine-tuning rows that cannot be used (or a mismatched rerun)
    │   ├── GeneratorClosedError    the Generator was closed (before or while the call waited)
    │   ├── jobs.RecordError        a batch input line that is not a valid record
    │   └── jobs.OutputMismatchError  a batch output written with other settings
    └── RuntimeFailure              the environment failed (fix the setup, not the call)
        ├── ModelLoadError          not a loadable IDEFICS-family checkpoint
        ├── DeviceError             a device or dtype that is not available here
        ├── GenerationError         the model failed while generating
        ├── OverloadedError         the request queue is full; retry later
        ├── EngineFailedError       the model's worker stopped after repeated failures
        ├── jobs.OutputBusyError    another live process is writing that batch output
        ├── RequestTimeoutError     the call's ``timeout`` passed (also TimeoutError)
        └── TrainingError           fine-tuning cannot run here (template, packages, hardware)

Misuse errors (``UsageError``) are raised before any model work, so a batch
with a bad item fails without having spent time on the good ones. Messages say
what was wrong, what was allowed and what was received. An error that belongs
to one input of a batch carries that input's position in ``index`` (None
otherwise); the message itself does not repeat it, so the edges (the CLI, the
HTTP server) can name the input their own way.
"""

from __future__ import annotations

__all__ = [
    "ConversationError",
    "DeviceError",
    "EngineFailedError",
    "GenerationError",
    "GeneratorClosedError",
    "IdeficsKitError",
    "ImageLoadError",
    "InvalidParameterError",
    "ModelLoadError",
    "OverloadedError",
    "RequestTimeoutError",
    "RuntimeFailure",
    "TrainingDataError",
    "TrainingError",
    "UsageError",
]


class IdeficsKitError(Exception):
    """Base class of every error idefics_kit raises on purpose.

    ``index`` is the position of the input it belongs to in a batch call
    (``generate_batch``, ``iter_batch``), else None.
    """

    index: int | None = None

    def at_index(self, index: int) -> IdeficsKitError:
        """Mark this error as belonging to input ``index`` of a batch; returns self."""
        self.index = index
        if hasattr(self, "add_note"):  # Python 3.11+: tracebacks show the position
            self.add_note(f"(input {index} of the batch)")
        return self


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


class TrainingDataError(UsageError):
    """Fine-tuning data that cannot be used: no usable row, a bad row under ``strict``,
    or an output folder left by a run with other settings or data.

    ``bad_rows`` lists the rows that were left out (each with its id and reason).
    """

    def __init__(self, message: str, *, bad_rows: tuple[object, ...] = ()) -> None:
        super().__init__(message)
        self.bad_rows = bad_rows


class GeneratorClosedError(UsageError):
    """The Generator was closed: calls after ``close()``, and requests still waiting then."""


class RuntimeFailure(IdeficsKitError):
    """Something outside the call failed: files, hardware or the model."""


class ModelLoadError(RuntimeFailure):
    """The checkpoint could not be loaded, or is not an IDEFICS-family model."""


class DeviceError(RuntimeFailure):
    """The requested device or dtype is not available on this machine."""


class GenerationError(RuntimeFailure):
    """The model raised while generating; the original error is ``__cause__``."""


class OverloadedError(RuntimeFailure):
    """The request queue is full (``max_queued``): retry later or raise the bound.

    Raised at once, before the request waits anywhere.
    """


class RequestTimeoutError(RuntimeFailure, TimeoutError):
    """The call's ``timeout`` passed before its answer was complete; its row was freed."""


class EngineFailedError(RuntimeFailure):
    """The model's worker stopped after failing repeatedly; this Generator cannot answer.

    Every pending and later call fails at once with it and
    ``Generator.ready`` is False. Load a new Generator (after fixing the
    device, memory or model that kept failing).
    """


class TrainingError(RuntimeFailure):
    """Fine-tuning cannot run: a chat template that breaks the label construction,
    the ``[train]`` extra missing, or QLoRA without a CUDA GPU."""
