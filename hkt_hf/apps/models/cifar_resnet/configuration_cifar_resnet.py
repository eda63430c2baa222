"""Configuration of the He et al. (2016) CIFAR ResNets (depth 6n+2, option-A shortcuts)."""

from __future__ import annotations

from transformers import PretrainedConfig

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class CifarResNetConfig(PretrainedConfig):
    """Hyper-parameters of a CIFAR ResNet.

    Args:
        depth: total depth 6n+2 (20, 32, 44, 56, 110, ...); each of the three stages holds n BasicBlocks.
        num_channels: channels of the input image.
        hidden_sizes: widths of the three stages (16, 32, 64 in the paper).
    """

    model_type = "cifar-resnet"

    def __init__(
        self,
        depth: int = 20,
        num_channels: int = 3,
        hidden_sizes: list[int] | tuple[int, ...] = (16, 32, 64),
        **kwargs,
    ):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}.")
        if len(hidden_sizes) != 3:
            raise ValueError(f"hidden_sizes must name the widths of exactly 3 stages, got {list(hidden_sizes)}.")
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["id2label"] = dict(enumerate(CIFAR10_LABELS))
        self.depth = depth
        self.num_channels = num_channels
        self.hidden_sizes = list(hidden_sizes)
        super().__init__(**kwargs)

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6
