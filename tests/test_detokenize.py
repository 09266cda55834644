"""The incremental detokenizer and stream decoder, on every family's tokenizer.

``IncrementalDetokenizer.text`` must equal ``adapter.decode`` of every id fed,
after every chunk, and ``TextDecoder`` must emit exactly the pieces of the
whole-answer decoder it replaced (tests/_reference_decoder.py), for random
token sequences: special tokens, byte-fallback runs, characters split across
byte-level tokens, stop strings. The tokenizer work per token must stay
bounded: counted as token ids passed to ``decode``, not as time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoProcessor, GenerationConfig

from idefics_kit import testing
from idefics_kit.detokenize import IncrementalDetokenizer, TextDecoder, _lossy, _strategy
from idefics_kit.families import adapter_for
from idefics_kit.families.base import FamilyAdapter
from idefics_kit.options import GenerationOptions
from idefics_kit.toy import checkpoint_path
from tests._reference_decoder import ReferenceTextDecoder

TOKENIZERS = ("idefics", "idefics2", "idefics3", "smolvlm", "byte-fallback", "toy")
STRATEGIES = {
    "idefics": "pieces",
    "idefics2": "pieces",
    "idefics3": "bytes",
    "smolvlm": "bytes",
    "byte-fallback": "pieces",
    "toy": "pieces",
}
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Text that needs every kind of token: multibyte characters (byte runs with
# byte fallback, split characters with byte-level BPE), spaces at the start.
SAMPLE_TEXT = " Red dog, été à Zürich — 3 x 4 = 12 € ✓ 中文字 😀🐈 \n  ok."


def load_adapter(path: Path) -> FamilyAdapter:
    config = AutoConfig.from_pretrained(path)
    adapter_cls = adapter_for(config.model_type)
    assert adapter_cls is not None
    return adapter_cls(AutoProcessor.from_pretrained(path), GenerationConfig.from_pretrained(path))


@pytest.fixture(scope="module")
def adapters(
    checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, FamilyAdapter]:
    loaded = {family: load_adapter(path) for family, path in checkpoints.items()}
    # Llama 2's tokenizer (idefics-9b, idefics2-8b): <0xNN> byte pieces, Strip decoder.
    spec = dataclasses.replace(testing._TOKENIZER_SPECS["idefics2"], byte_fallback=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(testing._TOKENIZER_SPECS, "idefics2", spec)
        path = testing.build_tiny_checkpoint("idefics2", tmp_path_factory.mktemp("bf") / "bf")
    loaded["byte-fallback"] = load_adapter(path)
    # The toy model's word-level tokenizer: no decoder (tokens joined by spaces).
    loaded["toy"] = load_adapter(checkpoint_path())
    return loaded


def token_pool(adapter: FamilyAdapter) -> dict[str, list[int]]:
    """Ids by kind: special, byte pieces, multibyte text (as the tokenizer spells it), any."""
    tokenizer = adapter.tokenizer
    size = len(tokenizer)
    special = sorted(set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder))
    text = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    return {
        "special": special,
        "bytes": sorted(adapter.byte_token_ids) or text,
        "text": text,
        # A few ids past the vocabulary: decode drops them.
        "any": list(range(size + 2)),
    }


@st.composite
def token_runs(draw: st.DrawFn, pool: dict[str, list[int]]) -> list[int]:
    ids: list[int] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["special", "bytes", "mixed", "text", "text", "any"]))
        if kind == "text":  # a stretch of real text, cut anywhere
            start = draw(st.integers(0, len(pool["text"]) - 1))
            ids += pool["text"][start : start + draw(st.integers(1, 12))]
        elif kind == "mixed":  # byte pieces with special tokens among them
            both = pool["bytes"] + pool["special"]
            ids += draw(st.lists(st.sampled_from(both), min_size=1, max_size=6))
        else:
            ids += draw(st.lists(st.sampled_from(pool[kind]), min_size=1, max_size=4))
    return ids


def chunks(ids: Sequence[int], sizes: Sequence[int]) -> Iterator[list[int]]:
    start, index = 0, 0
    while start < len(ids):
        size = sizes[index % len(sizes)] if sizes else 1
        yield list(ids[start : start + size])
        start += size
        index += 1


@pytest.mark.parametrize("name", TOKENIZERS)
def test_the_tokenizer_gets_its_incremental_strategy(
    name: str, adapters: dict[str, FamilyAdapter]
) -> None:
    assert IncrementalDetokenizer(adapters[name]).strategy == STRATEGIES[name]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_detokenizer_text_is_always_the_whole_decode(
    name: str, adapters: dict[str, FamilyAdapter]
) -> None:
    adapter = adapters[name]
    pool = token_pool(adapter)

    @PROPERTY
    @given(ids=token_runs(pool), sizes=st.lists(st.integers(1, 4), max_size=5))
    def check(ids: list[int], sizes: list[int]) -> None:
        detokenizer = IncrementalDetokenizer(adapter)
        fed: list[int] = []
        stable = ""
        for chunk in chunks(ids, sizes):
            detokenizer.feed(chunk)
            fed += chunk
            text = detokenizer.text
            assert text == adapter.decode(fed)
            # The stable prefix only grows; what was stable stays.
            assert text.startswith(stable)
            stable = text[: detokenizer.stable]
        assert detokenizer.resets == 0, "every window followed the tokenizer's rules"

    check()


def stop_strings(text: str) -> st.SearchStrategy[tuple[str, ...]]:
    pieces = st.integers(0, max(0, len(text) - 1)).flatmap(
        lambda start: st.integers(1, 4).map(lambda size: text[start : start + size])
    )
    other = st.text(alphabet="ab é€\ufffd😀 .\n", min_size=1, max_size=3)
    one = (pieces | other) if text else other
    return st.lists(one.filter(bool), max_size=3).map(tuple)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_text_decoder_pieces_are_the_whole_answer_decoders(
    name: str, adapters: dict[str, FamilyAdapter]
) -> None:
    adapter = adapters[name]
    pool = token_pool(adapter)
    stops = list(adapter.stop_token_ids)

    @PROPERTY
    @given(
        ids=token_runs(pool),
        sizes=st.lists(st.integers(1, 3), max_size=5),
        data=st.data(),
    )
    def check(ids: list[int], sizes: list[int], data: st.DataObject) -> None:
        if data.draw(st.booleans()):  # a stop token somewhere
            ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.sampled_from(stops)))
        options = GenerationOptions(
            max_new_tokens=data.draw(st.integers(1, max(1, len(ids) + 1))),
            stop=data.draw(stop_strings(adapter.decode(ids))),
        )
        old, new = ReferenceTextDecoder(adapter, options), TextDecoder(adapter, options)
        for chunk in chunks(ids, sizes):
            assert new.feed(chunk) == old.feed(chunk), (chunk, old.emitted)
            assert (new.ended, new.emitted, new.ids) == (old.ended, old.emitted, old.ids)
        final = adapter.decode(old.ids)
        assert new.rest(final) == old.rest(final)
        assert new.rest(final[:1]) == old.rest(final[:1])

    check()


def test_text_decoder_matches_on_split_characters_and_held_stops(
    adapters: dict[str, FamilyAdapter],
) -> None:
    # Deterministic cases the property test may not draw: every token of the
    # sample text one at a time, with stop strings that start many times
    # (" ", "€ ✓") and one that ends the answer in a multibyte character.
    for name in TOKENIZERS:
        adapter = adapters[name]
        ids = token_pool(adapter)["text"]
        for stop in [(), (" ", "zz"), ("€ ✓",), ("中文",), ("\ufffd",)]:
            options = GenerationOptions(max_new_tokens=len(ids), stop=stop)
            old, new = ReferenceTextDecoder(adapter, options), TextDecoder(adapter, options)
            pieces = [new.feed([token]) for token in ids]
            assert pieces == [old.feed([token]) for token in ids], (name, stop)
            assert (new.ended, new.emitted) == (old.ended, old.emitted)
            if not stop:
                assert "".join(pieces) + new.rest(adapter.decode(ids)) == adapter.decode(ids)


@pytest.mark.parametrize(
    "pieces",
    [
        # A run of byte pieces that special tokens interrupt: decode skips the
        # specials, so the run goes on; the old decoder emitted what the
        # unfinished run decoded to, and so must the new one.
        ["<0x41>", "<s>", "<0x42>", "<unk>", "▁dog"],
        ["<0xE2>", "<s>", "<0x82>", "<s>", "<0xAC>", "▁dog", "<0xE2>", "<s>", "▁"],
        # "A" is emitted, then the run turns into U+FFFD U+FFFD: the text no
        # longer starts with what was emitted, and nothing more is emitted.
        ["<0x41>", "<s>", "<0x80>", "▁dog", "▁the", "<0x41>", "<s>", "▁"],
        ["▁", "<0x41>", "<s>", "<0x80>", "<s>", "▁dog"],
    ],
)
@pytest.mark.parametrize("stop", [(), ("og",), ("A\ufffd",)])
def test_text_decoder_on_byte_runs_interrupted_by_special_tokens(
    pieces: list[str], stop: tuple[str, ...], adapters: dict[str, FamilyAdapter]
) -> None:
    adapter = adapters["byte-fallback"]
    ids = adapter.tokenizer.convert_tokens_to_ids(pieces)
    assert adapter.tokenizer.convert_ids_to_tokens(ids) == pieces
    for size in (1, 2, 3):
        options = GenerationOptions(max_new_tokens=len(ids), stop=stop)
        old, new = ReferenceTextDecoder(adapter, options), TextDecoder(adapter, options)
        for chunk in chunks(ids, [size]):
            assert new.feed(chunk) == old.feed(chunk), (size, chunk)
            assert (new.ended, new.emitted) == (old.ended, old.emitted)


class CountingDecode:
    """Wraps ``adapter.decode``: counts the token ids it is given."""

    def __init__(self, adapter: FamilyAdapter) -> None:
        self.decode = adapter.decode
        self.calls = 0
        self.ids = 0
        self.widest = 0

    def __call__(self, ids: Sequence[int]) -> str:
        self.calls += 1
        self.ids += len(ids)
        self.widest = max(self.widest, len(ids))
        return self.decode(ids)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_work_per_token_is_bounded(
    name: str, adapters: dict[str, FamilyAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2,000-token answer of mixed text (multibyte characters, byte runs,
    # split characters, a special token now and then), streamed one token at a
    # time with stop strings that never match.
    adapter = adapters[name]
    pool = token_pool(adapter)
    ids: list[int] = []
    while len(ids) < 2000:
        ids += pool["text"]
        ids.append(pool["special"][len(ids) % len(pool["special"])])
    ids = [t for t in ids[:2000] if t not in adapter.stop_token_ids]
    counter = CountingDecode(adapter)
    monkeypatch.setattr(adapter, "decode", counter)
    decoder = TextDecoder(adapter, GenerationOptions(max_new_tokens=len(ids), stop=("zzz", "qq")))
    text = "".join(decoder.feed([token]) for token in ids)
    monkeypatch.undo()
    assert text + decoder.rest(adapter.decode(ids)) == adapter.decode(ids)
    # The whole-answer decoder passes ~len(ids)**2 / 2 = 2,000,000 ids.
    assert counter.ids <= 4 * len(ids), counter.ids
    # A window holds the new token and up to three before it (an open
    # character's bytes, byte-level; one token of context, SentencePiece), or
    # a whole byte-fallback run (it decodes as one) with its context and the
    # token that ends it; never the answer.
    runs = [0]
    for token in ids:
        runs.append(runs[-1] + 1 if token in adapter.byte_token_ids else 0)
    assert counter.widest <= max(runs) + 4, counter.widest
    print(f"{name}: {counter.ids} ids in {counter.calls} decodes, widest {counter.widest}")
    assert counter.calls <= 2 * len(ids)


def test_unknown_decoders_fall_back_to_whole_decodes(adapters: dict[str, FamilyAdapter]) -> None:
    adapter = adapters["idefics2"]

    class Rewriting(type(adapter)):  # type: ignore[misc]
        def decode(self, token_ids: Sequence[int]) -> str:
            return super().decode(token_ids).upper()

    rewriting = Rewriting.__new__(Rewriting)
    rewriting.__dict__.update(adapter.__dict__)
    ids = token_pool(rewriting)["text"]
    detokenizer = IncrementalDetokenizer(rewriting)
    assert detokenizer.strategy == "whole"
    options = GenerationOptions(max_new_tokens=len(ids), stop=("D ",))
    old, new = ReferenceTextDecoder(rewriting, options), TextDecoder(rewriting, options)
    for token in ids:
        detokenizer.feed([token])
        assert new.feed([token]) == old.feed([token])
    assert detokenizer.text == rewriting.decode(ids)
    assert (new.ended, new.emitted) == (old.ended, old.emitted)


@pytest.mark.parametrize("broken", ["context", "bytes"])
def test_a_window_that_breaks_the_rules_falls_back_and_stays_exact(
    broken: str, adapters: dict[str, FamilyAdapter], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "context": treat the byte-level tokenizer as if it were SentencePiece, so
    # that a character split across tokens makes a window disagree with its
    # context. "bytes": read every token as the wrong bytes. The detokenizer
    # must notice, decode whole answers from then on, and say so.
    from idefics_kit import detokenize

    adapter = adapters["idefics3"]
    plan = detokenize._Plan(adapter)
    if broken == "context":
        plan.strategy = "pieces"
    else:
        monkeypatch.setattr(plan, "token_bytes", lambda _: b"?")
    monkeypatch.setattr(detokenize, "_plan_for", lambda _: plan)
    ids = token_pool(adapter)["text"]
    detokenizer = IncrementalDetokenizer(adapter)
    options = GenerationOptions(max_new_tokens=len(ids), stop=("€",))
    old, new = ReferenceTextDecoder(adapter, options), TextDecoder(adapter, options)
    for end, token in enumerate(ids, start=1):
        detokenizer.feed([token])
        assert detokenizer.text == adapter.decode(ids[:end])
        assert new.feed([token]) == old.feed([token])
    assert detokenizer.resets == 1
    assert detokenizer.strategy == "whole"
    assert new._detokenizer.resets == 1
    assert (new.ended, new.emitted) == (old.ended, old.emitted)


def test_added_plain_tokens_of_a_byte_level_tokenizer(checkpoints: dict[str, Path]) -> None:
    # Non-special added tokens are spelled in plain text, not in the byte
    # alphabet: decode reads the characters it can as bytes ("é" is byte
    # 0xE9 there, half a character) and the others as UTF-8 (" café").
    adapter = load_adapter(checkpoints["smolvlm"])
    tokenizer = adapter.tokenizer
    tokenizer.add_tokens(["café", " café", "<note>"])
    words = tokenizer.convert_tokens_to_ids(["café", " café", "<note>"])
    ids = [*words, *tokenizer(" ok é", add_special_tokens=False)["input_ids"], *words]
    assert adapter.decode(words[:1]) == "caf\ufffd"
    detokenizer = IncrementalDetokenizer(adapter)
    for end, token in enumerate(ids, start=1):
        detokenizer.feed([token])
        assert detokenizer.text == adapter.decode(ids[:end])
    assert detokenizer.resets == 0


LLAMA2 = {
    "type": "Sequence",
    "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ],
}


@pytest.mark.parametrize(
    ("decoder", "expected"),
    [
        (LLAMA2, ("pieces", True)),
        ({**LLAMA2, "decoders": LLAMA2["decoders"][:3]}, ("pieces", True)),
        (
            {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"},
            ("pieces", False),
        ),
        ({"type": "ByteLevel", "add_prefix_space": True}, ("bytes", False)),
        # The end of the text can still change: not incremental.
        (
            {**LLAMA2, "decoders": [*LLAMA2["decoders"][:3], {**LLAMA2["decoders"][3], "stop": 1}]},
            None,
        ),
        # Strip before Fuse, steps out of order, other replacements, other decoders.
        ({**LLAMA2, "decoders": [LLAMA2["decoders"][3], LLAMA2["decoders"][2]]}, None),
        ({**LLAMA2, "decoders": LLAMA2["decoders"][::-1]}, None),
        ({**LLAMA2, "decoders": [{**LLAMA2["decoders"][0], "content": ""}]}, None),
        ({"type": "WordPiece", "prefix": "##", "cleanup": True}, None),
        ({"type": "Sequence", "decoders": [{"type": "ByteLevel"}]}, None),
        # No decoder: the tokens joined by spaces.
        (None, ("pieces", False)),
        ("Metaspace", None),
    ],
)
def test_decoder_strategies(decoder: Any, expected: object) -> None:
    assert _strategy(decoder) == expected


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(max_size=12), cut=st.integers(0, 12))
def test_utf8_state_machine_is_pythons_one_shot_decode(data: bytes, cut: int) -> None:
    # Python's one-shot decode and Rust's from_utf8_lossy both replace maximal
    # invalid subparts; the state machine must agree when fed in two parts.
    from idefics_kit.detokenize import _Utf8

    decoder = _Utf8()
    text = decoder.decode(data[:cut]) + decoder.decode(data[cut:])
    expected = data.decode("utf-8", errors="replace")
    assert text + ("\ufffd" if decoder.pending else "") == expected
    assert _lossy(data) == expected
