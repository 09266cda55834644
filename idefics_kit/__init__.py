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
    GenerationError,
    IdeficsKitError,
    ImageLoadError,
    InvalidParameterError,
    ModelLoadError,
    RuntimeFailure,
    UsageError,
)
from idefics_kit.family import Family
from idefics_kit.images import ImagePart
from idefics_kit.options import GenerationOptions
from idefics_kit.results import FinishReason, Result, Usage

if TYPE_CHECKING:
    from idefics_kit.generator import Generator

__version__ = "0.1.0"

__all__ = [
    "Conversation",
    "ConversationError",
    "DeviceError",
    "Family",
    "FinishReason",
    "GenerationError",
    "GenerationOptions",
    "Generator",
    "IdeficsKitError",
    "ImageLoadError",
    "ImagePart",
    "InvalidParameterError",
    "ModelLoadError",
    "Result",
    "RuntimeFailure",
    "TextPart",
    "Turn",
    "Usage",
    "UsageError",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Generator pulls in torch and transformers: load them on first use, so
    # `import idefics_kit` (and `idefics-kit --help`) stays fast.
    if name == "Generator":
        from idefics_kit.generator import Generator

        return Generator
    raise AttributeError(f"module 'idefics_kit' has no attribute {name!r}")
