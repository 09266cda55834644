"""idefics_kit: run the IDEFICS family of vision-language models correctly.

>>> from idefics_kit import Conversation, Generator, ImagePart
>>> gen = Generator.from_pretrained("HuggingFaceM4/idefics2-8b")  # doctest: +SKIP
>>> conv = Conversation().user(ImagePart.from_path("dog.jpg"), "What is this?")
>>> gen.generate(conv, max_new_tokens=32).text  # doctest: +SKIP
"""

from typing import TYPE_CHECKING

from idefics_kit.conversation import Conversation, TextPart, Turn
from idefics_kit.errors import (
    ConversationError,
    DeviceError,
    EngineFailedError,
    GenerationError,
    GeneratorClosedError,
    IdeficsKitError,
    ImageLoadError,
    InvalidParameterError,
    ModelLoadError,
    OverloadedError,
    RequestTimeoutError,
    RuntimeFailure,
    TrainingDataError,
    TrainingError,
    UsageError,
)
from idefics_kit.family import Family
from idefics_kit.images import ImagePart
from idefics_kit.options import GenerationOptions
from idefics_kit.results import ChoiceScore, FinishReason, Result, Timing, TokenLogprob, Usage

if TYPE_CHECKING:
    from idefics_kit.generator import Generator
    from idefics_kit.scheduler import SchedulerStats
    from idefics_kit.streams import AsyncTextStream, TextStream

__version__ = "0.1.0"

__all__ = [
    "AsyncTextStream",
    "ChoiceScore",
    "Conversation",
    "ConversationError",
    "DeviceError",
    "EngineFailedError",
    "Family",
    "FinishReason",
    "GenerationError",
    "GenerationOptions",
    "Generator",
    "GeneratorClosedError",
    "IdeficsKitError",
    "ImageLoadError",
    "ImagePart",
    "InvalidParameterError",
    "ModelLoadError",
    "OverloadedError",
    "RequestTimeoutError",
    "Result",
    "RuntimeFailure",
    "SchedulerStats",
    "TextPart",
    "TextStream",
    "Timing",
    "TokenLogprob",
    "TrainingDataError",
    "TrainingError",
    "Turn",
    "Usage",
    "UsageError",
    "__version__",
]


_LAZY = {
    "Generator": "idefics_kit.generator",
    "SchedulerStats": "idefics_kit.scheduler",
    "TextStream": "idefics_kit.streams",
    "AsyncTextStream": "idefics_kit.streams",
}


def __getattr__(name: str) -> object:
    # These pull in torch and transformers: load them on first use, so
    # `import idefics_kit` (and `idefics-kit --help`) stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'idefics_kit' has no attribute {name!r}")
