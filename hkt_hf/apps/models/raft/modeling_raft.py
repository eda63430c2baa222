"""torchvision's RAFT and RAFT-small as transformers models: `save_pretrained`, `AutoModel.from_pretrained`, a loss
in `forward` (so `Trainer` and `HKTTrainer` train them like any transformers model) and the RAFT sequence loss.

The network itself is torchvision's (`torchvision.models.optical_flow.raft_large` / `raft_small`, built without
weights); this module only adds the transformers interface. Carrier names for HKT are torchvision's module names
under `raft.`, e.g. `raft.feature_encoder`, `raft.context_encoder`, `raft.feature_encoder.layer2`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_raft import RaftConfig


@dataclass
class OpticalFlowOutput(ModelOutput):
    """`predicted_flow`: the last iteration's flow [B, 2, H, W] (x, y displacement in pixels from image1 to image2);
    `flow_predictions`: every iteration's flow, first to last; `loss`: the sequence loss when labels were given."""

    loss: torch.Tensor | None = None
    predicted_flow: torch.Tensor | None = None
    flow_predictions: tuple[torch.Tensor, ...] | None = None


def sequence_loss(
    flow_predictions: list[torch.Tensor] | tuple[torch.Tensor, ...],
    flow_gt: torch.Tensor,
    valid: torch.Tensor | None = None,
    gamma: float = 0.8,
    max_flow: float = 400.0,
) -> torch.Tensor:
    """RAFT's training loss: sum over iterations i of gamma^(N-1-i) * mean over valid pixels of |flow_i - gt|_1.

    Pixels are valid where `valid` (bool [B, H, W], all if None) holds and the ground truth is shorter than
    `max_flow`. Computed in fp32.
    """
    flow_gt = flow_gt.float()
    mask = flow_gt.norm(dim=1) < max_flow
    if valid is not None:
        mask = mask & valid.bool()
    weight = mask.float()
    count = weight.sum().clamp_min(1.0)
    n = len(flow_predictions)
    loss = flow_gt.new_zeros(())
    for i, flow in enumerate(flow_predictions):
        per_pixel = (flow.float() - flow_gt).abs().sum(dim=1)
        loss = loss + gamma ** (n - 1 - i) * (per_pixel * weight).sum() / count
    return loss


def end_point_error(flow: torch.Tensor, flow_gt: torch.Tensor) -> torch.Tensor:
    """Per-pixel end-point error |flow - gt|_2 [B, H, W], the standard optical-flow metric (in pixels)."""
    return (flow.float() - flow_gt.float()).norm(dim=1)


def build_raft(variant: str) -> nn.Module:
    try:
        from torchvision.models.optical_flow import raft_large, raft_small
    except ImportError as err:  # torchvision is an optional dependency
        raise ImportError(
            "RAFT models need torchvision (its RAFT implementation is used as is): pip install 'hkt-hf[flow]'."
        ) from err
    return (raft_large if variant == "large" else raft_small)(weights=None)


class RaftPreTrainedModel(PreTrainedModel):
    config_class = RaftConfig
    base_model_prefix = "raft"
    main_input_name = "image1"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """torchvision's RAFT initialisation, leaf by leaf (transformers initialises parameter-holding modules only):
        Kaiming fan-out convolutions and unit norms in the two encoders, PyTorch's defaults everywhere else."""
        if getattr(module, "_in_raft_encoder", False):
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                return
            if isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)) and module.weight is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                return
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


class RaftForOpticalFlow(RaftPreTrainedModel):
    """RAFT estimating dense optical flow from `image1` to `image2` (RGB scaled to [-1, 1], H and W multiples of 8
    and at least 128, as torchvision's RAFT requires)."""

    def __init__(self, config: RaftConfig):
        super().__init__(config)
        self.raft = build_raft(config.variant)
        for encoder in (self.raft.feature_encoder, self.raft.context_encoder):
            for module in encoder.modules():
                module._in_raft_encoder = True
        self.post_init()

    def forward(
        self,
        image1: torch.Tensor,
        image2: torch.Tensor,
        labels: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        num_flow_updates: int | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> OpticalFlowOutput | tuple:
        """`labels`: ground-truth flow [B, 2, H, W]; `valid`: bool [B, H, W] marking pixels whose flow is known."""
        iterations = num_flow_updates or self.config.num_flow_updates
        flows = self.raft(image1, image2, num_flow_updates=iterations)
        loss = None
        if labels is not None:
            loss = sequence_loss(flows, labels, valid, self.config.loss_gamma, self.config.max_flow)
        output = OpticalFlowOutput(loss=loss, predicted_flow=flows[-1], flow_predictions=tuple(flows))
        return output if return_dict is not False else output.to_tuple()
