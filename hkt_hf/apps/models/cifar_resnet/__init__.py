from .configuration_cifar_resnet import CIFAR10_LABELS, CifarResNetConfig
from .modeling_cifar_resnet import CifarResNetForImageClassification, CifarResNetModel, CifarResNetPreTrainedModel

__all__ = [
    "CIFAR10_LABELS",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "CifarResNetPreTrainedModel",
]
