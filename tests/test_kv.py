"""The running batch's KV cache: layers that grow in place hold what concatenation holds.

``BatchCache`` swaps transformers' cache layers for ones that keep spare
columns and write each step's keys and values in place. The model must not
see a difference: at every step, after rows join and leave, and past the
spare room, the keys and values handed to attention are exactly those of
the plain ``torch.cat`` layers, and the sliding-window layer reports the
same mask sizes as transformers' own, also once its window fills.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from idefics_kit import kv

HEADS, DIM, LAYERS = 2, 4, 2


def prefilled(rows: int, columns: int, seed: int) -> tuple[kv.BatchCache, list[torch.Tensor]]:
    """A batch state of ``rows`` rows, and the reference keys per layer (values are twice the keys)."""
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    reference = []
    for layer in range(LAYERS):
        keys = torch.randn(rows, HEADS, columns, DIM, generator=generator)
        cache.update(keys, 2 * keys, layer)
        reference.append(keys)
    mask = torch.ones(rows, columns, dtype=torch.long)
    state = kv.BatchCache(cache, mask, torch.full((rows,), columns), {})
    return state, reference


def left_padded(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, 0, columns - tensor.shape[-2], 0))


def same(state: kv.BatchCache, reference: list[torch.Tensor]) -> None:
    for layer, expected in zip(state.cache.layers, reference, strict=True):
        assert torch.equal(layer.keys, expected)
        assert torch.equal(layer.values, 2 * expected)
        assert layer.get_seq_length() == expected.shape[-2] == state.columns


@torch.inference_mode()  # as the engine runs the model
def test_steps_joins_and_selections_hold_what_concatenation_holds() -> None:
    generator = torch.Generator().manual_seed(0)
    state, reference = prefilled(rows=3, columns=5, seed=1)
    for step in range(2 * kv.ROOM + 7):  # past the spare room twice
        rows = state.rows
        state.step_inputs(torch.zeros(rows, dtype=torch.long))  # as the engine steps
        assert all(type(layer).__name__ == "_GrowingLayer" for layer in state.cache.layers)
        for index, layer in enumerate(state.cache.layers):
            new = torch.randn(rows, HEADS, 1, DIM, generator=generator)
            keys, values = layer.update(new, 2 * new)
            reference[index] = torch.cat([reference[index], new], dim=-2)
            # What attention gets is the whole cache, this step's column included.
            assert torch.equal(keys, reference[index])
            assert torch.equal(values, 2 * reference[index])
        state.stepped()
        same(state, reference)
        if step == 10:
            # A longer row joins: the running rows are padded on the left.
            other, theirs = prefilled(rows=2, columns=state.columns + 9, seed=2)
            width = other.columns
            state.join(other)
            reference = [
                torch.cat([left_padded(mine, width), extra])
                for mine, extra in zip(reference, theirs, strict=True)
            ]
            same(state, reference)
        if step == 40:
            # The longer rows leave: the columns only they used are cut off.
            state.select([0, 2])
            start = 9
            reference = [keys[[0, 2], :, start:] for keys in reference]
            same(state, reference)


@torch.inference_mode()
def test_states_joined_before_any_step_grow_from_the_join() -> None:
    # An admission prefilled in parts: its states are joined before the first step.
    state, reference = prefilled(rows=2, columns=4, seed=4)
    other, theirs = prefilled(rows=1, columns=7, seed=5)
    state.join(other)
    reference = [
        torch.cat([left_padded(mine, 7), extra])
        for mine, extra in zip(reference, theirs, strict=True)
    ]
    assert all(type(layer).__name__ == "_GrowingLayer" for layer in state.cache.layers)
    same(state, reference)
    generator = torch.Generator().manual_seed(6)
    state.step_inputs(torch.zeros(state.rows, dtype=torch.long))
    for index, layer in enumerate(state.cache.layers):
        new = torch.randn(state.rows, HEADS, 1, DIM, generator=generator)
        keys, _ = layer.update(new, 2 * new)
        reference[index] = torch.cat([reference[index], new], dim=-2)
        assert torch.equal(keys, reference[index])
    state.stepped()
    same(state, reference)


@torch.inference_mode()
def test_a_sliding_layer_reports_transformers_sizes_also_once_its_window_fills() -> None:
    window = 8
    generator = torch.Generator().manual_seed(3)
    plain = DynamicSlidingWindowLayer(sliding_window=window)
    growing = DynamicSlidingWindowLayer(sliding_window=window)
    prompt = torch.randn(2, HEADS, 3, DIM, generator=generator)
    plain.update(prompt, prompt + 1)
    growing.update(prompt, prompt + 1)
    cache = DynamicCache()
    cache.layers.append(growing)
    state = kv.BatchCache(cache, torch.ones(2, 3, dtype=torch.long), torch.full((2,), 3), {})
    state.step_inputs(torch.zeros(2, dtype=torch.long))
    growing = cache.layers[0]
    assert type(growing).__name__ == "_GrowingSlidingLayer"
    for _ in range(2 * window):
        new = torch.randn(2, HEADS, 1, DIM, generator=generator)
        assert growing.get_mask_sizes(1) == plain.get_mask_sizes(1)
        assert growing.get_seq_length() == plain.get_seq_length()
        expected = plain.update(new, new + 1)
        got = growing.update(new, new + 1)
        assert torch.equal(got[0], expected[0])
        assert torch.equal(got[1], expected[1])
        assert torch.equal(growing.keys, plain.keys)
    assert growing.full
    del state
