"""The ``idefics-kit`` command line: ``ask``, ``batch``, ``batch-status``, ``info``, ``serve``.

Also runnable as ``python -m idefics_kit``. :func:`main` parses the
arguments, runs one command and returns the exit code: 0 ok, 1 a failure
(a model that does not load, an unreadable image or input file), 2 a usage
error (bad arguments or option values), 130 interrupted. Every error is one
line on stderr starting with ``idefics-kit: error:``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from idefics_kit import __version__
from idefics_kit._cli_batch import BatchJob, run_batch, run_status
from idefics_kit._cli_common import PROG, CliExit, cli_message, one_line, positive_int
from idefics_kit._cli_finetune import add_finetune_command
from idefics_kit._cli_ray import add_ray_flags, run_ray_batch, wants_ray
from idefics_kit._cli_serve import SERVE_EPILOG, add_serve_flags, engine_options, run_serve
from idefics_kit.conversation import Conversation
from idefics_kit.errors import IdeficsKitError, InvalidParameterError
from idefics_kit.images import ImagePart
from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result

if TYPE_CHECKING:
    # torch and transformers load only when a command runs, so --help is fast.
    from idefics_kit.generator import Generator

__all__ = [
    "answer_json",
    "ask_conversation",
    "build_parser",
    "format_info",
    "generation_options",
    "image_part",
    "main",
    "model_info",
    "stream_answer",
]

_DEFAULT_BATCH_SIZE = 8
_OPTION_NAMES = ("max_new_tokens", "temperature", "top_p", "stop", "seed")
# InvalidParameterError.parameter values that a flag of this CLI sets.
_FLAG_PARAMETERS = frozenset({*_OPTION_NAMES, "device", "dtype", "batch_size"})
_EXAMPLE_MODEL = "HuggingFaceTB/SmolVLM-Instruct"
_LABEL_WIDTH = len("tokens per image: ")
_DEFAULTS = GenerationOptions()

_MAIN_EPILOG = f"""\
commands:
  ask     answer a question about one or more images, streaming the answer
  batch   answer JSONL/Parquet files of conversations, resumably
  batch-status  how far a batch output is (done, errors, remaining, running)
  info    describe a checkpoint: family, size, context, image settings, tokens
  serve   an OpenAI-compatible HTTP server (needs the [serve] extra)
  finetune  fine-tune a model on JSONL conversations (LoRA needs the [train] extra)

examples:
  {PROG} ask --image red_circle.png "What color is the shape?"   # built-in toy model
  {PROG} ask --model {_EXAMPLE_MODEL} --image dog.jpg "What breed is this dog?"
  {PROG} batch --model {_EXAMPLE_MODEL} questions.jsonl -o answers.jsonl
  {PROG} info --model {_EXAMPLE_MODEL} --json
  {PROG} serve --model {_EXAMPLE_MODEL} --port 8000

Run '{PROG} COMMAND --help' for the flags of a command.
"""

_ASK_EPILOG = f"""\
Images come first in the user turn, in the order given, then the question.
An --image starting with http:// or https:// is downloaded; anything else is
a file path. URLs are fetched only from public internet addresses unless
--allow-private-network is given.

examples:
  {PROG} ask --image red_circle.png "What shape is it?"   # built-in toy model
  {PROG} ask --model {_EXAMPLE_MODEL} --image dog.jpg "What breed is this dog?"
  {PROG} ask --model ./my-checkpoint --image before.png --image https://example.com/after.png \\
      "What changed between these two pictures?"
  {PROG} ask --model {_EXAMPLE_MODEL} --image chart.png --json --max-new-tokens 64 \\
      "Summarise this chart."
"""

_BATCH_EPILOG = f"""\
input: one JSON object per line, messages in Conversation.to_messages() format:
  {{"id": "a1", "messages": [{{"role": "user", "content": [{{"type": "image", "path": "dog.jpg"}},
      {{"type": "text", "text": "What breed is this dog?"}}]}}]}}
(or Parquet files with id and messages columns). Several files, folders or
quoted glob patterns may be given; ids must be unique across all of them.
output: one JSON object per input, in input order:
  {{"id": "a1", "text": "...", "finish_reason": "stop",
   "usage": {{"prompt_tokens": 41, "completion_tokens": 7}}, "error": null}}
A bad line gets a row with "error": {{"type": ..., "message": ...}} and the rest go on.
Rows are appended and flushed one by one: after a crash or Ctrl-C, rerun the
same command to resume (inputs already in the output are skipped). OUT.manifest.json
records the model, options, SDK version and inputs: a rerun with other settings
is refused (exit 2) unless --overwrite starts over. --retry-errors runs the
error rows again and replaces them. One command per output at a time.
'{PROG} batch-status OUT' shows how far an output is. Image URLs are fetched only
from public internet addresses unless --allow-private-network is given.

examples:
  {PROG} batch --model {_EXAMPLE_MODEL} questions.jsonl -o answers.jsonl
  {PROG} batch --model {_EXAMPLE_MODEL} part1.jsonl 'more/*.jsonl' -o answers.jsonl \\
      --batch-size 16 --max-new-tokens 128 --stop $'\\n'
  {PROG} batch --model {_EXAMPLE_MODEL} questions.jsonl -o answers.jsonl --retry-errors
  {PROG} batch-status answers.jsonl
  {PROG} batch --ray --actors 4 questions.jsonl -o answers/   # Ray cluster ([ray] extra)
"""

_BATCH_STATUS_EPILOG = f"""\
Reads the output, its manifest and the inputs the manifest names; runs nothing.

examples:
  {PROG} batch-status answers.jsonl
  {PROG} batch-status answers/ --json     # a --ray output folder
"""

_INFO_EPILOG = f"""\
examples:
  {PROG} info --model {_EXAMPLE_MODEL}
  {PROG} info --model ./my-checkpoint --device cpu --json
"""


# -- arguments ---------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2, raised as CliExit."""

    def error(self, message: str) -> NoReturn:
        raise CliExit(f"{message} (see '{self.prog} --help')", 2)


def _model_flags() -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="M",
        default="toy",
        help="hub id or local checkpoint folder of an IDEFICS-family model (default: 'toy', "
        "the tiny built-in model that answers questions about simple shape pictures)",
    )
    group.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps (default: auto)",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="weight dtype; auto: bfloat16/float16 on GPUs, float32 on the CPU (default: auto)",
    )
    parent.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing on stderr but errors (no progress bar, notes or warnings)",
    )
    return parent


def _generation_flags() -> _Parser:
    parent = _Parser(add_help=False)
    group = parent.add_argument_group("generation (defaults: GenerationOptions)")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help=f"most tokens to generate (default: {_DEFAULTS.max_new_tokens})",
    )
    group.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        help="0 means greedy decoding (the default); > 0 samples",
    )
    group.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help=f"nucleus sampling in (0, 1] (default: {_DEFAULTS.top_p})",
    )
    group.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end the answer before TEXT; repeatable (a newline in bash: --stop $'\\n')",
    )
    group.add_argument(
        "--seed", type=int, metavar="N", help="make sampling reproducible (default: none)"
    )
    return parent


def _network_flag() -> _Parser:
    parent = _Parser(add_help=False)
    parent.add_argument(
        "--allow-private-network",
        action="store_true",
        help="also download image URLs from loopback, private, link-local and cloud-metadata "
        "addresses (refused by default so that URLs cannot reach internal services; use it "
        "only when you trust every URL)",
    )
    return parent


def _json_flag(help_text: str) -> _Parser:
    parent = _Parser(add_help=False)
    parent.add_argument("--json", action="store_true", help=help_text)
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The ``idefics-kit`` parser; each command sets ``run`` to its handler."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Run IDEFICS-family vision-language models (IDEFICS 1/2/3, SmolVLM).",
        epilog=_MAIN_EPILOG,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    model, generation, network = _model_flags(), _generation_flags(), _network_flag()

    ask = commands.add_parser(
        "ask",
        help="answer a question about images, streaming the answer",
        description="Answer a question about one or more images; the answer streams to stdout.",
        epilog=_ASK_EPILOG,
        formatter_class=formatter,
        parents=[
            model,
            generation,
            network,
            _json_flag("print one JSON object (text, finish_reason, usage) instead of streaming"),
        ],
    )
    ask.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH_OR_URL",
        help="an image file or http(s) URL; repeatable, kept in order",
    )
    ask.add_argument("question", help="the question (text of the user turn, after the images)")
    ask.set_defaults(run=_cmd_ask)

    batch = commands.add_parser(
        "batch",
        help="answer JSONL/Parquet files of conversations, resumably",
        description="Answer every conversation of JSONL or Parquet files; write one JSON row per input.",
        epilog=_BATCH_EPILOG,
        formatter_class=formatter,
        parents=[model, generation, network],
    )
    batch.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="input JSONL or Parquet files, folders of them, or quoted glob patterns",
    )
    batch.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output JSONL file (appended to); with --ray, a folder of part files",
    )
    batch.add_argument(
        "--retry-errors",
        action="store_true",
        help="also run again the inputs whose row is an error row; each new row replaces "
        "the old one (crash-safe)",
    )
    batch.add_argument(
        "--overwrite",
        action="store_true",
        help="remove the output's rows and manifest first and start over (needed to change "
        "--model, generation options or inputs of an existing output)",
    )
    batch.add_argument(
        "--batch-size",
        type=positive_int,
        default=_DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"conversations per model call (default: {_DEFAULT_BATCH_SIZE})",
    )
    add_ray_flags(batch)
    batch.set_defaults(run=_cmd_batch)

    batch_status = commands.add_parser(
        "batch-status",
        help="how far a batch output is",
        description="Show how far a batch output (a JSONL file, or a --ray folder) is: rows "
        "done, error rows, inputs remaining, and whether a job is writing it now.",
        epilog=_BATCH_STATUS_EPILOG,
        formatter_class=formatter,
        parents=[_json_flag("print one JSON object")],
    )
    batch_status.add_argument("output", type=Path, help="the -o of the batch command")
    batch_status.set_defaults(run=_cmd_batch_status, quiet=False)

    info = commands.add_parser(
        "info",
        help="describe a checkpoint",
        description="Describe a checkpoint: family, parameters, device, dtype, context length, "
        "image settings, stop and banned tokens.",
        epilog=_INFO_EPILOG,
        formatter_class=formatter,
        parents=[model, _json_flag("print one JSON object")],
    )
    info.set_defaults(run=_cmd_info)

    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (needs the [serve] extra)",
        description="Serve a model over HTTP with OpenAI's chat-completions API; concurrent "
        "requests share batches. Stops on SIGTERM or Ctrl-C after draining.",
        epilog=SERVE_EPILOG,
        formatter_class=formatter,
        parents=[model, network],
    )
    add_serve_flags(serve)
    serve.set_defaults(run=_cmd_serve)

    add_finetune_command(commands, [model])
    return parser


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    """GenerationOptions from the flags that were given; the others keep their defaults."""
    given: dict[str, Any] = {}
    for name in _OPTION_NAMES:
        value = getattr(args, name, None)
        if value is not None:
            given[name] = tuple(value) if name == "stop" else value
    return GenerationOptions(**given)


def _require_model(args: argparse.Namespace) -> str:
    model: str = args.model
    if not model:
        raise CliExit(
            f"--model must not be empty: pass a hub id (e.g. {_EXAMPLE_MODEL}), a checkpoint "
            "folder, or leave it out for the built-in toy model",
            2,
        )
    return model


# -- model loading ---------------------------------------------------------------------


def _load_generator(model: str, args: argparse.Namespace) -> Generator:
    from idefics_kit.generator import Generator

    return Generator.from_pretrained(model, device=args.device, dtype=args.dtype)


# -- ask -------------------------------------------------------------------------------


def image_part(source: str, *, allow_private_network: bool = False) -> ImagePart:
    """``ImagePart.from_url`` for an http(s) URL, else ``ImagePart.from_path``."""
    if source.lower().startswith(("http://", "https://")):
        return ImagePart.from_url(source, allow_private_network=allow_private_network)
    return ImagePart.from_path(source)


def ask_conversation(
    images: Sequence[str], question: str, *, allow_private_network: bool = False
) -> Conversation:
    """One user turn: the images in order, then the question; images are decoded now."""
    parts = [
        ImagePart.from_pil(image_part(source, allow_private_network=allow_private_network).load())
        for source in images
    ]
    return Conversation().user(*parts, question)


def stream_answer(
    gen: Generator, conversation: Conversation, options: GenerationOptions, out: TextIO
) -> None:
    """Write each streamed piece to ``out`` as it comes (flushed), then a newline."""
    try:
        for piece in gen.stream(conversation, options):
            out.write(piece)
            out.flush()
    finally:
        out.write("\n")
        out.flush()


def answer_json(result: Result) -> dict[str, Any]:
    """The ``ask --json`` object of a result."""
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
        },
    }


def _cmd_ask(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    model = _require_model(args)
    options = generation_options(args)
    conversation = ask_conversation(
        args.image, args.question, allow_private_network=args.allow_private_network
    )
    gen = _load_generator(model, args)
    if args.json:
        print(
            json.dumps(answer_json(gen.generate(conversation, options)), ensure_ascii=False),
            file=out,
        )
    else:
        stream_answer(gen, conversation, options, out)
    return 0


# -- batch -------------------------------------------------------------------------------


def _cmd_batch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    model = _require_model(args)
    if wants_ray(args):
        return run_ray_batch(args, model, generation_options(args), err)
    job = BatchJob(
        inputs=tuple(args.inputs),
        output=args.output,
        model=model,
        options=generation_options(args),
        batch_size=args.batch_size,
        quiet=args.quiet,
        allow_private_network=args.allow_private_network,
        overwrite=args.overwrite,
        retry_errors=args.retry_errors,
    )
    return run_batch(job, lambda: _load_generator(model, args), err)


def _cmd_batch_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return run_status(args.output, args.json, out)


# -- info --------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-friendly copy of an image-processor setting (SizeDict and dicts as dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, Mapping):
        return {str(key): item for key, item in value.items() if item is not None}
    return value


def _image_settings(processor: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    image_processor = getattr(processor, "image_processor", None)
    for name in ("size", "max_image_size", "do_image_splitting", "image_size"):
        value = getattr(image_processor, name, None)
        if value is not None:
            settings[name] = _plain(value)
    seq_len = getattr(processor, "image_seq_len", None)
    if seq_len is not None:
        settings["image_seq_len"] = seq_len
    return settings


def _tokens(gen: Generator, ids: Sequence[int]) -> list[dict[str, Any]]:
    names = gen.processor.tokenizer.convert_ids_to_tokens(list(ids))
    return [{"id": token_id, "token": name} for token_id, name in zip(ids, names, strict=True)]


def model_info(gen: Generator, model: str) -> dict[str, Any]:
    """What ``info`` reports about a loaded generator."""
    text_config = gen.model.config.get_text_config()
    return {
        "model": model,
        "family": gen.family,
        "parameters": sum(p.numel() for p in gen.model.parameters()),
        "device": str(gen.device),
        "dtype": str(gen.dtype).removeprefix("torch."),
        "context_length": getattr(text_config, "max_position_embeddings", None),
        "image": _image_settings(gen.processor),
        "stop_tokens": _tokens(gen, gen.stop_token_ids),
        "banned_tokens": _tokens(gen, gen.banned_token_ids),
    }


def _setting(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def format_info(info: Mapping[str, Any]) -> str:
    """``info`` as aligned ``label: value`` lines."""
    lines = [
        ("model", info["model"]),
        ("family", info["family"]),
        ("parameters", f"{info['parameters']:,}"),
        ("device", info["device"]),
        ("dtype", info["dtype"]),
        (
            "context length",
            f"{info['context_length']} tokens" if info["context_length"] is not None else "unknown",
        ),
    ]
    labels = {
        "size": "image size",
        "max_image_size": "max image size",
        "do_image_splitting": "image splitting",
        "image_size": "image side",
        "image_seq_len": "tokens per image",
    }
    lines += [(labels[name], _setting(value)) for name, value in info["image"].items()]
    for label, key in (("stop tokens", "stop_tokens"), ("banned tokens", "banned_tokens")):
        tokens = info[key]
        text = ", ".join(f"{t['id']} {t['token']}" for t in tokens) if tokens else "none"
        lines.append((label, text))
    return "\n".join(f"{label + ':':<{_LABEL_WIDTH}}{value}" for label, value in lines)


def _cmd_info(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    model = _require_model(args)
    info = model_info(_load_generator(model, args), model)
    print(json.dumps(info, ensure_ascii=False) if args.json else format_info(info), file=out)
    return 0


# -- serve -------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    model = _require_model(args)

    def load() -> Generator:
        from idefics_kit.generator import Generator

        return Generator.from_pretrained(
            model, device=args.device, dtype=args.dtype, **engine_options(args)
        )

    return run_serve(args, load, model, err)


# -- main ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """Silence transformers' progress bars and logs (and with ``quiet``, warnings); restore after."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _flag_error(exc: InvalidParameterError) -> str:
    if exc.parameter in _FLAG_PARAMETERS:
        return f"--{exc.parameter.replace('_', '-')}: {exc}"
    return str(exc)


def _out_of_memory(exc: Exception) -> bool:
    # Only a loaded torch can have raised its OutOfMemoryError: no import here.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the chosen command; turn user errors into one stderr line and an exit code."""
    command: Callable[[argparse.Namespace, TextIO, TextIO], int] = args.run
    try:
        with _quiet_libraries(args.quiet):
            return command(args, out, err)
    except CliExit as exc:
        print(exc.line(), file=err)
        return exc.code
    except InvalidParameterError as exc:
        print(f"{PROG}: error: {one_line(_flag_error(exc))}", file=err)
        return 2
    except IdeficsKitError as exc:
        print(f"{PROG}: error: {one_line(cli_message(str(exc)))}", file=err)
        return 1
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        print(
            f"{PROG}: error: out of memory ({one_line(str(exc))[:200]}); lower "
            "--batch-size or --max-new-tokens, or pick another --dtype/--device",
            file=err,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return 130


def main(argv: list[str] | None = None) -> int:
    """Run ``idefics-kit`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    out, err = sys.stdout, sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except CliExit as exc:
        print(exc.line(), file=err)
        return exc.code
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    try:
        return _run(args, out, err)
    except BrokenPipeError:
        # The reader went away (`| head`); stop quietly, as shell tools do.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
