"""Torch models for studies (body and head), their local training, and safe serialization."""

from aipipe.models.errors import ModelError, ModelFormatError, ModelMismatchError
from aipipe.models.fenda import FendaModel, build_fenda
from aipipe.models.serialization import (
    Arrays,
    arrays_to_model,
    weights_to_arrays,
)
from aipipe.models.split import SplitModel, build_model

__all__ = [
    "Arrays",
    "FendaModel",
    "ModelError",
    "ModelFormatError",
    "ModelMismatchError",
    "SplitModel",
    "arrays_to_model",
    "build_fenda",
    "build_model",
    "weights_to_arrays",
]
