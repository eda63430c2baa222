from .configuration_raft import RAFT_VARIANTS, RaftConfig
from .modeling_raft import OpticalFlowOutput, RaftForOpticalFlow, RaftPreTrainedModel, end_point_error, sequence_loss

__all__ = [
    "RAFT_VARIANTS",
    "OpticalFlowOutput",
    "RaftConfig",
    "RaftForOpticalFlow",
    "RaftPreTrainedModel",
    "end_point_error",
    "sequence_loss",
]
