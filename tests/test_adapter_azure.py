"""The Azure Quantum adapter, offline: the real azure-quantum SDK against a workspace on loopback.

A local HTTP server answers the REST calls the SDK makes (provider status, SAS URIs, job PUT / GET
/ cancel) and the blob uploads and downloads behind the SAS URLs it hands out, from the fixtures
in tests/fixtures/azure/. The SDK's own seam points the workspace at it: `_quantum_endpoint` with
`_from_connection_string=True` skips the ARM lookup.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest

from qpu_gateway.adapters import azure
from qpu_gateway.adapters.azure import AzureAdapter, azure_job_id, classify
from qpu_gateway.adapters.base import (
    JobSpec,
    PermanentError,
    ProviderRef,
    ProviderState,
    QuotaError,
    TransientError,
)
from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, BELL3, body, gateway_cmd, in_memory, new_key

pytestmark = pytest.mark.anyio

FIXTURES = Path(__file__).parent / "fixtures" / "azure"
API_KEY = "azq-test-key-5f1e9c0b7d2a4e86"  # the workspace key: must never appear in any output
WORKSPACE_PATH = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/[^/]+/providers/Microsoft\.Quantum/workspaces/[^/]+/(?P<rest>.*)$"
)
BLOB_PATH = re.compile(r"^/devstoreaccount1/(?P<container>[^/]+)/(?P<blob>.+)$")
FAR_SAS = "sv=2023-11-03&se=2099-01-01T00%3A00%3A00Z&sp=racw&sr=c&sig=fake"
RESULT_FIXTURES = {"ionq": "result_ionq.json", "quantinuum": "result_quantinuum.json", "rigetti": "result_rigetti.json"}

AZURE_POLICY = (
    '[defaults]\nallowed_backends = ["aer/*", "azure/*"]\nloop_guard = { max_repeats = 1000 }\n'
    '[prices."azure/*"]\nmodel = "free"\n'
)


class FakeWorkspace:
    """The Azure Quantum data plane and its linked blob storage, in memory, on 127.0.0.1."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.blobs: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.hits: Counter[str] = Counter()  # "PUT job", "GET job", "POST cancel", ...
        self.faults: dict[str, tuple[int, str]] = {}  # call -> (status, error code), until removed
        self.api_keys: set[str] = set()
        self.progress = ["Executing", "Succeeded"]  # what successive GETs of a new job show
        self.hold = False  # keep jobs running (for cancel)
        self.cost_usd = 0.0
        self.cancel_cost_usd: float | None = None  # the cost estimate a cancelled job shows, if any
        self.hide_next_get = False  # answer one job GET with 404 although the job exists (a race)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def workspace_factory(self) -> Callable[[], Any]:
        def make() -> Any:
            from azure.core.credentials import AzureKeyCredential
            from azure.quantum import Workspace

            return Workspace(
                subscription_id="00000000-0000-0000-0000-000000000001",
                resource_group="rg-test",
                name="ws-test",
                location="eastus",
                credential=AzureKeyCredential(API_KEY),
                _quantum_endpoint=self.url + "/",
                _from_connection_string=True,
            )

        return make

    # -- request handling ------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._dispatch(self, "GET")

            def do_PUT(self) -> None:
                fake._dispatch(self, "PUT")

            def do_POST(self) -> None:
                fake._dispatch(self, "POST")

            def do_DELETE(self) -> None:
                fake._dispatch(self, "DELETE")

        return Handler

    def _dispatch(self, req: BaseHTTPRequestHandler, method: str) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        path, _, _ = req.path.partition("?")
        if key := req.headers.get("x-ms-quantum-api-key"):
            self.api_keys.add(key)
        with self._lock:
            if match := WORKSPACE_PATH.match(path):
                self._workspace_call(req, method, match.group("rest"), body)
            elif match := BLOB_PATH.match(path):
                self._blob_call(req, method, match.group("container"), match.group("blob"), body)
            else:
                self._send(req, 404, {"error": {"code": "NotFound", "message": path}})

    def _fault(self, req: BaseHTTPRequestHandler, call: str) -> bool:
        self.hits[call] += 1
        if call not in self.faults:
            return False
        status, code = self.faults[call]
        headers = {"Retry-After": "0.01"} if status == 429 or status >= 500 else {}
        self._send(req, status, {"error": {"code": code, "message": f"fake {code}"}}, headers)
        return True

    def _workspace_call(self, req: BaseHTTPRequestHandler, method: str, rest: str, body: bytes) -> None:
        if rest == "providerStatus" and method == "GET":
            if not self._fault(req, "GET providers"):
                self._send(req, 200, json.loads((FIXTURES / "provider_status.json").read_text()))
            return
        if rest == "storage/sasUri" and method == "POST":
            if self._fault(req, "POST sas"):
                return
            details = json.loads(body)
            blob = f"/{details['blobName']}" if details.get("blobName") else ""
            uri = f"{self.url}/devstoreaccount1/{details['containerName']}{blob}?{FAR_SAS}"
            self._send(req, 200, {"sasUri": uri})
            return
        job_match = re.fullmatch(r"jobs/([^/:]+)(:cancel)?", rest)
        if job_match is None:
            self._send(req, 404, {"error": {"code": "NotFound", "message": rest}})
            return
        job_id, cancel = job_match.group(1), job_match.group(2)
        if cancel or method == "DELETE":
            if self._fault(req, "POST cancel"):
                return
            job = self.jobs.get(job_id)
            if job is None:
                self._send(req, 404, {"error": {"code": "JobNotFound", "message": job_id}})
                return
            job["status"] = "Cancelled"
            if self.cancel_cost_usd is not None:
                job["costEstimate"] = {"currencyCode": "USD", "estimatedTotal": self.cancel_cost_usd, "events": []}
            self._send(req, 204, None)
            return
        if method == "PUT":
            if self._fault(req, "PUT job"):
                return
            if job_id in self.jobs:
                self._send(req, 409, {"error": {"code": "Conflict", "message": "job exists"}})
                return
            job = json.loads(body)
            job.update(id=job_id, status="Waiting", itemType="Job", creationTime="2026-01-01T00:00:00Z")
            job["_step"] = 0
            self.jobs[job_id] = job
            self._send(req, 201, _public(job))
            return
        if method == "GET":
            if self._fault(req, "GET job"):
                return
            job = self.jobs.get(job_id)
            if job is None or self.hide_next_get:
                self.hide_next_get = False
                self._send(req, 404, {"error": {"code": "JobNotFound", "message": f"no job {job_id}"}})
                return
            self._advance(job)
            self._send(req, 200, _public(job))
            return
        self._send(req, 405, {"error": {"code": "MethodNotAllowed", "message": method}})

    def _advance(self, job: dict[str, Any]) -> None:
        if self.hold or job["status"] in ("Succeeded", "Failed", "Cancelled"):
            return
        job["status"] = self.progress[min(job["_step"], len(self.progress) - 1)]
        job["_step"] += 1
        if job["status"] == "Succeeded":
            container = f"job-{job['id']}"
            provider = job["target"].split(".")[0]
            self.blobs[(container, "rawOutputData")] = (
                (FIXTURES / RESULT_FIXTURES[provider]).read_bytes(),
                "application/json",
            )
            job["outputDataUri"] = f"{self.url}/devstoreaccount1/{container}/rawOutputData?{FAR_SAS}"
            job["costEstimate"] = {"currencyCode": "USD", "estimatedTotal": self.cost_usd, "events": []}

    def _blob_call(self, req: BaseHTTPRequestHandler, method: str, container: str, blob: str, body: bytes) -> None:
        headers = {"ETag": '"0x8D0000000000001"', "Last-Modified": formatdate(usegmt=True)}
        if method == "PUT":
            if self._fault(req, "PUT blob"):
                return
            self.blobs[(container, blob)] = (body, req.headers.get("x-ms-blob-content-type") or "")
            self._send(req, 201, None, {**headers, "x-ms-request-server-encrypted": "true"})
            return
        if method == "GET":
            self.hits["GET blob"] += 1
            if (container, blob) not in self.blobs:
                self._send(req, 404, None, {"x-ms-error-code": "BlobNotFound"})
                return
            data, content_type = self.blobs[(container, blob)]
            headers.update(
                {
                    "x-ms-blob-type": "BlockBlob",
                    "Content-Type": content_type or "application/octet-stream",
                    "Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}",
                }
            )
            self._send_bytes(req, 206, data, headers)
            return
        self._send(req, 405, None)

    def _send(
        self, req: BaseHTTPRequestHandler, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self._send_bytes(req, status, data, {"Content-Type": "application/json", **(headers or {})})

    @staticmethod
    def _send_bytes(req: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str]) -> None:
        req.send_response(status)
        for name, value in headers.items():
            req.send_header(name, value)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def input_blob(self, job_id: str) -> bytes:
        return self.blobs[(f"job-{job_id}", "inputData")][0]


def _public(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if not k.startswith("_")}


@pytest.fixture(autouse=True)
def no_azure_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("AZURE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def fake() -> Iterator[FakeWorkspace]:
    server = FakeWorkspace()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def adapter(fake: FakeWorkspace) -> AzureAdapter:
    return AzureAdapter(workspace_factory=fake.workspace_factory())


def spec(job_id: str, target: str = "ionq.simulator", source: str = BELL2, shots: int = 10) -> JobSpec:
    return JobSpec(job_id=job_id, backend=f"azure/{target}", circuits=(source,), shots=shots)


async def azure_gateway(config: Config, adapter: AzureAdapter) -> Gateway:
    config.policy_path.write_text(AZURE_POLICY)
    gateway = Gateway(config)
    gateway.providers.adapters["azure"] = adapter
    return gateway


# -- through a real MCP client session ----------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "source"),
    [("ionq.simulator", BELL2), ("quantinuum.sim.h2-1e", BELL3), ("rigetti.sim.qvm", BELL2)],
)
async def test_bell_circuit_runs_on_an_azure_simulator_and_returns_the_workspace_counts(
    config: Config, fake: FakeWorkspace, adapter: AzureAdapter, target: str, source: str
) -> None:
    gateway = await azure_gateway(config, adapter)
    key = await new_key(config.database, "alice")
    async with gateway.running(), in_memory(gateway, key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": source, "shots": 10, "backend": f"azure/{target}"})
        assert not submitted.is_error, submitted.content
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30})
    view = done.structured_content
    assert view["state"] == "succeeded", view
    counts = view["result"]["counts"][0]["c"]
    assert sum(counts.values()) == 10 and set(counts) == {"00", "11"}
    # The Azure job id is ours, created once, with what the target takes.
    assert fake.hits["PUT job"] == 1 and azure_job_id(job_id) in fake.jobs
    job = fake.jobs[azure_job_id(job_id)]
    assert job["target"] == target and job["inputParams"]["shots"] == 10
    sent = fake.input_blob(azure_job_id(job_id)).decode()
    if target.startswith("ionq"):
        assert job["inputDataFormat"] == "ionq.circuit.v1"
        assert json.loads(sent)["circuit"] == [
            {"gate": "h", "targets": [0]},
            {"gate": "x", "controls": [0], "targets": [1]},
        ]
    elif target.startswith("quantinuum"):
        assert job["inputDataFormat"] == "honeywell.openqasm.v1" and sent.startswith("OPENQASM 2.0;")
    else:
        assert job["inputDataFormat"] == "rigetti.quil.v1"
        assert sent.splitlines() == ["DECLARE c BIT[2]", "H 0", "CNOT 0 1", "MEASURE 0 c[0]", "MEASURE 1 c[1]"]
    assert fake.api_keys == {API_KEY}  # the real auth path ran


async def test_list_backends_shows_the_workspace_targets(
    config: Config, fake: FakeWorkspace, adapter: AzureAdapter
) -> None:
    gateway = await azure_gateway(config, adapter)
    key = await new_key(config.database, "alice")
    async with gateway.running(), in_memory(gateway, key) as client:
        listed = await client.call_tool("list_backends", {})
    backends = {b["id"]: b for b in listed.structured_content["backends"]}
    assert backends["azure/ionq.simulator"]["status"] == "online"
    assert backends["azure/ionq.qpu.aria-1"]["status"] == "offline"
    assert backends["azure/quantinuum.qpu.h2-1"]["status"] == "online"  # degraded still takes jobs
    assert backends["azure/rigetti.sim.qvm"]["qubits"] == 20
    assert backends["azure/pasqal.sim.emu-tn"]["status"] == "unavailable"
    assert "aer/simulator" in backends


async def test_an_unconfigured_adapter_lists_azure_unavailable_and_names_the_variables(config: Config) -> None:
    gateway = await azure_gateway(config, AzureAdapter())  # the default: the environment, which is empty here
    key = await new_key(config.database, "alice")
    async with gateway.running(), in_memory(gateway, key) as client:
        listed = await client.call_tool("list_backends", {})
        refused = await client.call_tool(
            "submit_job", {"circuit": BELL2, "shots": 10, "backend": "azure/ionq.simulator"}
        )
    (entry,) = [b for b in listed.structured_content["backends"] if b["id"].startswith("azure/")]
    assert entry["id"] == "azure/*" and entry["status"] == "unavailable"
    for name in ("AZURE_QUANTUM_RESOURCE_ID", "AZURE_QUANTUM_LOCATION", "AZURE_QUANTUM_CONNECTION_STRING"):
        assert name in entry["reason"]
    assert refused.is_error and body(refused)["code"] == "unsupported_backend"


async def test_a_provider_quota_fails_the_job_as_quota_exhausted_without_retrying(
    config: Config, fake: FakeWorkspace, adapter: AzureAdapter
) -> None:
    fake.faults["PUT job"] = (403, "QuotaExceeded")
    gateway = await azure_gateway(config, adapter)
    key = await new_key(config.database, "alice")
    async with gateway.running(), in_memory(gateway, key) as client:
        submitted = await client.call_tool(
            "submit_job", {"circuit": BELL2, "shots": 10, "backend": "azure/ionq.simulator"}
        )
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30})
    view = done.structured_content
    assert view["state"] == "failed" and view["error"]["code"] == "quota_exhausted", view
    assert fake.hits["PUT job"] == 1


async def test_cancel_job_cancels_the_azure_job(config: Config, fake: FakeWorkspace, adapter: AzureAdapter) -> None:
    fake.hold = True
    gateway = await azure_gateway(config, adapter)
    key = await new_key(config.database, "alice")
    async with gateway.running(), in_memory(gateway, key) as client:
        submitted = await client.call_tool(
            "submit_job", {"circuit": BELL2, "shots": 10, "backend": "azure/ionq.simulator"}
        )
        job_id = submitted.structured_content["job_id"]
        for _ in range(100):
            view = (await client.call_tool("get_job", {"job_id": job_id})).structured_content
            if view["state"] == "running":
                break
            await __import__("anyio").sleep(0.05)
        cancelled = await client.call_tool("cancel_job", {"job_id": job_id})
        assert not cancelled.is_error, cancelled.content
        for _ in range(100):
            if fake.jobs[azure_job_id(job_id)]["status"] == "Cancelled":
                break
            await __import__("anyio").sleep(0.05)
    assert fake.jobs[azure_job_id(job_id)]["status"] == "Cancelled"
    assert fake.hits["POST cancel"] == 1


async def test_an_operators_cancel_from_the_cli_is_carried_to_azure_by_the_gateway_polling_the_job(
    config: Config, fake: FakeWorkspace, adapter: AzureAdapter
) -> None:
    fake.hold = True
    gateway = await azure_gateway(config, adapter)
    key = await new_key(config.database, "alice")
    async with gateway.running(), in_memory(gateway, key) as client:
        submitted = await client.call_tool(
            "submit_job", {"circuit": BELL2, "shots": 10, "backend": "azure/ionq.simulator"}
        )
        job_id = submitted.structured_content["job_id"]
        for _ in range(200):
            view = (await client.call_tool("get_job", {"job_id": job_id})).structured_content
            if view["state"] == "running":
                break
            await anyio.sleep(0.05)
        # The operator's command runs in its own process, with no Azure credentials of its own.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QPU_GATEWAY_", "AZURE_"))}
        done = await anyio.run_process(
            gateway_cmd("jobs", "cancel", job_id, "--reason", "over budget", "--db", str(config.db_path)),
            env=env,
            check=False,
        )
        for _ in range(200):
            if fake.jobs[azure_job_id(job_id)]["status"] == "Cancelled":
                break
            await anyio.sleep(0.05)
        seen = (await client.call_tool("get_job", {"job_id": job_id})).structured_content
    assert done.returncode == 0, done.stderr
    assert fake.jobs[azure_job_id(job_id)]["status"] == "Cancelled"
    assert fake.hits["POST cancel"] == 1
    assert seen["state"] == "cancelled" and seen["error"]["code"] == "cancelled_by_operator"


async def test_no_credential_appears_in_results_errors_logs_or_the_database(
    config: Config, fake: FakeWorkspace, adapter: AzureAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await azure_gateway(config, adapter)
    key = await new_key(config.database, "alice")
    outputs: list[str] = []
    async with gateway.running(), in_memory(gateway, key) as client:
        ok = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 10, "backend": "azure/ionq.simulator"})
        outputs.append(str(ok.content))
        outputs.append(str(await client.call_tool("wait_for_job", {"job_id": ok.structured_content["job_id"]})))
        fake.faults["PUT job"] = (401, "Unauthorized")
        refused = await client.call_tool(
            "submit_job", {"circuit": BELL3, "shots": 10, "backend": "azure/ionq.simulator"}
        )
        done = await client.call_tool("wait_for_job", {"job_id": refused.structured_content["job_id"]})
        outputs.append(str(done))
        outputs.append(str(await client.call_tool("list_backends", {})))
    assert done.structured_content["state"] == "failed"
    assert "credential was refused" in done.structured_content["error"]["message"]
    assert fake.api_keys == {API_KEY}
    everything = "\n".join(outputs) + caplog.text
    assert API_KEY not in everything
    assert API_KEY.encode() not in config.db_path.read_bytes()


# -- the adapter against the fake workspace -----------------------------------------------------


async def test_submitting_the_same_job_twice_creates_one_azure_job(fake: FakeWorkspace, adapter: AzureAdapter) -> None:
    job = spec("job_0123456789abcdef0123")
    first = await adapter.submit(job)
    # The worker crashed after the request went out and before it saved the ref: it submits again.
    second = await adapter.submit(job)
    assert first == second == ProviderRef(azure_job_id("job_0123456789abcdef0123"))
    assert fake.hits["PUT job"] == 1 and list(fake.jobs) == [azure_job_id("job_0123456789abcdef0123")]


async def test_a_job_created_by_a_racing_submit_is_taken_as_ours(fake: FakeWorkspace, adapter: AzureAdapter) -> None:
    job = spec("job_race")
    await adapter.submit(job)
    fake.hide_next_get = True  # our lookup misses it, the PUT then conflicts
    assert await adapter.submit(job) == ProviderRef(azure_job_id("job_race"))
    assert fake.hits["PUT job"] == 2 and len(fake.jobs) == 1


async def test_status_and_result_follow_the_job_and_record_its_cost(fake: FakeWorkspace, adapter: AzureAdapter) -> None:
    fake.cost_usd = 12.4166
    ref = await adapter.submit(spec("job_cost", target="ionq.qpu.aria-1"))
    assert (await adapter.status(ref)).state is ProviderState.RUNNING
    assert (await adapter.status(ref)).state is ProviderState.DONE
    result = await adapter.result(ref)
    assert result.counts == ({"c": {"00": 5, "11": 5}},)
    assert result.cost_micro_usd == 12_416_600
    assert (await adapter.status(ProviderRef("job_never_sent"))).state is ProviderState.UNKNOWN


async def test_a_failed_azure_job_reports_its_reason(fake: FakeWorkspace, adapter: AzureAdapter) -> None:
    fake.progress = ["Failed"]
    ref = await adapter.submit(spec("job_fails"))
    fake.jobs[azure_job_id("job_fails")]["errorData"] = {"code": "InvalidInputData", "message": "gate not supported"}
    status = await adapter.status(ref)
    assert status.state is ProviderState.FAILED and "InvalidInputData" in (status.message or "")


@pytest.mark.parametrize(
    ("call", "status", "code", "expected"),
    [
        ("PUT job", 429, "TooManyRequests", TransientError),
        ("PUT job", 503, "ServiceUnavailable", TransientError),
        ("PUT job", 401, "Unauthorized", PermanentError),
        ("PUT job", 403, "Forbidden", PermanentError),
        ("PUT job", 400, "InvalidJobDefinition", PermanentError),
        ("PUT job", 403, "QuotaExceeded", QuotaError),
        ("PUT job", 429, "InsufficientQuota", QuotaError),
        ("POST sas", 500, "InternalError", TransientError),
        ("GET job", 503, "ServiceUnavailable", TransientError),
    ],
)
async def test_each_workspace_error_answer_is_classified(
    fake: FakeWorkspace, adapter: AzureAdapter, call: str, status: int, code: str, expected: type[Exception]
) -> None:
    fake.faults[call] = (status, code)
    with pytest.raises(expected) as raised:
        await adapter.submit(spec("job_err"))
    assert API_KEY not in str(raised.value)
    assert azure_job_id("job_err") not in fake.jobs


async def test_status_and_cancel_errors_are_classified(fake: FakeWorkspace, adapter: AzureAdapter) -> None:
    ref = await adapter.submit(spec("job_poll"))
    fake.faults["GET job"] = (429, "TooManyRequests")
    with pytest.raises(TransientError):
        await adapter.status(ref)
    fake.faults["GET job"] = (401, "Unauthorized")
    with pytest.raises(PermanentError):
        await adapter.cancel(ref)


async def test_backends_errors_are_classified(fake: FakeWorkspace, adapter: AzureAdapter) -> None:
    fake.faults["GET providers"] = (503, "ServiceUnavailable")
    with pytest.raises(TransientError):
        await adapter.backends()


async def test_a_job_with_several_circuits_is_refused_before_anything_is_sent(
    fake: FakeWorkspace, adapter: AzureAdapter
) -> None:
    with pytest.raises(PermanentError):
        await adapter.submit(JobSpec("job_two", "azure/ionq.simulator", (BELL2, BELL2), 10))
    with pytest.raises(PermanentError):
        await adapter.submit(spec("job_pasqal", target="pasqal.sim.emu-tn"))
    mid_circuit = BELL2.replace("measure q -> c;", "measure q[0] -> c[0];\nx q[0];\nmeasure q[1] -> c[1];")
    with pytest.raises(PermanentError, match="measures only at the end"):
        await adapter.submit(spec("job_mid", source=mid_circuit))
    assert sum(fake.hits.values()) == 0


# -- the classification table, entry by entry ---------------------------------------------------


def _http_error(status: int, code: str | None) -> Exception:
    from azure.core.exceptions import HttpResponseError
    from azure.core.pipeline.transport import HttpResponse

    class Response(HttpResponse):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(None, None)  # type: ignore[arg-type]
            self.status_code = status
            self.reason = "fake"
            self.headers = {"Content-Type": "application/json"}

        def body(self) -> bytes:
            return json.dumps({"error": {"code": code, "message": "m"}} if code else {}).encode()

    return HttpResponseError(response=Response())


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        *((s, None, cls) for s, cls in azure.HTTP_STATUS_CLASSES.items()),
        (500, None, TransientError),
        (502, None, TransientError),
        (504, None, TransientError),
        (418, None, PermanentError),
        *((403, code, QuotaError) for code in sorted(azure.QUOTA_ERROR_CODES)),
        (429, "QuotaExceeded", QuotaError),
    ],
)
def test_the_http_table_entry_by_entry(status: int, code: str | None, expected: type[Exception]) -> None:
    assert type(classify(_http_error(status, code))) is expected


def test_transport_failures_and_sign_in_failures_are_classified() -> None:
    from azure.core import exceptions

    for name in azure.TRANSPORT_ERRORS:
        assert type(classify(getattr(exceptions, name)("boom"))) is TransientError
    assert type(classify(TimeoutError())) is TransientError
    signed_out = classify(exceptions.ClientAuthenticationError(f"token for {API_KEY} refused"))
    assert type(signed_out) is PermanentError and API_KEY not in str(signed_out)
    assert type(classify(RuntimeError("?"))) is PermanentError


def test_a_broken_connection_string_never_echoes_its_key() -> None:
    def broken() -> Any:
        raise ValueError(f"Invalid connection string Endpoint=...;ApiKey={API_KEY}")

    import anyio

    (entry,) = anyio.run(AzureAdapter(workspace_factory=broken).backends)
    assert entry.status == "unavailable" and API_KEY not in (entry.reason or "")


@pytest.mark.parametrize(
    ("translate", "target"), [(azure.to_ionq, "ionq.simulator"), (azure.to_quil, "rigetti.sim.qvm")]
)
def test_a_gate_outside_the_target_set_is_decomposed_and_barriers_pass(translate: Any, target: str) -> None:
    # Qiskit 2.6 refuses `barrier` among transpile's basis_gates: every such job used to fail.
    source = BELL2.replace("cx q[0], q[1];", "cz q[0], q[1];\nbarrier q;\nu3(0.1, 0.2, 0.3) q[1];")
    text = translate(source, target, 10).data.decode()
    if target.startswith("ionq"):
        gates = json.loads(text)["circuit"]
        assert {"gate": "x", "controls": [0], "targets": [1]} in gates  # cz as h, cx, h
        assert {g["gate"] for g in gates} <= {"x", "y", "z", "h", "s", "si", "t", "ti", "v", "vi", "rx", "ry", "rz"}
    else:
        assert "CZ 0 1" in text.splitlines() and "U3" not in text


async def test_a_job_past_its_wall_clock_cap_is_cancelled_at_azure_and_charged_its_cost_estimate(
    config: Config, fake: FakeWorkspace, adapter: AzureAdapter
) -> None:
    fake.hold = True  # the job stays waiting at the provider
    fake.cancel_cost_usd = 0.37  # what Azure's estimate says the cancelled job cost
    gateway = await azure_gateway(config, adapter)
    config.policy_path.write_text(
        AZURE_POLICY.replace(
            "[prices.",
            'agent_quota = { cost_usd = { day = "10.00" } }\nmax_wall_clock = { "azure/*" = "1s" }\n[prices.',
        ),
        encoding="utf-8",
    )
    key = await new_key(config.database, "alice")
    async with gateway.running(), in_memory(gateway, key) as client:
        submitted = await client.call_tool(
            "submit_job", {"circuit": BELL2, "shots": 10, "backend": "azure/ionq.simulator"}
        )
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30})
        usage = (await client.call_tool("get_usage", {})).structured_content
    view = done.structured_content
    assert view["state"] == "failed" and view["error"]["code"] == "timeout", view
    assert "the provider reports $0.37" in view["error"]["message"]
    assert fake.hits["POST cancel"] == 1 and fake.jobs[azure_job_id(job_id)]["status"] == "Cancelled"
    cost = next(q for q in usage["quotas"] if (q["scope"], q["dimension"], q["period"]) == ("agent", "cost", "day"))
    assert (cost["committed"], cost["reserved"]) == (370_000, 0)  # the price table says free; Azure billed this
