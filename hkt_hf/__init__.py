"""hkt-hf: Hereditary Knowledge Transfer (HKT) for the Hugging Face ecosystem.

Importing the package registers the built-in architectures with the transformers Auto classes.
"""

from .models import CifarResNetConfig, CifarResNetForImageClassification, CifarResNetModel, cifar_image_processor

__version__ = "0.1.0"

__all__ = [
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "cifar_image_processor",
]
