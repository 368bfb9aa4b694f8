"""The protocol between node and hub: pydantic models of every message, and binary frames.

Node and hub never import each other; they meet here.
"""

from aipipe.wire.frames import FrameError, pack_frame, unpack_frame
from aipipe.wire.messages import (
    PROTOCOL_VERSION,
    WORK_ITEM,
    Decline,
    EnrolRequest,
    EnrolResponse,
    EnrolToken,
    EvalReport,
    EvaluateWork,
    FeatureStats,
    IdleWork,
    ModelVersionInfo,
    NodeInfo,
    RoundInfo,
    RoundOpen,
    RoundState,
    RoundWork,
    SecureMode,
    StudyInfo,
    StudyPublish,
    UpdateHeader,
    UpdateReceipt,
    WorkItem,
)

__all__ = [
    "PROTOCOL_VERSION",
    "WORK_ITEM",
    "Decline",
    "EnrolRequest",
    "EnrolResponse",
    "EnrolToken",
    "EvalReport",
    "EvaluateWork",
    "FeatureStats",
    "FrameError",
    "IdleWork",
    "ModelVersionInfo",
    "NodeInfo",
    "RoundInfo",
    "RoundOpen",
    "RoundState",
    "RoundWork",
    "SecureMode",
    "StudyInfo",
    "StudyPublish",
    "UpdateHeader",
    "UpdateReceipt",
    "WorkItem",
    "pack_frame",
    "unpack_frame",
]
