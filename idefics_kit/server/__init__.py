"""``idefics-kit serve``: an OpenAI-compatible HTTP server (the ``[serve]`` extra).

>>> from idefics_kit import Generator
>>> from idefics_kit.server import create_app
>>> app = create_app(Generator.from_pretrained("toy"), served_model_name="toy")  # doctest: +SKIP

``app`` is an ASGI application: serve it with uvicorn (``idefics-kit serve``
does), mount it in another app, or call it in-process in tests. See
docs/server.md. Importing this package needs starlette and prometheus_client; ``import
idefics_kit`` never imports it.
"""

from __future__ import annotations

try:
    import prometheus_client  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "idefics_kit.server needs the 'serve' extra: pip install 'idefics-kit[serve]'"
    ) from exc

from idefics_kit.server.app import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_IMAGE_TIMEOUT,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_MAX_DECODED_PIXELS,
    DEFAULT_MAX_DOWNLOADS_PER_REQUEST,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_IMAGES,
    DEFAULT_MAX_RECEIVING_REQUESTS,
    DEFAULT_MAX_REQUEST_BYTES,
    ServerApp,
    create_app,
)
from idefics_kit.server.errors import APIError
from idefics_kit.server.metrics import Metrics
from idefics_kit.server.schemas import ImagePolicy

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_IMAGE_TIMEOUT",
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "DEFAULT_MAX_DECODED_PIXELS",
    "DEFAULT_MAX_DOWNLOADS_PER_REQUEST",
    "DEFAULT_MAX_IMAGES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_RECEIVING_REQUESTS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "APIError",
    "ImagePolicy",
    "Metrics",
    "ServerApp",
    "create_app",
]
