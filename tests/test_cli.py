"""The ``idefics-kit`` command line: ask, batch (errors, resume), info, exit codes.

End-to-end checks run ``python -m idefics_kit`` as a subprocess (each costs a
few seconds of imports, so they are few and run in parallel where independent);
parsing, option building, row formatting and resume logic are checked in-process.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import transformers

import idefics_kit
from idefics_kit import (
    Conversation,
    ConversationError,
    GenerationOptions,
    Generator,
    ImagePart,
    InvalidParameterError,
)
from idefics_kit.cli import (
    build_parser,
    format_info,
    generation_options,
    image_part,
    main,
    model_info,
)
from idefics_kit.jobs import (
    JsonlOutput,
    Record,
    RecordError,
    RowWriter,
    answer,
    conversation_of,
    error_row,
    find_duplicate,
    parse_record,
    result_row,
)
from tests.conftest import FAMILIES, picture

ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONIOENCODING": "utf-8",
}
TIMEOUT_S = 180
CLI = [sys.executable, "-m", "idefics_kit"]


def slow_cli(seconds: float) -> list[str]:
    """The real CLI with every answer delayed by ``seconds``, so that a run can be
    interrupted (or killed) part-way at a point the test controls."""
    return [
        sys.executable,
        "-c",
        "import sys, time\n"
        "from idefics_kit.generator import Generator\n"
        "original = Generator.iter_batch\n"
        "def slow(self, *args, **kwargs):\n"
        "    for result in original(self, *args, **kwargs):\n"
        f"        time.sleep({seconds})\n"
        "        yield result\n"
        "Generator.iter_batch = slow\n"
        "from idefics_kit.cli import main\n"
        "raise SystemExit(main())\n",
    ]


SLOW_CLI = slow_cli(0.3)
CPU = ["--device", "cpu", "--dtype", "float32"]
QUESTION = "What is in this image?"


# -- helpers ------------------------------------------------------------------------


def run_cli(*argvs: list[str], cwd: Path | None = None) -> list[subprocess.CompletedProcess[bytes]]:
    """Run ``python -m idefics_kit ARGV`` for each argv, all at once; wait for all."""
    procs = [
        subprocess.Popen(
            [*CLI, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
            cwd=cwd,
        )
        for argv in argvs
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT_S)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def one_error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The single stderr line of a failed run (asserts there is exactly one, no traceback)."""
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, proc.stderr.decode()
    assert lines[0].startswith("idefics-kit: error: "), lines[0]
    return lines[0]


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
    """Poll ``condition`` until it holds; fail if the deadline passes or ``proc`` ends first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"the process ended (rc={proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def messages_line(record_id: str, messages: list[dict[str, Any]]) -> str:
    return json.dumps({"id": record_id, "messages": messages})


def user(*content: dict[str, str]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(content)}]


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


def image(path: Path | str) -> dict[str, str]:
    return {"type": "image", "path": str(path)}


def row_of(record_id: str, result: Any) -> dict[str, Any]:
    return {
        "id": record_id,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
        },
        "error": None,
    }


@pytest.fixture(scope="module")
def cpu_gens(checkpoints: dict[str, Path]) -> dict[str, Generator]:
    """What the subprocesses load with ``--device cpu --dtype float32``."""
    return {
        family: Generator.from_pretrained(path, device="cpu", dtype="float32")
        for family, path in checkpoints.items()
    }


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("pictures")
    paths = [root / f"p{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        picture(40 + 8 * i, 30, seed=i).save(path)
    return paths


# -- arguments and options (in-process) ----------------------------------------------------


def test_every_generation_flag_builds_options() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["ask", "--model", "m", "--max-new-tokens", "7", "--temperature", "0.5", "--top-p",
         "0.9", "--stop", "a", "--stop", "\n", "--seed", "3", "--image", "x.png", "--image",
         "https://h/y.png", "--device", "cpu", "--dtype", "bfloat16", "--json", "--quiet", "q?"]
    )  # fmt: skip
    assert generation_options(args) == GenerationOptions(
        max_new_tokens=7, temperature=0.5, top_p=0.9, stop=("a", "\n"), seed=3
    )
    assert (args.image, args.question, args.device, args.dtype) == (
        ["x.png", "https://h/y.png"], "q?", "cpu", "bfloat16"
    )  # fmt: skip
    assert args.json
    assert args.quiet
    # Flags not given keep the GenerationOptions defaults.
    plain = parser.parse_args(["batch", "in.jsonl", "-o", "out.jsonl"])
    assert generation_options(plain) == GenerationOptions()
    assert (plain.batch_size, plain.model, plain.device, plain.dtype) == (8, "toy", "auto", "auto")
    assert not plain.allow_private_network
    trusting = parser.parse_args(["batch", "i", "-o", "o", "--allow-private-network"])
    assert trusting.allow_private_network
    assert parser.parse_args(["batch", "i", "-o", "o", "--batch-size", "3"]).batch_size == 3
    with pytest.raises(InvalidParameterError, match="top_p"):
        generation_options(parser.parse_args(["ask", "--top-p", "1.5", "q"]))


def test_image_argument_kind() -> None:
    assert image_part("https://example.com/a.png").kind == "url"
    assert not image_part("https://example.com/a.png").allow_private_network
    assert image_part("https://h/a.png", allow_private_network=True).allow_private_network
    assert image_part("HTTP://example.com/a.png").kind == "url"
    assert image_part("dir/http_cat.png").kind == "path"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"idefics-kit {idefics_kit.__version__}\n"


@pytest.mark.parametrize("command", [None, "ask", "batch", "info"])
def test_help_shows_examples(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert f"idefics-kit {command or 'ask'} --model" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ask", "--model", "m", "--temperature", "abc", "q"], "invalid float value: 'abc'"),
        (["batch", "--model", "m", "in.jsonl"], "required: -o/--output"),
        (["batch", "--model", "m", "i", "-o", "o", "--batch-size", "0"], "must be an integer"),
        (["ask", "--model", "m", "--dtype", "float8", "q"], "invalid choice: 'float8'"),
        (["ask", "--model", "m", "--stop", "", "q"], "--stop: stop must hold only non-empty"),
        (["ask", "--model", "m", "--max-new-tokens", "0", "q"], "--max-new-tokens: max_new"),
        (["ask", "--model", "m", "--seed", "-1", "q"], "--seed: seed must be None or an int"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: COMMAND"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("idefics-kit: error: ")
    assert message in lines[0]


# -- ask ---------------------------------------------------------------------------------


class RecordingOut(io.StringIO):
    """A stdout that records each write and flush."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def write(self, text: str) -> int:
        self.events.append(("write", text))
        return super().write(text)

    def flush(self) -> None:
        self.events.append(("flush", ""))
        super().flush()


def test_ask_writes_each_streamed_piece_as_it_comes(
    checkpoints: dict[str, Path],
    cpu_gens: dict[str, Generator],
    pictures: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Images in the order given, then the question.
    conv = Conversation().user(
        ImagePart.from_path(pictures[1]), ImagePart.from_path(pictures[0]), "Compare them."
    )
    options = GenerationOptions(max_new_tokens=16)
    pieces = list(cpu_gens["idefics2"].stream(conv, options))
    assert len(pieces) > 1
    assert "".join(pieces) == cpu_gens["idefics2"].generate(conv, options).text

    out = RecordingOut()
    monkeypatch.setattr(sys, "stdout", out)
    argv = ["ask", "--model", str(checkpoints["idefics2"]), *CPU, "--max-new-tokens", "16"]
    images = ["--image", str(pictures[1]), "--image", str(pictures[0])]
    assert main([*argv, *images, "Compare them."]) == 0
    # One write and one flush per piece, then the final newline.
    expected = [event for piece in pieces for event in (("write", piece), ("flush", ""))]
    assert out.events == [*expected, ("write", "\n"), ("flush", "")]


def test_ask_streams_the_generate_answer(
    checkpoints: dict[str, Path], cpu_gens: dict[str, Generator], pictures: list[Path]
) -> None:
    conv = Conversation().user(
        ImagePart.from_path(pictures[0]), ImagePart.from_path(pictures[2]), QUESTION
    )
    sampled = GenerationOptions(
        max_new_tokens=12, temperature=0.8, top_p=0.9, seed=11, stop=("zzz",)
    )
    sampling_flags = [
        "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9",
        "--seed", "11", "--stop", "zzz",
    ]  # fmt: skip
    images = ["--image", str(pictures[0]), "--image", str(pictures[2])]
    model = ["--model", str(checkpoints["smolvlm"]), *CPU]
    streamed, as_json = run_cli(
        ["ask", *model, "--max-new-tokens", "12", *images, QUESTION],
        ["ask", *model, *sampling_flags, "--json", *images, QUESTION],
    )
    greedy = cpu_gens["smolvlm"].generate(conv, max_new_tokens=12)
    assert greedy.text
    assert streamed.returncode == 0, streamed.stderr.decode()
    assert streamed.stdout.decode() == greedy.text + "\n"

    assert as_json.returncode == 0, as_json.stderr.decode()
    result = cpu_gens["smolvlm"].generate(conv, sampled)
    assert json.loads(as_json.stdout) == {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
        },
    }
    assert as_json.stdout.decode().count("\n") == 1


def test_failures_exit_with_one_clear_line(
    checkpoints: dict[str, Path], pictures: list[Path], tmp_path: Path
) -> None:
    llama = tmp_path / "llama"
    transformers.LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(llama)
    model = ["--model", str(checkpoints["idefics2"]), *CPU]
    pic = ["--image", str(pictures[0])]
    no_model, no_image, bad_path, not_idefics, bad_temperature, no_input = run_cli(
        ["ask", "--model", "", *pic, QUESTION],
        ["ask", *model, "--image", "missing.png", QUESTION],
        ["ask", "--model", str(tmp_path / "nowhere"), *pic, QUESTION],
        ["info", "--model", str(llama)],
        ["ask", *model, "--temperature", "-1", *pic, QUESTION],
        ["batch", *model, "missing.jsonl", "-o", "out.jsonl"],
        cwd=tmp_path,
    )
    assert no_model.returncode == 2
    line = one_error_line(no_model)
    assert "--model must not be empty" in line
    assert "leave it out for the built-in toy model" in line

    assert no_image.returncode == 1
    assert "image file not found: 'missing.png'" in one_error_line(no_image)

    assert bad_path.returncode == 1
    assert "no checkpoint folder at " in one_error_line(bad_path)

    assert not_idefics.returncode == 1
    assert "is a 'llama' model, not an IDEFICS-family one" in one_error_line(not_idefics)

    assert bad_temperature.returncode == 2
    assert "--temperature: temperature must be" in one_error_line(bad_temperature)

    assert no_input.returncode == 1
    assert "input file 'missing.jsonl' not found" in one_error_line(no_input)
    assert not (tmp_path / "out.jsonl").exists()

    for proc in (no_model, no_image, bad_path, not_idefics, bad_temperature, no_input):
        assert proc.stdout == b""


# -- private network addresses ---------------------------------------------------------


@pytest.fixture
def local_png(pictures: list[Path]) -> Iterator[str]:
    """The URL of a PNG served by an HTTP server on 127.0.0.1 (a loopback address)."""
    data = pictures[0].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep stderr for the CLI

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/x.png"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_private_network_urls_need_the_flag(
    checkpoints: dict[str, Path],
    cpu_gens: dict[str, Generator],
    pictures: list[Path],
    local_png: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = ["--model", str(checkpoints["idefics2"]), *CPU, "--max-new-tokens", "6", "--quiet"]
    ask = ["ask", *model, "--json", "--image", local_png, QUESTION]
    assert main(ask) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"idefics-kit: error: refusing to fetch {local_png}: ")
    assert "private/loopback address" in lines[0]
    assert lines[0].endswith("pass --allow-private-network for trusted setups")

    expected = cpu_gens["idefics2"].generate(
        Conversation().user(ImagePart.from_path(pictures[0]), QUESTION), max_new_tokens=6
    )
    assert main([*ask, "--allow-private-network"]) == 0
    captured = capsys.readouterr()
    assert (json.loads(captured.out)["text"], captured.err) == (expected.text, "")

    source = tmp_path / "in.jsonl"
    messages = user({"type": "image", "url": local_png}, text(QUESTION))
    source.write_text(messages_line("u", messages) + "\n")
    refused, trusted = tmp_path / "refused.jsonl", tmp_path / "trusted.jsonl"
    assert main(["batch", *model, str(source), "-o", str(refused)]) == 0
    assert main(["batch", *model, "--allow-private-network", str(source), "-o", str(trusted)]) == 0
    assert capsys.readouterr().err == ""
    (row,) = read_rows(refused)
    assert row["error"]["type"] == "ImageLoadError"
    assert row["error"]["message"].startswith(f"refusing to fetch {local_png}: ")
    assert "pass --allow-private-network" in row["error"]["message"]
    assert read_rows(trusted) == [row_of("u", expected)]


# -- info --------------------------------------------------------------------------------


def test_info_human_and_json(checkpoints: dict[str, Path], cpu_gens: dict[str, Generator]) -> None:
    path = str(checkpoints["idefics3"])
    human, as_json = run_cli(
        ["info", "--model", path, *CPU], ["info", "--model", path, *CPU, "--json", "--quiet"]
    )
    assert human.returncode == as_json.returncode == 0, human.stderr + as_json.stderr
    gen = cpu_gens["idefics3"]
    info = json.loads(as_json.stdout)
    assert info == model_info(gen, path)
    out = human.stdout.decode()
    assert out == format_info(info) + "\n"
    context = gen.model.config.get_text_config().max_position_embeddings
    eou = gen.processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    for expected in (
        "family:           idefics3\n",
        "device:           cpu\n",
        "dtype:            float32\n",
        f"context length:   {context} tokens\n",
        "image splitting:  on\n",
        f"tokens per image: {gen.processor.image_seq_len}\n",
        f"{eou} <end_of_utterance>",
        "<row_6_col_6>",
    ):
        assert expected in out


@pytest.mark.parametrize("family", FAMILIES)
def test_model_info_every_family(family: str, cpu_gens: dict[str, Generator]) -> None:
    gen = cpu_gens[family]
    info = model_info(gen, "m")
    assert info["family"] == family
    assert info["parameters"] == sum(p.numel() for p in gen.model.parameters()) > 0
    context = gen.model.config.get_text_config().max_position_embeddings
    assert (info["device"], info["dtype"], info["context_length"]) == ("cpu", "float32", context)
    assert [t["id"] for t in info["stop_tokens"]] == list(gen.stop_token_ids)
    assert [t["id"] for t in info["banned_tokens"]] == list(gen.banned_token_ids)
    assert {"token": "<end_of_utterance>", "id": gen.processor.tokenizer.convert_tokens_to_ids(
        "<end_of_utterance>")} in info["stop_tokens"]  # fmt: skip
    assert "<image>" in [t["token"] for t in info["banned_tokens"]]
    image, processor = info["image"], gen.processor
    if family == "idefics":
        side = processor.image_processor.image_size
        assert image == {"size": {"height": side, "width": side}, "image_size": side}
    else:
        assert image["image_seq_len"] == processor.image_seq_len
        assert image["do_image_splitting"] is (family != "idefics2")
        assert image["size"] == dict(processor.image_processor.size)
    json.dumps(info)  # plain JSON values only
    assert format_info(info).splitlines()[1] == f"family:           {family}"


# -- batch: records, rows, answering (in-process) -------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "record_id", "message"),
    [
        (b"not json", None, "line 5: invalid JSON"),
        (b"[1, 2]", None, "expected a JSON object"),
        (b'{"messages": []}', None, '"id" must be a non-empty string, got no id'),
        (b'{"id": 7, "messages": []}', None, "got a JSON number 7"),
        (b'{"id": "", "messages": []}', None, "got a JSON string ''"),
        (b'{"id": "x"}', "x", 'no "messages" key'),
        (b'{"id": "x", "messages": \xff}', None, "not UTF-8"),
    ],
)
def test_parse_bad_records(raw: bytes, record_id: str | None, message: str) -> None:
    record = parse_record(5, raw)
    assert (record.line, record.id) == (5, record_id)
    assert isinstance(record.error, RecordError)
    assert message in str(record.error)
    row = error_row(record, record.error)
    assert row["error"] == {"type": "RecordError", "message": str(record.error)}
    assert ("line" in row) is (record_id is None)


def test_parse_good_record_and_rows(cpu_gens: dict[str, Generator]) -> None:
    messages = user(text("Hi there"))
    record = parse_record(3, json.dumps({"id": "é1", "messages": messages, "meta": 1}).encode())
    assert record == Record(line=3, id="é1", messages=messages)
    result = cpu_gens["idefics2"].generate(Conversation.from_messages(messages), max_new_tokens=3)
    assert result_row(record, result) == row_of("é1", result)
    nameless = Record(line=9, id=None, error=RecordError("x"))
    assert list(error_row(nameless, ConversationError("bad"))) == [
        "id", "line", "text", "finish_reason", "usage", "error"
    ]  # fmt: skip


def test_find_duplicate() -> None:
    assert find_duplicate([(1, "a"), (2, None), (3, "b"), (4, None)]) is None
    assert find_duplicate([(1, "a"), (2, "b"), (3, "b"), (4, "a"), (5, "b")]) == ("b", [2, 3, 5])


def test_answer_keeps_order_and_gives_each_failure_its_row(
    cpu_gens: dict[str, Generator], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The IDEFICS 1 adapter refuses text that its processor would fetch as a
    # URL: Conversation.from_messages accepts it, iter_batch fails that input alone.
    gen = cpu_gens["idefics"]
    photo = ImagePart.from_pil(picture(20, 20, seed=1)).to_message_content()
    records = [
        Record(line=1, id="r1", messages=user(text("Describe a dog."))),
        Record(line=2, id=None, error=RecordError("line 2: invalid JSON")),
        Record(line=3, id="bad-role", messages=[{"role": "robot", "content": "hi"}]),
        Record(line=4, id="url-text", messages=user(photo, text("http://x.org/a.png"))),
        Record(line=5, id="r5", messages=user(text("Count to three."))),
        Record(line=6, id="no-messages", error=RecordError('line 6: no "messages" key')),
    ]
    sent: list[Conversation] = []
    original = gen.iter_batch

    def spy(conversations: Iterator[Conversation], *args: Any, **kwargs: Any) -> Any:
        assert kwargs["on_error"] == "return"
        return original((sent.append(c) or c for c in conversations), *args, **kwargs)

    monkeypatch.setattr(gen, "iter_batch", spy)
    options = GenerationOptions(max_new_tokens=4)
    rows = list(answer(gen, records, options, batch_size=2))
    assert [row["id"] for row in rows] == [record.id for record in records]
    assert len(sent) == 3  # bad lines and bad messages never reach the SDK
    monkeypatch.undo()
    assert rows[0] == row_of("r1", gen.generate(Conversation.from_messages(records[0].messages),
                                                 options))  # fmt: skip
    assert rows[4] == row_of("r5", gen.generate(Conversation.from_messages(records[4].messages),
                                                 options))  # fmt: skip
    assert rows[1] == {
        "id": None, "line": 2, "text": None, "finish_reason": None, "usage": None,
        "error": {"type": "RecordError", "message": "line 2: invalid JSON"},
    }  # fmt: skip
    assert rows[2]["error"]["type"] == "ConversationError"
    assert rows[2]["error"]["message"].startswith("messages[0]['role'] must be one of")
    assert rows[3]["error"]["type"] == "ConversationError"
    assert "fetched as an image URL" in rows[3]["error"]["message"]
    # The error's batch position is not repeated in the row: the row's id names the input.
    assert "input 3" not in rows[3]["error"]["message"]
    assert rows[3]["text"] is rows[3]["usage"] is None
    assert rows[5]["error"]["type"] == "RecordError"


def test_conversation_of_trusts_url_images_only_when_asked() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        *user(image("a.png"), {"type": "image", "url": "http://10.0.0.1/b.png"}, text("Same?")),
    ]
    plain = conversation_of(messages)
    assert plain == Conversation.from_messages(messages)
    assert not any(part.allow_private_network for part in plain.images())
    trusted = conversation_of(messages, allow_private_network=True)
    assert trusted.to_messages() == plain.to_messages()
    assert [(part.kind, part.allow_private_network) for part in trusted.images()] == [
        ("path", False), ("url", True)
    ]  # fmt: skip


def test_opening_an_output_cuts_a_partial_line_and_reads_the_ledger(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with JsonlOutput.open(out, None) as output:
        assert output.ledger.rows == {}
    assert not out.exists()
    complete = '{"id": "a", "error": null}\n{"id": null, "line": 4, "error": {}}\n\n{"id": "b"}\n'
    out.write_text(complete + '{"id": "c", "te')
    notes: list[str] = []
    with JsonlOutput.open(out, None, note=notes.append) as output:
        assert output.ledger.rows == {"a": False, (None, 4): True, "b": False}
    assert notes == [f"removed a partial last line from {out} (an interrupted write)"]
    assert out.read_text() == complete
    with JsonlOutput.open(out, None) as output:
        assert (output.ledger.done, output.ledger.errors) == (2, 1)


def test_batch_refuses_foreign_output_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"id": "a", "messages": []}\n')
    argv = ["batch", "--model", "m", str(source), "-o"]
    for foreign in ('{"id": "a"}\n{"answer": 1}\n', '{"id": "a"}\nnot json\n'):
        out.write_text(foreign)
        assert main([*argv, str(out)]) == 1
        assert capsys.readouterr().err == (
            f"idefics-kit: error: line 2 of the output file {str(out)!r} is not a row of a "
            "batch job; use another output, or fix or remove that file\n"
        )
        assert out.read_text() == foreign
    assert main([*argv, str(source)]) == 1
    assert "is an input file; pass another -o" in capsys.readouterr().err


def test_ctrl_c_waits_for_the_row_being_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.jsonl"
    real_fsync = os.fsync
    # A shell without job control starts background jobs with SIGINT ignored;
    # this test needs Python's usual handler whatever started pytest.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def fsync_hit_by_ctrl_c(fd: int) -> None:
        signal.raise_signal(signal.SIGINT)  # arrives mid-write
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_hit_by_ctrl_c)
    with contextlib.closing(RowWriter(out)) as writer:
        with pytest.raises(KeyboardInterrupt):
            writer.write({"id": "a", "text": "é"})
        assert writer.count == 1
    assert out.read_text(encoding="utf-8") == '{"id": "a", "text": "é"}\n'
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, previous)


def test_duplicate_ids_fail_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    lines = [messages_line(i, user(text("hi"))) for i in ("a", "b", "c", "b", "d", "b")]
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    # The model is never loaded: its path does not even exist.
    assert main(["batch", "--model", str(tmp_path / "none"), str(source), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"idefics-kit: error: duplicate id 'b' on lines 2, 4 and 6 of {source}; "
        "every id must be unique\n"
    )
    assert not out.exists()


# -- batch end to end ----------------------------------------------------------------------


def test_batch_good_and_bad_lines(
    checkpoints: dict[str, Path], cpu_gens: dict[str, Generator], pictures: list[Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    good = {
        "g1": user(image(pictures[0]), text(QUESTION)),
        "g2": [
            {"role": "system", "content": "Answer briefly."},
            *user(text("What colour is the sky?")),
            {"role": "assistant", "content": "Blue."},
            *user(image(pictures[1]), text("And here?")),
        ],
        "g3": user(text("Tell me a story about a dog.")),
        "g4": user(image(pictures[2]), image(pictures[0]), text("Same?")),
    }
    lines = [
        messages_line("g1", good["g1"]),
        "{not json",
        messages_line("g2", good["g2"]),
        json.dumps({"messages": good["g3"]}),
        "",
        messages_line("bad-image", user(image(tmp_path / "missing.png"), text("?"))),
        messages_line("g3", good["g3"]),
        messages_line("ends-assistant", [*good["g3"], {"role": "assistant", "content": "Hi"}]),
        messages_line("bad-role", [{"role": "robot", "content": "hi"}]),
        messages_line("g4", good["g4"]),
    ]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    flags = ["--model", str(checkpoints["idefics2"]), *CPU, "--max-new-tokens", "10"]
    (proc,) = run_cli(["batch", *flags, "--batch-size", "2", str(source), "-o", str(out)])
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    assert "wrote 9 rows" in proc.stderr.decode()  # not --quiet: a summary on stderr

    rows = read_rows(out)
    gen, options = cpu_gens["idefics2"], GenerationOptions(max_new_tokens=10)
    expected = {
        key: gen.generate(Conversation.from_messages(m), options) for key, m in good.items()
    }
    assert [row.get("id") for row in rows] == [
        "g1", None, "g2", None, "bad-image", "g3", "ends-assistant", "bad-role", "g4"
    ]  # fmt: skip
    for key, result in expected.items():
        assert rows[[row["id"] for row in rows].index(key)] == row_of(key, result)
    errors = {(row["id"], row.get("line")): row["error"]["type"] for row in rows if row["error"]}
    assert errors == {
        (None, 2): "RecordError",
        (None, 4): "RecordError",
        ("bad-image", None): "ImageLoadError",
        ("ends-assistant", None): "ConversationError",
        ("bad-role", None): "ConversationError",
    }
    for row in rows:
        if row["error"]:
            assert row["text"] is row["finish_reason"] is row["usage"] is None
    assert "missing.png" in rows[4]["error"]["message"]
    assert "ends with an assistant turn" in rows[6]["error"]["message"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_batch_resumes_after_sigint_and_sigkill(
    checkpoints: dict[str, Path], pictures: list[Path], tmp_path: Path
) -> None:
    total = 40
    lines = []
    for i in range(total):
        content = [text(f"Question {i}: what is this?")]
        if i % 4 == 0:
            content.insert(0, image(pictures[i % 3]))
        lines.append(messages_line(f"q{i:02d}", user(*content)))
    lines.insert(7, "{broken")
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    flags = [
        "--model", str(checkpoints["idefics2"]), *CPU, "--max-new-tokens", "24",
        "--batch-size", "2", "--quiet",
    ]  # fmt: skip

    # The reference: an uninterrupted run.
    reference = tmp_path / "reference.jsonl"
    assert main(["batch", *flags, str(source), "-o", str(reference)]) == 0
    expected = read_rows(reference)
    assert len(expected) == total + 1
    assert [row["id"] for row in expected].count(None) == 1

    out, err = tmp_path / "out.jsonl", tmp_path / "err.txt"

    def start() -> subprocess.Popen[bytes]:
        with open(err, "wb") as sink:
            return subprocess.Popen(
                [*SLOW_CLI, "batch", *flags, str(source), "-o", str(out)],
                stdout=subprocess.DEVNULL,
                stderr=sink,
                env=ENV,
                # SIGINT may be ignored where pytest was started (a background
                # job); the child must see Ctrl-C as a user would.
                preexec_fn=_default_sigint,
            )

    # Ctrl-C once the first rows are in: exit 130, one line, complete rows kept.
    proc = start()
    wait_for(lambda: count_lines(out) >= 2, proc, "the first rows")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=TIMEOUT_S) == 130
    message = err.read_text().splitlines()
    assert len(message) == 1, message
    match = re.fullmatch(
        rf"idefics-kit: interrupted; (\d+) rows written to {re.escape(str(out))} "
        r"\((\d+) in total\); rerun the same command to resume",
        message[0],
    )
    assert match, message[0]
    after_sigint = count_lines(out)
    assert int(match[1]) == int(match[2]) == after_sigint
    assert 2 <= after_sigint < total

    # A hard kill part-way through the rerun, then a torn last line as if the
    # kill had landed mid-write.
    proc = start()
    wait_for(lambda: count_lines(out) > after_sigint, proc, "rows of the second run")
    proc.kill()
    proc.wait(timeout=TIMEOUT_S)
    assert after_sigint < count_lines(out) < total
    with open(out, "ab") as file:
        file.write(b'{"id": "q39", "text": "tor')

    (final,) = run_cli(["batch", *flags, str(source), "-o", str(out)])
    assert final.returncode == 0, final.stderr.decode()
    assert final.stderr == b""  # --quiet
    assert read_rows(out) == expected

    # Once complete, a rerun has nothing to do and leaves the file alone.
    before = out.read_bytes()
    assert main(["batch", *flags, str(source), "-o", str(out)]) == 0
    assert out.read_bytes() == before


def test_default_model_is_the_toy_model_and_answers_the_readme_question() -> None:
    images = Path(__file__).resolve().parent.parent / "examples" / "images"
    ask, info = run_cli(
        ["ask", "--image", str(images / "red_circle.png"), "What color is the shape?"],
        ["info", "--json"],
    )
    assert ask.returncode == 0, ask.stderr.decode()
    assert ask.stdout.decode() == "red\n"
    assert info.returncode == 0, info.stderr.decode()
    described = json.loads(info.stdout)
    assert described["model"] == "toy"
    assert described["family"] == "idefics3"
