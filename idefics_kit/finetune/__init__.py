"""Fine-tuning IDEFICS-family models on conversations (``idefics-kit finetune``).

* :func:`encode_for_training`: one conversation as ``input_ids``, ``labels``
  (the assistant turns' tokens, -100 elsewhere) and its image inputs.
* :class:`TrainingCollator`: batches of those, for transformers' ``Trainer``
  and TRL.
* :func:`finetune`: LoRA (or full) fine-tuning on ``Trainer``, with
  checkpoints, resume, evaluation and an output folder that loads wherever a
  model loads.

See docs/finetuning.md. The names load on first use (they import torch);
``peft`` (the ``[train]`` extra) is imported only when training or loading an
adapter.
"""

from typing import TYPE_CHECKING

from idefics_kit.finetune.defaults import DEFAULTS, Defaults

if TYPE_CHECKING:
    from idefics_kit.finetune.collator import PaddingSide, TrainingCollator
    from idefics_kit.finetune.data import BadRow, RowSource
    from idefics_kit.finetune.labels import IGNORE_INDEX, Encoder, encode_for_training
    from idefics_kit.finetune.trainer import FinetuneResult, OutputKind, finetune

__all__ = [
    "DEFAULTS",
    "IGNORE_INDEX",
    "BadRow",
    "Defaults",
    "Encoder",
    "FinetuneResult",
    "OutputKind",
    "PaddingSide",
    "RowSource",
    "TrainingCollator",
    "encode_for_training",
    "finetune",
]

_LAZY = {
    "PaddingSide": "collator",
    "TrainingCollator": "collator",
    "BadRow": "data",
    "RowSource": "data",
    "IGNORE_INDEX": "labels",
    "Encoder": "labels",
    "encode_for_training": "labels",
    "FinetuneResult": "trainer",
    "OutputKind": "trainer",
    "finetune": "trainer",
}


def __getattr__(name: str) -> object:
    # torch and transformers load on first use: the CLI's parser imports the defaults.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"idefics_kit.finetune.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'idefics_kit.finetune' has no attribute {name!r}")
