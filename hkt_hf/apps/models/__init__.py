"""Built-in architectures, registered with the transformers Auto classes on import (no trust_remote_code needed)."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, ViTImageProcessorPil

from .cifar_resnet import (
    CIFAR10_LABELS,
    CifarResNetConfig,
    CifarResNetForImageClassification,
    CifarResNetModel,
)
from .raft import RaftConfig, RaftForOpticalFlow

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

AutoConfig.register(CifarResNetConfig.model_type, CifarResNetConfig, exist_ok=True)
AutoModel.register(CifarResNetConfig, CifarResNetModel, exist_ok=True)
AutoModelForImageClassification.register(CifarResNetConfig, CifarResNetForImageClassification, exist_ok=True)
AutoConfig.register(RaftConfig.model_type, RaftConfig, exist_ok=True)
AutoModel.register(RaftConfig, RaftForOpticalFlow, exist_ok=True)  # transformers has no optical-flow Auto class


def cifar_image_processor(size: int = 32) -> ViTImageProcessorPil:
    """The processor the public CIFAR checkpoints were trained with: 32x32, ImageNet mean/std.

    A stock transformers processor (PIL backend, so it needs no torchvision); it saves as a plain
    `preprocessor_config.json` that `AutoImageProcessor` reads back.
    """
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": size, "width": size},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


__all__ = [
    "CIFAR10_LABELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CifarResNetConfig",
    "CifarResNetForImageClassification",
    "CifarResNetModel",
    "RaftConfig",
    "RaftForOpticalFlow",
    "cifar_image_processor",
]
