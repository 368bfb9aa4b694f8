"""The `Personalizer` ABC: each site's own model beside the federated one.

A method splits the study's model into a shared part, federated exactly as a study without
personalization federates its whole model (DP-SGD, clipped, summed in clear or securely, by any
aggregator), and a local part that never leaves the node:

    method = personalizer_for(spec)               # the study's `personalization:` block
    model = method.build(n_features, seed=0)      # the whole architecture
    arrays_to_model(global_weights, model)        # the hub keeps every parameter of it, but
                                                  # only `method.shared(model)` ever changes
    out = method.train_round(model, state, data, noise_multiplier=σ, seed=s)
    out.result.delta                              # shared names only: clipped, charged, sent
    out.state                                     # local training state: the node store keeps it
    personal = method.personalize(model, state, carry, data, seed=s)   # the site's own model

Two kinds of local state are kept apart, because of what DP-SGD's guarantee assumes (Abadi et
al. 2016): each step's gradient is taken at parameters that are public, or post-processing of
earlier noised steps.

* The training state (`RoundOutput.state`) is what the next round's shared training reads:
  FedPer's head, FENDA's local extractor and head. `train_round` updates it only with the same
  steps that make the shared update (under `privacy.mode: dp`, one clipped and noised DP-SGD
  step over every parameter, of which only the shared part leaves), so the shared update stays
  a DP release and the local part costs no ε of its own.
* The personal model (`personalize`) is what the site predicts with: the new global version and
  the training state, refined by local training that nothing shared ever reads again
  (fine-tuning, Ditto's personal objective), with what it tries chosen on the validation split.
  It is derived from patients' data without noise, so it never leaves the node (README,
  "Personalization"); `carry` is what the next `personalize` starts from (Ditto's v).
"""

from __future__ import annotations

import math
from abc import ABC
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
from torch import nn

from aipipe.models import build_model, weights_to_arrays
from aipipe.models.serialization import Arrays, arrays_to_model
from aipipe.models.training import EvalResult, TrainResult, evaluate, train_local
from aipipe.study.blocks import ModelSpec, Privacy, Training
from aipipe.study.features import FeatureMatrix
from aipipe.study.personal import Personalization

NO_DP = Privacy(mode="none")
"""Local training that nothing shared reads again: the personal model stays on the node."""


@dataclass(frozen=True)
class SiteData:
    """A site's fit split (its train split less validation) and its validation split. The test
    split is never given to a personalizer: nothing is chosen on it."""

    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @classmethod
    def of(cls, matrix: FeatureMatrix) -> SiteData:
        """A site's extracted matrices (`x_train` is the fit split when the study carves a
        validation split out of it)."""
        return cls(matrix.x_train, matrix.y_train, matrix.x_val, matrix.y_val)


@dataclass(frozen=True)
class RoundOutput:
    """One round at one site: the shared update and the local training state after it."""

    result: TrainResult  # weights and delta over the shared names only
    state: Arrays  # the local (never shared) parameters, {} when all are shared


@dataclass(frozen=True)
class PersonalModel:
    """The whole model a site predicts with, and how it was chosen (on validation only)."""

    weights: Arrays
    validation: EvalResult
    chosen: dict[str, float] = field(default_factory=dict)
    carry: Arrays = field(default_factory=dict)  # what the next `personalize` starts from


class Personalizer(ABC):
    """One personalization method. The defaults are those of a study without one (`none`):
    every parameter shared, the global model is the personal model.

    Subclasses set `name` (the registry key and the study's `personalization.method`), and
    override `build` (another architecture), `shared` (keep a part local) and `personalize`
    (refine locally). `global_predicts` is False when the global model alone is no predictor
    (its head or local extractor never trained): the hub then serves no CDS for the study.
    `requires_body` is True when the method federates the body only: `personalizer_for`
    refuses it with `model.kind: logistic`, whose identity body leaves nothing to federate.
    """

    name: ClassVar[str]
    global_predicts: ClassVar[bool] = True
    requires_body: ClassVar[bool] = False  # refused with `model.kind: logistic` (no body)

    def __init__(
        self, *, model: ModelSpec, settings: Personalization, training: Training, privacy: Privacy
    ) -> None:
        self.model = model
        self.settings = settings
        self.training = training
        self.privacy = privacy

    def build(self, n_features: int, *, seed: int | None = None) -> nn.Module:
        """The whole model (shared and local parts) for `n_features` inputs."""
        return build_model(self.model, n_features, seed=seed)

    def shared(self, model: nn.Module) -> list[str]:
        """The names of the tensors that are federated: sent, aggregated, versioned."""
        return list(model.state_dict())

    def local(self, model: nn.Module) -> list[str]:
        """The names of the tensors that never leave the node."""
        shared = set(self.shared(model))
        return [name for name in model.state_dict() if name not in shared]

    def train_round(
        self,
        model: nn.Module,
        state: Arrays,
        data: SiteData,
        *,
        noise_multiplier: float | None,
        seed: int,
    ) -> RoundOutput:
        """Train `model` (the global weights loaded) with the site's training `state` in its
        local part, jointly, as the study trains (DP-SGD under `privacy.mode: dp`); return the
        update of the shared part and the new state of the local part."""
        if state:
            arrays_to_model(state, model, strict=False)
        result = train_local(
            model,
            data.x_fit,
            data.y_fit,
            training=self.training,
            privacy=self.privacy,
            noise_multiplier=noise_multiplier,
            seed=seed,
        )
        local = self.local(model)
        return RoundOutput(
            result=restrict(result, self.shared(model)),
            state={name: result.weights[name] for name in local},
        )

    def personalize(
        self, model: nn.Module, state: Arrays, carry: Arrays, data: SiteData, *, seed: int
    ) -> PersonalModel:
        """The site's own model for the global weights loaded in `model`: by default the
        global weights with the training state in the local part, as they are."""
        if state:
            arrays_to_model(state, model, strict=False)
        return PersonalModel(
            weights=weights_to_arrays(model), validation=evaluate(model, data.x_val, data.y_val)
        )

    def local_training(self) -> Training:
        """The settings of local-only training: the study's, with the block's steps and lr."""
        lr = self.settings.lr if self.settings.lr is not None else self.training.lr
        return self.training.model_copy(update={"local_steps": self.settings.steps, "lr": lr})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings.model_dump(exclude_defaults=True)})"


def restrict(result: TrainResult, names: list[str]) -> TrainResult:
    """`result` with its weights and delta cut to `names` and the update norm recomputed: what
    leaves the node is the shared part only."""
    delta = {name: result.delta[name] for name in names}
    norm = math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in delta.values()))
    weights = {name: result.weights[name] for name in names}
    return replace(result, weights=weights, delta=delta, update_norm=norm)
