"""Structured output: JSON Schema, regex and choice constraints, and log-probabilities.

Random-weight checkpoints make the hardest case: the model has no idea what
JSON is, so every character of a valid answer comes from the grammar. Answers
are checked with a strict JSON parser (raw control characters, NaN and
Infinity rejected; the text must also be valid UTF-8) and validated with
``jsonschema``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest
import torch
from transformers import BatchFeature

from idefics_kit import (
    Conversation,
    GenerationOptions,
    Generator,
    InvalidParameterError,
    Result,
    TokenLogprob,
)
from idefics_kit._vocab import logits_width, vocabulary
from idefics_kit.structured import RowConstraint, compile_constraint
from idefics_kit.testing import _LLAMA2_SPEC, _train_tokenizer
from tests.conftest import picture

pytest.importorskip("xgrammar")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b c", 'd"e']}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "string", "pattern": "^[0-9]{3}$"},
                "ok": {"type": "boolean"},
            },
            "required": ["zip", "ok"],
        },
    },
    "required": ["name", "age", "tags", "address"],
}
SCORE = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": -10, "maximum": 10},
        "label": {"enum": ["cat", "dog", "bird"]},
        "sure": {"type": "boolean"},
    },
    "required": ["score", "label", "sure"],
}
LIST = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 4}
NESTED = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["id"],
            },
        },
        "kind": {"type": "string", "enum": ["x", "y"]},
    },
    "required": ["items", "kind"],
}
SCHEMAS = [PERSON, SCORE, LIST, NESTED]


def strict_json(text: str) -> Any:
    """json.loads that rejects what strict parsers reject."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    text.encode("utf-8")  # lone surrogates cannot be encoded
    assert "\ufffd" not in text, "invalid UTF-8 in the answer"
    return json.loads(text, parse_constant=no_constant)


def valid(schema: dict[str, Any], result: Result) -> bool:
    try:
        jsonschema.validate(strict_json(result.text), schema)
    except (ValueError, jsonschema.ValidationError, AssertionError):
        return False
    return result.finish_reason == "stop"


def conversations(count: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    words = ["describe", "the", "picture", "as", "json", "what", "is", "here", "count", "them"]
    out = []
    for index in range(count):
        text = " ".join(rng.choices(words, k=rng.randint(2, 6)))
        if index % 3 == 0:
            out.append(Conversation().user(text))
        else:
            out.append(Conversation().user(picture(24 + index % 17, 20 + index % 13, index), text))
    return out


# -- token views ---------------------------------------------------------------


def byte_fallback_tokenizer() -> Any:
    return _train_tokenizer(dataclasses.replace(_LLAMA2_SPEC, byte_fallback=True), 0)


def test_token_bytes_join_to_the_decoded_answer(gen: Generator) -> None:
    tokenizers = {"model": gen.processor.tokenizer, "byte_fallback": byte_fallback_tokenizer()}
    for name, tokenizer in tokenizers.items():
        vocab = vocabulary(tokenizer)
        ordinary = [i for i, piece in enumerate(vocab.pieces) if piece is not None]
        rng = random.Random(0)
        for _ in range(300):
            ids = [rng.choice(ordinary) for _ in range(rng.randint(1, 8))]
            raw = (vocab.first_pieces[ids[0]] or b"") + b"".join(
                vocab.pieces[i] or b"" for i in ids[1:]
            )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue  # decoders differ on invalid UTF-8; answers never hold it
            assert text == tokenizer.decode(ids, skip_special_tokens=True), (name, ids)


def test_byte_pieces_are_bytes_not_their_spelling() -> None:
    tokenizer = byte_fallback_tokenizer()
    vocab = vocabulary(tokenizer)
    assert vocab.pieces[tokenizer.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert vocab.pieces[tokenizer.convert_tokens_to_ids("<0xE2>")] == b"\xe2"
    assert vocab.drops_first_space


def walk(tokenizer: Any, stop: tuple[int, ...], options: GenerationOptions, seed: int) -> str:
    """A constrained 'generation' with random scores instead of a model."""
    vocab = vocabulary(tokenizer)
    compiled = compile_constraint(vocab, stop, options)
    assert compiled is not None
    row = RowConstraint(compiled)
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(300):
        scores = torch.randn(vocab.size, generator=generator)
        scores[~row.allowed_mask()] = -float("inf")
        token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
        if token in stop:
            break
        row.advance(token)
        ids.append(token)
    assert row.is_complete
    text: str = tokenizer.decode(ids, skip_special_tokens=True)
    return text


def test_byte_fallback_vocabulary_never_puts_raw_control_bytes_in_json() -> None:
    tokenizer = byte_fallback_tokenizer()
    stop = (tokenizer.eos_token_id,)
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}}}
    options = GenerationOptions(json_schema=schema)
    for seed in range(60):
        jsonschema.validate(strict_json(walk(tokenizer, stop, options, seed)), schema)


def test_stop_tokens_end_the_grammar_and_control_tokens_never_appear(gen: Generator) -> None:
    adapter = gen._adapter
    vocab = vocabulary(adapter.tokenizer, logits_width(gen.model, adapter.tokenizer))
    compiled = compile_constraint(vocab, adapter.stop_token_ids, GenerationOptions(regex="ab?"))
    assert compiled is not None
    row = RowConstraint(compiled)
    control = set(adapter.tokenizer.all_special_ids) | set(adapter.banned_token_ids)
    allowed = set(row.allowed_mask().nonzero().flatten().tolist())
    assert not allowed & control
    assert not allowed & set(adapter.stop_token_ids)  # "" is not a match
    row.advance(adapter.tokenizer.encode("a", add_special_tokens=False)[-1])
    after = set(row.allowed_mask().nonzero().flatten().tolist())
    assert set(adapter.stop_token_ids) <= after  # complete: a stop token may end it
    row.advance(adapter.stop_token_ids[0])
    assert row.is_finished
    assert set(row.allowed_mask().nonzero().flatten().tolist()) == set(adapter.stop_token_ids)


def test_grammars_are_compiled_once_per_constraint(gen: Generator) -> None:
    adapter = gen._adapter
    vocab = vocabulary(adapter.tokenizer, logits_width(gen.model, adapter.tokenizer))
    first = compile_constraint(vocab, adapter.stop_token_ids, GenerationOptions(json_schema=SCORE))
    again = compile_constraint(
        vocab, adapter.stop_token_ids, GenerationOptions(json_schema=json.dumps(SCORE))
    )
    assert first is again


# -- options -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "parameter", "message"),
    [
        ({"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs=True, got 2"),
        (
            {"logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            "top_logprobs must be an int in [0, 20], got 21",
        ),
        ({"logprobs": 1}, "logprobs", "logprobs must be True or False, got 1"),
        ({"json_schema": "{"}, "json_schema", "json_schema must be a dict or JSON text"),
        ({"json_schema": "[]"}, "json_schema", "json_schema must be a JSON object"),
        ({"json_schema": 3}, "json_schema", "json_schema must be None, a dict or JSON text"),
        ({"regex": ""}, "regex", "regex must be None or a non-empty string"),
        ({"choice": "yes"}, "choice", "choice must be None or a list of strings, got 'yes'"),
        ({"choice": []}, "choice", "choice must hold 1 to 1024 strings"),
        ({"choice": ["a", ""]}, "choice", "choice must hold only non-empty strings"),
        (
            {"regex": "a", "choice": ["a"]},
            "choice",
            "at most one of json_schema, regex and choice may be given, got regex and choice",
        ),
        ({"regex": "a", "stop": ["x"]}, "stop", "stop cannot be combined with regex"),
    ],
)
def test_bad_options_name_the_parameter(
    kwargs: dict[str, Any], parameter: str, message: str
) -> None:
    with pytest.raises(InvalidParameterError) as info:
        GenerationOptions(**kwargs)
    assert str(info.value).startswith(message)
    assert info.value.parameter == parameter


def test_schema_is_kept_as_json_text_in_key_order() -> None:
    options = GenerationOptions(json_schema={"type": "object", "properties": {"b": {}, "a": {}}})
    assert options.json_schema == '{"type":"object","properties":{"b":{},"a":{}}}'
    assert options.constrained
    assert hash(options) == hash(GenerationOptions(json_schema=options.json_schema))
    assert GenerationOptions(choice=["x", "y", "x"]).choice == ("x", "y")


# -- errors before model work ----------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        (
            {"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}},
            "json_schema",
        ),
        ({"json_schema": {"type": "strange"}}, "json_schema"),
        ({"regex": "(unclosed"}, "regex"),
    ],
)
def test_a_constraint_that_cannot_compile_fails_before_model_work(
    generators: dict[str, Generator], kwargs: dict[str, Any], parameter: str
) -> None:
    gen = generators["idefics2"]
    before = gen.stats().batches
    with pytest.raises(InvalidParameterError, match="cannot be compiled") as info:
        gen.generate_batch(conversations(3, 0), max_new_tokens=4, **kwargs)
    assert info.value.parameter == parameter
    with pytest.raises(InvalidParameterError, match="cannot be compiled"):
        gen.stream(conversations(1, 0)[0], max_new_tokens=4, **kwargs)
    assert gen.stats().batches == before


def test_missing_grammar_engine_says_how_to_install(
    generators: dict[str, Generator], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    gen = generators["idefics2"]
    with pytest.raises(
        InvalidParameterError, match=re.escape("pip install 'idefics-kit[structured]'")
    ):
        gen.generate(conversations(1, 0)[0], regex="[0-9]{5}")


# -- generation on random weights -------------------------------------------------


def test_200_constrained_answers_per_family_are_all_valid(gen: Generator) -> None:
    # Four schemas from four threads: the scheduler mixes them in micro-batches.
    answers: dict[int, list[Result]] = {}

    def run(number: int) -> None:
        answers[number] = gen.generate_batch(
            conversations(50, number),
            json_schema=SCHEMAS[number],
            max_new_tokens=192,
            temperature=1.0,
            seed=number,
        )

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(SCHEMAS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bad = [
        (number, result.text)
        for number, results in answers.items()
        for result in results
        if not valid(SCHEMAS[number], result)
    ]
    assert sum(len(r) for r in answers.values()) == 200
    assert not bad


def test_rows_with_different_constraints_share_a_batch_and_match_singles(gen: Generator) -> None:
    convs = conversations(4, 7)
    options = [
        GenerationOptions(json_schema=PERSON, max_new_tokens=192, temperature=1.0, seed=1),
        GenerationOptions(regex=r"[a-z]{1,4}-[0-9]{2}", max_new_tokens=20, temperature=1.0, seed=2),
        GenerationOptions(choice=["red", "green", "blue"], max_new_tokens=8),
        GenerationOptions(max_new_tokens=6),
    ]
    convs = [convs[1], convs[2], convs[1], convs[2]]  # same input keys: one batch
    shared = Generator.from_model(gen.model, gen.processor, max_batch_size=4)
    release = threading.Event()
    holder = threading.Thread(target=shared._scheduler.call, args=(lambda: release.wait(60),))
    holder.start()  # the worker is held while all four queue up
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(shared.generate, c, o) for c, o in zip(convs, options, strict=True)]
        while shared.stats().queued < 4:
            time.sleep(0.005)
        release.set()
        together = [f.result() for f in futures]
    holder.join(30)
    assert shared.stats().batches == 1  # admitted together, one running batch
    shared.close()
    alone = [gen.generate(c, o) for c, o in zip(convs, options, strict=True)]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert valid(PERSON, together[0])
    assert re.fullmatch(r"[a-z]{1,4}-[0-9]{2}", together[1].text)
    assert together[2].text in ("red", "green", "blue")


def test_regex_and_choice(gen: Generator) -> None:
    convs = conversations(12, 3)
    pattern = r"(yes|no), [0-9]{1,3}( items)?"
    for result in gen.generate_batch(
        convs, regex=pattern, max_new_tokens=24, temperature=1.0, seed=5
    ):
        assert result.finish_reason == "stop"
        assert re.fullmatch(pattern, result.text), result.text
    choices = ["circle", "square", "triangle", "a yellow star"]
    for result in gen.generate_batch(
        convs, choice=choices, max_new_tokens=24, temperature=1.0, seed=6
    ):
        assert result.finish_reason == "stop"
        assert result.text in choices


def test_streamed_constrained_answer_joins_to_the_generated_one(gen: Generator) -> None:
    for conversation in conversations(3, 11):
        options = GenerationOptions(json_schema=PERSON, max_new_tokens=192, temperature=1.0, seed=3)
        whole = gen.generate(conversation, options)
        stream = gen.stream(conversation, options)
        assert "".join(stream) == whole.text
        assert stream.result is not None
        assert stream.result.token_ids == whole.token_ids
        assert valid(PERSON, whole)


def test_budget_ending_first_gives_length_and_a_cut_answer(gen: Generator) -> None:
    conversation = conversations(1, 5)[0]
    full = gen.generate(
        conversation, json_schema=PERSON, max_new_tokens=192, temperature=1.0, seed=4
    )
    cut = gen.generate(conversation, json_schema=PERSON, max_new_tokens=5, temperature=1.0, seed=4)
    assert full.finish_reason == "stop"
    assert cut.finish_reason == "length"
    assert len(cut.token_ids) == 5
    assert cut.token_ids == full.token_ids[:5]
    assert full.text.startswith(cut.text)


def test_word_vocabulary_that_cannot_continue_is_an_error_not_invalid_text() -> None:
    toy = Generator.from_pretrained("toy", device="cpu")
    try:
        conversation = Conversation().user("What color is the shape?")
        with pytest.raises(InvalidParameterError, match="cannot start with any token"):
            toy.generate(conversation, json_schema={"type": "object"})
        # "red" is a word of the toy's vocabulary, "red!" cannot be spelled.
        result = toy.generate_batch([conversation], choice=["red!"], on_error="return")[0]
        assert result.error is not None
        assert "can continue the choice constraint" in str(result.error)
    finally:
        toy.close()


# -- log-probabilities ------------------------------------------------------------------


def reference_logprobs(
    gen: Generator, conversation: Conversation, ids: tuple[int, ...]
) -> torch.Tensor:
    """log-softmax of the raw logits before each generated token, one forward pass."""
    adapter = gen._adapter
    images = [part.load() for part in conversation.images()]
    inputs = dict(BatchFeature(dict(adapter.encode([conversation], [images]))))
    count = len(ids)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids])], dim=1)
    mask = inputs["attention_mask"]
    full["attention_mask"] = torch.cat([mask, torch.ones(1, count, dtype=mask.dtype)], dim=1)
    if "image_attention_mask" in inputs:
        image_mask = inputs["image_attention_mask"]
        full["image_attention_mask"] = torch.cat(
            [image_mask, image_mask[:, -1:].expand(1, count, -1)], dim=1
        )
    with torch.inference_mode():
        logits = gen.model(**full).logits[0].float()
    start = int(inputs["input_ids"].shape[1]) - 1
    return torch.log_softmax(logits[start : start + count], dim=-1)


def check_logprobs(gen: Generator, conversation: Conversation, result: Result, k: int) -> None:
    assert result.logprobs is not None
    assert [e.token_id for e in result.logprobs] == list(result.token_ids)
    reference = reference_logprobs(gen, conversation, result.token_ids)
    vocab = vocabulary(gen.processor.tokenizer, logits_width(gen.model, gen.processor.tokenizer))
    for step, entry in enumerate(result.logprobs):
        assert entry.logprob == pytest.approx(float(reference[step, entry.token_id]), abs=1e-4)
        assert entry.text == vocab.text(entry.token_id)
        assert len(entry.top_logprobs) == k
        values, ids = reference[step].topk(k)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        if k and len(set(values.tolist())) == k:
            assert [t.token_id for t in entry.top_logprobs] == ids.tolist()


def test_logprobs_are_the_models_raw_distribution(gen: Generator) -> None:
    conversation = conversations(2, 1)[1]
    greedy = gen.generate(conversation, max_new_tokens=10, logprobs=True, top_logprobs=3)
    check_logprobs(gen, conversation, greedy, 3)
    assert greedy.logprobs is not None
    # Greedy picks the most likely allowed token.
    assert all(
        e.logprob == e.top_logprobs[0].logprob
        for e in greedy.logprobs
        if e.top_logprobs[0].token_id not in gen.banned_token_ids
    )
    # Sampling, penalties and a grammar change the pick, never the reported distribution.
    sampled = gen.generate(
        conversation,
        max_new_tokens=10,
        logprobs=True,
        temperature=1.7,
        top_k=5,
        repetition_penalty=1.3,
        seed=9,
        regex="[a-z ]{3,20}",
    )
    check_logprobs(gen, conversation, sampled, 0)
    assert gen.generate(conversation, max_new_tokens=4).logprobs is None


def test_logprobs_per_row_in_batches_and_in_streams(gen: Generator) -> None:
    convs = conversations(5, 2)
    options = GenerationOptions(max_new_tokens=8, logprobs=True, top_logprobs=2)
    batched = gen.generate_batch(convs, options, batch_size=5)
    for conversation, result in zip(convs, batched, strict=True):
        alone = gen.generate(conversation, options)
        assert alone.logprobs is not None
        assert result.logprobs is not None
        assert [e.token_id for e in result.logprobs] == [e.token_id for e in alone.logprobs]
        assert [e.logprob for e in result.logprobs] == pytest.approx(
            [e.logprob for e in alone.logprobs], abs=1e-4
        )
    stream = gen.stream(convs[0], options)
    "".join(stream)
    assert stream.result is not None
    assert stream.result.logprobs is not None
    assert [e.token_id for e in stream.result.logprobs] == list(stream.result.token_ids)
    assert isinstance(stream.result.logprobs[0], TokenLogprob)
