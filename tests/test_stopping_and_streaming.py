"""Stop tokens, stop strings, banned tokens and streaming, on every family."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from idefics_kit import Conversation, Generator
from tests.conftest import picture

CONV = Conversation().user("What is in this image?", picture(40, 30, seed=7))
TEXT_CONV = Conversation().user("Tell me a story about a dog and a cat.")


@contextlib.contextmanager
def boosted(gen: Generator, *tokens: str, amount: float = 1e4) -> Iterator[list[int]]:
    """Make the model strongly prefer ``tokens`` (a forward hook on its output head)."""
    ids = [gen.processor.tokenizer.convert_tokens_to_ids(t) for t in tokens]
    head = gen.model.get_output_embeddings()

    def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., ids] += amount
        return output

    handle = head.register_forward_hook(hook)
    try:
        yield ids
    finally:
        handle.remove()


def stop_string_from(text: str) -> str:
    """A two-character piece of ``text``, past its start, whose first occurrence is there."""
    for start in range(2, len(text) - 2):
        piece = text[start : start + 2]
        if "\ufffd" not in piece and piece.strip() and text.find(piece) == start:
            return piece
    pytest.fail(f"no usable stop string in {text!r}")


def test_end_of_utterance_always_stops(gen: Generator) -> None:
    # Idefics3's generation config does not list <end_of_utterance>: the SDK must.
    with boosted(gen, "<end_of_utterance>"):
        result = gen.generate(CONV, max_new_tokens=8)
    assert result.token_ids == ()
    assert result.text == ""
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens == 0


def test_checkpoint_eos_stops(gen: Generator) -> None:
    eos = gen.model.generation_config.eos_token_id
    first = eos if isinstance(eos, int) else eos[0]
    token = gen.processor.tokenizer.convert_ids_to_tokens(first)
    plain = gen.generate(CONV, max_new_tokens=3)
    with boosted(gen, token):
        result = gen.generate(CONV, max_new_tokens=8)
    assert (result.token_ids, result.finish_reason) == ((), "stop")
    assert plain.token_ids != ()


def test_stop_token_is_not_in_token_ids_and_later_tokens_dropped(gen: Generator) -> None:
    free = gen.generate(CONV, max_new_tokens=12)
    eou = gen.processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    # After 3 free tokens, force <end_of_utterance> by boosting it from the 4th step.
    head = gen.model.get_output_embeddings()
    steps = {"n": 0}

    def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        steps["n"] += 1
        if steps["n"] <= 3:
            return output
        output = output.clone()
        output[..., eou] += 1e4
        return output

    handle = head.register_forward_hook(hook)
    try:
        result = gen.generate(CONV, max_new_tokens=12)
    finally:
        handle.remove()
    assert result.token_ids == free.token_ids[:3]
    assert result.finish_reason == "stop"
    assert result.text == gen.processor.tokenizer.decode(
        list(free.token_ids[:3]), skip_special_tokens=True
    )


def test_banned_tokens_are_never_generated(gen: Generator, family: str) -> None:
    banned = ["<image>", "<fake_token_around_image>"]
    if family in ("idefics3", "smolvlm"):
        banned += ["<global-img>", "<row_1_col_1>", "<row_6_col_6>"]
    with boosted(gen, *banned) as ids:
        # Without bad_words_ids the boosted model emits them: the hook works.
        raw = gen.model.generate(
            **_reference_inputs(gen, family), do_sample=False, max_new_tokens=4, eos_token_id=None
        )
        assert set(raw[0, -4:].tolist()) <= set(ids)
        result = gen.generate(CONV, max_new_tokens=6)
    assert not set(result.token_ids) & set(ids)
    assert set(ids) <= set(gen.banned_token_ids)


def _reference_inputs(gen: Generator, family: str) -> object:
    if family == "idefics":
        return gen.processor(
            text=["User: hi", "<end_of_utterance>", "\nAssistant:"],
            add_end_of_utterance_token=False,
            return_tensors="pt",
        )
    return gen.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


def test_stop_string_cuts_text_and_keeps_completing_token(gen: Generator) -> None:
    free = gen.generate(TEXT_CONV, max_new_tokens=32)
    stop = stop_string_from(free.text)
    result = gen.generate(TEXT_CONV, max_new_tokens=32, stop=(stop,))
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.find(stop)]
    assert free.token_ids[: len(result.token_ids)] == result.token_ids
    tokenizer = gen.processor.tokenizer

    def decode(ids: tuple[int, ...]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))

    assert stop in decode(result.token_ids)
    assert stop not in decode(result.token_ids[:-1])
    assert result.usage.completion_tokens == len(result.token_ids)


def test_stop_string_on_the_last_allowed_token_is_a_stop(gen: Generator) -> None:
    free = gen.generate(TEXT_CONV, max_new_tokens=32)
    stop = stop_string_from(free.text)
    stopped = gen.generate(TEXT_CONV, max_new_tokens=32, stop=(stop,))
    exact = gen.generate(TEXT_CONV, max_new_tokens=len(stopped.token_ids), stop=(stop,))
    assert exact.finish_reason == "stop"
    assert exact.token_ids == stopped.token_ids
    assert exact.text == stopped.text


def test_length_finish(gen: Generator) -> None:
    result = gen.generate(TEXT_CONV, max_new_tokens=5, stop=("\x00never",))
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 5


def test_stop_strings_in_a_batch_cut_each_row(gen: Generator) -> None:
    convs = [TEXT_CONV, CONV, Conversation().user("Describe the page.")]
    free = gen.generate_batch(convs, max_new_tokens=24)
    stop = stop_string_from(free[0].text)
    singles = [gen.generate(c, max_new_tokens=24, stop=(stop,)) for c in convs]
    batched = gen.generate_batch(convs, max_new_tokens=24, stop=(stop,))
    assert [r.token_ids for r in batched] == [r.token_ids for r in singles]
    assert [r.text for r in batched] == [r.text for r in singles]
    assert batched[0].finish_reason == "stop"


@pytest.mark.parametrize("conversation", [CONV, TEXT_CONV], ids=["image", "text"])
def test_stream_joins_to_generate_text(gen: Generator, conversation: Conversation) -> None:
    free = gen.generate(conversation, max_new_tokens=24)
    assert "".join(gen.stream(conversation, max_new_tokens=24)) == free.text
    stop = stop_string_from(free.text)
    for stops in [(stop,), (stop[0] + "\x00",), (free.text[-1:] + "\x01", stop)]:
        expected = gen.generate(conversation, max_new_tokens=24, stop=stops).text
        assert "".join(gen.stream(conversation, max_new_tokens=24, stop=stops)) == expected


def test_stream_yields_per_token_without_waiting(generators: dict[str, Generator]) -> None:
    # The Metaspace families decode one clean piece per token.
    gen = generators["idefics2"]
    result = gen.generate(TEXT_CONV, max_new_tokens=12, stop=("\x00",))
    tokenizer = gen.processor.tokenizer
    prefixes = [
        tokenizer.decode(list(result.token_ids[:k]), skip_special_tokens=True)
        for k in range(len(result.token_ids) + 1)
    ]
    expected = [b[len(a) :] for a, b in itertools.pairwise(prefixes) if len(b) > len(a)]
    assert list(gen.stream(TEXT_CONV, max_new_tokens=12, stop=("\x00",))) == expected


def test_stream_holds_back_a_possible_stop_string_start(generators: dict[str, Generator]) -> None:
    gen = generators["idefics2"]
    text = gen.generate(TEXT_CONV, max_new_tokens=12).text
    pieces = list(gen.stream(TEXT_CONV, max_new_tokens=12, stop=(text[4] + "\x00",)))
    emitted = ""
    for piece in pieces[:-1]:
        emitted += piece
        assert not emitted.endswith(text[4]) or emitted == text
    assert "".join(pieces) == text


def test_stream_closed_early_stops_and_generator_stays_usable(gen: Generator) -> None:
    expected = gen.generate(CONV, max_new_tokens=16)
    pieces = gen.stream(CONV, max_new_tokens=200)
    first = next(iter(pieces))
    assert expected.text.startswith(first)
    pieces.close()
    assert gen.generate(CONV, max_new_tokens=16) == expected


def test_seeded_sampling_is_reproducible(gen: Generator) -> None:
    options = {"max_new_tokens": 12, "temperature": 1.5, "top_k": 50, "seed": 1234}
    first = gen.generate(TEXT_CONV, **options)
    assert gen.generate(TEXT_CONV, **options) == first
    others = {gen.generate(TEXT_CONV, **{**options, "seed": s}).token_ids for s in range(5)}
    assert len(others) > 1


def test_checkpoint_sampling_defaults_do_not_leak(gen: Generator) -> None:
    greedy = gen.generate(CONV, max_new_tokens=12)
    config = gen.model.generation_config
    saved = (config.do_sample, config.temperature, config.top_k)
    config.do_sample, config.temperature, config.top_k = True, 1.7, 3
    try:
        assert gen.generate(CONV, max_new_tokens=12) == greedy
    finally:
        config.do_sample, config.temperature, config.top_k = saved


def test_a_call_during_an_open_stream_in_the_same_thread_works(gen: Generator) -> None:
    # Streams hold no lock across a yield: the same thread may call again.
    expected = gen.generate(CONV, max_new_tokens=8)
    pieces = gen.stream(CONV, max_new_tokens=8)
    first = next(pieces)
    assert gen.generate(CONV, max_new_tokens=8) == expected
    assert first + "".join(pieces) == expected.text
    assert pieces.result == expected


def test_streams_hold_back_runs_of_byte_fallback_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Llama 2's tokenizer (idefics-9b, idefics2-8b) spells rare characters as
    # <0xXX> byte pieces; a run of them decodes as a whole and can turn into
    # other text (or U+FFFD) when the next byte arrives.
    from idefics_kit import testing

    spec = dataclasses.replace(testing._TOKENIZER_SPECS["idefics2"], byte_fallback=True)
    monkeypatch.setitem(testing._TOKENIZER_SPECS, "idefics2", spec)
    gen = Generator.from_pretrained(testing.build_tiny_checkpoint("idefics2", tmp_path / "bf"))
    assert gen._adapter.byte_token_ids, "the tokenizer has byte pieces"
    convs = [Conversation().user(f"Question number {n}: what now?") for n in range(12)]
    results = [gen.generate(conv, max_new_tokens=24) for conv in convs]
    used = sum(any(t in gen._adapter.byte_token_ids for t in r.token_ids) for r in results)
    assert used >= 3, "the answers must contain byte pieces for this test to mean anything"
    for conv, result in zip(convs, results, strict=True):
        stream = gen.stream(conv, max_new_tokens=24)
        assert "".join(stream) == result.text
        assert stream.result == result
    gen.close()
