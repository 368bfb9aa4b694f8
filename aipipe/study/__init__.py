"""Study definitions (YAML → pydantic) and feature extraction (store → tensors)."""

from aipipe.study.spec import StudySpec, load_study

__all__ = ["StudySpec", "load_study"]
