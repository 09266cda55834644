"""``finetune()``: LoRA or full fine-tuning on transformers' ``Trainer``.

The run, step by step:

1. Load the model (``loading.load_pretrained``, as every entry point does).
2. Read and check every row (:mod:`idefics_kit.finetune.data`); report each
   bad one (row id and reason) before training, and go on without them (or
   stop, with ``strict``).
3. Wrap the model with LoRA adapters on the language model's linear layers
   (``peft``; the vision encoder too with ``train_vision``), or unfreeze the
   weights (``full``).
4. Train with ``Trainer``: checkpoints under ``OUTPUT/checkpoints`` (a rerun
   of the same call after a kill resumes from the last one), gradient
   accumulation, bf16 autocast on GPUs, a progress bar, a loss log
   (``OUTPUT/log.jsonl``) and, with eval rows, eval loss and exact-match
   accuracy before training and after every epoch.
5. Write the output: a LoRA adapter folder (it records its base model), or
   merged / fully trained weights with the processor: a checkpoint folder.
   Safetensors only. ``OUTPUT/finetune.json`` records settings and results.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from idefics_kit import loading
from idefics_kit.devices import DeviceLike, DTypeLike, resolve_device
from idefics_kit.errors import InvalidParameterError, TrainingDataError, TrainingError
from idefics_kit.finetune.collator import TrainingCollator
from idefics_kit.finetune.data import BadRow, Row, RowSource, check_rows, fingerprint, read_rows
from idefics_kit.finetune.defaults import DEFAULTS
from idefics_kit.finetune.labels import IGNORE_INDEX, Encoder, answer_text

__all__ = ["FinetuneResult", "OutputKind", "causal_loss", "finetune"]

OutputKind = Literal["adapter", "merged", "full"]
Quantize = Literal["4bit"]

RECORD = "finetune.json"
LOG = "log.jsonl"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneResult:
    """What a :func:`finetune` run wrote and measured."""

    output: Path
    kind: OutputKind
    """``adapter`` (LoRA weights only), ``merged`` (LoRA merged) or ``full``."""
    train_rows: int
    left_out: tuple[BadRow, ...]
    """Training and eval rows left out, each with its reason."""
    eval_rows: int
    steps: int
    """Optimizer steps of the whole run (a resumed run counts the earlier ones too)."""
    resumed_from_step: int | None
    train_seconds: float
    """Seconds of this call's training (not of earlier, interrupted calls)."""
    evaluations: tuple[dict[str, float], ...] = field(default=())
    """Eval loss and exact match per evaluation: before training (epoch 0), then per epoch."""
    already_complete: bool = False
    """True when an earlier run had finished this output; nothing was trained."""


def _positive(name: str, value: object, kind: type[int] | type[float]) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (kind is float or isinstance(value, int))
    if not ok or not math.isfinite(float(value)) or float(value) <= 0:  # type: ignore[arg-type]
        rule = "an integer >= 1" if kind is int else "a number > 0"
        raise InvalidParameterError(name, f"{name} must be {rule}, got {value!r}", value)


def finetune(
    model: str | os.PathLike[str],
    train: RowSource,
    output: str | os.PathLike[str],
    *,
    eval: RowSource | None = None,
    epochs: float = DEFAULTS.epochs,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    batch_size: int = DEFAULTS.batch_size,
    gradient_accumulation: int = DEFAULTS.gradient_accumulation,
    lora_rank: int = DEFAULTS.lora_rank,
    full: bool = False,
    train_vision: bool = False,
    merge: bool = False,
    quantize: Quantize | None = None,
    seed: int = DEFAULTS.seed,
    save_steps: int = DEFAULTS.save_steps,
    gradient_checkpointing: bool = False,
    strict: bool = False,
    device: DeviceLike = "auto",
    dtype: DTypeLike = "auto",
    max_length: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    callbacks: Sequence[Any] = (),
) -> FinetuneResult:
    """Fine-tune ``model`` on the assistant turns of ``train``; write the result to ``output``.

    ``model`` is a hub id, a checkpoint folder or ``"toy"``. ``train`` and
    ``eval`` are ``batch``-format JSONL files (one path or several) or
    conversations. LoRA (rank ``lora_rank``) on the language model's linear
    layers by default; ``full`` trains every language-model weight (and the
    connector) instead; ``train_vision`` adds the vision encoder. ``merge``
    writes merged weights instead of an adapter. ``quantize="4bit"`` is QLoRA
    (needs a CUDA GPU and bitsandbytes). ``max_steps`` overrides ``epochs``.
    ``learning_rate`` defaults to 2e-4 for LoRA and 1e-5 for ``full`` (3e-3
    and 1e-3 for models under 100 M parameters, such as the toy model).

    Rerunning the same call after an interruption resumes from the last
    checkpoint (every ``save_steps`` optimizer steps); rerunning a finished
    one returns its recorded result. An ``output`` folder written by a run
    with other settings or data is refused. Bad rows are reported through
    ``log`` (default: stderr), one line each, and left out; with ``strict``
    any bad row raises :class:`~idefics_kit.TrainingDataError`.
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects.
    """
    say = log or _stderr
    _positive("epochs", epochs, float)
    for name, value in (
        ("batch_size", batch_size),
        ("gradient_accumulation", gradient_accumulation),
        ("lora_rank", lora_rank),
        ("save_steps", save_steps),
    ):
        _positive(name, value, int)
    if max_steps is not None:
        _positive("max_steps", max_steps, int)
    if learning_rate is not None:
        _positive("learning_rate", learning_rate, float)
    if quantize not in (None, "4bit"):
        raise InvalidParameterError(
            "quantize", f"quantize must be '4bit' or None, got {quantize!r}", quantize
        )
    if quantize is not None and full:
        raise InvalidParameterError(
            "quantize",
            "QLoRA trains LoRA adapters on a 4-bit base: it cannot be combined with full",
        )
    if merge and full:
        raise InvalidParameterError(
            "merge", "merge applies to LoRA adapters; full training already writes all weights"
        )
    kind: OutputKind = "full" if full else "merged" if merge else "adapter"
    out = Path(output)
    target = resolve_device(device)
    if quantize is not None and target.type != "cuda":
        raise TrainingError(
            "QLoRA (quantize='4bit') needs a CUDA GPU: bitsandbytes' 4-bit kernels run only "
            f"on CUDA, and this run's device is {str(target)!r}. Train plain LoRA (the "
            "default, no quantize) on this machine, or run QLoRA on a CUDA GPU"
        )
    base = _model_record(model)
    settings: dict[str, object] = {
        "model": base,
        "kind": kind,
        "epochs": epochs,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "batch_size": batch_size,
        "gradient_accumulation": gradient_accumulation,
        "lora_rank": None if full else lora_rank,
        "train_vision": train_vision,
        "quantize": quantize,
        "seed": seed,
        "max_length": max_length,
    }
    record = _read_record(out)

    loaded, processor = _load(model, target, dtype, quantize=quantize, full=full)
    lr = learning_rate or _default_learning_rate(loaded, full=full)
    settings["learning_rate"] = lr
    encoder = Encoder.for_model(loaded, processor, max_length=max_length)
    train_rows_all = read_rows(train)
    eval_rows_all = read_rows(eval) if eval is not None else []
    data = {
        "train": fingerprint(train, train_rows_all),
        "eval": fingerprint(eval, eval_rows_all) if eval is not None else None,
    }
    if record is not None:
        _check_same_run(out, record, settings, data)
        if record.get("complete"):
            say(f"{out} is already complete ({record['steps']} step(s)); nothing to train")
            return _result_of(out, record)

    train_rows, bad = check_rows(train_rows_all, encoder)
    eval_rows, bad_eval = check_rows(eval_rows_all, encoder, needs_final_answer=True)
    left_out = (*bad, *bad_eval)
    for row in left_out:
        say(f"bad row: {row.line()}")
    if left_out:
        if strict:
            raise TrainingDataError(
                f"{len(left_out)} bad row(s) (listed above, first: {left_out[0].line()}); "
                "with strict, every row must be usable: fix or remove them",
                bad_rows=left_out,
            )
        say(
            f"left out {len(bad)} of {len(train_rows_all)} training row(s)"
            + (f" and {len(bad_eval)} of {len(eval_rows_all)} eval row(s)" if eval_rows_all else "")
        )
    if not train_rows:
        raise TrainingDataError(
            f"no usable training row (of {len(train_rows_all)} read); see the reasons above",
            bad_rows=left_out,
        )
    if eval is not None and not eval_rows:
        raise TrainingDataError(
            f"no usable eval row (of {len(eval_rows_all)} read); see the reasons above",
            bad_rows=left_out,
        )

    if record is None:
        _start_output(out)
    if record is None or not (out / CHECKPOINTS).is_dir():
        _write_record(out, {"settings": settings, "data": data, "complete": False})
    from transformers import set_seed

    # Seeded before the adapters exist: their initial weights are part of the run.
    set_seed(seed)
    trainable = _make_trainable(loaded, full=full, train_vision=train_vision, rank=lora_rank)
    if gradient_checkpointing:
        trainable.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    say(
        f"training {_count(trainable, trainable=True):,} of {_count(trainable):,} parameters "
        f"({kind}) on {len(train_rows)} row(s)"
        + (f", evaluating on {len(eval_rows)}" if eval_rows else "")
    )
    checkpoints = out / CHECKPOINTS
    last = _last_complete_checkpoint(checkpoints, say)
    resumed = int(last.rsplit("-", 1)[1]) if last else None
    running = {"settings": settings, "data": data, "complete": False}

    def evaluated(evaluations: list[dict[str, float]]) -> None:
        # Kept in the record as they come, so a resumed run reports the earlier ones too.
        _write_record(out, {**running, "evaluations": evaluations})

    trainer = _build_trainer(
        trainable,
        encoder,
        train_rows,
        eval_rows,
        out,
        target=target,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        batch_size=batch_size,
        gradient_accumulation=gradient_accumulation,
        seed=seed,
        save_steps=save_steps,
        progress=progress,
        say=say,
        callbacks=callbacks,
        resuming=last is not None,
        evaluated=evaluated,
    )
    if last:
        say(f"resuming from {last} (step {resumed})")
        trainer.evaluations = _evaluations_until(record, Path(last))
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - started
    steps = int(trainer.state.global_step)
    evaluations = tuple(trainer.evaluations)

    _save(trainable, processor, out, kind=kind, base=base, quantized=quantize)
    shutil.rmtree(checkpoints, ignore_errors=True)
    result = FinetuneResult(
        output=out,
        kind=kind,
        train_rows=len(train_rows),
        left_out=left_out,
        eval_rows=len(eval_rows),
        steps=steps,
        resumed_from_step=resumed,
        train_seconds=seconds,
        evaluations=evaluations,
    )
    _write_record(
        out,
        {
            "settings": settings,
            "data": data,
            "complete": True,
            "steps": steps,
            "train_rows": len(train_rows),
            "eval_rows": len(eval_rows),
            "left_out": [asdict(row) for row in left_out],
            "evaluations": list(evaluations),
            "train_seconds": round(seconds, 2),
        },
    )
    say(f"wrote the {kind} model to {out} ({steps} step(s), {seconds:.1f} s)")
    return result


# -- loading and trainable parameters ---------------------------------------------------


def _model_record(model: str | os.PathLike[str]) -> str:
    """How the output records its base: hub ids and ``toy`` as given, folders absolute."""
    name = os.fspath(model)
    if name != "toy" and os.path.isdir(name):
        return os.path.abspath(name)
    return name


def _load(
    model: str | os.PathLike[str],
    target: torch.device,
    dtype: DTypeLike,
    *,
    quantize: Quantize | None,
    full: bool,
) -> tuple[Any, Any]:
    quantization: Any = None
    if quantize is not None:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise TrainingError(
                "QLoRA needs bitsandbytes: pip install bitsandbytes (CUDA only)"
            ) from exc
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    # Full training keeps float32 master weights (bf16 is autocast on GPUs);
    # LoRA trains float32 adapters over a frozen base in the usual dtype.
    weights: DTypeLike = "float32" if full and dtype == "auto" else dtype
    loaded, processor = loading.load_pretrained(
        model,
        device=target if quantize is None else "auto",
        dtype=weights,
        device_map={"": target.index or 0} if quantize is not None else None,
        quantization_config=quantization,
    )
    return loaded, processor


def _default_learning_rate(model: Any, *, full: bool) -> float:
    small = _count(model) < DEFAULTS.small_model_parameters
    if full:
        return DEFAULTS.learning_rate_full_small if small else DEFAULTS.learning_rate_full
    return DEFAULTS.learning_rate_lora_small if small else DEFAULTS.learning_rate_lora


def _linear_names(model: Any, prefixes: Sequence[str]) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(tuple(prefixes))
    ]


def _language_prefixes(model: Any) -> tuple[str, ...]:
    from idefics_kit.loading import adapter_class

    family = adapter_class(str(model.config.model_type), type(model).__name__)
    return family.language_module_prefixes


_VISION_PREFIXES = ("model.vision_model.", "model.connector.", "model.perceiver_resampler.")


def _make_trainable(model: Any, *, full: bool, train_vision: bool, rank: int) -> Any:
    language = _language_prefixes(model)
    if full:
        for name, parameter in model.named_parameters():
            vision = name.startswith("model.vision_model.")
            parameter.requires_grad_(train_vision or not vision)
        return model
    try:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    except ImportError as exc:
        raise TrainingError(
            "LoRA fine-tuning needs peft, which is not installed: pip install "
            "'idefics-kit[train]' (or pass full=True / --full to train all weights)"
        ) from exc
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=False
        )
    targets = _linear_names(model, (*language, *(_VISION_PREFIXES if train_vision else ())))
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none"
    )
    with loading.peft_quietly():
        return get_peft_model(model, config)


def _count(model: Any, *, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


# -- the Trainer ----------------------------------------------------------------------------


class _Examples(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Rows encoded when the data loader asks (images are not all held in memory)."""

    def __init__(self, rows: Sequence[Row], encoder: Encoder) -> None:
        self.rows = list(rows)
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        conversation = self.rows[index].conversation
        assert conversation is not None
        return self.encoder.encode(conversation)


def causal_loss(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Next-token cross-entropy on the labelled positions, summed over ``num_items_in_batch``.

    Computed here, not by the model: IDEFICS 1's logits are wider than its
    ``vocab_size`` (the decoupled extra tokens), which transformers' own loss
    cannot reshape; and only labelled positions are upcast to float32.
    """
    logits = outputs["logits"][:, :-1, :]
    targets = labels[:, 1:].to(logits.device)
    mask = targets != IGNORE_INDEX
    total = torch.nn.functional.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def _build_trainer(
    model: Any,
    encoder: Encoder,
    train_rows: Sequence[Row],
    eval_rows: Sequence[Row],
    out: Path,
    *,
    target: torch.device,
    epochs: float,
    max_steps: int | None,
    lr: float,
    batch_size: int,
    gradient_accumulation: int,
    seed: int,
    save_steps: int,
    progress: bool,
    say: Callable[[str], None],
    callbacks: Sequence[Any],
    resuming: bool,
    evaluated: Callable[[list[dict[str, float]]], None],
) -> Any:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    cuda = target.type == "cuda"
    per_epoch = math.ceil(math.ceil(len(train_rows) / batch_size) / gradient_accumulation)
    total = max_steps if max_steps is not None else math.ceil(per_epoch * epochs)
    arguments = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps is not None else -1,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_cpu=target.type == "cpu",
        logging_strategy="steps",
        # About 20 loss lines a run, at least every 10 steps.
        logging_steps=max(1, min(10, total // 20)),
        logging_first_step=True,
        eval_strategy="epoch" if eval_rows else "no",
        eval_on_start=bool(eval_rows) and not resuming,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        seed=seed,
        data_seed=seed,
        report_to="none",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_pin_memory=cuda,
        label_names=["labels"],
    )
    pad = encoder.adapter.pad_token_id

    class LogFile(TrainerCallback):  # type: ignore[misc]
        """Append every log entry (loss, learning rate, eval metrics) to ``log.jsonl``."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            entry = {"step": state.global_step, "epoch": state.epoch, **(logs or {})}
            with open(out / LOG, "a", encoding="utf-8") as file:
                file.write(json.dumps(entry) + "\n")

    class FinetuneTrainer(Trainer):  # type: ignore[misc]
        evaluations: list[dict[str, float]]

        def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            metrics: dict[str, float] = super().evaluate(*args, **kwargs)
            correct = _exact_matches(self.model, encoder, eval_rows, batch_size)
            accuracy = correct / len(eval_rows)
            extra = {"eval_exact_match": accuracy}
            self.log(extra)
            metrics.update(extra)
            epoch = float(self.state.epoch or 0.0)
            self.evaluations.append(
                {"epoch": round(epoch, 4), "eval_loss": float(metrics["eval_loss"]), **extra}
            )
            evaluated(self.evaluations)
            say(
                f"epoch {epoch:.2f}: eval loss {metrics['eval_loss']:.4f}, exact match "
                f"{correct}/{len(eval_rows)} ({100 * accuracy:.1f}%)"
            )
            return metrics

    trainer = FinetuneTrainer(
        model=model,
        args=arguments,
        train_dataset=_Examples(train_rows, encoder),
        eval_dataset=_Examples(eval_rows, encoder) if eval_rows else None,
        data_collator=TrainingCollator(pad_token_id=pad),
        compute_loss_func=causal_loss,
        callbacks=[LogFile(), *callbacks],
    )
    trainer.evaluations = []
    if not progress:
        # Without the progress bar, Trainer prints every log dict instead: quiet means quiet.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _exact_matches(model: Any, encoder: Encoder, rows: Sequence[Row], batch_size: int) -> int:
    """How many eval rows the model answers exactly (greedy, whitespace-trimmed)."""
    from transformers import BatchFeature

    adapter = encoder.adapter
    tokenizer = adapter.tokenizer
    prompts = []
    expected = []
    for row in rows:
        assert row.conversation is not None
        turns = row.conversation.turns
        prompts.append(type(row.conversation)(system=row.conversation.system, turns=turns[:-1]))
        expected.append(answer_text(row.conversation).strip())
    longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in expected)
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    floating = next(p.dtype for p in model.parameters() if p.is_floating_point())
    correct = 0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            images = [[part.load() for part in c.images()] for c in chunk]
            encoded = BatchFeature(dict(adapter.encode(chunk, images))).to(device)
            if "pixel_values" in encoded:
                encoded["pixel_values"] = encoded["pixel_values"].to(floating)
            with torch.no_grad():
                generated = model.generate(
                    **encoded,
                    max_new_tokens=longest + 4,
                    do_sample=False,
                    eos_token_id=list(adapter.stop_token_ids),
                    pad_token_id=adapter.pad_token_id,
                    bad_words_ids=[[i] for i in adapter.banned_token_ids] or None,
                )
            width = int(encoded["input_ids"].shape[1])
            for row_ids, answer in zip(
                generated[:, width:].tolist(), expected[start : start + batch_size], strict=True
            ):
                cut = next(
                    (i for i, t in enumerate(row_ids) if t in adapter.stop_token_ids), len(row_ids)
                )
                correct += adapter.decode(row_ids[:cut]).strip() == answer
    finally:
        model.train(was_training)
    return correct


# -- output folder -----------------------------------------------------------------------------


def _evaluations_until(record: dict[str, Any] | None, checkpoint: Path) -> list[dict[str, float]]:
    """The evaluations an interrupted run recorded up to ``checkpoint`` (later ones are redone)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        reached = float(state.get("epoch") or 0.0)
    except (OSError, ValueError):
        return []
    earlier = (record or {}).get("evaluations", [])
    return [dict(e) for e in earlier if float(e.get("epoch", 0.0)) <= reached + 1e-6]


def _last_complete_checkpoint(folder: Path, say: Callable[[str], None]) -> str | None:
    """The newest checkpoint that was completely written; incomplete ones are removed.

    Trainer writes ``trainer_state.json`` last, so a checkpoint without it was
    being written when the run was killed: resuming from it would fail.
    """
    if not folder.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for path in folder.iterdir():
        name, _, step = path.name.partition("-")
        if name == "checkpoint" and step.isdigit() and path.is_dir():
            found.append((int(step), path))
    for _step, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return str(path)
        say(f"removing the incomplete checkpoint {path.name} (the run was killed while saving it)")
        shutil.rmtree(path)
    return None


def _read_record(out: Path) -> dict[str, Any] | None:
    path = out / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainingDataError(
            f"cannot read {path}: {exc}; delete the folder {str(out)!r} to start over"
        ) from exc
    if not isinstance(record, dict):
        raise TrainingDataError(f"{path} is not a finetune record; pass another output folder")
    return record


def _check_same_run(
    out: Path, record: dict[str, Any], settings: dict[str, Any], data: dict[str, Any]
) -> None:
    before = {
        **record.get("settings", {}),
        **{f"{k} data": v for k, v in record.get("data", {}).items()},
    }
    now = {**settings, **{f"{k} data": v for k, v in data.items()}}
    differ = sorted(key for key in now.keys() | before.keys() if before.get(key) != now.get(key))
    if differ:
        raise TrainingDataError(
            f"the output folder {str(out)!r} holds a run with other settings or data "
            f"(different: {', '.join(differ)}); rerun with the same arguments to resume it, "
            "pass another output folder, or delete it to start over"
        )


def _start_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainingDataError(
            f"the output {str(out)!r} exists and is not a finetune output folder (no "
            f"{RECORD}); pass a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)


def _write_record(out: Path, record: dict[str, Any]) -> None:
    path = out / RECORD
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _result_of(out: Path, record: dict[str, Any]) -> FinetuneResult:
    return FinetuneResult(
        output=out,
        kind=record["settings"]["kind"],
        train_rows=int(record.get("train_rows", 0)),
        left_out=tuple(BadRow(**row) for row in record.get("left_out", [])),
        eval_rows=int(record.get("eval_rows", 0)),
        steps=int(record.get("steps", 0)),
        resumed_from_step=None,
        train_seconds=0.0,
        evaluations=tuple(record.get("evaluations", [])),
        already_complete=True,
    )


def _save(
    model: Any, processor: Any, out: Path, *, kind: OutputKind, base: str, quantized: object
) -> None:
    if kind == "adapter":
        # The adapter folder names its base, so it loads on its own.
        for config in model.peft_config.values():
            config.base_model_name_or_path = base
        # The base's embeddings are never trained here: do not look them up to save them.
        model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
        return
    if kind == "merged":
        if quantized:
            # A 4-bit base cannot take merged weights: merge into the full-precision base.
            staging = out / "adapter-staging"
            for config in model.peft_config.values():
                config.base_model_name_or_path = base
            model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
            model, _ = loading.load_pretrained(base, device="cpu", adapter=staging)
            shutil.rmtree(staging)
        else:
            model = model.merge_and_unload()
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
