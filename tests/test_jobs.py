"""idefics_kit.jobs and the local ``idefics-kit batch``: several inputs, the manifest, the
lock, ``--retry-errors`` (crash-safe), ``batch-status``; the toy model answers.

The Ray path of the same features is in tests/test_ray.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from idefics_kit import GenerationOptions, UsageError, jobs
from idefics_kit.cli import main
from tests.test_cli import slow_cli

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "examples" / "images"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
TIMEOUT_S = 120
# The CLI with every answer slowed down, so that a run can be killed part-way.
SLOW_CLI = slow_cli(0.6)
FLAGS = ["--device", "cpu", "--max-new-tokens", "8", "--batch-size", "4"]
Row = dict[str, Any]


def _ask(image: Path | str, question: str = "What color is the shape?") -> list[Row]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": question}],
        }
    ]


def _write(path: Path, rows: list[Row], extra: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    for position, line in sorted((extra or {}).items()):
        lines.insert(position, line)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _rows(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ids(path: Path) -> list[str | None]:
    return [row["id"] for row in _rows(path)]


@pytest.fixture
def shapes(tmp_path: Path) -> list[Path]:
    """Three toy pictures copied beside the test's inputs."""
    copies = []
    for name in ("red_circle.png", "blue_square.png", "green_triangle.png"):
        copies.append(tmp_path / name)
        shutil.copy(IMAGES / name, copies[-1])
    return copies


def _batch(*argv: str) -> int:
    return main(["batch", *FLAGS, "--quiet", *argv])


# -- inputs ------------------------------------------------------------------------------


def test_several_inputs_files_folders_and_globs_with_ids_unique_across_them(
    tmp_path: Path, shapes: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    a = _write(tmp_path / "a.jsonl", [{"id": "a1", "messages": _ask(shapes[0])}], {1: "{bad"})
    more = tmp_path / "more"
    more.mkdir()
    _write(more / "b.jsonl", [{"id": "b1", "messages": _ask(shapes[1])}])
    _write(more / "c.jsonl", [{"id": "c1", "messages": _ask(shapes[2])}])
    assert jobs.expand_inputs([a, str(more / "*.jsonl")]) == [a, more / "b.jsonl", more / "c.jsonl"]
    assert jobs.expand_inputs([more]) == [more / "b.jsonl", more / "c.jsonl"]
    for bad, message in [
        ([str(tmp_path / "none*.jsonl")], "no input file matches"),
        ([tmp_path / "none.jsonl"], "not found"),
        ([a, str(tmp_path / "a.*")], "is given twice"),
        ([], "no input files given"),
    ]:
        with pytest.raises(UsageError, match=message):
            jobs.expand_inputs(bad)

    out = tmp_path / "out.jsonl"
    assert _batch(str(a), str(more / "*.jsonl"), "-o", str(out)) == 0
    rows = _rows(out)
    assert [row["id"] for row in rows] == ["a1", None, "b1", "c1"]  # input order
    assert (rows[1]["line"], rows[1]["input"]) == (2, str(a.resolve()))
    assert rows[1]["error"]["type"] == "RecordError"
    assert [row["text"] for row in rows if row["id"]] == ["red", "blue", "green"]

    # One id in two files: refused before any work, naming both places.
    _write(more / "c.jsonl", [{"id": "x", "messages": []}, {"id": "a1", "messages": []}])
    fresh = tmp_path / "fresh.jsonl"
    assert _batch(str(a), str(more), "-o", str(fresh)) == 1
    assert capsys.readouterr().err == (
        f"idefics-kit: error: duplicate id 'a1' on line 1 of {a} and line 2 of "
        f"{more / 'c.jsonl'}; every id must be unique\n"
    )
    assert not fresh.exists()


def test_parquet_inputs_locally_with_images_in_a_binary_column(
    tmp_path: Path, shapes: list[Path]
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    text = {"type": "text", "text": "What color is the shape?"}
    question = [{"role": "user", "content": [{"type": "image"}, text]}]
    table = pa.Table.from_pylist(
        [
            {"id": "p1", "messages": json.dumps(question), "images": [shapes[0].read_bytes()]},
            {"id": "p2", "messages": json.dumps(question), "images": [shapes[1].read_bytes()]},
            {"id": "p3", "messages": json.dumps(question), "images": []},  # one image short
        ]
    )
    pq.write_table(table, tmp_path / "in.parquet")
    jsonl = _write(tmp_path / "same.jsonl", [{"id": "j1", "messages": _ask(shapes[0])}])
    out = tmp_path / "out.jsonl"
    assert _batch(str(tmp_path / "in.parquet"), str(jsonl), "-o", str(out)) == 0
    rows = {row["id"]: row for row in _rows(out)}
    assert list(rows) == ["p1", "p2", "p3", "j1"]
    assert rows["p1"]["text"] == rows["j1"]["text"] == "red"
    assert rows["p1"]["usage"] == rows["j1"]["usage"]
    assert rows["p2"]["text"] == "blue"
    assert rows["p3"]["error"]["type"] == "ConversationError"
    assert "more image blocks without a source" in rows["p3"]["error"]["message"]


# -- the manifest --------------------------------------------------------------------------


def test_a_rerun_with_other_settings_is_refused_and_overwrite_starts_over(
    tmp_path: Path, shapes: list[Path], checkpoints: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    source = _write(tmp_path / "in.jsonl", [{"id": "q1", "messages": _ask(shapes[0])}])
    other = _write(tmp_path / "other.jsonl", [{"id": "q2", "messages": _ask(shapes[1])}])
    out = tmp_path / "out.jsonl"
    assert _batch(str(source), "-o", str(out)) == 0
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["format"] == "idefics-kit-batch/1"
    assert (manifest["model"], manifest["revision"]) == ("toy", None)
    assert manifest["options"]["max_new_tokens"] == 8
    assert manifest["inputs"] == [str(source.resolve())]
    assert manifest["sdk_version"] == jobs._sdk_version()
    before = {path.name: path.read_bytes() for path in tmp_path.glob("out.jsonl*")}
    capsys.readouterr()

    refused = [
        (["--max-new-tokens", "9"], "option max_new_tokens 8 then, 9 now"),
        (["--stop", "x"], 'option stop [] then, ["x"] now'),
        (
            ["--model", str(checkpoints["idefics2"])],
            f"model 'toy' then, '{checkpoints['idefics2']}",
        ),
    ]
    for flags, difference in refused:
        argv = ["batch", *FLAGS, "--quiet", *flags, str(source), "-o", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"idefics-kit: error: {out} was written with other settings: ")
        assert difference in err, err
        assert err.endswith(
            "Rerun with the same settings to resume, write to another output, or start over "
            "with --overwrite\n"
        )
    assert _batch(str(source), str(other), "-o", str(out)) == 2
    assert f'inputs ["{source.resolve()}"] then, ["{source.resolve()}", ' in (
        capsys.readouterr().err
    )
    assert {path.name: path.read_bytes() for path in tmp_path.glob("out.jsonl*")} == before

    # The same settings resume (nothing to do); --overwrite starts over with the new ones.
    assert _batch(str(source), "-o", str(out)) == 0
    assert _batch("--max-new-tokens", "1", "--overwrite", str(other), "-o", str(out)) == 0
    assert _ids(out) == ["q2"]
    assert _rows(out)[0]["usage"]["completion_tokens"] == 1
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert (manifest["options"]["max_new_tokens"], manifest["inputs"]) == (
        1, [str(other.resolve())]
    )  # fmt: skip


def test_a_folder_model_is_fingerprinted(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    options = GenerationOptions()
    first = jobs.Manifest.create(model=folder, options=options, inputs=[])
    assert first.model == str(folder.resolve())
    assert str(first.revision).startswith("sha256:")
    assert jobs.Manifest.create(model=folder, options=options, inputs=[]) == first
    (folder / "config.json").write_text('{"a": 2}')
    second = jobs.Manifest.create(model=folder, options=options, inputs=[])
    assert first.differences(second) == [
        f"model revision {first.revision!r} then, {second.revision!r} now"
    ]


# -- retrying error rows ------------------------------------------------------------------


def _error_job(tmp_path: Path, shapes: list[Path], count: int) -> tuple[Path, Path, list[Path]]:
    """``count`` questions; every other one about a picture that does not exist yet."""
    later = [tmp_path / f"later{number}.png" for number in range(count)]
    rows = [
        {"id": f"q{number:02d}", "messages": _ask(later[number] if number % 2 else shapes[0])}
        for number in range(count)
    ]
    return _write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl", later


def _make_pictures(later: list[Path], shapes: list[Path]) -> None:
    for number, path in enumerate(later):
        shutil.copy(shapes[number % 3], path)


def test_retry_errors_replaces_each_error_row_in_place(
    tmp_path: Path, shapes: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, out, later = _error_job(tmp_path, shapes, 6)
    argv = ["batch", *FLAGS, str(source), "-o", str(out)]
    assert main(argv) == 0
    assert [row["error"] is not None for row in _rows(out)] == [False, True] * 3
    capsys.readouterr()

    # A plain rerun leaves error rows alone, and says how to retry them.
    assert main(argv) == 0
    assert capsys.readouterr().err == (
        f"idefics-kit: nothing to do: all 6 inputs already have a row in {out} "
        "(3 with an error; --retry-errors runs them again)\n"
    )
    _make_pictures(later, shapes)
    reference = tmp_path / "reference.jsonl"
    assert _batch(str(source), "-o", str(reference)) == 0

    assert main([*argv, "--retry-errors"]) == 0
    err = capsys.readouterr().err
    assert "idefics-kit: retrying 3 error rows\n" in err
    assert re.search(
        rf"wrote 3 rows to {re.escape(str(out))} in [\d.]+ s: 3 done, 0 with an error, "
        r"3 skipped \(already there\), 3 retried\n",
        err,
    ), err
    assert _rows(out) == _rows(reference)  # every id once, in input order
    assert not (tmp_path / "out.jsonl.retry").exists()
    assert main([*argv, "--retry-errors"]) == 0  # nothing left to retry
    assert "nothing to do: all 6 inputs already have a row" in capsys.readouterr().err


def test_a_retry_killed_mid_way_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, shapes: list[Path]
) -> None:
    source, out, later = _error_job(tmp_path, shapes, 16)
    argv = ["batch", *FLAGS, "--quiet", str(source), "-o", str(out)]
    assert main(argv) == 0
    first = out.read_bytes()
    _make_pictures(later, shapes)
    reference = tmp_path / "reference.jsonl"
    assert _batch(str(source), "-o", str(reference)) == 0
    journal = tmp_path / "out.jsonl.retry"

    process = subprocess.Popen(
        [*SLOW_CLI, *argv, "--retry-errors"], env=ENV, stderr=subprocess.PIPE, cwd=ROOT
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1]
        process.kill()  # SIGKILL: no cleanup of any kind
    finally:
        process.kill()
        process.communicate(timeout=TIMEOUT_S)
    retried = journal.read_bytes().count(b"\n")
    assert 2 <= retried < 8
    # The output itself is untouched: each id once, its error rows still there.
    assert out.read_bytes() == first
    state = jobs.status(out)
    assert (state.retry_pending, state.running, state.remaining) == (retried, None, 0)
    assert (state.done, state.errors) == (16 - 8 + retried, 8 - retried)

    # Any next run merges the journal (atomically) before anything else.
    notes: list[str] = []
    with jobs.JsonlOutput.open(out, None, note=notes.append) as output:
        assert output.ledger.errors == 8 - retried
    assert f"merged {retried} rows of an interrupted retry into {out}" in notes
    assert any(note.startswith(f"took over the lock of {out} from process") for note in notes)
    assert not journal.exists()
    merged = _rows(out)
    assert [row["id"] for row in merged] == [f"q{number:02d}" for number in range(16)]
    assert sum(row["error"] is None for row in merged) == 8 + retried

    assert main([*argv, "--retry-errors"]) == 0
    assert _rows(out) == _rows(reference)


@pytest.mark.parametrize("layout", ["file", "jsonl parts", "parquet parts"])
def test_a_crash_while_merging_a_retry_loses_nothing(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge rewrites into a temporary file and renames it over the output: a crash
    before the rename leaves the old output and the journal; the next open merges."""
    if layout == "parquet parts":
        pytest.importorskip("pyarrow")

    def open_output() -> jobs.JobOutput:
        if layout == "file":
            return jobs.JsonlOutput.open(tmp_path / "out.jsonl", None)
        kind = "parquet" if layout == "parquet parts" else "jsonl"
        return jobs.PartsOutput.open(tmp_path / "out", None, output_format=kind, flush_rows=2)

    def row(key: str, error: bool) -> Row:
        if error:
            return {"id": key, "text": None, "finish_reason": None, "usage": None,
                    "error": {"type": "ImageLoadError", "message": "gone"}}  # fmt: skip
        usage = {"prompt_tokens": 3, "completion_tokens": 1}
        return {"id": key, "text": key, "finish_reason": "stop", "usage": usage, "error": None}

    with open_output() as output:
        for number in range(5):
            output.write(row(f"k{number}", error=number in (1, 3)))
    crashed = open_output()
    crashed.write(row("k1", error=False))
    crashed.write(row("k3", error=False))
    assert crashed.retried == 2

    def crash(*args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        crashed.close()
    monkeypatch.undo()
    assert crashed.journal_path.exists()
    assert not list(tmp_path.rglob(".*.tmp"))  # the half-written rewrite is gone
    state = jobs.status(crashed.path)
    assert (state.done, state.errors, state.retry_pending) == (5, 0, 2)

    with open_output() as output:  # merges the journal first
        assert output.ledger.rows == {f"k{number}": False for number in range(5)}
    assert not crashed.journal_path.exists()
    with open_output() as output:
        assert (output.ledger.done, output.ledger.errors) == (5, 0)
    if layout == "file":
        assert [r["id"] for r in _rows(tmp_path / "out.jsonl")] == [f"k{n}" for n in range(5)]


# -- one writer ------------------------------------------------------------------------------


_HOLD_LOCK = (
    "import sys, time\n"
    "from idefics_kit import jobs\n"
    "output = jobs.JsonlOutput.open(sys.argv[1], None)\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process that holds the lock of tmp_path/out.jsonl until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "out.jsonl")],
        env={**ENV, "PYTHONPATH": os.pathsep.join(sys.path)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "locked\n"
        yield process
    finally:
        process.kill()
        process.communicate(timeout=TIMEOUT_S)


def test_a_second_writer_is_refused_at_once_and_a_dead_owners_lock_is_taken_over(
    tmp_path: Path, shapes: list[Path], holder: subprocess.Popen[str],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    source = _write(tmp_path / "in.jsonl", [{"id": "q1", "messages": _ask(shapes[0])}])
    out = tmp_path / "out.jsonl"
    started = time.monotonic()
    assert _batch(str(source), "-o", str(out)) == 1
    assert time.monotonic() - started < 5  # refused at once, not after loading a model
    err = capsys.readouterr().err
    assert err.startswith(
        f"idefics-kit: error: {out} is being written by another job (process {holder.pid} on "
    )
    assert err.endswith("); wait for it to end, or stop it first\n")
    with pytest.raises(jobs.OutputBusyError, match=f"process {holder.pid} "):
        jobs.JsonlOutput.open(out, None)
    state = jobs.status(out)
    assert state.running == holder.pid
    main(["batch-status", str(out)])
    assert f"running:   yes, process {holder.pid}\n" in capsys.readouterr().out

    holder.kill()  # gone without releasing anything: its lock file stays behind
    holder.communicate(timeout=TIMEOUT_S)
    assert (tmp_path / "out.jsonl.lock").exists()
    assert jobs.status(out).running is None
    assert main(["batch", *FLAGS, str(source), "-o", str(out)]) == 0
    assert (
        f"idefics-kit: took over the lock of {out} from process {holder.pid}, which is gone\n"
        in capsys.readouterr().err
    )
    assert _ids(out) == ["q1"]
    assert not (tmp_path / "out.jsonl.lock").exists()  # released at the end


def test_two_outputs_in_one_process_each_take_their_lock(tmp_path: Path) -> None:
    with jobs.JsonlOutput.open(tmp_path / "a.jsonl", None):
        with pytest.raises(jobs.OutputBusyError):
            jobs.JsonlOutput.open(tmp_path / "a.jsonl", None)
        with jobs.JsonlOutput.open(tmp_path / "b.jsonl", None):
            pass
    with jobs.JsonlOutput.open(tmp_path / "a.jsonl", None):  # released
        pass


# -- status ------------------------------------------------------------------------------------


def test_batch_status_counts_done_errors_and_remaining(
    tmp_path: Path, shapes: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source, out, _ = _error_job(tmp_path, shapes, 6)
    assert _batch(str(source), "-o", str(out)) == 0
    # Three more inputs since: they remain.
    more = [{"id": f"r{n}", "messages": _ask(shapes[0])} for n in range(3)]
    _write(source, [*[json.loads(line) for line in source.read_text().splitlines()], *more])
    capsys.readouterr()
    assert main(["batch-status", str(out)]) == 0
    assert capsys.readouterr().out == (
        f"output:    {out}\n"
        "model:     toy\n"
        f"inputs:    {source.resolve()}\n"
        "done:      3\n"
        "errors:    3 (--retry-errors runs them again)\n"
        "remaining: 3 of 9 inputs\n"
        "running:   no\n"
    )
    assert main(["batch-status", "--json", str(out)]) == 0
    state = json.loads(capsys.readouterr().out)
    assert {key: state[key] for key in ("inputs", "done", "errors", "remaining", "running")} == {
        "inputs": 9, "done": 3, "errors": 3, "remaining": 3, "running": None
    }  # fmt: skip
    assert main(["batch-status", str(tmp_path / "nothing.jsonl")]) == 1
    assert "no batch output at" in capsys.readouterr().err


# -- the library never imports the command line ------------------------------------------------


def test_the_library_never_imports_the_command_line() -> None:
    package = ROOT / "idefics_kit"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name in ("cli.py", "__main__.py") or path.name.startswith("_cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            if any(re.fullmatch(r"idefics_kit\.(cli|_cli\w*)(\..*)?", name) for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
    code = (
        "import sys, idefics_kit.jobs\n"
        "assert not [m for m in sys.modules if m.startswith(('idefics_kit.cli', 'idefics_kit._cli'))]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=ENV)


def test_ctrl_c_during_a_write_takes_effect_once_the_row_is_written_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    # A shell without job control starts background jobs with SIGINT ignored;
    # this test needs Python's usual handler whatever started pytest.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    def fsync_hit_by_ctrl_c(fd: int) -> None:
        signal.raise_signal(signal.SIGINT)  # arrives mid-write
        real_fsync(fd)

    try:
        with jobs.JsonlOutput.open(tmp_path / "out.jsonl", None) as output:
            monkeypatch.setattr(os, "fsync", fsync_hit_by_ctrl_c)
            with pytest.raises(KeyboardInterrupt):
                output.write({"id": "a", "text": "x", "error": None})
            monkeypatch.undo()
            assert (output.written, output.ledger.rows) == (1, {"a": False})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert _ids(tmp_path / "out.jsonl") == ["a"]
