"""Configuration of RAFT optical-flow networks (Teed & Deng, 2020) as transformers models."""

from __future__ import annotations

from transformers import PretrainedConfig

RAFT_VARIANTS = ("large", "small")


class RaftConfig(PretrainedConfig):
    """Which torchvision RAFT to build and how to train it.

    Args:
        variant: `"large"` (RAFT, 5.3M parameters) or `"small"` (RAFT-small, 1.0M), as in torchvision.
        num_flow_updates: recurrent refinement iterations per forward (12 in the paper's training).
        loss_gamma: weight decay over iterations of the RAFT sequence loss (iteration i of N weighs gamma^(N-1-i)).
        max_flow: ground-truth flows at least this long (pixels) are left out of the loss, as in RAFT's training.
    """

    model_type = "raft"

    def __init__(
        self,
        variant: str = "large",
        num_flow_updates: int = 12,
        loss_gamma: float = 0.8,
        max_flow: float = 400.0,
        **kwargs,
    ):
        if variant not in RAFT_VARIANTS:
            raise ValueError(f"RAFT variant must be one of {RAFT_VARIANTS}, got '{variant}'.")
        if num_flow_updates < 1:
            raise ValueError(f"num_flow_updates must be >= 1, got {num_flow_updates}.")
        if not 0.0 < loss_gamma <= 1.0:
            raise ValueError(f"loss_gamma must lie in (0, 1], got {loss_gamma}.")
        self.variant = variant
        self.num_flow_updates = num_flow_updates
        self.loss_gamma = loss_gamma
        self.max_flow = max_flow
        super().__init__(**kwargs)
