"""hkt-hf: Hereditary Knowledge Transfer (HKT) for the Hugging Face ecosystem.

The method is the package's top-level modules; `hkt_hf.apps` holds its applications (built-in models, data helpers,
metrics, command line, demo). Importing `hkt_hf` imports one of them, `hkt_hf.apps.models`, which registers the two
built-in architectures (CIFAR ResNets, RAFT) with the transformers Auto classes, so that children and parents of
those architectures load with `AutoModel...from_pretrained` after `import hkt_hf`; nothing else is registered.
"""

from . import hub
from .apps.models import CifarResNetConfig, CifarResNetForImageClassification, CifarResNetModel, cifar_image_processor
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
