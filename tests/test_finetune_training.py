"""finetune(): training lowers eval loss on every family; outputs reload exactly; resume; bad rows.

Every run here is a few optimizer steps on a tiny random checkpoint (seconds);
the toy model's before/after accuracy is in tests/test_finetune_toy.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from idefics_kit import Conversation, Generator, ImagePart
from idefics_kit.errors import InvalidParameterError, TrainingDataError, TrainingError
from idefics_kit.finetune import TrainingCollator, encode_for_training, finetune
from idefics_kit.finetune import trainer as trainer_module
from tests.conftest import picture

ANSWERS = ("red", "green", "blue", "yellow")


def rows(count: int, seed: int) -> list[Conversation]:
    """Conversations whose answer is a fixed function of the question: learnable in a few steps."""
    conversations = []
    for index in range(count):
        answer = ANSWERS[index % len(ANSWERS)]
        image = picture(24 + index % 3 * 8, 24, seed=seed + index)
        conversations.append(
            Conversation().user(image, f"colour number {index % len(ANSWERS)}?").assistant(answer)
        )
    return conversations


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    )
    return path


def quiet(**kwargs: Any) -> dict[str, Any]:
    return {"progress": False, "log": lambda _message: None, **kwargs}


def test_training_lowers_eval_loss_and_the_adapter_reloads_exactly(
    family: str,
    checkpoints: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = rows(1, seed=99)[0]
    captured: dict[str, torch.Tensor] = {}
    real_save = trainer_module._save

    def save_and_capture(model: Any, processor: Any, out: Path, **kwargs: Any) -> None:
        # The trained (unmerged) model's logits, just before it is written.
        gen = Generator.from_model(model, processor)
        example = TrainingCollator(pad_token_id=0)([encode_for_training(gen, probe)])
        gen.close()
        with torch.inference_mode():
            captured["logits"] = model(**{k: v for k, v in example.items() if k != "labels"}).logits
        real_save(model, processor, out, **kwargs)

    monkeypatch.setattr(trainer_module, "_save", save_and_capture)
    out = tmp_path / "out"
    result = finetune(
        checkpoints[family],
        rows(8, seed=1),
        out,
        eval=rows(4, seed=50),
        batch_size=2,
        epochs=3,
        learning_rate=1e-2,
        **quiet(),
    )
    losses = [e["eval_loss"] for e in result.evaluations]
    assert [e["epoch"] for e in result.evaluations] == [0.0, 1.0, 2.0, 3.0]
    # Random tiny models with a frozen output layer learn slowly under LoRA
    # (tests/test_finetune_toy.py measures real learning); still, clearly.
    assert losses[-1] < losses[0] - 0.1, losses
    assert result.kind == "adapter"
    assert result.steps == 12
    assert (out / "adapter_model.safetensors").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in out.iterdir())
    assert not (out / "checkpoints").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(checkpoints[family])

    # The adapter folder loads on its own and as adapter=: the trained model's logits.
    example = None
    for loaded in (
        Generator.from_pretrained(out),
        Generator.from_pretrained(checkpoints[family], adapter=out),
    ):
        example = TrainingCollator(pad_token_id=0)([encode_for_training(loaded, probe)])
        with torch.inference_mode():
            logits = loaded.model(**{k: v for k, v in example.items() if k != "labels"}).logits
        torch.testing.assert_close(logits, captured["logits"], rtol=1e-5, atol=1e-5)
        assert loaded.generate(Conversation().user("hi")).finish_reason in ("stop", "length")
        loaded.close()


def test_merge_writes_a_checkpoint_equal_to_the_adapter(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    settings = quiet(batch_size=4, max_steps=3, seed=3)
    adapter = finetune(checkpoints["idefics3"], rows(8, seed=1), tmp_path / "a", **settings)
    merged = finetune(
        checkpoints["idefics3"], rows(8, seed=1), tmp_path / "m", merge=True, **settings
    )
    assert (adapter.kind, merged.kind) == ("adapter", "merged")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "config.json").is_file()
    from_adapter = Generator.from_pretrained(tmp_path / "a")
    from_merged = Generator.from_pretrained(tmp_path / "m")
    for name, tensor in from_adapter.model.state_dict().items():
        assert torch.equal(tensor, from_merged.model.state_dict()[name]), name
    from_adapter.close()
    from_merged.close()


class _Kill(TrainerCallback):  # type: ignore[misc]
    """Stop the run abruptly at a step, as a kill would (no final save)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_rerun_after_a_kill_continues_from_the_last_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    settings = quiet(batch_size=2, max_steps=8, save_steps=3, seed=5, full=True, eval=rows(2, 50))
    data = rows(8, seed=1)
    with pytest.raises(KeyboardInterrupt):
        finetune(checkpoints["smolvlm"], data, tmp_path / "k", callbacks=[_Kill(5)], **settings)
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").iterdir()) == ["checkpoint-3"]
    # A checkpoint the kill interrupted while it was being written (no trainer_state.json).
    partial = tmp_path / "k" / "checkpoints" / "checkpoint-6"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    lines: list[str] = []
    resumed = finetune(
        checkpoints["smolvlm"], data, tmp_path / "k", **{**settings, "log": lines.append}
    )
    assert resumed.resumed_from_step == 3
    assert "removing the incomplete checkpoint checkpoint-6" in " ".join(lines)
    assert resumed.steps == 8
    # Epoch 0's evaluation came from the first run; epoch 1's (step 4, after the step-3
    # checkpoint) was redone.
    assert [e["epoch"] for e in resumed.evaluations] == [0.0, 1.0, 2.0]
    log = [json.loads(line) for line in (tmp_path / "k" / "log.jsonl").read_text().splitlines()]
    steps = [entry["step"] for entry in log if "loss" in entry]
    # The first run logged steps 1-4 (killed in step 5); the second redid 4 and 5, not 1-3.
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    # Same weights as a run that was never interrupted.
    straight = finetune(checkpoints["smolvlm"], data, tmp_path / "s", **settings)
    assert straight.resumed_from_step is None
    a = Generator.from_pretrained(tmp_path / "k")
    b = Generator.from_pretrained(tmp_path / "s")
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(tensor, b.model.state_dict()[name], rtol=1e-5, atol=1e-6)
    a.close()
    b.close()
    # Rerunning a finished run trains nothing; other settings are refused.
    again = finetune(checkpoints["smolvlm"], data, tmp_path / "k", **settings)
    assert again.already_complete
    assert again.steps == 8
    with pytest.raises(TrainingDataError, match=r"other settings or data \(different: seed\)"):
        finetune(checkpoints["smolvlm"], data, tmp_path / "k", **{**settings, "seed": 6})


def test_bad_rows_are_reported_and_left_out(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "ok.png"
    picture(20, 20, seed=1).save(image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")

    def row(row_id: str, answer: object, image_path: Path = image) -> dict[str, object]:
        messages: list[dict[str, object]] = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": str(image_path)},
                    {"type": "text", "text": "q"},
                ],
            }
        ]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return {"id": row_id, "messages": messages}

    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            row("good1", "red"),
            "{not json",
            row("no-answer", None),
            row("blank", "   "),
            row("bad-image", "red", broken),
            row("long", "red " * 400),
            row("good2", "blue"),
        ],
    )
    lines: list[str] = []
    result = finetune(
        checkpoints["idefics2"],
        train,
        tmp_path / "out",
        max_steps=1,
        max_length=200,
        progress=False,
        log=lines.append,
    )
    bad = [line for line in lines if line.startswith("bad row: ")]
    assert [line.split(":")[1].strip() for line in bad] == [
        "train.jsonl line 2",
        "train.jsonl line 3 (id 'no-answer')",
        "train.jsonl line 4 (id 'blank')",
        "train.jsonl line 5 (id 'bad-image')",
        "train.jsonl line 6 (id 'long')",
    ]
    assert "invalid JSON" in bad[0]
    assert "no assistant turn" in bad[1]
    assert "empty answer" in bad[2]
    assert "broken.png" in bad[3]
    assert "at most 200 fit" in bad[4]
    assert "left out 5 of 7 training row(s)" in lines
    assert result.train_rows == 2
    assert len(result.left_out) == 5

    with pytest.raises(TrainingDataError, match=r"5 bad row\(s\) .* first: train.jsonl line 2"):
        finetune(
            checkpoints["idefics2"],
            train,
            tmp_path / "strict",
            strict=True,
            max_length=200,
            **quiet(),
        )
    assert not (tmp_path / "strict").exists()


def test_wrong_settings_are_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="batch_size must be an integer >= 1, got 0"):
        finetune("toy", rows(2, 1), tmp_path / "x", batch_size=0)
    with pytest.raises(InvalidParameterError, match="merge applies to LoRA adapters"):
        finetune("toy", rows(2, 1), tmp_path / "x", full=True, merge=True)
    with pytest.raises(TrainingError, match=r"QLoRA .* needs a CUDA GPU"):
        finetune("toy", rows(2, 1), tmp_path / "x", quantize="4bit", device="cpu")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(TrainingDataError, match="exists and is not a finetune output folder"):
        finetune("toy", [Conversation().user("q").assistant("red")], folder, **quiet())
    assert (folder / "notes.txt").read_text() == "keep me"


def test_image_part_rows_from_files_train(tmp_path: Path) -> None:
    """A JSONL file of the batch format trains (the CLI's path), rows reference image files."""
    image = tmp_path / "a.png"
    picture(30, 30, seed=4).save(image)
    conv = (
        Conversation().user(ImagePart.from_path(image), "what color is the shape?").assistant("red")
    )
    train = write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "messages": conv.to_messages()}])
    result = finetune("toy", train, tmp_path / "o", max_steps=2, **quiet())
    assert result.train_rows == 1
    assert result.steps == 2


def test_adapter_folders_that_cannot_load_say_why(tmp_path: Path) -> None:
    from idefics_kit import ModelLoadError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"no LoRA adapter at .*adapter_config.json"):
        Generator.from_pretrained("toy", adapter=empty)
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    (nameless / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ModelLoadError, match="does not record its base model"):
        Generator.from_pretrained(nameless)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "toy"})
    )
    (pickled / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(ModelLoadError, match=r"has no adapter_model.safetensors; pickled"):
        Generator.from_pretrained(pickled)


def test_train_vision_adds_the_vision_encoder(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    from safetensors import safe_open

    def adapted(out: Path) -> set[str]:
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as file:
            return {key.split(".")[3] for key in file.keys()}  # base_model.model.model.<part>  # noqa: SIM118 - safe_open is not iterable

    settings = quiet(batch_size=2, max_steps=1)
    finetune(checkpoints["idefics2"], rows(2, 1), tmp_path / "text", **settings)
    finetune(checkpoints["idefics2"], rows(2, 1), tmp_path / "both", train_vision=True, **settings)
    assert adapted(tmp_path / "text") == {"text_model"}
    assert adapted(tmp_path / "both") == {"text_model", "vision_model", "connector"}

    base = Generator.from_pretrained(checkpoints["idefics3"])
    finetune(checkpoints["idefics3"], rows(2, 1), tmp_path / "full", full=True, **settings)
    tuned = Generator.from_pretrained(tmp_path / "full")
    changed = {
        name.split(".")[1]
        for name, tensor in tuned.model.state_dict().items()
        if not torch.equal(tensor, base.model.state_dict()[name])
    }
    assert "text_model" in changed
    assert "vision_model" not in changed
    base.close()
    tuned.close()


def test_cli_finetune_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from idefics_kit.cli import main

    assert main(["finetune", "rows.jsonl"]) == 2
    assert "the following arguments are required: -o/--output" in capsys.readouterr().err
    assert main(["finetune", "rows.jsonl", "-o", str(tmp_path / "o"), "--lora-rank", "0"]) == 2
    assert "argument --lora-rank: must be an integer >= 1, got '0'" in capsys.readouterr().err
    rows_file = write_jsonl(tmp_path / "rows.jsonl", [])
    code = main(
        ["finetune", "--qlora", "--device", "cpu", str(rows_file), "-o", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("idefics-kit: error: QLoRA (quantize='4bit') needs a CUDA GPU")
    assert err.count("\n") == 1
    code = main(["finetune", "--quiet", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")])
    assert code == 1
    assert "cannot read the rows file" in capsys.readouterr().err
    assert main(["finetune", "--quiet", str(rows_file), "-o", str(tmp_path / "o")]) == 1
    assert "no usable training row (of 0 read)" in capsys.readouterr().err
