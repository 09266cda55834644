"""``idefics-kit serve``: flags, and running the server under uvicorn with a SIGTERM drain.

starlette and uvicorn (the ``[serve]`` extra) are imported only when the
command runs, so ``idefics-kit --help`` stays fast and works without them.

On SIGTERM or Ctrl-C the server drains: new requests get 503 (``/health``
too, so a load balancer stops sending), requests in flight run to the end
for at most ``--drain-seconds``, then uvicorn closes the connections and the
process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from idefics_kit._cli_common import (
    PROG,
    CliExit,
    non_negative_float,
    non_negative_int,
    positive_int,
)

if TYPE_CHECKING:
    from idefics_kit.generator import Generator
    from idefics_kit.server import ServerApp

__all__ = ["API_KEY_ENV", "add_serve_flags", "engine_options", "run_serve"]

API_KEY_ENV = "IDEFICS_KIT_API_KEY"
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_DEFAULT_DRAIN_SECONDS = 30.0
# Kept in step with idefics_kit.server.app (not imported here: it needs starlette).
_DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
_DEFAULT_MAX_IMAGES = 8
_DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
_DEFAULT_MAX_CONCURRENT_REQUESTS = 256
_DEFAULT_MAX_RECEIVING_REQUESTS = 64
_DEFAULT_BODY_TIMEOUT = 30.0
_DEFAULT_MAX_DECODED_PIXELS = 256 * 1024 * 1024
_DEFAULT_IMAGE_TIMEOUT = 30.0
_DEFAULT_MAX_DOWNLOADS_PER_REQUEST = 4

SERVE_EPILOG = f"""\
The API is OpenAI's chat completions: POST /v1/chat/completions (images as
data: URIs or http(s) URLs, streaming with "stream": true), GET /v1/models,
GET /health, GET /metrics (Prometheus). GET / is the playground: a chat page
to try the model on your own pictures in a browser (open the server's URL;
--no-playground leaves it out). Loopback only and no API key by default;
before listening on another address set an API key (prefer the
{API_KEY_ENV} environment variable: a --api-key value shows in `ps`). The key
guards every route but /health and the playground's page (its API calls need
the key; the page asks for it), and /metrics with --metrics-without-key.
docs/server.md ("Security") gives the memory the limits add up to.

examples:
  {PROG} serve                                   # the built-in toy model on 127.0.0.1:8000
  {PROG} serve --model HuggingFaceTB/SmolVLM-Instruct --served-model-name smolvlm
  {API_KEY_ENV}=secret {PROG} serve --host 0.0.0.0 --port 8080 --access-log
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "toy", "messages": [{{"role": "user", "content": [
           {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,..."}}}},
           {{"type": "text", "text": "What color is the shape?"}}]}}]}}'
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}")
    return value


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of ``serve`` (besides the shared model flags and --allow-private-network)."""
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    net.add_argument("--port", type=_port, default=8000, help="port to bind (default: 8000)")
    net.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="model id that /v1/models lists and requests name (default: the --model value)",
    )
    net.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: "
        f"${API_KEY_ENV}; none when unset)",
    )
    net.add_argument(
        "--metrics-without-key",
        action="store_true",
        help="let /metrics be scraped without the API key (default: it needs the key)",
    )
    net.add_argument(
        "--no-playground",
        dest="playground",
        action="store_false",
        help="do not serve the playground chat page at / (default: served, without the API "
        "key like /health; the requests it sends need the key)",
    )
    net.add_argument(
        "--drain-seconds",
        type=non_negative_float,
        default=_DEFAULT_DRAIN_SECONDS,
        metavar="S",
        help="on SIGTERM/Ctrl-C, let requests in flight finish for up to S seconds while new "
        f"ones get 503, then exit 0 (default: {_DEFAULT_DRAIN_SECONDS:g})",
    )
    net.add_argument(
        "--request-timeout",
        type=non_negative_float,
        metavar="S",
        help="give up on a request (504) that has not finished S seconds after it arrived "
        "(default: no limit)",
    )
    limits = parser.add_argument_group("request limits")
    limits.add_argument(
        "--allowed-local-media-path",
        metavar="DIR",
        help="also accept image_url file:// URLs and absolute paths of files inside DIR "
        "(default: local files are refused)",
    )
    limits.add_argument(
        "--max-images-per-request",
        type=non_negative_int,
        default=_DEFAULT_MAX_IMAGES,
        metavar="N",
        help=f"refuse requests with more images (400) (default: {_DEFAULT_MAX_IMAGES})",
    )
    limits.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=_DEFAULT_MAX_IMAGE_PIXELS,
        metavar="N",
        help="refuse images of more pixels, read from the header before decoding (default: "
        f"{_DEFAULT_MAX_IMAGE_PIXELS})",
    )
    limits.add_argument(
        "--max-decoded-pixels",
        type=positive_int,
        default=_DEFAULT_MAX_DECODED_PIXELS,
        metavar="N",
        help="decoded image pixels (scaled down to what the model uses) held by all requests "
        "together; a request waits up to --image-timeout for room, then gets 503 (default: "
        f"{_DEFAULT_MAX_DECODED_PIXELS})",
    )
    limits.add_argument(
        "--image-timeout",
        type=_positive_float,
        default=_DEFAULT_IMAGE_TIMEOUT,
        metavar="S",
        help="seconds a request may spend loading its images, downloads (DNS included) and "
        f"decoding (default: {_DEFAULT_IMAGE_TIMEOUT:g})",
    )
    limits.add_argument(
        "--max-downloads-per-request",
        type=positive_int,
        default=_DEFAULT_MAX_DOWNLOADS_PER_REQUEST,
        metavar="N",
        help="image URLs of one request downloaded at once (default: "
        f"{_DEFAULT_MAX_DOWNLOADS_PER_REQUEST})",
    )
    limits.add_argument(
        "--max-request-bytes",
        type=positive_int,
        default=_DEFAULT_MAX_REQUEST_BYTES,
        metavar="N",
        help="refuse larger request bodies (413) before reading them whole (default: "
        f"{_DEFAULT_MAX_REQUEST_BYTES})",
    )
    limits.add_argument(
        "--max-concurrent-requests",
        type=positive_int,
        default=_DEFAULT_MAX_CONCURRENT_REQUESTS,
        metavar="N",
        help="chat completions held at once once their body has arrived (decoded, queued or "
        f"generating); more get 503 with Retry-After (default: "
        f"{_DEFAULT_MAX_CONCURRENT_REQUESTS})",
    )
    limits.add_argument(
        "--max-receiving-requests",
        type=positive_int,
        default=_DEFAULT_MAX_RECEIVING_REQUESTS,
        metavar="N",
        help="chat completions whose body is still arriving; more get 503 with Retry-After "
        f"(default: {_DEFAULT_MAX_RECEIVING_REQUESTS})",
    )
    limits.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=_DEFAULT_BODY_TIMEOUT,
        metavar="S",
        help="seconds a client has to send its whole request body; a slower one gets 408 "
        f"(default: {_DEFAULT_BODY_TIMEOUT:g})",
    )
    engine = parser.add_argument_group("engine (defaults: Generator.from_pretrained)")
    engine.add_argument(
        "--max-batch-size",
        type=positive_int,
        metavar="N",
        help="most requests decoded together in the running batch",
    )
    engine.add_argument(
        "--max-wait-ms",
        type=non_negative_float,
        metavar="MS",
        help="how long an idle engine waits for others to fill its first batch",
    )
    engine.add_argument(
        "--max-prefill-tokens",
        type=positive_int,
        metavar="N",
        help="prompt tokens admitted into the running batch per decoding step",
    )
    engine.add_argument(
        "--max-queued",
        type=positive_int,
        metavar="N",
        help="requests waiting beyond this get 503 with Retry-After at once",
    )
    logs = parser.add_argument_group("logging")
    logs.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default="info",
        help="server log level (default: info)",
    )
    logs.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="one stdout line per request: client, method, path, status, tokens, latency, "
        "request id (default: off)",
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Generator.from_pretrained`` keywords that the engine flags set."""
    names = ("max_batch_size", "max_wait_ms", "max_queued", "max_prefill_tokens")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _log_config(level: str, access_log: bool) -> dict[str, Any]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["idefics_kit_access"] = {
        "formatter": "default",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stdout",
    }
    numeric = 5 if level == "trace" else level.upper()
    config["loggers"]["idefics_kit.server"] = {
        "handlers": ["default"],
        "level": numeric,
        "propagate": False,
    }
    config["loggers"]["idefics_kit.server.access"] = {
        "handlers": ["idefics_kit_access"],
        "level": "INFO" if access_log else "WARNING",
        "propagate": False,
    }
    return config


def run_serve(
    args: argparse.Namespace, load: Callable[[], Generator], model: str, err: TextIO
) -> int:
    """Load the model, serve until SIGTERM/Ctrl-C, drain, close the model; exit code 0."""
    try:
        import uvicorn

        from idefics_kit.server import create_app
    except ImportError as exc:
        raise CliExit(
            f"serve needs the 'serve' extra ({exc}): pip install 'idefics-kit[serve]'"
        ) from exc
    if args.allowed_local_media_path is not None and not os.path.isdir(
        args.allowed_local_media_path
    ):
        raise CliExit(
            f"--allowed-local-media-path {args.allowed_local_media_path!r} is not a folder", 2
        )
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    gen = load()
    try:
        try:
            app = create_app(
                gen,
                served_model_name=args.served_model_name or model,
                api_key=api_key or None,
                metrics_without_key=args.metrics_without_key,
                allow_private_network=args.allow_private_network,
                allowed_local_media_path=args.allowed_local_media_path,
                max_images_per_request=args.max_images_per_request,
                max_image_pixels=args.max_image_pixels,
                max_decoded_pixels=args.max_decoded_pixels,
                image_timeout=args.image_timeout,
                max_downloads_per_request=args.max_downloads_per_request,
                max_request_bytes=args.max_request_bytes,
                max_concurrent_requests=args.max_concurrent_requests,
                max_receiving_requests=args.max_receiving_requests,
                body_timeout=args.body_timeout,
                request_timeout=args.request_timeout,
                playground=args.playground,
            )
        except ValueError as exc:  # a limit that cannot work with this model
            raise CliExit(f"serve: {exc}", 2) from exc
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            log_config=_log_config(args.log_level, args.access_log),
            access_log=False,  # the app writes its own line, with tokens and latency
            lifespan="on",
            timeout_graceful_shutdown=2,
            server_header=False,
        )
        if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
            logging.getLogger("idefics_kit.server").warning(
                "listening on %s without an API key: anyone who can reach the port can use the "
                "model; set %s",
                args.host,
                API_KEY_ENV,
            )
        page = None
        if args.playground and args.port:
            host = f"[{args.host}]" if ":" in args.host else args.host
            page = f"http://{host}:{args.port}/"
        server = _draining_server(config, app, args.drain_seconds, page)
        server.run()
        if not server.started:
            return 1
    finally:
        close = getattr(gen, "close", None)
        if callable(close):
            close()
    return 0


def _draining_server(
    config: Any, app: ServerApp, drain_seconds: float, page: str | None = None
) -> Any:
    """A ``uvicorn.Server`` whose SIGTERM/SIGINT drains ``app`` first, then exits cleanly.

    ``page``: the playground's URL, logged once the server listens.
    """
    import uvicorn

    log = logging.getLogger("idefics_kit.server")

    class DrainingServer(uvicorn.Server):
        drain_started: float | None = None

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if page is not None and self.started:
                log.info("playground: open %s in a browser", page)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # Not recorded as a captured signal: uvicorn would re-raise it after
            # the shutdown and the process would die of it instead of exiting 0.
            if self.drain_started is not None:
                log.warning("second signal: stopping now")
                self.should_exit = self.force_exit = True
                return
            self.drain_started = time.monotonic()
            app.begin_drain()
            log.info(
                "draining: %d request(s) in flight, new ones get 503; stopping within %gs",
                app.in_flight,
                drain_seconds,
            )

        async def on_tick(self, counter: int) -> bool:
            if self.drain_started is not None and not self.should_exit:
                waited = time.monotonic() - self.drain_started
                if app.in_flight == 0 or waited >= drain_seconds:
                    if app.in_flight:
                        log.warning("drain time over: cancelling %d request(s)", app.in_flight)
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)
