"""The IBM adapter: fake devices in the SDK's local testing mode, and the cloud path offline.

Offline path: the real `SamplerV2(mode=FakeManilaV2())` of qiskit-ibm-runtime, on Aer with the
device's noise model, driven through a real MCP client session.

Cloud path: the real `QiskitRuntimeService`, `SamplerV2`, `RuntimeJobV2` and their REST clients
(requests, ibm_cloud_sdk_core's IAM token manager, the Global Search and Catalog clients) talk to
a small HTTP server on 127.0.0.1. The seam is the one every requests-based client honours: the
`HTTP_PROXY` environment variable. The account URL is `http://cloud.test`, from which the SDK
derives `iam.cloud.test` (the IAM token exchange), `api.global-search-tagging.cloud.test` and
`globalcatalog.cloud.test` (instance lookup) and `quantum.cloud.test/api/v1` (the runtime API);
all of them reach the loopback server as proxy requests, which answers them from fixtures: the
configuration and properties of the SDK's own fake Manila snapshot, and a SamplerV2 result
encoded with the SDK's own RuntimeEncoder. No SDK code is patched.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from qpu_gateway.adapters import ibm, sdk_thread
from qpu_gateway.adapters.base import (
    JobSpec,
    PermanentError,
    ProviderRef,
    ProviderState,
    QuotaError,
    TransientError,
)
from qpu_gateway.adapters.ibm import IbmAdapter, classify
from qpu_gateway.config import Config
from qpu_gateway.errors import Unavailable
from qpu_gateway.jobs.providers import Providers
from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, in_memory, new_key

pytestmark = pytest.mark.anyio

FAKE_TOKEN = "ibm-test-token-4f1c9e0b7a2d"  # never a real credential; searched for in every output
CRN = "crn:v1:bluemix:public:quantum-computing:us-east:a/abc123:inst-1::"
DEVICE = "ibm_loopback"
POLICY = '[defaults]\nallowed_backends = ["aer/*", "ibm/*"]\nloop_guard = { max_repeats = 1000 }\n'


def _clear_ibm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QISKIT_IBM_TOKEN", "QISKIT_IBM_INSTANCE", "QISKIT_IBM_CHANNEL", "QISKIT_IBM_URL", "IAM_URL"):
        monkeypatch.delenv(name, raising=False)


async def _gateway_with(config: Config, adapter: IbmAdapter) -> Gateway:
    config.policy_path.write_text(POLICY, encoding="utf-8")
    gateway = Gateway(config)
    gateway.providers.adapters["ibm"] = adapter
    return gateway


# -- offline: local testing mode through a real MCP session -----------------------------------


async def test_bell_on_fake_manila_runs_noisy_through_an_mcp_session(
    config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _clear_ibm_env(monkeypatch)
    monkeypatch.setenv("QISKIT_IBM_TOKEN", FAKE_TOKEN)  # set, but without an instance URL that answers
    monkeypatch.setenv("QISKIT_IBM_URL", "http://127.0.0.1:9")  # a closed port: the cloud must be unavailable
    caplog.set_level(logging.DEBUG)
    adapter = IbmAdapter()
    gateway = await _gateway_with(config, adapter)
    key = await new_key(config.database, "alice")
    outputs: list[str] = []
    async with gateway.running(), in_memory(gateway, key) as client:
        listed = await client.call_tool("list_backends", {})
        outputs.append(json.dumps(listed.structured_content))
        backends = {b["id"]: b for b in listed.structured_content["backends"]}
        manila = backends["ibm/fake_manila"]
        assert manila["qubits"] == 5 and manila["status"] == "online" and manila["price_model"] == "free"
        assert manila["max_shots"] == 100000
        assert {"ibm/fake_brisbane", "ibm/fake_sherbrooke", "ibm/fake_kyiv"} <= set(backends)
        assert backends["ibm/*"]["status"] == "unavailable"

        submitted = await client.call_tool(
            "submit_job", {"circuit": BELL2, "backend": "ibm/fake_manila", "shots": 2000}
        )
        outputs.append(json.dumps(submitted.structured_content))
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 60})
        outputs.append(json.dumps(done.structured_content))
    job = done.structured_content
    assert job["state"] == "succeeded", job
    counts = job["result"]["counts"][0]["c"]
    assert sum(counts.values()) == 2000
    assert counts.get("00", 0) + counts.get("11", 0) > 1600  # a Bell pair ...
    assert counts.get("01", 0) + counts.get("10", 0) > 0  # ... with the device's noise
    outputs.append(caplog.text)
    assert not any(FAKE_TOKEN in text for text in outputs)


async def test_backends_show_basis_gates_and_the_cloud_entry_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_ibm_env(monkeypatch)
    monkeypatch.setattr("qiskit_ibm_runtime.accounts.management._DEFAULT_ACCOUNT_CONFIG_JSON_FILE", "/nonexistent/x")
    found = {b.id: b for b in await IbmAdapter().backends()}
    assert found["ibm/fake_manila"].basis_gates == ("cx", "id", "rz", "sx", "x")
    assert found["ibm/fake_torino"].qubits == 133
    cloud = found["ibm/*"]
    assert cloud.status == "unavailable"
    assert cloud.reason is not None and "QISKIT_IBM_TOKEN" in cloud.reason and "QISKIT_IBM_INSTANCE" in cloud.reason


async def test_a_circuit_too_wide_for_the_device_is_permanent() -> None:
    wide = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[6];\ncreg c[6];\nh q[0];\nmeasure q -> c;\n'
    with pytest.raises(PermanentError, match="6 qubits"):
        await IbmAdapter().submit(JobSpec("wide", "ibm/fake_manila", (wide,), 100))


async def test_local_submit_twice_runs_once_and_cancel_drops_it() -> None:
    adapter = IbmAdapter()
    spec = JobSpec("job-local-1", "ibm/fake_manila", (BELL2,), 100)
    first = await adapter.submit(spec)
    second = await adapter.submit(spec)
    assert first == second and adapter.submissions == 1
    await adapter.cancel(first)
    status = await adapter.status(first)
    assert status.state is ProviderState.UNKNOWN  # nothing held: a restarted worker would run it again


# -- the error table, entry by entry ----------------------------------------------------------


def _sdk_errors() -> list[tuple[BaseException, type[Exception]]]:
    import requests
    from qiskit.transpiler.exceptions import TranspilerError
    from qiskit_ibm_runtime.accounts.exceptions import AccountNotFoundError, InvalidAccountError
    from qiskit_ibm_runtime.api.exceptions import RequestsApiError
    from qiskit_ibm_runtime.exceptions import (
        IBMInputValueError,
        IBMNotAuthorizedError,
        IBMRuntimeError,
        RuntimeJobFailureError,
    )

    def caused_by(outer: BaseException, cause: BaseException) -> BaseException:
        outer.__cause__ = cause
        return outer

    def wrapped(status: int, text: str = "error") -> BaseException:
        # How the SDK reports a failed submit: `raise IBMRuntimeError(...) from None` inside an except.
        try:
            try:
                raise RequestsApiError(text, status)
            except RequestsApiError as ex:
                raise IBMRuntimeError(f"Failed to run program: {ex}") from None
        except IBMRuntimeError as outer:
            return outer

    return [
        (RequestsApiError("429 Client Error: Too Many Requests", 429), TransientError),
        (wrapped(429), TransientError),
        (RequestsApiError("408 Request Timeout", 408), TransientError),
        (requests.exceptions.ReadTimeout("read timed out"), TransientError),
        (requests.exceptions.ConnectionError("connection reset"), TransientError),
        (TimeoutError("timed out"), TransientError),
        *[(RequestsApiError(f"{code} Server Error", code), TransientError) for code in (500, 502, 503, 504, 520)],
        (RequestsApiError("Please check if the service is in maintenance mode"), TransientError),
        (ibm.BackendOfflineError("ibm_x is not operational (paused)"), TransientError),
        (wrapped(403, "403 Forbidden. Instance usage limit reached, Error code: 1352."), QuotaError),
        (wrapped(429, "There is currently no more time available for this instance's plan"), QuotaError),
        (RequestsApiError("Monthly quota exceeded", 400), QuotaError),
        (IBMNotAuthorizedError("401 Client Error: Unauthorized"), PermanentError),
        (RequestsApiError("403 Client Error: Forbidden", 403), PermanentError),
        (wrapped(400, "400 Bad Request. Invalid circuit"), PermanentError),
        (wrapped(422), PermanentError),
        (InvalidAccountError("Unable to retrieve instances."), PermanentError),
        (
            caused_by(
                InvalidAccountError("Unable to retrieve instances."), requests.exceptions.ConnectionError("no route")
            ),
            TransientError,
        ),  # the SDK's wrapping of an IAM it could not reach
        (AccountNotFoundError("Unable to find account."), PermanentError),
        (IBMInputValueError("bad input"), PermanentError),
        (RuntimeJobFailureError("Unable to retrieve job result."), PermanentError),
        (TranspilerError("Unable to translate the operations in the circuit"), PermanentError),
        (ValueError("The instruction foo on qubits (0,) is not supported by the target"), PermanentError),
        (RuntimeError("something nobody has seen before"), PermanentError),
    ]


def test_every_error_class_maps_as_the_table_says() -> None:
    cases = _sdk_errors()
    for exc, expected in cases:
        got = classify(exc)
        assert type(got) is expected, (exc, got)
        assert got.args[0].startswith("IBM Quantum:")
    # every HTTP status in the table is exercised by the table itself
    from qiskit_ibm_runtime.api.exceptions import RequestsApiError

    for code, kind in ibm.HTTP_STATUS_ERRORS.items():
        assert type(classify(RequestsApiError(f"HTTP {code}", code))) is kind, code


def test_a_token_in_an_sdk_message_never_reaches_the_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QISKIT_IBM_TOKEN", FAKE_TOKEN)
    from qiskit_ibm_runtime.accounts.exceptions import InvalidAccountError

    got = classify(InvalidAccountError(f"Invalid `token` value. got '{FAKE_TOKEN}' instead."))
    assert FAKE_TOKEN not in str(got) and "***" in str(got)


# -- the cloud path against a loopback IBM ----------------------------------------------------


def _jwt(lifetime_s: int = 3600) -> str:
    """An unsigned JWT shaped like IAM's (ibm_cloud_sdk_core reads `exp` and `iat` from it)."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part({'iat': now, 'exp': now + lifetime_s})}.c2ln"


@dataclass
class LoopbackIbm:
    """IBM Cloud IAM, Global Search/Catalog and the Qiskit Runtime REST API, as fixtures."""

    config: dict[str, Any]
    properties: dict[str, Any]
    result_text: str
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, host, path)
    fail_next_submit: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    initial_state: str = "Completed"
    qpu_seconds: float = 2.5
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, method: str, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        parts = urlsplit(url)
        host, path, query = parts.hostname or "", parts.path, parse_qs(parts.query)
        with self.lock:
            self.requests.append((method, host, path))
        if host == "iam.cloud.test" and path == "/identity/token":
            assert FAKE_TOKEN in body.decode()  # the API key goes to IAM, and only there
            return 200, {
                "access_token": _jwt(),
                "refresh_token": "r",
                "token_type": "Bearer",
                "expires_in": 3600,
                "expiration": int(time.time()) + 3600,
            }
        if FAKE_TOKEN in json.dumps(headers):
            return 401, {"errors": [{"message": "the API key must be exchanged at IAM first"}]}
        if host == "api.global-search-tagging.cloud.test" and path == "/v3/resources/search":
            item = {
                "crn": CRN,
                "service_plan_unique_id": "plan-standard",
                "name": "gateway-test",
                "doc": {"extensions": {"allocation": 1}},
                "tags": [],
            }
            return 200, {"items": [item], "search_cursor": None}
        if host == "globalcatalog.cloud.test":
            return 200, {"overview_ui": {"en": {"display_name": "Standard"}}, "metadata": {"pricing": {"type": "paid"}}}
        if host != "quantum.cloud.test" or not path.startswith("/api/v1"):
            return 404, {"errors": [{"message": f"no route {host}{path}"}]}
        return self.runtime(method, path.removeprefix("/api/v1"), query, body)

    def runtime(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        if path == "/backends":
            return 200, {"devices": [{"name": DEVICE, "status": {"name": "online"}, "qubits": 5}]}
        if path == f"/backends/{DEVICE}/configuration":
            return 200, self.config
        if path == f"/backends/{DEVICE}/properties":
            return 200, self.properties
        if path == f"/backends/{DEVICE}/status":
            return 200, {"state": True, "status": "active", "message": "", "length_queue": 3}
        if path == "/instances/usage":
            return 200, {"usage_consumed_seconds": 10, "usage_limit_seconds": 600, "usage_limit_reached": False}
        if path == "/jobs" and method == "POST":
            if self.fail_next_submit:
                return self.fail_next_submit.pop(0)
            sent = json.loads(body)
            job_id = f"d{len(self.jobs) + 1:019d}"
            with self.lock:
                self.jobs[job_id] = {
                    "id": job_id,
                    "backend": sent["backend"],
                    "tags": sent.get("tags", []),
                    "program": {"id": sent["program_id"]},
                    "state": {"status": self.initial_state},
                    "created": "2026-11-25T10:00:00.000Z",
                    "shots": sent["params"]["pubs"][0][2] if sent["params"]["pubs"] else None,
                }
            return 200, {"id": job_id, "backend": sent["backend"]}
        if path == "/jobs" and method == "GET":
            wanted = set(query.get("tags", []))
            found = [j for j in self.jobs.values() if wanted <= set(j["tags"])]
            return 200, {"jobs": found, "count": len(found)}
        if path.startswith("/jobs/"):
            job_id, _, rest = path.removeprefix("/jobs/").partition("/")
            job = self.jobs.get(job_id)
            if job is None:
                return 404, {"errors": [{"message": "job not found", "code": 1291}]}
            if rest == "" and method == "GET":
                return 200, job
            if rest == "results":
                return 200, self.result_text
            if rest == "metrics":
                usage = {"quantum_seconds": self.qpu_seconds, "qpu_charge_time_seconds": self.qpu_seconds}
                return 200, {"usage": {**usage, "status": "complete"}, "timestamps": {}}
            if rest == "cancel" and method == "POST":
                job["state"] = {"status": "Cancelled"}
                return 204, None
        return 404, {"errors": [{"message": f"no route {method} {path}"}]}


def _fixtures() -> tuple[dict[str, Any], dict[str, Any], str]:
    """The fake Manila snapshot renamed to a cloud device, and a SamplerV2 result as IBM encodes it."""
    import numpy as np
    import qiskit_ibm_runtime.fake_provider.backends.manila as manila
    from qiskit.primitives.containers import BitArray, DataBin, PrimitiveResult, SamplerPubResult
    from qiskit_ibm_runtime.json import RuntimeEncoder

    folder = Path(manila.__file__).parent
    config = json.loads((folder / "conf_manila.json").read_text())
    config["backend_name"] = DEVICE
    properties = json.loads((folder / "props_manila.json").read_text())
    properties["backend_name"] = DEVICE
    bits = np.array([[0b00]] * 480 + [[0b11]] * 500 + [[0b01]] * 12 + [[0b10]] * 8, dtype=np.uint8)
    data = DataBin(c=BitArray(bits, num_bits=2))
    result = PrimitiveResult([SamplerPubResult(data, metadata={"circuit_metadata": {}})], metadata={"version": 2})
    return config, properties, json.dumps(result, cls=RuntimeEncoder)


@pytest.fixture
async def loopback_ibm(monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopbackIbm]:
    config, properties, result_text = await sdk_thread.run_sync(_fixtures)
    state = LoopbackIbm(config=config, properties=properties, result_text=result_text)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            code, payload = state.answer(self.command, self.path, body, dict(self.headers))
            raw = (
                payload.encode()
                if isinstance(payload, str)
                else b""
                if payload is None
                else json.dumps(payload).encode()
            )
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{server.server_address[1]}"
    _clear_ibm_env(monkeypatch)
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("QISKIT_IBM_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("QISKIT_IBM_INSTANCE", CRN)
    monkeypatch.setenv("QISKIT_IBM_URL", "http://cloud.test")
    # The runtime client's own token manager (api/auth.py CloudAuth) does not derive its IAM host
    # from the account URL; the SDK reads IAM_URL for that, its seam for the IAM step.
    monkeypatch.setenv("IAM_URL", "http://iam.cloud.test")
    yield state
    server.shutdown()
    server.server_close()


async def test_cloud_submit_status_result_through_the_real_runtime_client(
    loopback_ibm: LoopbackIbm, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    adapter = IbmAdapter()
    backends = {b.id: b for b in await adapter.backends()}
    assert f"ibm/{DEVICE}" in backends, backends.get("ibm/*")
    device = backends[f"ibm/{DEVICE}"]
    assert device.status == "online" and device.qubits == 5 and device.queue_depth == 3 and not device.simulator
    assert any(host == "iam.cloud.test" for _, host, _ in loopback_ibm.requests)  # the IAM step ran

    gateway = await _gateway_with(config, adapter)
    key = await new_key(config.database, "alice")
    async with gateway.running(), in_memory(gateway, key) as client:
        listed = await client.call_tool("list_backends", {})
        price = next(b for b in listed.structured_content["backends"] if b["id"] == f"ibm/{DEVICE}")["price_model"]
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": f"ibm/{DEVICE}", "shots": 1000})
        assert not submitted.is_error, submitted.structured_content
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 60})
    job = done.structured_content
    assert job["state"] == "succeeded", job
    assert job["result"]["counts"] == [{"c": {"00": 480, "11": 500, "01": 12, "10": 8}}]
    assert "1.6" in price  # the gateway's price table, per QPU second
    (sent,) = loopback_ibm.jobs.values()
    assert sent["tags"] == [f"qpu-gateway:{job_id}"] and sent["shots"] == 1000

    outputs = [json.dumps(x.structured_content) for x in (listed, submitted, done)] + [caplog.text]
    assert not any(FAKE_TOKEN in text for text in outputs)


async def test_cloud_result_reports_the_qpu_seconds_ibm_measured(loopback_ibm: LoopbackIbm) -> None:
    adapter = IbmAdapter()
    ref = await adapter.submit(JobSpec("job-usage", f"ibm/{DEVICE}", (BELL2,), 1000))
    assert (await adapter.status(ref)).state is ProviderState.DONE
    result = await adapter.result(ref)
    assert result.qpu_seconds == 2.5 and result.cost_micro_usd is None
    assert result.counts[0]["c"]["11"] == 500


async def test_a_resubmit_after_a_crash_finds_the_tagged_job_instead_of_sending_another(
    loopback_ibm: LoopbackIbm,
) -> None:
    spec = JobSpec("job-crash-1", f"ibm/{DEVICE}", (BELL2,), 500)
    first = await IbmAdapter().submit(spec)  # the request went out; the worker died before saving the ref
    restarted = IbmAdapter()  # a new process: nothing in memory
    again = await restarted.submit(spec)
    assert again == first and restarted.submissions == 0
    assert len(loopback_ibm.jobs) == 1
    assert await restarted.find("job-crash-1") == first
    assert await restarted.find("never-sent") is None


async def test_cloud_cancel_and_status_mapping(loopback_ibm: LoopbackIbm) -> None:
    loopback_ibm.initial_state = "Queued"
    adapter = IbmAdapter()
    ref = await adapter.submit(JobSpec("job-cancel", f"ibm/{DEVICE}", (BELL2,), 100))
    assert (await adapter.status(ref)).state is ProviderState.QUEUED
    loopback_ibm.jobs[ref.provider_job_id]["state"] = {"status": "Running"}
    assert (await adapter.status(ref)).state is ProviderState.RUNNING
    await adapter.cancel(ref)
    assert (await adapter.status(ref)).state is ProviderState.CANCELLED
    assert ("POST", "quantum.cloud.test", f"/api/v1/jobs/{ref.provider_job_id}/cancel") in loopback_ibm.requests
    await adapter.cancel(ref)  # cancelling a finished job is a no-op
    with pytest.raises(PermanentError):
        await adapter.status(ProviderRef("d-no-such-job"))


async def test_cloud_http_errors_are_classified_through_the_real_client(loopback_ibm: LoopbackIbm) -> None:
    adapter = IbmAdapter()
    await adapter.backends()
    loopback_ibm.fail_next_submit = [
        (429, {"errors": [{"message": "Too many requests", "code": 1001}]}),
        (403, {"errors": [{"message": "Instance usage limit reached", "code": 1352}]}),
        (400, {"errors": [{"message": "Invalid circuit", "code": 1200}]}),
    ]
    spec = JobSpec("job-errors", f"ibm/{DEVICE}", (BELL2,), 100)
    with pytest.raises(TransientError):
        await adapter.submit(spec)
    with pytest.raises(QuotaError):
        await adapter.submit(spec)
    with pytest.raises(PermanentError) as permanent:
        await adapter.submit(spec)
    assert FAKE_TOKEN not in str(permanent.value)
    ref = await adapter.submit(spec)  # the next attempt goes through, once
    assert list(loopback_ibm.jobs) == [ref.provider_job_id]


async def test_providers_list_the_fake_backends_when_the_adapter_is_built_without_arguments(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_ibm_env(monkeypatch)
    providers = Providers(config)
    assert isinstance(providers.adapters["ibm"], IbmAdapter)
    assert (await providers.backend("ibm/fake_manila")) is not None


async def test_building_the_cloud_client_at_debug_level_turns_on_no_wire_trace_for_other_sdks(
    loopback_ibm: LoopbackIbm, caplog: pytest.LogCaptureFixture
) -> None:
    # ibm-cloud-sdk-core sets http.client's debuglevel for the whole process when its logger is at
    # DEBUG: the next Azure request would print its API key header into the log.
    import http.client

    caplog.set_level(logging.DEBUG)
    await IbmAdapter().backends()
    assert any(host == "iam.cloud.test" for _, host, _ in loopback_ibm.requests)  # the SDK's clients were built
    assert http.client.HTTPConnection.debuglevel == 0


async def test_a_cloud_job_past_its_wall_clock_cap_is_cancelled_at_ibm_and_charged_the_qpu_time_ibm_reports(
    loopback_ibm: LoopbackIbm, config: Config
) -> None:
    loopback_ibm.initial_state = "Running"  # it never finishes on its own
    loopback_ibm.qpu_seconds = 1.5  # what IBM's metrics say the cancelled job used
    gateway = await _gateway_with(config, IbmAdapter())
    config.policy_path.write_text(
        POLICY + 'agent_quota = { cost_usd = { day = "100.00" } }\nmax_wall_clock = { "ibm/*" = "1s" }\n',
        encoding="utf-8",
    )
    key = await new_key(config.database, "alice")
    async with gateway.running(), in_memory(gateway, key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": f"ibm/{DEVICE}", "shots": 1000})
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 60})
        usage = (await client.call_tool("get_usage", {})).structured_content
    view = done.structured_content
    assert view["state"] == "failed" and view["error"]["code"] == "timeout", view
    assert "1.5 s of QPU time: $2.40 at the list price" in view["error"]["message"]
    (ibm_job,) = loopback_ibm.jobs
    assert ("POST", "quantum.cloud.test", f"/api/v1/jobs/{ibm_job}/cancel") in loopback_ibm.requests
    assert loopback_ibm.jobs[ibm_job]["state"] == {"status": "Cancelled"}
    cost = next(q for q in usage["quotas"] if (q["scope"], q["dimension"], q["period"]) == ("agent", "cost", "day"))
    assert (cost["committed"], cost["reserved"]) == (2_400_000, 0)  # 1.5 s at $1.60 a second, not the estimate


async def test_an_unreachable_cloud_keeps_the_fake_devices_and_answers_unavailable_for_the_rest(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_ibm_env(monkeypatch)
    monkeypatch.setenv("QISKIT_IBM_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("QISKIT_IBM_INSTANCE", CRN)
    monkeypatch.setenv("QISKIT_IBM_URL", "http://127.0.0.1:9")  # nothing listens: IBM cannot be reached
    providers = Providers(config, adapters={"ibm": IbmAdapter()})
    listed = {b.id: b for b in await providers.backends()}
    assert listed["ibm/fake_manila"].status == "online"
    assert listed["ibm/*"].status == "unavailable" and listed["ibm/*"].retry_after_s is not None
    with pytest.raises(Unavailable) as refused:
        await providers.backend("ibm/ibm_brisbane")  # it may well exist: IBM could not be asked
    assert refused.value.retry_after_s is not None and FAKE_TOKEN not in refused.value.message
    assert await providers.backend("ibm/fake_manila") is not None


async def test_without_an_account_a_cloud_device_is_unknown_rather_than_unavailable(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_ibm_env(monkeypatch)
    monkeypatch.setattr("qiskit_ibm_runtime.accounts.management._DEFAULT_ACCOUNT_CONFIG_JSON_FILE", "/nonexistent/x")
    providers = Providers(config, adapters={"ibm": IbmAdapter()})
    assert (await providers.backend("ibm/ibm_brisbane")) is None  # asking again cannot help: it is configuration
