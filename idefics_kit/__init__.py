"""idefics_kit: run the IDEFICS family of vision-language models correctly.

>>> from idefics_kit import Conversation, Generator, ImagePart
>>> gen = Generator.from_pretrained("HuggingFaceM4/idefics2-8b")  # doctest: +SKIP
>>> conv = Conversation().user(ImagePart.from_path("dog.jpg"), "What is this?")
>>> gen.generate(conv, max_new_tokens=32).text  # doctest: +SKIP
"""

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
from idefics_kit.families.base import Family
from idefics_kit.generator import Generator
from idefics_kit.images import ImagePart
from idefics_kit.options import GenerationOptions
from idefics_kit.results import FinishReason, Result, Usage

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
