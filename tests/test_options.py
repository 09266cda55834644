"""GenerationOptions validation: exact types and messages."""

from __future__ import annotations

import math

import pytest

from idefics_kit import GenerationOptions, InvalidParameterError


def test_defaults_are_greedy() -> None:
    options = GenerationOptions()
    assert options.greedy
    assert options.stop == ()
    assert (options.max_new_tokens, options.top_p, options.top_k, options.seed) == (
        256,
        1.0,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens must be an int >= 1, got 0"),
        ("max_new_tokens", 2.0, "max_new_tokens must be an int >= 1, got 2.0"),
        ("max_new_tokens", True, "max_new_tokens must be an int >= 1, got True"),
        (
            "temperature",
            -0.1,
            "temperature must be a finite number >= 0 (0 means greedy), got -0.1",
        ),
        (
            "temperature",
            math.nan,
            "temperature must be a finite number >= 0 (0 means greedy), got nan",
        ),
        ("temperature", "1", "temperature must be a finite number >= 0 (0 means greedy), got '1'"),
        ("top_p", 0.0, "top_p must be a number in (0, 1], got 0.0"),
        ("top_p", 1.5, "top_p must be a number in (0, 1], got 1.5"),
        ("top_k", 0, "top_k must be None or an int >= 1, got 0"),
        ("top_k", 2.5, "top_k must be None or an int >= 1, got 2.5"),
        ("repetition_penalty", 0, "repetition_penalty must be a finite number > 0, got 0"),
        ("repetition_penalty", math.inf, "repetition_penalty must be a finite number > 0, got inf"),
        ("seed", -1, "seed must be None or an int in [0, 9223372036854775807], got -1"),
        ("seed", "7", "seed must be None or an int in [0, 9223372036854775807], got '7'"),
        ("stop", ("",), "stop must hold only non-empty strings, got ('',)"),
        ("stop", (1,), "stop must hold only non-empty strings, got (1,)"),
        ("stop", 3, "stop must be a string or a sequence of strings, got 3"),
        ("stop", ("x",) * 17, "stop must hold at most 16 strings"),
    ],
)
def test_bad_values_raise_naming_parameter_range_and_value(
    name: str, value: object, message: str
) -> None:
    with pytest.raises(InvalidParameterError) as info:
        GenerationOptions(**{name: value})  # type: ignore[arg-type]
    assert str(info.value).startswith(message)
    assert info.value.parameter == name
    assert isinstance(info.value, ValueError)


def test_stop_is_narrowed_to_a_tuple_once() -> None:
    assert GenerationOptions(stop="\n\n").stop == ("\n\n",)  # type: ignore[arg-type]
    assert GenerationOptions(stop=["a", "b", "a"]).stop == ("a", "b")  # type: ignore[arg-type]


def test_numbers_are_normalised() -> None:
    options = GenerationOptions(temperature=1, top_p=1, repetition_penalty=2)
    assert (options.temperature, options.top_p, options.repetition_penalty) == (1.0, 1.0, 2.0)
    assert type(options.temperature) is float
    assert not options.greedy


def test_overrides_apply_and_unknown_names_are_rejected() -> None:
    base = GenerationOptions(max_new_tokens=10)
    assert base.with_overrides({"seed": 3}) == GenerationOptions(max_new_tokens=10, seed=3)
    assert base.with_overrides({}) is base
    with pytest.raises(
        InvalidParameterError,
        match=r"unknown generation option 'max_tokens'; allowed: max_new_tokens, ",
    ):
        base.with_overrides({"max_tokens": 3})
    with pytest.raises(InvalidParameterError, match="top_p must be a number in"):
        base.with_overrides({"top_p": 2})


def test_options_are_frozen() -> None:
    with pytest.raises(AttributeError):
        GenerationOptions().temperature = 1.0  # type: ignore[misc]
