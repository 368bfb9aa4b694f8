"""`HubClient`: the node's only way to talk to the hub (httpx, retries with backoff).

Connection failures and 502–504 answers are retried with exponential backoff and then raised
as `HubUnavailableError`: `max_retries` times, or, inside `retrying_until(t)`, until the
monotonic time t (a SecAgg+ round retries for its stage deadline, so it outlives a hub restart).
Other error answers become, at once, the `AipipeError` the hub raised: its class name travels
in the body (`aipipe.errors.error_from_body`), with the hub's reason.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel

from aipipe.audit.anchor import HEADER as AUDIT_HEAD_HEADER
from aipipe.errors import ConfigError, HubUnavailableError, error_from_body
from aipipe.secure.errors import SecAggRoundFailedError
from aipipe.tls import HubTransport
from aipipe.wire import (
    WORK_ITEM,
    ClientCert,
    ClientCertRequest,
    Decline,
    EnrolRequest,
    EnrolResponse,
    EvalReport,
    RoundInfo,
    StudyInfo,
    UpdateReceipt,
    WorkItem,
)
from aipipe.wire.frames import MEDIA_TYPE
from aipipe.wire.people import TokenGrant, TokenRequest
from aipipe.wire.secure import CkksKeyInfo, CkksKeys, Keyring, SecAggRoundConfig, SecAggStep

M = TypeVar("M", bound=BaseModel)

_RETRY_STATUS = {502, 503, 504}
MAX_RETRY_DELAY_S = 2.0  # backoff cap while retrying until a deadline: reconnect soon after


class HubClient:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
        on_audit_head: Callable[[str], None] | None = None,
        ca_bundle: Path | None = None,
        ca_only: bool = False,
        client_pair: tuple[bytes, bytes] | None = None,
    ) -> None:
        """`on_audit_head` is given the hub's signed audit head from each response that has
        one (`aipipe.audit.HeadRecorder.observe` keeps the highest in the node home).
        `ca_bundle` adds the consortium's CA to the public ones, or with `ca_only` is the only
        CA trusted (the one the enrolment token pinned; `aipipe.tls.HubTransport`).
        `client_pair` (PEM certificate and key) is the node's TLS client certificate, presented
        to a hub that requires mutual TLS."""
        if max_retries < 0 or backoff_s < 0:
            raise ValueError("max_retries and backoff_s must be ≥ 0")
        if urlsplit(base_url).scheme not in ("http", "https") or "://" not in base_url:
            raise ConfigError(
                f"hub URL {base_url!r} needs http:// or https://, e.g. http://{base_url}"
            )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        hooks = {"response": [_audit_head_hook(on_audit_head)]} if on_audit_head else {}
        self._tls = (
            None
            if transport is not None
            else HubTransport(ca_bundle, only=ca_only, client_pair=client_pair)
        )
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout_s,
            transport=transport or self._tls,
            event_hooks=hooks,
        )
        self._retries = max_retries
        self._backoff = backoff_s
        self.sleep = sleep  # between retries; the daemon's wait ends at SIGTERM
        self._until: float | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def retrying_until(self, until: float) -> Iterator[None]:
        """Inside the block, retry an unreachable hub until the monotonic time `until`."""
        previous, self._until = self._until, until
        try:
            yield
        finally:
            self._until = previous

    def _may_retry(self, attempt: int, delay: float) -> bool:
        if self._until is None:
            return attempt < self._retries
        return time.monotonic() + delay < self._until

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        delay = self._backoff
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if not self._may_retry(attempt, delay):
                    raise HubUnavailableError(
                        f"cannot reach the hub at {self.base_url}: {type(exc).__name__}; "
                        "is `aipipe hub serve` running?"
                    ) from exc
            else:
                if response.status_code not in _RETRY_STATUS:
                    return _checked(response)
                if not self._may_retry(attempt, delay):
                    raise HubUnavailableError(
                        f"the hub at {self.base_url} answered {response.status_code} "
                        f"{attempt + 1} times"
                    )
            self.sleep(delay)
            attempt += 1
            delay = delay * 2 if self._until is None else min(delay * 2, MAX_RETRY_DELAY_S)

    def _json(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate(self._request(method, path, **kwargs).json())

    # -- calls ---------------------------------------------------------------------------

    def login(self, request: TokenRequest) -> TokenGrant:
        """A person's token for their password and TOTP code (`aipipe login`)."""
        return self._json(TokenGrant, "POST", "/v1/auth/token", json=request.model_dump())

    def health(self) -> dict[str, Any]:
        data: dict[str, Any] = self._request("GET", "/healthz").json()
        return data

    def enrol(self, request: EnrolRequest) -> EnrolResponse:
        return self._json(EnrolResponse, "POST", "/v1/enrol", json=request.model_dump())

    def renew_certificate(self, csr: str) -> ClientCert:
        """A new TLS client certificate for the key of `csr` (this node's name)."""
        body = ClientCertRequest(csr=csr).model_dump()
        return self._json(ClientCert, "POST", "/v1/node/certificate", json=body)

    def present(self, client_pair: tuple[bytes, bytes]) -> None:
        """Present a renewed client certificate (PEM certificate, key) from now on."""
        if self._tls is None:
            raise ConfigError("this hub client was given its own transport; it has no TLS to renew")
        self._tls.present(client_pair)

    def work(self, wait_s: float, skip: Sequence[str] = ()) -> WorkItem:
        """The next work item; `skip` names studies whose work this node declines for now."""
        params: dict[str, Any] = {"wait": wait_s}
        if skip:
            params["skip"] = list(skip)
        response = self._request("GET", "/v1/work", params=params, timeout=wait_s + 30)
        return WORK_ITEM.validate_python(response.json())

    def study(self, name: str) -> StudyInfo:
        return self._json(StudyInfo, "GET", f"/v1/studies/{name}")

    def publish(self, spec: dict[str, Any]) -> StudyInfo:
        return self._json(StudyInfo, "POST", "/v1/studies", json={"spec": spec})

    def open_round(self, study: str, deadline_s: float | None) -> RoundInfo:
        return self._json(
            RoundInfo, "POST", f"/v1/studies/{study}/rounds", json={"deadline_s": deadline_s}
        )

    def round(
        self, study: str, number: int, *, changed_from: RoundInfo | None = None, wait_s: float = 0
    ) -> RoundInfo:
        """The round; with `changed_from`, wait up to `wait_s` for its state or metrics to move."""
        params: dict[str, str | float | int] = {}
        if changed_from is not None:
            params = {
                "wait": wait_s,
                "state": changed_from.state,
                "metrics": len(changed_from.metrics),
            }
        return self._json(
            RoundInfo,
            "GET",
            f"/v1/studies/{study}/rounds/{number}",
            params=params,
            timeout=wait_s + 30,
        )

    def rounds(self, study: str) -> list[RoundInfo]:
        data = self._request("GET", f"/v1/studies/{study}/rounds").json()
        return [RoundInfo.model_validate(item) for item in data]

    def model_weights(self, version: str) -> bytes:
        return self._request("GET", f"/v1/models/{version}/weights").content

    def models(self, study: str | None = None) -> list[dict[str, Any]]:
        params = {"study": study} if study else {}
        data: list[dict[str, Any]] = self._request("GET", "/v1/models", params=params).json()
        return data

    def model(self, version: str) -> dict[str, Any]:
        data: dict[str, Any] = self._request("GET", f"/v1/models/{version}").json()
        return data

    def nodes(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._request("GET", "/v1/nodes").json()
        return data

    def upload(self, study: str, number: int, frame: bytes) -> UpdateReceipt:
        return self._json(
            UpdateReceipt,
            "POST",
            f"/v1/studies/{study}/rounds/{number}/updates",
            content=frame,
            headers={"Content-Type": MEDIA_TYPE},
        )

    def decline(self, study: str, number: int, reason: str, *, exclude: bool) -> None:
        body = Decline(reason=reason, exclude=exclude).model_dump()
        self._request("POST", f"/v1/studies/{study}/rounds/{number}/decline", json=body)

    def report_stats(self, study: str, body: bytes) -> None:
        """Send a `FeatureStats` as the exact JSON bytes the ledger charged (and keeps)."""
        self._request(
            "POST",
            f"/v1/studies/{study}/stats",
            content=body,
            headers={"Content-Type": "application/json"},
        )

    def report(self, report: EvalReport) -> None:
        self._request(
            "POST", f"/v1/models/{report.version}/metrics", json=report.model_dump(mode="json")
        )

    # -- secure aggregation ----------------------------------------------------------------

    def keyring(self) -> Keyring:
        return self._json(Keyring, "GET", "/v1/keyring")

    def _round_path(self, study: str, number: int) -> str:
        return f"/v1/studies/{study}/rounds/{number}"

    def secagg_config(self, study: str, number: int) -> SecAggRoundConfig:
        path = self._round_path(study, number) + "/secagg/config"
        return self._json(SecAggRoundConfig, "GET", path)

    def secagg_post(self, study: str, number: int, step: SecAggStep, message: BaseModel) -> None:
        path = self._round_path(study, number) + f"/secagg/{step}"
        self._request(
            "POST",
            path,
            content=message.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )

    def secagg_wait(
        self, study: str, number: int, step: SecAggStep, model: type[M], *, until: float
    ) -> M:
        """Long-poll `step` until the hub closes the stage before it (`until`: monotonic)."""
        path = self._round_path(study, number) + f"/secagg/{step}"
        while (left := until - time.monotonic()) > 0:
            wait = min(left, 20.0)
            response = self._request("GET", path, params={"wait": wait}, timeout=wait + 30)
            if response.status_code == 200:
                return model.model_validate_json(response.content)
        raise SecAggRoundFailedError(
            f"the hub did not release {step} for round {number} of '{study}' before its deadline"
        )

    def ckks_post_keys(self, study: str, keys: CkksKeys) -> None:
        self._request(
            "POST",
            f"/v1/studies/{study}/ckks/keys",
            content=keys.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )

    def ckks_key_info(self, study: str) -> CkksKeyInfo:
        return self._json(CkksKeyInfo, "GET", f"/v1/studies/{study}/ckks/keys")

    def ckks_bundle(self, study: str, number: int) -> bytes:
        return self._request("GET", self._round_path(study, number) + "/ckks/sum").content

    def ckks_decrypted(self, study: str, number: int, frame: bytes) -> None:
        self._request(
            "POST",
            self._round_path(study, number) + "/ckks/decrypted",
            content=frame,
            headers={"Content-Type": MEDIA_TYPE},
        )


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": response.text[:200]}
    detail = str(body.get("detail", response.text[:200]))
    status = response.status_code
    raise error_from_body(status, body, f"hub answered {status}: {detail}")


def _audit_head_hook(record: Callable[[str], None]) -> Callable[[httpx.Response], None]:
    def hook(response: httpx.Response) -> None:
        head = response.headers.get(AUDIT_HEAD_HEADER)
        if head:
            record(head)

    return hook
