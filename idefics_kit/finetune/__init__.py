"""Fine-tuning IDEFICS-family models on conversations (``idefics-kit finetune``).

* :func:`encode_for_training`: one conversation as ``input_ids``, ``labels``
  (the assistant turns' tokens, -100 elsewhere) and its image inputs.
* :class:`TrainingCollator`: batches of those, for transformers' ``Trainer``
  and TRL.
* :func:`finetune`: LoRA (or full) fine-tuning on ``Trainer``, with
  checkpoints, resume, evaluation and an output folder that loads wherever a
  model loads.

See docs/finetuning.md. Importing this module imports torch; ``peft`` (the
``[train]`` extra) is imported only when training or loading an adapter.
"""

from idefics_kit.finetune.collator import PaddingSide, TrainingCollator
from idefics_kit.finetune.data import BadRow, RowSource
from idefics_kit.finetune.labels import IGNORE_INDEX, Encoder, encode_for_training
from idefics_kit.finetune.trainer import DEFAULTS, FinetuneResult, OutputKind, finetune

__all__ = [
    "DEFAULTS",
    "IGNORE_INDEX",
    "BadRow",
    "Encoder",
    "FinetuneResult",
    "OutputKind",
    "PaddingSide",
    "RowSource",
    "TrainingCollator",
    "encode_for_training",
    "finetune",
]
