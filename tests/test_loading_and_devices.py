"""Loading checkpoints, devices and dtypes, and input checks before model work."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from idefics_kit import (
    Conversation,
    ConversationError,
    DeviceError,
    Generator,
    ImageLoadError,
    ImagePart,
    InvalidParameterError,
    ModelLoadError,
    engine,
)
from idefics_kit.devices import resolve_device, resolve_dtype
from idefics_kit.testing import build_tiny_checkpoint
from tests.conftest import picture

CONV = Conversation().user("What is in this image?", picture(32, 32, seed=3))


def test_family_device_and_dtype(gen: Generator, family: str) -> None:
    assert gen.family == family
    assert gen.device == torch.device("cpu")
    assert gen.dtype == torch.float32
    assert repr(gen) == f"Generator(family={family!r}, device='cpu', dtype=torch.float32)"


def test_stop_ids_include_end_of_utterance(gen: Generator) -> None:
    tokenizer = gen.processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<end_of_utterance>") in gen.stop_token_ids
    eos = gen.model.generation_config.eos_token_id
    assert set([eos] if isinstance(eos, int) else eos) <= set(gen.stop_token_ids)


def test_auto_device_is_cpu_here_and_cuda_is_refused() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"device 'cuda' was requested but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match=r"device 'cuda:1' was requested but CUDA"):
        resolve_device(torch.device("cuda", 1))
    with pytest.raises(DeviceError, match="device 'mps' was requested but MPS is not available"):
        resolve_device("mps")
    with pytest.raises(
        InvalidParameterError, match=r"device must be 'auto', 'cpu', 'cuda', .*got 'gpu0'"
    ):
        resolve_device("gpu0")


def test_dtypes() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype(torch.float16, cpu) is torch.float16
    with pytest.raises(
        InvalidParameterError,
        match=re.escape(
            "dtype must be 'auto', one of bfloat16, float16, float32 or a torch.dtype; got 'int8'"
        ),
    ):
        resolve_dtype("int8", cpu)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match=r"got torch\.float64"):
        resolve_dtype(torch.float64, cpu)


def test_unavailable_device_fails_before_loading(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(DeviceError):
        Generator.from_pretrained(checkpoints["idefics2"], device="cuda")


def test_explicit_dtype_loads_and_generates(checkpoints: dict[str, Path]) -> None:
    gen = Generator.from_pretrained(checkpoints["idefics3"], dtype="bfloat16", device="cpu")
    assert gen.dtype == torch.bfloat16
    result = gen.generate(CONV, max_new_tokens=4)
    assert result.usage.completion_tokens == len(result.token_ids) <= 4


def test_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(
        ModelLoadError, match=f"^no checkpoint folder at '{missing}': pass an existing folder"
    ):
        Generator.from_pretrained(missing)


def test_non_idefics_checkpoint_names_model_type(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        Generator.from_pretrained(tmp_path)
    assert str(info.value) == (
        f"{str(tmp_path)!r} is a 'llama' model, not an IDEFICS-family one; supported model types: "
        "idefics, idefics2, idefics3, smolvlm"
    )


def test_from_model_wraps_loaded_objects(gen: Generator) -> None:
    wrapped = Generator.from_model(gen.model, gen.processor)
    assert wrapped.family == gen.family
    assert wrapped.generate(CONV, max_new_tokens=6) == gen.generate(CONV, max_new_tokens=6)
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        Generator.from_model(gen.model, gen.processor.image_processor)


def test_left_padding_whatever_the_tokenizer_was_saved_with(family: str, tmp_path: Path) -> None:
    path = build_tiny_checkpoint(family, tmp_path / family)  # type: ignore[arg-type]
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["padding_side"] = "right"
    config_file.write_text(json.dumps(config))
    gen = Generator.from_pretrained(path)
    assert gen.processor.tokenizer.padding_side == "right"
    convs = [CONV, Conversation().user("Hi"), CONV.assistant("A cat.").user("Sure?")]
    singles = [gen.generate(c, max_new_tokens=8).token_ids for c in convs]
    assert [r.token_ids for r in gen.generate_batch(convs, max_new_tokens=8)] == singles


def test_build_tiny_checkpoint_is_deterministic_and_checked(tmp_path: Path) -> None:
    a = build_tiny_checkpoint("idefics2", tmp_path / "a", seed=1)
    b = build_tiny_checkpoint("idefics2", tmp_path / "b", seed=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    with pytest.raises(
        InvalidParameterError,
        match="family must be one of idefics, idefics2, idefics3, smolvlm; got 'llava'",
    ):
        build_tiny_checkpoint("llava", tmp_path / "c")  # type: ignore[arg-type]


def test_idefics3_checkpoint_mirrors_the_published_generation_config(
    checkpoints: dict[str, Path],
) -> None:
    config = json.loads((checkpoints["idefics3"] / "generation_config.json").read_text())
    tokenizer = json.loads((checkpoints["idefics3"] / "tokenizer.json").read_text())
    eou = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<end_of_utterance>")
    assert eou not in config["eos_token_id"]


class _Calls:
    def __init__(self) -> None:
        self.count = 0


@pytest.fixture
def model_calls(monkeypatch: pytest.MonkeyPatch) -> _Calls:
    calls = _Calls()
    real = engine.Engine.admit

    def counting(self: engine.Engine, items: Any, rows: Any) -> None:
        calls.count += 1
        real(self, items, rows)

    monkeypatch.setattr(engine.Engine, "admit", counting)
    return calls


def test_bad_input_fails_before_any_model_work(
    gen: Generator, model_calls: _Calls, tmp_path: Path
) -> None:
    good = [CONV, CONV]
    cases: list[tuple[list[object], type[Exception], str]] = [
        ([*good, Conversation()], ConversationError, "^conversation is empty"),
        (
            [*good, CONV.assistant("done")],
            ConversationError,
            "^conversation ends with an assistant turn",
        ),
        ([*good, "What?"], ConversationError, "^expected a Conversation, got str"),
        (
            [*good, Conversation().user(ImagePart.from_path(tmp_path / "missing.png"), "hi")],
            ImageLoadError,
            "missing.png",
        ),
    ]
    for batch, error, message in cases:
        with pytest.raises(error, match=message) as raised:
            gen.generate_batch(batch, max_new_tokens=2, batch_size=1)  # type: ignore[arg-type]
        assert raised.value.index == 2  # type: ignore[attr-defined]
    assert model_calls.count == 0
    with pytest.raises(
        InvalidParameterError, match="batch_size must be an int >= 1 or 'auto', got 0"
    ):
        gen.generate_batch(good, batch_size=0)
    with pytest.raises(InvalidParameterError, match="unknown generation option 'max_tokens'"):
        gen.generate(CONV, max_tokens=3)
    with pytest.raises(
        InvalidParameterError, match="options must be a GenerationOptions, got dict"
    ):
        gen.generate(CONV, {"max_new_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(ConversationError, match="conversation is empty"):
        gen.stream(Conversation())
    assert model_calls.count == 0


def test_idefics1_refuses_text_its_processor_would_fetch(generators: dict[str, Generator]) -> None:
    gen = generators["idefics"]
    image = picture(16, 16, seed=1)
    with pytest.raises(
        ConversationError, match=r"text part 'https://example.com/cat.png' would be fetched"
    ):
        gen.generate(Conversation().user(image, "https://example.com/cat.png"), max_new_tokens=2)
    # As a turn's first text part it is joined to "User:" and stays text.
    result = gen.generate(
        Conversation().user("https://example.com/cat.png", image), max_new_tokens=2
    )
    assert result.usage.prompt_tokens > 0


def test_empty_batch_returns_empty_list(gen: Generator) -> None:
    assert gen.generate_batch([]) == []


def test_device_map_and_attention_implementation_pass_through(
    checkpoints: dict[str, Path], generators: dict[str, Generator]
) -> None:
    gen = Generator.from_pretrained(
        checkpoints["idefics2"], device_map="cpu", attn_implementation="eager"
    )
    assert gen.device == torch.device("cpu")
    assert gen.model.config._attn_implementation == "eager"
    expected = generators["idefics2"].generate(CONV, max_new_tokens=6)
    assert gen.generate(CONV, max_new_tokens=6).token_ids == expected.token_ids
