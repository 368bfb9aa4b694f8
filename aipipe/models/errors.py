"""Errors raised when model weights cannot be read or do not fit the model.

AipipeError
└── ModelError                 weights that cannot be used
    ├── ModelFormatError       bytes that are not a valid safetensors file, or non-finite values
    ├── ModelMismatchError     names or shapes that do not match the model they are loaded into
    └── UnverifiedModelError   a version that is not the result of a round this node took part in
"""

from __future__ import annotations

from aipipe.errors import AipipeError


class ModelError(AipipeError):
    """Model weights cannot be used."""

    exit_code = 18


class ModelFormatError(ModelError):
    """Bytes are not a valid safetensors file, or they hold NaN or infinite weights."""


class ModelMismatchError(ModelError):
    """Weights name a tensor the model lacks, lack one it has, or have the wrong shape."""


class UnverifiedModelError(ModelError):
    """A model version whose lineage this node cannot verify: it evaluates none such."""
