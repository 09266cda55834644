"""Train the toy IDEFICS 3 model that ships as ``Generator.from_pretrained("toy")``.

Everything is made here, offline: a word-level tokenizer over the toy world's
closed vocabulary, an ``Idefics3Processor`` around it, a tiny
``Idefics3ForConditionalGeneration`` initialised at random, and the training
pictures, drawn with Pillow by ``idefics_kit.toy.scenes``. Seeded and
reproducible (same seed, same torch build, same thread count: same weights).
Takes about 25 minutes on 2 CPU cores; never run in CI.

    python tools/train_toy_model.py --out idefics_kit/toy/checkpoint

Then measure it through the public API with ``tools/eval_toy_model.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from PIL import Image

from idefics_kit.toy.scenes import (
    ANSWERS,
    QUESTIONS,
    QuestionKind,
    Scene,
    draw_count_scene,
    draw_scene,
)

IMAGE_SIDE = 96
PATCH = 8
SCALE = 2  # pixel shuffle: 12x12 patches -> 6x6 image tokens; two token columns per third
IMAGE_SEQ_LEN = (IMAGE_SIDE // PATCH) ** 2 // SCALE**2


def configure(image_side: int, scale: int) -> None:
    """Set the image side and pixel-shuffle factor (module constants) for this run."""
    global IMAGE_SIDE, SCALE, IMAGE_SEQ_LEN
    if image_side % (PATCH * scale):
        raise SystemExit(f"--image-side must be a multiple of {PATCH * scale}")
    IMAGE_SIDE, SCALE = image_side, scale
    IMAGE_SEQ_LEN = (IMAGE_SIDE // PATCH) ** 2 // SCALE**2


BOS, EOS, EOT, PAD, UNK = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<unk>",
)
IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>")
# Idefics3-8B-Llama3's template.
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Share of each question kind in training: shape is the hard one.
KIND_WEIGHTS: dict[QuestionKind, float] = {
    "color": 1.0,
    "shape": 3.0,
    "position": 1.0,
    "describe": 1.5,
    "count": 1.0,
}


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words: set[str] = {"user", "assistant", ":"}
    for text in (*QUESTIONS.values(), *(a for answers in ANSWERS.values() for a in answers)):
        words.update(text.lower().replace("?", " ?").replace(".", " .").split())
    specials = [UNK, BOS, EOS, EOT, PAD]
    vocab = {token: i for i, token in enumerate([*specials, *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": list(IMAGE_TOKENS)})
    return fast


def build_processor(tokenizer: Any) -> Any:
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    # No splitting: every image becomes one IMAGE_SIDE square, IMAGE_SEQ_LEN tokens.
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIDE},
        max_image_size={"longest_edge": IMAGE_SIDE},
    )
    return Idefics3Processor(
        image_processor, tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=CHAT_TEMPLATE
    )


def build_model(tokenizer: Any) -> Any:
    from transformers import GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration

    config = Idefics3Config(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 96,
            "intermediate_size": 384,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIDE,
            "patch_size": PATCH,
        },
        scale_factor=SCALE,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(config)
    # As on Idefics3-8B-Llama3: the Llama-3 eos ids only; the SDK adds <end_of_utterance>.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


@dataclass
class Pool:
    """Pre-processed training pictures, stored as uint8 to keep memory small."""

    pixels: torch.Tensor  # (N, 3, S, S) uint8, the processor's output mapped back to 0..255
    scenes: list[Scene]
    colourful: list[int]  # indices of single-shape scenes still in colour


def degrade(rng: random.Random, scene: Scene, single: bool) -> tuple[Image.Image, bool]:
    """The scene's picture as users may send it: sometimes grey, JPEG'd or palette-reduced.

    Returns the picture and whether it lost its colours.
    """
    image = scene.image
    grey = single and rng.random() < 0.1
    if grey:
        image = image.convert("L").convert("RGB")
    roll = rng.random()
    if roll < 0.15:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(40, 95))
        image = Image.open(buffer).convert("RGB")
    elif roll < 0.2:
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=rng.choice((16, 32, 64)))
        image = image.convert("RGB")
    return image, grey


def make_pool(seed: int, singles: int, counts: int, log: Any) -> Pool:
    from transformers import Idefics3ImageProcessor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    kwargs = {
        "do_image_splitting": False,
        "size": {"longest_edge": IMAGE_SIDE},
        "max_image_size": {"longest_edge": IMAGE_SIDE},
    }
    # Users without torchvision get the Pillow backend: train on both resizers.
    backends = [Idefics3ImageProcessor(**kwargs), Idefics3ImageProcessorPil(**kwargs)]
    rng = random.Random(seed)
    scenes: list[Scene] = []
    colourful: list[int] = []
    chunks: list[torch.Tensor] = []
    total = singles + counts
    start = time.perf_counter()
    while len(scenes) < total:
        images = []
        for _ in range(min(256, total - len(scenes))):
            single = len(scenes) < singles
            scene = draw_scene(rng) if single else draw_count_scene(rng)
            image, grey = degrade(rng, scene, single)
            if single and not grey:
                colourful.append(len(scenes))
            images.append(image)
            # Keep only the labels: the pixels go into the tensor below.
            scenes.append(Scene(image=_NO_IMAGE, items=scene.items))
        processed = backends[len(chunks) % 2](
            images=[[image] for image in images], return_tensors="pt"
        )["pixel_values"][:, 0]
        chunks.append(((processed * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8))
        if len(chunks) % 40 == 0:
            log(f"pool {len(scenes)}/{total} ({time.perf_counter() - start:.0f} s)")
    return Pool(pixels=torch.cat(chunks), scenes=scenes, colourful=colourful)


_NO_IMAGE: Any = None


class Conversations:
    """Token ids and loss masks per sequence of (question, answer) turns, cached."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.placeholder = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), "white")
        self.cache: dict[tuple[tuple[str, str], ...], tuple[list[int], list[int]]] = {}

    def _ids(self, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        out = self.processor.apply_chat_template(
            messages,
            add_generation_prompt=generation_prompt,
            tokenize=True,
            return_dict=True,
        )
        ids: list[int] = out["input_ids"][0]
        return list(ids)

    def render(self, turns: tuple[tuple[str, str], ...]) -> tuple[list[int], list[int]]:
        """Ids and labels exactly as the processor renders and tokenizes the conversation."""
        messages: list[dict[str, Any]] = []
        prefixes = []
        for question, answer in turns:
            messages.append(
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": self.placeholder},
                        {"type": "text", "text": question},
                    ],
                }
            )
            prefixes.append(self._ids(messages, True))
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        ids = self._ids(messages, False)
        eou = self.processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
        labels = [-100] * len(ids)
        for prefix in prefixes:
            # What the SDK feeds the model (the generation prompt) must be a
            # prefix of what the model is trained on.
            assert ids[: len(prefix)] == prefix, "generation prompt is not a prefix"
            end = ids.index(eou, len(prefix))
            labels[len(prefix) : end + 1] = ids[len(prefix) : end + 1]
        return ids, labels

    def get(self, turns: tuple[tuple[str, str], ...]) -> tuple[list[int], list[int]]:
        # Word-level tokens never straddle a turn boundary, so a conversation is
        # its turns' tokens joined (one BOS); check_joins() proves it on samples.
        if turns not in self.cache:
            if len(turns) == 1:
                self.cache[turns] = self.render(turns)
            else:
                head, tail = self.get(turns[:1]), self.get(turns[1:])
                self.cache[turns] = (head[0] + tail[0][1:], head[1] + tail[1][1:])
        return self.cache[turns]

    def check_joins(self, rng: random.Random, samples: int) -> None:
        answers = [(QUESTIONS[k], a) for k, values in ANSWERS.items() for a in values]
        for _ in range(samples):
            turns = (rng.choice(answers), rng.choice(answers))
            assert self.get(turns) == self.render(turns), f"joined tokens differ for {turns}"


def pick_turn(
    rng: random.Random, pool: Pool, singles: int, kind: QuestionKind | None = None
) -> tuple[int, str, str]:
    if kind is None:
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind == "count":
        index = rng.randrange(len(pool.scenes)) if rng.random() < 0.8 else rng.randrange(singles)
    elif kind in ("color", "describe"):
        index = rng.choice(pool.colourful)
    else:
        index = rng.randrange(singles)
    return index, QUESTIONS[kind], pool.scenes[index].answer(kind)


def make_batch(
    rng: random.Random,
    pool: Pool,
    singles: int,
    convs: Conversations,
    size: int,
    two_turn: float,
    kind: QuestionKind | None = None,
) -> dict[str, torch.Tensor]:
    rows = []
    for _ in range(size):
        turns = [
            pick_turn(rng, pool, singles, kind) for _ in range(2 if rng.random() < two_turn else 1)
        ]
        ids, labels = convs.get(tuple((q, a) for _, q, a in turns))
        rows.append((ids, labels, [index for index, _, _ in turns]))
    width = max(len(ids) for ids, _, _ in rows)
    pad = convs.processor.tokenizer.pad_token_id
    input_ids = torch.full((size, width), pad, dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    pixels = torch.zeros((size, 2, 3, IMAGE_SIDE, IMAGE_SIDE))
    for row, (ids, lab, indices) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
        for slot, index in enumerate(indices):
            pixels[row, slot] = pool.pixels[index].float() / 127.5 - 1.0
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": pixels,
    }


@torch.no_grad()
def probe(model: Any, batches: dict[str, dict[str, torch.Tensor]]) -> str:
    """Teacher-forced exact-match rates of all answer tokens on fixed held-out batches."""
    model.eval()
    rates = []
    for name, batch in batches.items():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
        predicted = logits[:, :-1].argmax(-1)
        target = batch["labels"][:, 1:]
        wrong = ((predicted != target) & (target != -100)).any(dim=1)
        rates.append(f"{name} {float((~wrong).float().mean()):.3f}")
    model.train()
    return " ".join(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--singles", type=int, default=30000)
    parser.add_argument("--counts", type=int, default=8000)
    parser.add_argument("--two-turn", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-side", type=int, default=IMAGE_SIDE)
    parser.add_argument("--scale", type=int, default=SCALE)
    parser.add_argument("--probe-every", type=int, default=500)
    args = parser.parse_args(argv)
    configure(args.image_side, args.scale)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    pool = make_pool(args.seed, args.singles, args.counts, log)
    held_out = make_pool(args.seed + 1, 400, 100, lambda _: None)
    convs = Conversations(processor)
    convs.check_joins(random.Random(args.seed + 4), 40)
    probe_rng = random.Random(args.seed + 2)
    probes = {
        kind: make_batch(probe_rng, held_out, 400, convs, 64, 0.0, kind) for kind in KIND_WEIGHTS
    }
    probes["two-turn"] = make_batch(probe_rng, held_out, 400, convs, 64, 1.0)
    log(f"data ready ({time.perf_counter() - started:.0f} s)")

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    warmup = min(200, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(args.seed + 3)
    model.train()
    smoothed = None
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = make_batch(rng, pool, args.singles, convs, args.batch_size, args.two_turn)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = loss.item()
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            message = f"step {step + 1}/{args.steps} loss {smoothed:.4f} lr {lr_at(step):.2e}"
            if (step + 1) % args.probe_every == 0 or step + 1 == args.steps:
                message += f" | {probe(model, probes)}"
            log(f"{message} ({time.perf_counter() - started:.0f} s)")

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    (args.out / "training.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "singles": args.singles,
                "counts": args.counts,
                "two_turn": args.two_turn,
                "threads": args.threads,
                "image_side": IMAGE_SIDE,
                "scale": SCALE,
                "torch": torch.__version__,
                "seconds": round(time.perf_counter() - started),
            },
            indent=2,
        )
        + "\n"
    )
    log(f"saved to {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
