"""The Braket adapter: the SDK's local simulators through MCP, and the cloud path through botocore's Stubber.

The cloud tests run a real `AwsSession` (a boto3 session with fake static credentials from the
environment) whose braket and s3 clients are stubbed: every request the adapter makes is
checked against what AWS would be sent, and answered with what AWS would answer.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import boto3
import pytest
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber
from braket.aws import AwsSession
from braket.ir.openqasm import Program
from braket.task_result import AdditionalMetadata, GateModelTaskResult, TaskMetadata

from qpu_gateway.adapters import braket
from qpu_gateway.adapters.base import (
    Backend,
    JobSpec,
    PermanentError,
    ProviderRef,
    ProviderState,
    ProviderStatus,
    QuotaError,
    Result,
    TransientError,
)
from qpu_gateway.adapters.braket import BraketAdapter
from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, BELL3, body, in_memory

pytestmark = pytest.mark.anyio

POLICY = '[defaults]\nallowed_backends = ["aer/*", "braket/*"]\nloop_guard = { max_repeats = 1000 }\n'
ACCESS_KEY_ID = "AKIAFAKEFAKEFAKEFAKE"
SECRET = "fAkE/SeCrEt+0123456789abcdefghijklmnopqrstu"
BUCKET = "amazon-braket-gateway-tests"
PREFIX = "runs"
SV1 = "arn:aws:braket:::device/quantum-simulator/amazon/sv1"
FORTE = "arn:aws:braket:us-east-1::device/qpu/ionq/Forte-1"
AQUILA = "arn:aws:braket:us-east-1::device/qpu/quera/Aquila"
DEVICES = {"sv1": SV1, "ionq_forte_1": FORTE, "quera_aquila": AQUILA}
TASK_ARN = "arn:aws:braket:us-east-1:123456789012:quantum-task/5f0c3d4e-1111-2222-3333-444455556666"
TASK_DIR = f"{PREFIX}/5f0c3d4e-1111-2222-3333-444455556666"

GATE_OPS = ["h", "x", "rx", "ry", "rz", "cnot", "cz", "s", "si", "t", "ti", "swap"]


def capabilities(*, qubits: int, max_shots: int, openqasm: bool = True) -> str:
    """A device's capabilities document, as GetDevice returns it (only the parts the adapter reads)."""
    action: dict[str, Any] = {}
    if openqasm:
        action["braket.ir.openqasm.program"] = {
            "version": ["1"],
            "actionType": "braket.ir.openqasm.program",
            "supportedOperations": GATE_OPS,
        }
    else:
        action["braket.ir.ahs.program"] = {"version": ["1"], "actionType": "braket.ir.ahs.program"}
    return json.dumps(
        {
            "service": {"shotsRange": [1, max_shots]},
            "action": action,
            "paradigm": {"qubitCount": qubits},
        }
    )


DEVICE_ANSWERS = {
    SV1: ("SV1", "Amazon Braket", "SIMULATOR", capabilities(qubits=34, max_shots=100_000), None),
    FORTE: ("Forte 1", "IonQ", "QPU", capabilities(qubits=36, max_shots=5_000), "17"),
    AQUILA: ("Aquila", "QuEra", "QPU", capabilities(qubits=256, max_shots=1_000, openqasm=False), None),
}


@dataclass
class Aws:
    """A real AwsSession with its braket and s3 clients under botocore Stubbers."""

    session: AwsSession
    braket: Stubber
    s3: Stubber

    def adapter(self) -> BraketAdapter:
        return BraketAdapter(aws_session=self.session, device_arns=DEVICES, bucket=BUCKET, prefix=PREFIX)

    def expect_get_device(self, arn: str) -> None:
        name, provider, kind, caps, queue = DEVICE_ANSWERS[arn]
        answer: dict[str, Any] = {
            "deviceArn": arn,
            "deviceName": name,
            "providerName": provider,
            "deviceType": kind,
            "deviceStatus": "ONLINE",
            "deviceCapabilities": caps,
        }
        if queue is not None:
            answer["deviceQueueInfo"] = [
                {"queue": "QUANTUM_TASKS_QUEUE", "queueSize": queue, "queuePriority": "Normal"}
            ]
        self.braket.add_response("get_device", answer, {"deviceArn": arn})

    def expect_create(self, token: Any, *, arn: str = SV1, shots: int = 100, task: str = TASK_ARN) -> None:
        self.braket.add_response(
            "create_quantum_task",
            {"quantumTaskArn": task},
            {
                "clientToken": token,
                "deviceArn": arn,
                "action": ANY,
                "shots": shots,
                "outputS3Bucket": BUCKET,
                "outputS3KeyPrefix": ANY if token is ANY else f"{PREFIX}/{token.rsplit('-', 1)[0]}",
                "tags": ANY,
            },
        )

    def expect_get_task(self, status: str, *, task: str = TASK_ARN, **extra: Any) -> None:
        self.braket.add_response(
            "get_quantum_task",
            {
                "quantumTaskArn": task,
                "status": status,
                "deviceArn": SV1,
                "deviceParameters": "{}",
                "shots": 100,
                "outputS3Bucket": BUCKET,
                "outputS3Directory": TASK_DIR,
                "createdAt": datetime.now(UTC),
                **extra,
            },
            {"quantumTaskArn": task, "additionalAttributeNames": ["QueueInfo"]},
        )

    def expect_results(self, measurements: list[list[int]], measured_qubits: list[int]) -> None:
        body = GateModelTaskResult(
            taskMetadata=TaskMetadata(id=TASK_ARN, shots=len(measurements), deviceId=SV1),
            additionalMetadata=AdditionalMetadata(action=Program(source="OPENQASM 3.0;")),
            measurements=measurements,
            measuredQubits=measured_qubits,
        ).json()
        data = body.encode()
        self.s3.add_response(
            "get_object",
            {"Body": StreamingBody(io.BytesIO(data), len(data)), "ContentLength": len(data)},
            {"Bucket": BUCKET, "Key": f"{TASK_DIR}/results.json"},
        )


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No credential anywhere boto looks, and no results bucket."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "QPU_GATEWAY_BRAKET_BUCKET",
        "AMZN_BRAKET_OUT_S3_BUCKET",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    boto_session = boto3.Session(region_name="us-east-1")  # credentials by boto's own chain: the env
    session = AwsSession(boto_session=boto_session, braket_client=boto_session.client("braket"))
    with Stubber(session.braket_client) as braket_stub, Stubber(session.s3_client) as s3_stub:
        yield Aws(session=session, braket=braket_stub, s3=s3_stub)
        braket_stub.assert_no_pending_responses()
        s3_stub.assert_no_pending_responses()


@pytest.fixture
def braket_config(config: Config) -> Config:
    config.policy_path.write_text(POLICY, encoding="utf-8")
    return config


def spec(backend: str = "braket/sv1", *, shots: int = 100, circuits: tuple[str, ...] = (BELL2,)) -> JobSpec:
    return JobSpec(job_id="job_0123456789abcdef0123", backend=backend, circuits=circuits, shots=shots)


# -- offline: the SDK's local simulators through a real MCP session ----------------------------


@pytest.mark.parametrize(("backend", "source"), [("braket/local_sv", BELL2), ("braket/local_dm", BELL3)])
async def test_bell_circuit_runs_on_a_local_braket_simulator_through_mcp(
    braket_config: Config, alice_key: str, no_aws: None, backend: str, source: str
) -> None:
    gateway = Gateway(braket_config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        submitted = body(await client.call_tool("submit_job", {"circuit": source, "shots": 400, "backend": backend}))
        view = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"], "timeout_s": 60}))
    assert view["state"] == "succeeded", view
    counts = view["result"]["counts"][0]["c"]
    assert set(counts) <= {"00", "11"} and sum(counts.values()) == 400 and len(counts) == 2


async def test_without_credentials_local_simulators_are_online_and_cloud_devices_say_what_to_set(
    braket_config: Config, alice_key: str, no_aws: None
) -> None:
    gateway = Gateway(braket_config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        listing = body(await client.call_tool("list_backends", {}))["backends"]
        refused = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "braket/ionq_forte_1"})
    found = {b["id"]: b for b in listing if b["provider"] == "braket"}
    assert found["braket/local_sv"]["status"] == "online" and found["braket/local_sv"]["qubits"] == 26
    assert found["braket/local_dm"]["status"] == "online" and found["braket/local_dm"]["simulator"] is True
    cloud = [b for b in found.values() if not b["id"].startswith("braket/local_")]
    assert {b["id"] for b in cloud} >= {"braket/ionq_forte_1", "braket/sv1", "braket/iqm_garnet", "braket/quera_aquila"}
    for backend in cloud:
        assert backend["status"] == "unavailable"
        assert "AWS_ACCESS_KEY_ID" in backend["reason"] and "QPU_GATEWAY_BRAKET_BUCKET" in backend["reason"]
    assert found["braket/quera_aquila"]["max_shots"] == 1000
    assert refused.is_error and body(refused)["code"] == "unsupported_backend"


async def test_measurements_map_back_to_each_classical_register_in_qiskit_bit_order() -> None:
    # q[0] -> c[1], q[1] -> c[0], r[0] -> d[1]; d[0] is never measured and reads 0.
    source = """OPENQASM 2.0;
include "qelib1.inc";
qreg q[2];
qreg r[1];
creg c[2];
creg d[2];
x q[0];
u3(pi, 0, pi) r[0];
barrier q;
measure q[0] -> c[1];
measure q[1] -> c[0];
measure r[0] -> d[1];
"""
    adapter = BraketAdapter()
    ref = await adapter.submit(spec("braket/local_sv", shots=50, circuits=(source, BELL3)))
    assert (await adapter.status(ref)).state is ProviderState.DONE
    result = await adapter.result(ref)
    assert result.counts[0] == {"c": {"10": 50}, "d": {"10": 50}}
    assert set(result.counts[1]["c"]) <= {"00", "11"}
    assert result.metadata["tasks"] == "2" and result.metadata["shots"] == "100"
    assert (await adapter.status(ref)).state is ProviderState.UNKNOWN  # the result was handed over


async def test_a_measurement_before_more_gates_on_the_same_qubit_is_refused() -> None:
    source = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[1];\ncreg c[1];\nmeasure q[0] -> c[0];\nx q[0];\n'
    with pytest.raises(PermanentError, match="measures each qubit once"):
        await BraketAdapter().submit(spec("braket/local_sv", circuits=(source,)))


def test_gates_outside_the_device_set_are_translated_to_braket_names() -> None:
    source = (
        'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\n'
        "u3(0.1,0.2,0.3) q[0];\ncx q[0],q[1];\nmeasure q -> c;\n"
    )
    program = braket.translate(source, frozenset(GATE_OPS), 36)
    assert "include" not in program.source and "cnot q[0], q[1];" in program.source
    assert "bit[2] b;" in program.source and "qubit[2] q;" in program.source
    assert program.registers == {"c": [0, 1]}
    with pytest.raises(PermanentError, match="uses 2 qubits; this device has 1"):
        braket.translate(source, frozenset(GATE_OPS), 1)


# -- the cloud path, through botocore's Stubber ------------------------------------------------


async def test_cloud_job_runs_on_a_stubbed_device_through_mcp(
    braket_config: Config, alice_key: str, aws: Aws, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sent: list[dict[str, Any]] = []
    aws.session.braket_client.meta.events.register(
        "provide-client-params.braket.CreateQuantumTask", lambda params, **_: sent.append(dict(params))
    )
    for arn in DEVICES.values():
        aws.expect_get_device(arn)
    aws.expect_create(ANY)
    aws.expect_get_task("QUEUED")
    aws.expect_get_task("RUNNING")
    aws.expect_get_task("COMPLETED")
    aws.expect_get_task("COMPLETED")  # the result's metadata: where in S3 it was written
    aws.expect_results([[0, 0], [1, 1], [1, 1], [0, 0], [1, 1]], [0, 1])

    gateway = Gateway(braket_config)
    gateway.providers.adapters["braket"] = aws.adapter()
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        listing = body(await client.call_tool("list_backends", {}))
        submitted = body(
            await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100, "backend": "braket/sv1"})
        )
        view = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"], "timeout_s": 30}))
        audit = await gateway.store.audit_tail(limit=1000)

    assert view["state"] == "succeeded", view
    assert view["result"]["counts"] == [{"c": {"00": 2, "11": 3}}]
    found = {b["id"]: b for b in listing["backends"]}
    assert (found["braket/sv1"]["status"], found["braket/sv1"]["qubits"], found["braket/sv1"]["simulator"]) == (
        "online",
        34,
        True,
    )
    forte = found["braket/ionq_forte_1"]
    assert (forte["status"], forte["max_shots"], forte["queue_depth"], forte["qubits"]) == ("online", 5000, 17, 36)
    aquila = found["braket/quera_aquila"]
    assert aquila["status"] == "unavailable" and "OpenQASM" in aquila["reason"] and aquila["max_shots"] == 1000

    # Exactly-once: the idempotency token AWS saw is our job id, results go under our prefix.
    (request,) = sent
    assert request["clientToken"] == submitted["job_id"]
    assert request["outputS3Bucket"] == BUCKET and request["outputS3KeyPrefix"] == f"{PREFIX}/{submitted['job_id']}"
    program = json.loads(request["action"])
    assert program["braketSchemaHeader"]["name"] == "braket.ir.openqasm.program"
    assert program["source"].startswith("OPENQASM 3.0;") and "cnot q[0], q[1];" in program["source"]

    everything = json.dumps([listing, submitted, view]) + caplog.text + repr(audit)
    assert SECRET not in everything and ACCESS_KEY_ID not in everything


async def test_a_crash_between_request_sent_and_state_saved_resubmits_with_the_same_client_token(aws: Aws) -> None:
    adapter = aws.adapter()
    job = spec()
    aws.expect_get_device(SV1)
    aws.expect_create(job.job_id)  # the first request reached AWS; its answer was lost with the worker
    aws.expect_create(job.job_id)  # the reclaimed job sends it again: AWS answers with the same task
    first = await adapter.submit(job)
    second = await adapter.submit(job)
    assert first == second and json.loads(first.provider_job_id)["tasks"] == [TASK_ARN]


class StopsAfterSending:
    """A worker process that dies after its submit reached AWS and before it saved the answer."""

    provider = "braket"

    def __init__(self, inner: BraketAdapter) -> None:
        self.inner = inner
        self.sent = anyio.Event()

    async def backends(self) -> list[Backend]:
        return await self.inner.backends()

    async def submit(self, job: JobSpec) -> ProviderRef:
        await self.inner.submit(job)
        self.sent.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def status(self, ref: ProviderRef) -> ProviderStatus:
        return await self.inner.status(ref)

    async def result(self, ref: ProviderRef) -> Result:
        return await self.inner.result(ref)

    async def cancel(self, ref: ProviderRef) -> None:
        await self.inner.cancel(ref)


async def test_a_job_whose_worker_stopped_after_sending_is_resubmitted_with_the_same_client_token(
    braket_config: Config, alice_key: str, aws: Aws
) -> None:
    tokens: list[str] = []
    aws.session.braket_client.meta.events.register(
        "provide-client-params.braket.CreateQuantumTask", lambda params, **_: tokens.append(params["clientToken"])
    )
    for arn in DEVICES.values():
        aws.expect_get_device(arn)
    aws.expect_create(ANY, shots=2)  # the first process: AWS created the task, the process never saved its ARN
    aws.expect_get_device(SV1)  # the second process reads the device afresh
    aws.expect_create(ANY, shots=2)  # ... and sends the same token, so AWS answers with the same task
    aws.expect_get_task("COMPLETED")
    aws.expect_get_task("COMPLETED")
    aws.expect_results([[1, 1], [0, 0]], [0, 1])

    first = Gateway(braket_config)
    stopping = StopsAfterSending(aws.adapter())
    first.providers.adapters["braket"] = stopping
    async with first.running(), in_memory(first, alice_key) as client:
        submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 2, "backend": "braket/sv1"}))
        with anyio.fail_after(30):
            await stopping.sent.wait()
    second = Gateway(braket_config)
    second.providers.adapters["braket"] = aws.adapter()
    async with second.running(), in_memory(second, alice_key) as client:
        view = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"], "timeout_s": 30}))
    assert view["state"] == "succeeded" and view["result"]["counts"] == [{"c": {"11": 1, "00": 1}}]
    assert tokens == [submitted["job_id"], submitted["job_id"]]


async def test_with_credentials_but_no_bucket_cloud_devices_name_the_bucket_variable(
    aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("QPU_GATEWAY_BRAKET_BUCKET", "AMZN_BRAKET_OUT_S3_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    listed = await BraketAdapter(aws_session=aws.session, device_arns=DEVICES).backends()
    cloud = [b for b in listed if not b.id.startswith("braket/local_")]
    assert [b.status for b in cloud] == ["unavailable"] * 3
    assert all("QPU_GATEWAY_BRAKET_BUCKET" in (b.reason or "") and "credentials" not in (b.reason or "") for b in cloud)
    assert SECRET not in repr(listed) and ACCESS_KEY_ID not in repr(listed)


async def test_a_job_of_several_circuits_sends_one_stable_token_per_circuit(aws: Aws) -> None:
    adapter = aws.adapter()
    job = spec(circuits=(BELL2, BELL3))
    aws.expect_get_device(SV1)
    for _ in range(2):
        aws.expect_create(f"{job.job_id}-0", task=TASK_ARN)
        aws.expect_create(f"{job.job_id}-1", task=TASK_ARN + "1")
    assert await adapter.submit(job) == await adapter.submit(job)


@pytest.mark.parametrize(
    ("braket_status", "state"),
    [
        ("CREATED", ProviderState.QUEUED),
        ("QUEUED", ProviderState.QUEUED),
        ("RUNNING", ProviderState.RUNNING),
        ("CANCELLING", ProviderState.RUNNING),
        ("COMPLETED", ProviderState.DONE),
        ("FAILED", ProviderState.FAILED),
        ("CANCELLED", ProviderState.CANCELLED),
    ],
)
async def test_braket_task_status_maps_to_provider_state(aws: Aws, braket_status: str, state: ProviderState) -> None:
    adapter = aws.adapter()
    ref = ProviderRef(json.dumps({"tasks": [TASK_ARN], "registers": [{"c": [0, 1]}]}))
    aws.expect_get_task(braket_status, failureReason="Circuit uses unsupported gate foo")
    status = await adapter.status(ref)
    assert status.state is state
    if state is ProviderState.FAILED:
        assert status.message is not None and "unsupported gate foo" in status.message


async def test_cancel_sends_cancel_quantum_task_for_every_task(aws: Aws) -> None:
    adapter = aws.adapter()
    tasks = [TASK_ARN, TASK_ARN + "1"]
    for task in tasks:
        aws.braket.add_response(
            "cancel_quantum_task",
            {"quantumTaskArn": task, "cancellationStatus": "CANCELLING"},
            {"quantumTaskArn": task},  # botocore adds its own idempotency token after the stub checks
        )
    await adapter.cancel(ProviderRef(json.dumps({"tasks": tasks, "registers": [{}, {}]})))


async def test_shots_above_the_device_maximum_are_refused_before_anything_is_sent(aws: Aws) -> None:
    adapter = aws.adapter()
    aws.expect_get_device(AQUILA)
    with pytest.raises(PermanentError, match="at most 1,000 shots"):
        await adapter.submit(spec("braket/quera_aquila", shots=1001))


ERROR_CASES = [(code, kind, 400) for code, kind in braket.ERROR_CLASSES.items()] + [
    ("SomethingNew", PermanentError, 400),  # unknown and not 5xx: do not retry what we do not understand
    ("SomethingBroke", TransientError, 503),  # unknown 5xx: the service's failure, retried
]


@pytest.mark.parametrize(("code", "kind", "http_status"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
async def test_each_braket_error_code_is_classified(
    aws: Aws, code: str, kind: type[Exception], http_status: int
) -> None:
    adapter = aws.adapter()
    aws.expect_get_device(SV1)
    aws.braket.add_client_error(
        "create_quantum_task",
        service_error_code=code,
        service_message=f"User: arn:aws:iam::123456789012:user/ops key {ACCESS_KEY_ID} is not authorized",
        http_status_code=http_status,
    )
    with pytest.raises(kind) as raised:
        await adapter.submit(spec())
    assert type(raised.value) is kind and code in str(raised.value)
    assert "123456789012" not in str(raised.value) and ACCESS_KEY_ID not in str(raised.value)


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="https://braket.us-east-1.amazonaws.com"),
        ReadTimeoutError(endpoint_url="https://braket.us-east-1.amazonaws.com"),
        TimeoutError(),
    ],
    ids=["endpoint-connection", "read-timeout", "timeout"],
)
def test_unreachable_or_slow_endpoints_are_transient(exc: Exception) -> None:
    assert isinstance(braket.classify(exc), TransientError)


def test_the_error_table_covers_every_error_the_braket_api_declares() -> None:
    model = boto3.Session(region_name="us-east-1").client("braket").meta.service_model
    declared = {e.name for op in model.operation_names for e in model.operation_model(op).error_shapes}
    assert declared <= set(braket.ERROR_CLASSES)
    assert braket.ERROR_CLASSES["ServiceQuotaExceededException"] is QuotaError


@pytest.mark.parametrize(
    ("code", "expected"),
    [("ServiceQuotaExceededException", "quota_exhausted"), ("AccessDeniedException", "provider_error")],
)
async def test_a_refused_cloud_submission_fails_the_job_with_its_code_and_no_secret(
    braket_config: Config, alice_key: str, aws: Aws, code: str, expected: str
) -> None:
    for arn in DEVICES.values():
        aws.expect_get_device(arn)
    aws.braket.add_client_error(
        "create_quantum_task",
        service_error_code=code,
        service_message=f"User: arn:aws:iam::123456789012:user/ops with {ACCESS_KEY_ID} may not",
        http_status_code=402 if code.startswith("Service") else 403,
    )
    gateway = Gateway(braket_config)
    gateway.providers.adapters["braket"] = aws.adapter()
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        submitted = body(
            await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100, "backend": "braket/sv1"})
        )
        view = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"], "timeout_s": 30}))
        audit = await gateway.store.audit_tail(limit=1000)
    assert view["state"] == "failed" and view["error"]["code"] == expected and view["attempts"] == 1
    everything = json.dumps(view) + repr(audit)
    assert SECRET not in everything and ACCESS_KEY_ID not in everything and "123456789012" not in everything


async def test_usage_of_a_cancelled_job_counts_the_tasks_that_completed(aws: Aws) -> None:
    # What the wall-clock cap settles by: Braket bills a task that completed, not one cancelled.
    adapter = aws.adapter()
    tasks = [TASK_ARN, TASK_ARN + "1"]
    aws.expect_get_task("COMPLETED", task=tasks[0])
    aws.expect_get_task("CANCELLED", task=tasks[1])
    usage = await adapter.usage(ProviderRef(json.dumps({"tasks": tasks, "registers": [{}, {}]})))
    assert usage.circuits_run == 1 and usage.cost_micro_usd is None and usage.qpu_seconds is None


async def test_a_throttled_device_listing_answers_unavailable_and_is_asked_again(
    braket_config: Config, alice_key: str, aws: Aws, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(braket, "LIST_RETRY_S", 0.3)
    aws.braket.add_client_error("get_device", service_error_code="ThrottlingException", http_status_code=429)
    for arn in DEVICES.values():  # the next listing: Braket answers again
        aws.expect_get_device(arn)
    aws.expect_create(ANY, shots=10)
    aws.expect_get_task("COMPLETED")
    aws.expect_get_task("COMPLETED")
    aws.expect_results([[1, 1]] * 10, [0, 1])
    gateway = Gateway(braket_config)
    gateway.providers.adapters["braket"] = aws.adapter()
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        refused = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 10, "backend": "braket/sv1"})
        await anyio.sleep(braket.LIST_RETRY_S)
        listed = body(await client.call_tool("list_backends", {}))["backends"]
        admitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 10, "backend": "braket/sv1"}))
        view = body(await client.call_tool("wait_for_job", {"job_id": admitted["job_id"], "timeout_s": 30}))
    refusal = body(refused)
    assert refused.is_error and refusal["code"] == "unavailable"
    assert 0 < refusal["retry_after_s"] <= max(1.0, braket.LIST_RETRY_S)
    assert "ThrottlingException" in refusal["message"]
    assert next(b for b in listed if b["id"] == "braket/sv1")["status"] == "online"  # asked again, not cached
    assert view["state"] == "succeeded"
