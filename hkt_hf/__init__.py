"""hkt-hf: Hereditary Knowledge Transfer (HKT) for the Hugging Face ecosystem.

Importing the package registers the built-in architectures with the transformers Auto classes.
"""

from . import hub
from .models import CifarResNetConfig, CifarResNetForImageClassification, CifarResNetModel, cifar_image_processor
from .trainer import HKTSeq2SeqTrainer, HKTTrainer
from .training_args import HKTSeq2SeqTrainingArguments, HKTTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "HKTTrainer",
    "HKTTrainingArguments",
    "HKTSeq2SeqTrainer",
    "HKTSeq2SeqTrainingArguments",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "cifar_image_processor",
    "hub",
]
