"""Offline test fixtures: tiny random-weight IDEFICS-family checkpoints.

``build_tiny_checkpoint(family, path)`` writes a complete checkpoint folder
(weights as safetensors, config, generation config, processor, a tokenizer
trained here with the ``tokenizers`` library, the family's chat template) that
``Generator.from_pretrained(path)`` loads like any hub checkpoint. Nothing is
downloaded. The weights are random, so answers are noise, but every code path
that a real checkpoint takes is exercised: apps can use it in their own tests.

The checkpoints mirror real ones where the SDK depends on it:

* IDEFICS 1 and 2: a Llama-2 style SentencePiece BPE whose alphabet holds
  every printable ASCII character, so any JSON text can be written (the
  published tokenizers reach every byte through byte fallback instead).
* IDEFICS 1: ``<image>``/``<fake_token_around_image>``/``<end_of_utterance>``
  live in the decoupled "additional" vocabulary, as on idefics-9b-instruct;
  the generation config lists only ``</s>``.
* IDEFICS 2: ``image_seq_len`` equals the perceiver's latent count; the
  generation config lists ``</s>`` and ``<end_of_utterance>``.
* IDEFICS 3: a byte-level tokenizer that adds ``<|begin_of_text|>`` itself
  while the chat template also starts with it; ``<row_i_col_j>`` and
  ``<global-img>`` tokens; image splitting on; the generation config lists
  only the Llama-3 eos ids, **not** ``<end_of_utterance>``.
* SmolVLM: ``<|im_start|>`` template prefix, ``<end_of_utterance>`` as eos.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from idefics_kit.errors import InvalidParameterError

__all__ = ["TinyFamily", "TinySize", "build_tiny_checkpoint"]

TinyFamily = Literal["idefics", "idefics2", "idefics3", "smolvlm"]
TinySize = Literal["tiny", "small"]

_TEMPLATE_BODY = (
    "{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# The published templates of idefics2-8b, Idefics3-8B-Llama3 and SmolVLM differ
# only in the prefix.
_TEMPLATES: dict[str, str] = {
    "idefics2": _TEMPLATE_BODY,
    "idefics3": "<|begin_of_text|>" + _TEMPLATE_BODY,
    "smolvlm": "<|im_start|>" + _TEMPLATE_BODY,
}

_WORDS = tuple(
    (
        "a an the this that is are was what where how many which who why of in on at to with "
        "and or but not no yes image picture photo dog cat bird car tree house red green blue "
        "yellow black white circle square triangle shape color left right center describe "
        "question answer story one two three four five big small sky water man woman child "
        "sitting standing running next under over there here it they he she we you i my your "
        "document text read write page table number first second last day night city road"
    ).split()
)

_IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>")
_ROW_COL_TOKENS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))


@dataclass(frozen=True, slots=True, kw_only=True)
class _TokenizerSpec:
    byte_level: bool
    bos: str
    eos: str
    unk: str | None
    pad: str
    base_specials: tuple[str, ...]
    extra: tuple[str, ...]
    add_bos: bool
    byte_fallback: bool = False
    """Llama 2's ``<0x00>`` ... ``<0xFF>`` pieces and decoder (SentencePiece specs only)."""


# Llama-2 style SentencePiece BPE (Metaspace), as idefics-9b and Mistral.
_LLAMA2_SPEC = _TokenizerSpec(
    byte_level=False,
    bos="<s>",
    eos="</s>",
    unk="<unk>",
    pad="<unk>",
    base_specials=("<unk>", "<s>", "</s>"),
    extra=_IMAGE_TOKENS,
    add_bos=True,
)

_TOKENIZER_SPECS: dict[str, _TokenizerSpec] = {
    "idefics": _LLAMA2_SPEC,
    "idefics2": _LLAMA2_SPEC,
    # Llama-3 style byte-level BPE.
    "idefics3": _TokenizerSpec(
        byte_level=True,
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        unk=None,
        pad="<|finetune_right_pad_id|>",
        base_specials=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        extra=(*_IMAGE_TOKENS, "<global-img>", *_ROW_COL_TOKENS),
        add_bos=True,
    ),
    # SmolLM2 style byte-level BPE (no BOS added by the tokenizer).
    "smolvlm": _TokenizerSpec(
        byte_level=True,
        bos="<|im_start|>",
        eos="<end_of_utterance>",
        unk=None,
        pad="<|im_end|>",
        base_specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        extra=(*_IMAGE_TOKENS, "<global-img>", *_ROW_COL_TOKENS),
        add_bos=False,
    ),
}


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(400):
        words = rng.choices(_WORDS, k=rng.randint(3, 12))
        sentence = " ".join(words).capitalize()
        lines.append(rng.choice(("User: ", "Assistant: ", "System: ", "")) + sentence + ".")
    lines.append("0123456789 ?!.,:;'\"()[]-_/\n")
    return lines


def _train_tokenizer(spec: _TokenizerSpec, seed: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if spec.byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token=spec.unk, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        printable = {chr(c) for c in range(0x20, 0x7F)}
        alphabet = sorted(set("".join(_corpus(seed))) | printable | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(spec.base_specials),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if spec.byte_fallback:
        tok = _with_byte_fallback(tok, len(spec.base_specials))
    if spec.add_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        )
    elif spec.byte_level:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs: dict[str, Any] = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad}
    if spec.unk is not None:
        kwargs["unk_token"] = spec.unk
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs
    )
    fast.add_special_tokens({"additional_special_tokens": list(spec.extra)})
    return fast


def _with_byte_fallback(tok: Any, specials: int) -> Any:
    """``tok`` with Llama-2's byte pieces after its first ``specials`` ids and its decoder."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    ordered = sorted(data["model"]["vocab"], key=data["model"]["vocab"].__getitem__)
    pieces = [f"<0x{byte:02X}>" for byte in range(256)]
    tokens = ordered[:specials] + pieces + ordered[specials:]
    data["model"]["vocab"] = {token: index for index, token in enumerate(tokens)}
    data["model"]["byte_fallback"] = True
    # Llama-2's decoder: the first space of the answer is dropped, byte pieces fused.
    data["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return Tokenizer.from_str(json.dumps(data))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Dims:
    text_hidden: int
    text_layers: int
    text_heads: int
    vision_hidden: int
    vision_layers: int
    image_size: int
    """The vision encoder's tile side; patches are 8 px."""
    latents: int
    """IDEFICS 2 perceiver latents = its image_seq_len."""


_SIZES: dict[str, _Dims] = {
    "tiny": _Dims(
        text_hidden=32,
        text_layers=2,
        text_heads=4,
        vision_hidden=32,
        vision_layers=1,
        image_size=32,
        latents=4,
    ),
    # Large enough that model compute, not Python, dominates a CPU benchmark.
    "small": _Dims(
        text_hidden=512,
        text_layers=4,
        text_heads=8,
        vision_hidden=256,
        vision_layers=2,
        image_size=64,
        latents=16,
    ),
}


def _text(dims: _Dims, tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": dims.text_hidden,
        "intermediate_size": 2 * dims.text_hidden,
        "num_hidden_layers": dims.text_layers,
        "num_attention_heads": dims.text_heads,
        "num_key_value_heads": dims.text_heads // 2,
        "max_position_embeddings": 2048,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _vision(dims: _Dims) -> dict[str, Any]:
    return {
        "hidden_size": dims.vision_hidden,
        "intermediate_size": 2 * dims.vision_hidden,
        "num_hidden_layers": dims.vision_layers,
        "num_attention_heads": 4,
        "image_size": dims.image_size,
        "patch_size": 8,
    }


def _build_idefics(tokenizer: Any, dims: _Dims) -> tuple[Any, Any, list[int]]:
    from transformers import (
        IdeficsConfig,
        IdeficsForVisionText2Text,
        IdeficsImageProcessor,
        IdeficsProcessor,
    )

    # The image tokens sit past the base vocabulary, in the decoupled
    # embedding, exactly as on the published checkpoints.
    text = _text(dims, tokenizer)
    del text["num_key_value_heads"]
    vision = _vision(dims)
    vision["embed_dim"] = vision.pop("hidden_size")
    config = IdeficsConfig(
        **{**text, "vocab_size": len(tokenizer) - len(_IMAGE_TOKENS)},
        additional_vocab_size=len(_IMAGE_TOKENS),
        cross_layer_interval=1,
        vision_config=vision,
        perceiver_config={"use_resampler": False},
    )
    model = IdeficsForVisionText2Text(config)
    image_processor = IdeficsImageProcessor(image_size=dims.image_size)
    processor = IdeficsProcessor(image_processor, tokenizer, image_size=dims.image_size)
    return model, processor, [tokenizer.eos_token_id]


def _build_idefics2(tokenizer: Any, dims: _Dims) -> tuple[Any, Any, list[int]]:
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessor,
        Idefics2Processor,
    )

    config = Idefics2Config(
        text_config={"model_type": "mistral", **_text(dims, tokenizer)},
        vision_config=_vision(dims),
        perceiver_config={
            "hidden_size": dims.text_hidden,
            "resampler_n_latents": dims.latents,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 8,
            "num_key_value_heads": 1,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Idefics2ForConditionalGeneration(config)
    edge = dims.image_size
    image_processor = Idefics2ImageProcessor(
        do_image_splitting=False, size={"shortest_edge": edge * 3 // 4, "longest_edge": edge}
    )
    processor = Idefics2Processor(
        image_processor, tokenizer, image_seq_len=dims.latents, chat_template=_TEMPLATES["idefics2"]
    )
    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    return model, processor, [tokenizer.eos_token_id, eou]


def _build_idefics3_like(family: str, tokenizer: Any, dims: _Dims) -> tuple[Any, Any, list[int]]:
    import transformers as tf

    prefix = "Idefics3" if family == "idefics3" else "SmolVLM"
    scale = 2
    seq_len = (dims.image_size // 8) ** 2 // scale**2
    config = getattr(tf, f"{prefix}Config")(
        text_config={"model_type": "llama", **_text(dims, tokenizer)},
        vision_config=_vision(dims),
        scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = getattr(tf, f"{prefix}ForConditionalGeneration")(config)
    image_kwargs = {
        "do_image_splitting": True,
        "size": {"longest_edge": 2 * dims.image_size},
        "max_image_size": {"longest_edge": dims.image_size},
    }
    image_processor = getattr(tf, f"{prefix}ImageProcessor")(**image_kwargs)
    processor_cls = getattr(tf, f"{prefix}Processor")
    if family == "smolvlm":
        video_processor = tf.SmolVLMVideoProcessor(**image_kwargs)
        processor = processor_cls(
            image_processor,
            tokenizer,
            video_processor,
            image_seq_len=seq_len,
            chat_template=_TEMPLATES[family],
        )
        eos = [tokenizer.convert_tokens_to_ids("<end_of_utterance>")]
    else:
        processor = processor_cls(
            image_processor, tokenizer, image_seq_len=seq_len, chat_template=_TEMPLATES[family]
        )
        # As on Idefics3-8B-Llama3: Llama-3 eos ids only, no <end_of_utterance>.
        eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    return model, processor, eos


def build_tiny_checkpoint(
    family: TinyFamily,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    size: TinySize = "tiny",
) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` to ``path`` and return it.

    ``family`` is one of ``"idefics"``, ``"idefics2"``, ``"idefics3"``,
    ``"smolvlm"``. ``seed`` fixes both the tokenizer corpus and the weights, so
    the same call writes the same checkpoint. ``size="small"`` (text hidden
    512 x 4 layers, vision hidden 256 x 2 layers, 64 px tiles) is for
    benchmarks, where model compute must dominate. Runs offline in well under a
    second once torch and transformers are imported (the first call in a
    process also pays for those imports); the folder holds a few hundred kB.
    """
    families = get_args(TinyFamily)
    if family not in families:
        raise InvalidParameterError(
            "family", f"family must be one of {', '.join(families)}; got {family!r}", family
        )
    if size not in _SIZES:
        raise InvalidParameterError(
            "size", f"size must be one of {', '.join(_SIZES)}; got {size!r}", size
        )
    dims = _SIZES[size]
    import torch
    from transformers import GenerationConfig

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(_TOKENIZER_SPECS[family], seed)
    torch.manual_seed(seed)
    if family == "idefics":
        model, processor, eos = _build_idefics(tokenizer, dims)
    elif family == "idefics2":
        model, processor, eos = _build_idefics2(tokenizer, dims)
    else:
        model, processor, eos = _build_idefics3_like(family, tokenizer, dims)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
