"""hkt-hf: Hereditary Knowledge Transfer (HKT) for the Hugging Face ecosystem.

Importing the package registers the built-in architectures with the transformers Auto classes.
"""

from . import hub
from .config import HKTConfig
from .models import CifarResNetConfig, CifarResNetForImageClassification, CifarResNetModel, cifar_image_processor
from .trainer import HKTTrainer
from .training_args import HKTTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "HKTConfig",
    "HKTTrainer",
    "HKTTrainingArguments",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "cifar_image_processor",
    "hub",
]
