"""OpenAI chat-completions shapes: parse a request body, build response bodies and chunks.

Nothing here touches the network or the model: :func:`parse_chat_request`
turns a decoded JSON body into a :class:`ChatRequest` (a
:class:`~idefics_kit.Conversation` whose images are built but not yet read,
:class:`~idefics_kit.GenerationOptions`, stream settings) or raises
:class:`~idefics_kit.server.errors.APIError` (400) naming the field.

What a request may hold:

* ``messages``: roles ``system`` (or ``developer``, read as system; first
  message only), ``user`` and ``assistant``; ``content`` a string or a list of
  parts ``{"type": "text", "text": ...}`` and ``{"type": "image_url",
  "image_url": {"url": ...}}`` (``image_url`` may also be the URL string).
  Image URLs are ``data:image/...;base64,...``, ``http(s)://`` (through the
  SDK's SSRF-safe fetcher) or, only when the server names a folder for them,
  ``file://`` URLs and paths inside that folder.
* ``model``, ``max_tokens`` / ``max_completion_tokens`` (the latter wins),
  ``temperature`` (0 to 2), ``top_p``, ``seed``, ``stop`` (a string or a list),
  ``n`` (1 only), ``stream``, ``stream_options.include_usage``, ``logprobs``
  and ``top_logprobs`` (up to 20), ``response_format`` (``text``,
  ``json_object``, ``json_schema``); the extensions ``top_k``,
  ``repetition_penalty`` and vLLM's ``structured_outputs`` (``json``,
  ``regex``, ``choice``) with its older spellings ``guided_json``,
  ``guided_regex`` and ``guided_choice``.
* OpenAI fields the server cannot honour get a 400 naming them when they ask
  for something (``n`` > 1, ``tools``, ``tool_choice`` other than ``none``,
  ``functions``, ``logit_bias``, non-zero ``presence_penalty`` /
  ``frequency_penalty``, ``audio``, ``modalities`` other than text). Every
  other field (``user``, ``metadata``, ``store``, ``service_tier``, unknown
  ones) is ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import math
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from idefics_kit._quote import short_repr
from idefics_kit.conversation import Conversation, TextPart, Turn
from idefics_kit.errors import ConversationError, IdeficsKitError, ImageLoadError
from idefics_kit.images import ImagePart
from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result, TokenLogprob
from idefics_kit.server.errors import APIError, capped

__all__ = [
    "ChatRequest",
    "ImagePolicy",
    "chunk",
    "completion_body",
    "logprobs_body",
    "models_body",
    "parse_chat_request",
    "usage_body",
]

_ROLES = ("system", "developer", "user", "assistant")
_MAX_TEMPERATURE = 2.0
# SDK option name -> request field, for error messages; max_new_tokens is per request.
_OPTION_FIELDS = (
    "temperature",
    "top_p",
    "seed",
    "stop",
    "top_k",
    "repetition_penalty",
    "logprobs",
    "top_logprobs",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImagePolicy:
    """Which image URLs a server accepts.

    ``data:`` URIs always; http(s) URLs from public addresses (any address
    with ``allow_private_network``); ``file://`` URLs and plain paths only
    when ``local_media_root`` is set, and only inside it (symbolic links
    resolved first).
    """

    allow_private_network: bool = False
    local_media_root: str | None = None
    max_pixels: int = 16_777_216

    def image_part(self, url: str, where: str) -> ImagePart:
        """An :class:`ImagePart` for an ``image_url`` URL; nothing is read or fetched yet."""
        lowered = url[:8].lower()
        try:
            if lowered.startswith("data:"):
                return ImagePart.from_base64(url, max_pixels=self.max_pixels)
            if lowered.startswith(("http://", "https://")):
                return ImagePart.from_url(
                    url,
                    max_pixels=self.max_pixels,
                    allow_private_network=self.allow_private_network,
                )
        except ImageLoadError as exc:
            raise APIError(
                400, capped(f"{where}: {exc}"), param=where, code="invalid_image"
            ) from exc
        return ImagePart.from_path(self._local_path(url, where), max_pixels=self.max_pixels)

    def _local_path(self, url: str, where: str) -> str:
        scheme = urllib.parse.urlsplit(url).scheme.lower() if ":" in url else ""
        # A one-letter "scheme" is a Windows drive letter: a path.
        if scheme not in ("", "file") and len(scheme) != 1:
            raise APIError(
                400,
                f"{where}: unsupported image URL scheme {short_repr(scheme)}; use a data:image/...;base64 "
                "URI or an http(s) URL",
                param=where,
                code="invalid_image_url",
            )
        if self.local_media_root is None:
            raise APIError(
                400,
                f"{where}: local image files are not served; send the image as a "
                "data:image/...;base64 URI or an http(s) URL (the server allows local files "
                "only under --allowed-local-media-path)",
                param=where,
                code="invalid_image_url",
            )
        if scheme == "file":
            parts = urllib.parse.urlsplit(url)
            if parts.netloc not in ("", "localhost"):
                raise APIError(
                    400,
                    f"{where}: file URL must name a local file (file:///path), got host "
                    f"{short_repr(parts.netloc)}",
                    param=where,
                    code="invalid_image_url",
                )
            path = urllib.request.url2pathname(parts.path)
        else:
            path = url
        if "\x00" in path or not os.path.isabs(path):
            raise APIError(
                400,
                f"{where}: a local image must be given as an absolute path or file:/// URL",
                param=where,
                code="invalid_image_url",
            )
        real = os.path.realpath(path)
        root = os.path.realpath(self.local_media_root)
        if os.path.commonpath([real, root]) != root:
            raise APIError(
                400,
                f"{where}: local image {short_repr(path)} is outside the folder this server serves "
                "images from",
                param=where,
                code="invalid_image_url",
            )
        return real


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatRequest:
    """A parsed ``POST /v1/chat/completions`` body."""

    conversation: Conversation
    options: GenerationOptions
    model: str | None
    stream: bool = False
    include_usage: bool = False
    parameters: Mapping[str, str] = field(default_factory=dict)
    """SDK option name -> the request field that set it, for error messages."""


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"{name} must be a finite number, got {short_repr(value)}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"{name} must be an integer, got {short_repr(value)}")
    return value


def _unsupported(body: Mapping[str, Any]) -> None:
    """400 for OpenAI features this server cannot honour, when the request asks for them."""
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise _bad("n", f"n must be 1 (one choice per request), got {n}", "unsupported_value")
    requests = {
        "tools": body.get("tools") not in (None, []),
        "functions": body.get("functions") not in (None, []),
        "tool_choice": body.get("tool_choice") not in (None, "none"),
        "logit_bias": body.get("logit_bias") not in (None, {}),
        "presence_penalty": body.get("presence_penalty") not in (None, 0),
        "frequency_penalty": body.get("frequency_penalty") not in (None, 0),
        "audio": body.get("audio") is not None,
        "modalities": body.get("modalities") not in (None, ["text"]),
    }
    for name, asked in requests.items():
        if asked:
            raise _bad(
                name,
                f"{name} is not supported by this server (got {short_repr(body[name])}); leave it out",
                "unsupported_parameter",
            )


def _text_of(content: object, where: str) -> str:
    """The text of a system message's content."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            at = f"{where}[{index}]"
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise _bad(at, f"{at}: a system message may contain only text parts")
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(at, f"{at}.text must be a string, got {_type_name(text)}")
            texts.append(text)
        return "".join(texts)
    raise _bad(where, f"{where} must be a string or a list of parts, got {_type_name(content)}")


def _image_url(part: Mapping[str, Any], at: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, Mapping) else value
    if not isinstance(url, str) or not url:
        raise _bad(
            f"{at}.image_url",
            f"{at}.image_url must be {{'url': '<data: URI or http(s) URL>'}}, got {short_repr(value)}",
        )
    return url


def _parts(
    content: object, where: str, policy: ImagePolicy, images: list[int]
) -> list[str | ImagePart]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise _bad(where, f"{where} must be a string or a list of parts, got {_type_name(content)}")
    parts: list[str | ImagePart] = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        if not isinstance(part, Mapping):
            raise _bad(at, f"{at} must be an object with a 'type', got {_type_name(part)}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{at}.text", f"{at}.text must be a string, got {_type_name(text)}")
            parts.append(text)
        elif kind == "image_url":
            images[0] += 1
            if images[0] > images[1]:
                raise _bad(
                    "messages",
                    f"too many images: this server takes at most {images[1]} per request",
                    "too_many_images",
                )
            parts.append(policy.image_part(_image_url(part, at), f"{at}.image_url"))
        else:
            raise _bad(
                f"{at}.type",
                f"{at}.type {short_repr(kind)} is not supported; use 'text' or 'image_url'",
            )
    return parts


def _conversation(messages: object, policy: ImagePolicy, max_images: int) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list of messages")
    system: str | None = None
    turns: list[Turn] = []
    images = [0, max_images]
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise _bad(where, f"{where} must be an object, got {_type_name(message)}")
        role = message.get("role")
        if role not in _ROLES:
            raise _bad(
                f"{where}.role",
                f"{where}.role must be one of {', '.join(_ROLES)}, got {short_repr(role)}",
                "invalid_role",
            )
        content = message.get("content")
        if role in ("system", "developer"):
            if index != 0:
                raise _bad(
                    f"{where}.role",
                    f"{where}: a {role} message is only allowed as the first message",
                    "invalid_role",
                )
            system = _text_of(content, f"{where}.content")
            continue
        parts = _parts(content, f"{where}.content", policy, images)
        try:
            turn = Turn(role="user" if role == "user" else "assistant", parts=_coerce(parts))
        except ConversationError as exc:
            raise _bad(f"{where}.content", f"{where}.content: {exc}") from exc
        if not turn.parts:
            raise _bad(f"{where}.content", f"{where}.content is empty")
        turns.append(turn)
    try:
        conversation = Conversation(system=system, turns=tuple(turns))
        conversation.validate()
    except ConversationError as exc:
        raise _bad("messages", str(exc)) from exc
    return conversation


def _coerce(parts: list[str | ImagePart]) -> tuple[TextPart | ImagePart, ...]:
    # Empty text parts are dropped, as Conversation.user() does.
    return tuple(TextPart(text=p) if isinstance(p, str) else p for p in parts if p != "")


def _options(body: Mapping[str, Any]) -> tuple[GenerationOptions, dict[str, str]]:
    given: dict[str, Any] = {}
    parameters = {name: name for name in _OPTION_FIELDS}
    limit_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else None
    limit_field = limit_field or ("max_tokens" if body.get("max_tokens") is not None else None)
    if limit_field is not None:
        given["max_new_tokens"] = _integer(body, limit_field)
        parameters["max_new_tokens"] = limit_field
    temperature = _number(body, "temperature")
    if temperature is not None:
        if not 0 <= temperature <= _MAX_TEMPERATURE:
            raise _bad(
                "temperature", f"temperature must be in [0, 2], got {short_repr(temperature)}"
            )
        given["temperature"] = temperature
    for name in ("top_p", "repetition_penalty"):
        value = _number(body, name)
        if value is not None:
            given[name] = value
    for name in ("seed", "top_k"):
        integer = _integer(body, name)
        if integer is not None:
            given[name] = integer
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if not isinstance(logprobs, bool):
            raise _bad("logprobs", f"logprobs must be true or false, got {short_repr(logprobs)}")
        given["logprobs"] = logprobs
    top_logprobs = _integer(body, "top_logprobs")
    if top_logprobs is not None:
        given["top_logprobs"] = top_logprobs
    _constraint(body, given, parameters)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stop = tuple(s for s in stop if s)
        elif not isinstance(stop, str):
            raise _bad(
                "stop", f"stop must be a string or a list of strings, got {short_repr(stop)}"
            )
        given["stop"] = stop if stop != "" else ()
    try:
        return GenerationOptions(**given), parameters
    except IdeficsKitError as exc:
        param = getattr(exc, "parameter", None)
        field_name = parameters.get(param, param) if isinstance(param, str) else None
        raise _bad(field_name or "body", str(exc)) from exc


def _constraint(body: Mapping[str, Any], given: dict[str, Any], parameters: dict[str, str]) -> None:
    """``response_format`` (OpenAI) and ``structured_outputs`` / ``guided_*`` (vLLM's names)."""
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, Mapping):
            raise _bad("response_format", "response_format must be an object like {'type': 'text'}")
        kind = response_format.get("type")
        if kind == "json_object":
            given["json_schema"] = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            if not isinstance(schema, Mapping):
                raise _bad(
                    "response_format.json_schema",
                    "response_format {'type': 'json_schema'} needs json_schema.schema, a JSON "
                    "Schema object",
                )
            given["json_schema"] = schema
        elif kind != "text":
            raise _bad(
                "response_format.type",
                "response_format.type must be text, json_object or json_schema, got "
                f"{short_repr(kind)}",
            )
        parameters["json_schema"] = "response_format"
    outputs = body.get("structured_outputs")
    if outputs is not None and not isinstance(outputs, Mapping):
        raise _bad("structured_outputs", "structured_outputs must be an object")
    sources = {
        "json_schema": ("structured_outputs.json", "guided_json"),
        "regex": ("structured_outputs.regex", "guided_regex"),
        "choice": ("structured_outputs.choice", "guided_choice"),
    }
    for option, names in sources.items():
        for name in names:
            value = (outputs or {}).get(name.split(".", 1)[1]) if "." in name else body.get(name)
            if value is None:
                continue
            if option in given:
                raise _bad(name, f"{name} conflicts with {parameters.get(option, option)}")
            given[option] = (
                tuple(value) if option == "choice" and isinstance(value, list) else value
            )
            parameters[option] = name


def parse_chat_request(body: object, policy: ImagePolicy, *, max_images: int) -> ChatRequest:
    """Check a decoded JSON body and build the request; :class:`APIError` (400) if it is wrong."""
    if not isinstance(body, Mapping):
        raise _bad("body", f"the request body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"model must be a string, got {_type_name(model)}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", f"stream must be true or false, got {short_repr(stream)}")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, Mapping):
            raise _bad("stream_options", "stream_options must be an object")
        usage = stream_options.get("include_usage", False)
        if not isinstance(usage, bool):
            raise _bad("stream_options.include_usage", "include_usage must be true or false")
        include_usage = usage
    _unsupported(body)
    options, parameters = _options(body)
    conversation = _conversation(body.get("messages"), policy, max_images)
    return ChatRequest(
        conversation=conversation,
        options=options,
        model=model,
        stream=bool(stream),
        include_usage=include_usage,
        parameters=parameters,
    )


# -- responses ---------------------------------------------------------------------------


def usage_body(result: Result) -> dict[str, int]:
    """OpenAI's ``usage`` object from a Result."""
    return {
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "total_tokens": result.usage.total_tokens,
    }


def logprobs_body(result: Result) -> dict[str, Any] | None:
    """OpenAI's ``choices[0].logprobs`` from a Result (None unless logprobs were asked for)."""
    if result.logprobs is None:
        return None
    return {"content": [_token(entry, top=True) for entry in result.logprobs], "refusal": None}


def _token(entry: TokenLogprob, *, top: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "token": entry.text,
        "logprob": entry.logprob,
        "bytes": list(entry.token_bytes),
    }
    if top:
        body["top_logprobs"] = [_token(other, top=False) for other in entry.top_logprobs]
    return body


def completion_body(request_id: str, created: int, model: str, result: Result) -> dict[str, Any]:
    """A ``chat.completion`` object with one choice."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": logprobs_body(result),
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage_body(result),
        "system_fingerprint": None,
    }


def chunk(
    request_id: str,
    created: int,
    model: str,
    *,
    delta: Mapping[str, str] | None = None,
    finish_reason: str | None = None,
    logprobs: Mapping[str, Any] | None = None,
    usage: Mapping[str, int] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` with ``usage`` is the final usage chunk."""
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [
            {
                "index": 0,
                "delta": dict(delta),
                "logprobs": None if logprobs is None else dict(logprobs),
                "finish_reason": finish_reason,
            }
        ],
    }
    if include_usage:
        # OpenAI sends "usage": null on every chunk but the last when usage is asked for.
        body["usage"] = dict(usage) if usage is not None else None
    return body


def models_body(model: str, created: int) -> dict[str, Any]:
    """``GET /v1/models``: the one served model."""
    return {"object": "list", "data": [model_body(model, created)]}


def model_body(model: str, created: int) -> dict[str, Any]:
    """One model object."""
    return {"id": model, "object": "model", "created": created, "owned_by": "idefics-kit"}


def now() -> int:
    """Seconds since the epoch, for ``created``."""
    return int(time.time())
