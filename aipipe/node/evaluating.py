"""What a node does with an evaluate work item: evaluate a round's result on its test split if
the result's lineage verifies, keep the numbers here, and send the hub an acknowledgement —
with the study's DP validation histogram, charged before it leaves, if the study asks for one.
It keeps the verified weights too (`aipipe.node.kept_versions`): the validation gate falls back
to them without asking the hub, which would tell it that the current version fails here.
When the study personalizes, the node records the verified version to make its personal model
from when it is idle (`aipipe.node.personal_pending`), after the acknowledgement: nothing of it
is in the acknowledgement, and making it does not delay the node's next round."""

from __future__ import annotations

from aipipe.errors import NotFoundError
from aipipe.models import arrays_to_model
from aipipe.models.errors import UnverifiedModelError
from aipipe.models.training import evaluate
from aipipe.node.kept_versions import KeptVersions
from aipipe.node.lineage import LocalEvaluation, ModelLineage
from aipipe.node.personal import personalizes
from aipipe.node.personal_pending import Pending, record_pending
from aipipe.node.site import SiteNode, audit_cohorts, audit_refusal
from aipipe.node.validation import Assessment, assess, release_histogram
from aipipe.personalization import personalizer_for
from aipipe.privacy.engine import VALIDATION
from aipipe.privacy.errors import PrivacyError
from aipipe.study.spec import StudySpec
from aipipe.wire import EvalReport, EvaluateWork
from aipipe.wire.messages import CalibrationHistogram
from aipipe.wire.tensors import decode_arrays


def evaluate_work(node: SiteNode, spec: StudySpec, item: EvaluateWork) -> str:
    """Evaluate a round's result on the test split, if its lineage verifies; keep the
    numbers here. The hub gets an acknowledgement without exact numbers either way (so it
    stops offering the version): an exact n_test, accuracy, AUC or loss leaks labels. A
    study with `validation.epsilon` gets the DP histogram too (`aipipe.node.validation`)."""
    version, lineage = item.version, ModelLineage(node.store.db)
    try:
        lineage.require_round(spec.name, item.round, version)
        announced = node.client.round(spec.name, item.round).result_version
        raw = node.client.model_weights(version)
        lineage.verify(spec.name, item.round, version, announced, raw)
    except (UnverifiedModelError, NotFoundError) as exc:
        audit_refusal(node, "evaluate", spec, item.round, exc)
        node.client.report(EvalReport(version=version))
        return f"refused to evaluate {version[:12]}: {exc}"
    matrix, weights = node.features(spec), decode_arrays(raw)
    # Every tensor of the method's architecture (FENDA's too): the hub keeps them all.
    model = arrays_to_model(weights, personalizer_for(spec).build(len(matrix.columns)))
    result = evaluate(model, matrix.x_test, matrix.y_test)
    assessment = assess(spec, model, matrix)  # calibration too; exact, kept here
    card = assessment.report.as_card()
    lineage.save(LocalEvaluation(spec.name, version, item.round, **result.__dict__,
                                 validation=card))  # fmt: skip
    # Its weights too, so the validation gate can fall back to it without asking the hub.
    KeptVersions(node.store).keep(spec.name, item.round, version, raw)
    calibration = _release_validation(node, spec, item.round, assessment)
    released = "nothing" if calibration is None else f"{VALIDATION} histogram (DP)"
    node.audit.append(
        "evaluate",
        actor=node.name,
        resource=f"model/{version}",
        details={"study": spec.name, "round": item.round, "released": released},
    )
    node.client.report(EvalReport(version=version, calibration=calibration))
    mine = ""
    if personalizes(spec):
        mine = record_pending(node, spec, Pending(spec.name, item.study_digest, item.round,
                                                  version, raw))  # fmt: skip
    return f"evaluated {version[:12]} (kept on this node): accuracy={result.accuracy:.3f}{mine}"


def _release_validation(
    node: SiteNode, spec: StudySpec, number: int, assessment: Assessment
) -> CalibrationHistogram | None:
    """The study's DP validation histogram, charged before it leaves (None if it asks for
    none or the budget refuses it: then the hub does not serve this version)."""
    engine = node.privacy()
    before = engine.ledger.groups()
    try:
        histogram = release_histogram(engine, spec, number, assessment, node.cohort(spec))
    except PrivacyError as exc:
        audit_refusal(node, VALIDATION, spec, number, exc)
        return None
    audit_cohorts(node, before, engine.ledger.groups())
    return histogram
