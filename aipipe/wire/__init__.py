"""The protocol between node and hub: pydantic models of every message, and binary frames.

Node and hub never import each other; they meet here.
"""

from aipipe.wire.frames import FrameError, pack_frame, unpack_frame
from aipipe.wire.messages import (
    PROTOCOL_VERSION,
    Decline,
    EnrolRequest,
    EnrolResponse,
    EnrolToken,
    EvalReport,
    FeatureStats,
    ModelVersionInfo,
    NodeInfo,
    RoundInfo,
    RoundOpen,
    RoundState,
    SecureMode,
    StudyInfo,
    StudyPublish,
    UpdateHeader,
    UpdateReceipt,
    WorkItem,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Decline",
    "EnrolRequest",
    "EnrolResponse",
    "EnrolToken",
    "EvalReport",
    "FeatureStats",
    "FrameError",
    "ModelVersionInfo",
    "NodeInfo",
    "RoundInfo",
    "RoundOpen",
    "RoundState",
    "SecureMode",
    "StudyInfo",
    "StudyPublish",
    "UpdateHeader",
    "UpdateReceipt",
    "WorkItem",
    "pack_frame",
    "unpack_frame",
]
