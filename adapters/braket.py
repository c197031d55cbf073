"""Amazon Braket: the SDK's local simulators offline, QPUs and managed simulators by ARN in the cloud.

Programs go to Braket as OpenQASM 3. Our OpenQASM 2 or 3 source is parsed by Qiskit,
translated to gates the device lists in its capabilities (named as Braket names them: `cnot`,
not `cx`), and exported with one qubit register and one bit register, since Braket reports
measurements per measured qubit in a single register. Which qubit fed which bit of which of our
classical registers is kept beside the task, so counts come back per register as from Aer.
Routing onto the coupling map is left to Braket's own compiler (tasks are not verbatim).

Cloud submissions are exactly-once: the `clientToken` of every task is our job id, so a
worker that crashed after sending the request and resubmits gets the same task back.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qpu_gateway.adapters import qasm, sdk_imports, sdk_thread
from qpu_gateway.adapters.base import (
    LIST_RETRY_S,
    AdapterError,
    Backend,
    JobSpec,
    PermanentError,
    ProviderRef,
    ProviderState,
    ProviderStatus,
    QuotaError,
    RegisterCounts,
    Result,
    TransientError,
    Usage,
    pass_internal,
)

if TYPE_CHECKING:
    from braket.aws import AwsSession
    from qiskit import QuantumCircuit

PROVIDER = "braket"
BUCKET_ENV = "QPU_GATEWAY_BRAKET_BUCKET"
PREFIX_ENV = "QPU_GATEWAY_BRAKET_PREFIX"
DEFAULT_PREFIX = "qpu-gateway"
# Braket's home region, where most devices and the managed simulators live, when boto names none.
DEFAULT_REGION = "us-east-1"
DEVICE_INFO_TTL_S = 300.0
# An absent credential is looked for again at most this often (the lookup may query the instance
# metadata service, which takes a second where there is none).
CREDENTIALS_RECHECK_S = 60.0
OPENQASM_ACTION = "braket.ir.openqasm.program"
RESULTS_FILENAME = "results.json"

# Our backend name -> the SDK's local simulator.
LOCAL_SIMULATORS = {"local_sv": "braket_sv", "local_dm": "braket_dm"}

# Our backend name -> device ARN (the region is part of the ARN; simulators have none). An
# operator may pass another table to the constructor; the ids match policy/prices.toml.
DEVICE_ARNS: dict[str, str] = {
    "sv1": "arn:aws:braket:::device/quantum-simulator/amazon/sv1",
    "dm1": "arn:aws:braket:::device/quantum-simulator/amazon/dm1",
    "tn1": "arn:aws:braket:::device/quantum-simulator/amazon/tn1",
    "ionq_forte_1": "arn:aws:braket:us-east-1::device/qpu/ionq/Forte-1",
    "ionq_forte_enterprise_1": "arn:aws:braket:us-east-1::device/qpu/ionq/Forte-Enterprise-1",
    "iqm_garnet": "arn:aws:braket:eu-north-1::device/qpu/iqm/Garnet",
    "iqm_emerald": "arn:aws:braket:eu-north-1::device/qpu/iqm/Emerald",
    "aqt_ibex_q1": "arn:aws:braket:eu-north-1::device/qpu/aqt/Ibex-Q1",
    "rigetti_ankaa_3": "arn:aws:braket:us-west-1::device/qpu/rigetti/Ankaa-3",
    "rigetti_cepheus_1_108q": "arn:aws:braket:us-west-1::device/qpu/rigetti/Cepheus-1-108Q",
    "quera_aquila": "arn:aws:braket:us-east-1::device/qpu/quera/Aquila",
}

# Max shots per task where the device's capabilities cannot be read (no credentials yet); the
# capabilities' `shotsRange` wins when they can. QuEra Aquila: 1,000 (issue 4).
KNOWN_MAX_SHOTS = {"quera_aquila": 1000}

# botocore ClientError code -> our class. Each line says why.
ERROR_CLASSES: dict[str, type[AdapterError]] = {
    # Slow down and try again: the request was fine.
    "ThrottlingException": TransientError,
    "TooManyRequestsException": TransientError,
    "RequestLimitExceeded": TransientError,
    "SlowDown": TransientError,  # S3's throttling
    # The service failed (HTTP 5xx): a retry may land on a healthy host.
    "InternalServiceException": TransientError,
    "InternalServerError": TransientError,
    "InternalError": TransientError,  # S3
    "ServiceUnavailable": TransientError,
    "ServiceUnavailableException": TransientError,
    "RequestTimeout": TransientError,
    "RequestTimeoutException": TransientError,
    # The device is in maintenance or outside its availability window (424); it comes back.
    "DeviceOfflineException": TransientError,
    # The account's Braket quota (tasks, concurrent tasks) is used up: retrying cannot help.
    "ServiceQuotaExceededException": QuotaError,
    # The request itself is wrong (program, shots, parameters): it will fail the same way again.
    "ValidationException": PermanentError,
    # The credentials lack a permission or are not valid: an operator must fix the IAM setup.
    "AccessDeniedException": PermanentError,
    "AccessDenied": PermanentError,  # S3
    "UnrecognizedClientException": PermanentError,
    "InvalidSignatureException": PermanentError,
    "ExpiredTokenException": PermanentError,
    "InvalidClientTokenId": PermanentError,
    # No such device, task or results object: nothing to retry against.
    "ResourceNotFoundException": PermanentError,
    "NoSuchKey": PermanentError,
    "NoSuchBucket": PermanentError,
    # The device is gone for good.
    "DeviceRetiredException": PermanentError,
    # The clientToken was used for a different request, or the task already ended.
    "ConflictException": PermanentError,
}

# Qiskit gate name -> Braket gate name, for gates whose matrices and parameter orders agree.
QISKIT_TO_BRAKET = {
    "id": "i",
    "h": "h",
    "x": "x",
    "y": "y",
    "z": "z",
    "s": "s",
    "sdg": "si",
    "t": "t",
    "tdg": "ti",
    "sx": "v",
    "sxdg": "vi",
    "rx": "rx",
    "ry": "ry",
    "rz": "rz",
    "r": "prx",
    "p": "phaseshift",
    "cx": "cnot",
    "cy": "cy",
    "cz": "cz",
    "cp": "cphaseshift",
    "swap": "swap",
    "iswap": "iswap",
    "ccx": "ccnot",
    "cswap": "cswap",
    "rxx": "xx",
    "ryy": "yy",
    "rzz": "zz",
}

_TASK_STATES = {
    "CREATED": ProviderState.QUEUED,
    "QUEUED": ProviderState.QUEUED,
    "RUNNING": ProviderState.RUNNING,
    "CANCELLING": ProviderState.RUNNING,  # not final: a task being cancelled may still complete
    "COMPLETED": ProviderState.DONE,
    "FAILED": ProviderState.FAILED,
    "CANCELLED": ProviderState.CANCELLED,
}

_DEVICE_STATUS = {"ONLINE": "online", "OFFLINE": "offline", "RETIRED": "unavailable"}

# Never echoed: an IAM principal (it names the account) or anything shaped like an access key id.
_PRINCIPAL = re.compile(r"arn:aws[\w-]*:(?:iam|sts)::\d+:\S+")
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")

_LOCAL_PREFIX = "local:"

# Names what to set, never a value.
_CREDENTIALS_HINT = (
    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or an IAM role, as boto looks for them"
)


def classify(exc: BaseException) -> AdapterError:
    """A botocore/SDK failure as Transient, Quota or Permanent, with a message safe to show."""
    sdk_imports.ensure("braket")
    from botocore.exceptions import (  # type: ignore[import-untyped]
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )
    from botocore.exceptions import ConnectTimeoutError as BotoConnectTimeout

    pass_internal(exc)  # a failure of this process is not the provider's answer
    if isinstance(exc, AdapterError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        kind = ERROR_CLASSES.get(code) or (TransientError if status >= 500 else PermanentError)
        message = _scrub(str(error.get("Message") or ""))[:300]
        return kind(f"Braket {code}: {message}" if message else f"Braket {code}", code=code)
    name = type(exc).__name__
    if isinstance(exc, (EndpointConnectionError, BotoConnectTimeout, ReadTimeoutError, ConnectionClosedError)):
        return TransientError(f"Braket could not be reached ({name}); will retry", code=name)
    if isinstance(exc, TimeoutError):
        return TransientError("Braket did not answer in time; will retry", code="timeout")
    if isinstance(exc, NoCredentialsError):
        return PermanentError(f"No AWS credentials: set {_CREDENTIALS_HINT}.", code=name)
    return PermanentError(f"Braket failed: {name}: {_scrub(_first_line(exc))}", code=name)


@dataclass(frozen=True, slots=True)
class _Program:
    """One circuit as sent to Braket, and where each bit of each of our registers comes from."""

    source: str
    # register name -> per bit (bit 0 first), the qubit measured into it, or None if never measured
    registers: dict[str, list[int | None]]
    qubits: int


@dataclass(slots=True)
class _Device:
    """What a device's GetDevice answer tells us, read once per TTL."""

    arn: str
    status: str
    simulator: bool
    qubits: int | None
    max_shots: int | None
    operations: frozenset[str]
    runs_openqasm: bool
    queue_depth: int | None
    read_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class _Cloud:
    session: AwsSession
    bucket: str
    prefix: str


class BraketAdapter:
    """Braket devices: `braket/local_sv|local_dm` run here; the others by ARN through an `AwsSession`.

    `aws_session`, `device_arns`, `bucket` and `prefix` are seams for configuration and tests;
    by default credentials come from boto's chain and the bucket from `QPU_GATEWAY_BRAKET_BUCKET`.
    """

    provider = PROVIDER

    def __init__(
        self,
        aws_session: AwsSession | None = None,
        device_arns: dict[str, str] | None = None,
        *,
        bucket: str | None = None,
        prefix: str | None = None,
    ) -> None:
        self.device_arns = dict(DEVICE_ARNS if device_arns is None else device_arns)
        self._injected_session = aws_session
        self._bucket = bucket
        self._prefix = prefix
        self._cloud: _Cloud | None = None
        self._cloud_missing: tuple[float, str] | None = None
        self._regional: dict[str, AwsSession] = {}
        self._devices: dict[str, _Device] = {}
        self._local_props: dict[str, tuple[int | None, int | None, frozenset[str]]] = {}
        self._finished: dict[str, Result] = {}
        self._lock = threading.Lock()

    # -- the contract --------------------------------------------------------------------------

    async def backends(self) -> list[Backend]:
        found = [await self._local_backend(name) for name in LOCAL_SIMULATORS]
        cloud = await sdk_thread.run_sync(self._resolve_cloud)
        if isinstance(cloud, str):
            return found + [self._unavailable(name, arn, cloud) for name, arn in self.device_arns.items()]
        return found + await sdk_thread.run_sync(lambda: self._cloud_backends(cloud))

    async def submit(self, job: JobSpec) -> ProviderRef:
        name = _device_name(job.backend)
        if name in LOCAL_SIMULATORS:
            # Abandoned on cancel, as with Aer: a shutdown does not wait for a simulation.
            result = await sdk_thread.run_sync(lambda: self._run_local(job, LOCAL_SIMULATORS[name]))
            self._finished[job.job_id] = result
            return ProviderRef(_LOCAL_PREFIX + job.job_id)
        arn = self.device_arns.get(name)
        if arn is None:
            raise PermanentError(f"No Braket device is configured for {job.backend[:100]!r}.")
        return await sdk_thread.run_sync(lambda: self._submit_cloud(job, name, arn))

    async def status(self, ref: ProviderRef) -> ProviderStatus:
        if ref.provider_job_id.startswith(_LOCAL_PREFIX):
            if ref.provider_job_id[len(_LOCAL_PREFIX) :] in self._finished:
                return ProviderStatus(ProviderState.DONE)
            # A local run lives only in the process that ran it; another process must run it again.
            return ProviderStatus(ProviderState.UNKNOWN, "the simulation ran in a process that has stopped")
        return await sdk_thread.run_sync(lambda: self._cloud_status(_decode_ref(ref)))

    async def result(self, ref: ProviderRef) -> Result:
        if ref.provider_job_id.startswith(_LOCAL_PREFIX):
            try:
                return self._finished.pop(ref.provider_job_id[len(_LOCAL_PREFIX) :])
            except KeyError:
                raise PermanentError("no result held for this job") from None
        return await sdk_thread.run_sync(lambda: self._cloud_result(_decode_ref(ref)))

    async def cancel(self, ref: ProviderRef) -> None:
        if ref.provider_job_id.startswith(_LOCAL_PREFIX):
            self._finished.pop(ref.provider_job_id[len(_LOCAL_PREFIX) :], None)
            return
        await sdk_thread.run_sync(lambda: self._cloud_cancel(_decode_ref(ref)))

    async def usage(self, ref: ProviderRef) -> Usage:
        if ref.provider_job_id.startswith(_LOCAL_PREFIX):
            return Usage(cost_micro_usd=0)  # the local simulators run here, free
        return await sdk_thread.run_sync(lambda: self._cloud_usage(_decode_ref(ref)))

    # -- local simulators ----------------------------------------------------------------------

    async def _local_backend(self, name: str) -> Backend:
        simulator = LOCAL_SIMULATORS[name]
        if simulator not in self._local_props:
            self._local_props[simulator] = await sdk_thread.run_sync(lambda: _local_properties(simulator))
        qubits, max_shots, operations = self._local_props[simulator]
        return Backend(
            id=f"{PROVIDER}/{name}",
            provider=PROVIDER,
            name=name,
            qubits=qubits,
            simulator=True,
            status="online",
            max_shots=max_shots,
            basis_gates=tuple(sorted(operations)),
        )

    def _run_local(self, job: JobSpec, simulator: str) -> Result:
        sdk_imports.ensure("braket")
        from braket.devices import LocalSimulator
        from braket.ir.openqasm import Program

        qubits, max_shots, operations = _local_properties(simulator)
        _check_shots(job, max_shots)
        # The density-matrix simulator warns on every noise-free circuit, which is every circuit we send.
        warnings.filterwarnings("ignore", message="You are running a noise-free circuit", category=UserWarning)
        device = LocalSimulator(simulator)
        counts = []
        for source in job.circuits:
            program = translate(source, operations, qubits)
            try:
                task = device.run(Program(source=program.source), shots=job.shots).result()
            except Exception as exc:  # the simulator raises several unrelated types for programs it refuses
                pass_internal(exc)
                raise PermanentError(f"The Braket simulator could not run the circuit: {_first_line(exc)}") from None
            counts.append(register_counts(list(task.measured_qubits), task.measurements, program.registers))
        return Result(
            counts=tuple(counts),
            metadata={"simulator": simulator, "tasks": str(len(job.circuits)), "shots": str(job.shots * len(counts))},
        )

    # -- the cloud -----------------------------------------------------------------------------

    def _resolve_cloud(self) -> _Cloud | str:
        """The session and bucket to use, or the reason (naming what to set) there are none."""
        with self._lock:
            if self._cloud is not None:
                return self._cloud
            if self._cloud_missing is not None and time.monotonic() - self._cloud_missing[0] < CREDENTIALS_RECHECK_S:
                return self._cloud_missing[1]
            bucket = self._bucket or os.environ.get(BUCKET_ENV) or os.environ.get("AMZN_BRAKET_OUT_S3_BUCKET")
            prefix = (self._prefix or os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX).strip("/")
            missing = []
            session = self._injected_session
            if session is None:
                try:
                    session = _default_session()
                except Exception as exc:  # a broken profile file, say
                    missing.append(f"a readable AWS configuration ({classify(exc)})")
            if session is not None:
                try:
                    found = session.boto_session.get_credentials()
                except Exception as exc:  # a credential_process that fails, an unreadable SSO cache
                    missing.append(f"usable AWS credentials ({classify(exc)})")
                    session = None
                else:
                    if found is None:
                        missing.append(f"AWS credentials ({_CREDENTIALS_HINT})")
                        session = None
            if not bucket:
                missing.append(f"an S3 bucket for results in {BUCKET_ENV} (and optionally {PREFIX_ENV})")
            if missing or session is None:
                reason = "Braket cloud devices need " + " and ".join(missing) + "."
                self._cloud_missing = (time.monotonic(), reason)
                return reason
            self._cloud = _Cloud(session=session, bucket=str(bucket), prefix=prefix)
            return self._cloud

    def _require_cloud(self) -> _Cloud:
        cloud = self._resolve_cloud()
        if isinstance(cloud, str):
            raise PermanentError(cloud)
        return cloud

    def _session_for(self, cloud: _Cloud, arn: str) -> AwsSession:
        """The session for the region an ARN names (regionless simulator ARNs use the home one)."""
        region = arn.split(":")[3] if arn.count(":") >= 3 else ""
        if not region or region == cloud.session.region:
            return cloud.session
        with self._lock:
            if region not in self._regional:
                self._regional[region] = cloud.session.copy_session(region=region)
            return self._regional[region]

    def _device(self, cloud: _Cloud, arn: str) -> _Device:
        cached = self._devices.get(arn)
        if cached is not None and time.monotonic() - cached.read_at < DEVICE_INFO_TTL_S:
            return cached
        try:
            answer = self._session_for(cloud, arn).get_device(arn)
        except Exception as exc:
            raise classify(exc) from None
        device = _parse_device(arn, answer)
        self._devices[arn] = device
        return device

    def _cloud_backends(self, cloud: _Cloud) -> list[Backend]:
        """One GetDevice per device, in table order; once Braket is unreachable, the rest are not asked."""
        listed = []
        unreachable: str | None = None
        for name, arn in self.device_arns.items():
            if unreachable is not None:
                listed.append(self._unavailable(name, arn, unreachable, retry_after_s=LIST_RETRY_S))
                continue
            try:
                listed.append(self._cloud_backend(name, self._device(cloud, arn)))
            except AdapterError as exc:
                transient = isinstance(exc, TransientError)
                listed.append(self._unavailable(name, arn, str(exc), retry_after_s=LIST_RETRY_S if transient else None))
                if transient:
                    unreachable = str(exc)
        return listed

    def _cloud_backend(self, name: str, device: _Device) -> Backend:
        status = _DEVICE_STATUS.get(device.status, "offline")
        reason = None
        if device.status == "RETIRED":
            reason = "AWS has retired this device."
        elif not device.runs_openqasm:
            status, reason = (
                "unavailable",
                "This device does not run gate circuits (OpenQASM); the gateway sends only those.",
            )
        return Backend(
            id=f"{PROVIDER}/{name}",
            provider=PROVIDER,
            name=name,
            qubits=device.qubits,
            simulator=device.simulator,
            status=status,
            max_shots=device.max_shots or KNOWN_MAX_SHOTS.get(name),
            basis_gates=tuple(sorted(device.operations)),
            queue_depth=device.queue_depth,
            reason=reason,
        )

    def _unavailable(self, name: str, arn: str, reason: str, *, retry_after_s: float | None = None) -> Backend:
        return Backend(
            id=f"{PROVIDER}/{name}",
            provider=PROVIDER,
            name=name,
            qubits=None,
            simulator="quantum-simulator" in arn,
            status="unavailable",
            max_shots=KNOWN_MAX_SHOTS.get(name),
            reason=reason,
            retry_after_s=retry_after_s,
        )

    def _submit_cloud(self, job: JobSpec, name: str, arn: str) -> ProviderRef:
        sdk_imports.ensure("braket")
        from braket.aws import AwsQuantumTask
        from braket.ir.openqasm import Program

        cloud = self._require_cloud()
        device = self._device(cloud, arn)
        _check_shots(job, device.max_shots or KNOWN_MAX_SHOTS.get(name))
        if device.status == "RETIRED":
            raise PermanentError(f"{job.backend} has been retired by AWS.")
        if not device.runs_openqasm:
            raise PermanentError(f"{job.backend} does not run gate circuits (OpenQASM).")
        programs = [translate(source, device.operations, device.qubits) for source in job.circuits]
        session = self._session_for(cloud, arn)
        tasks = []
        for index, program in enumerate(programs):
            # The idempotency token: the same job (and circuit) always sends the same token, so a
            # resubmission after a crash returns the task AWS already created.
            token = job.job_id if len(programs) == 1 else f"{job.job_id}-{index}"
            try:
                task_arn = session.create_quantum_task(
                    clientToken=token,
                    deviceArn=arn,
                    action=Program(source=program.source).json(),
                    shots=job.shots,
                    outputS3Bucket=cloud.bucket,
                    outputS3KeyPrefix=f"{cloud.prefix}/{job.job_id}",
                    tags={"qpu-gateway-job": job.job_id},
                )
            except Exception as exc:
                raise classify(exc) from None
            tasks.append(AwsQuantumTask(task_arn, aws_session=session, quiet=True).id)
        return ProviderRef(json.dumps({"tasks": tasks, "registers": [p.registers for p in programs]}))

    def _task_metadata(self, cloud: _Cloud, task_arn: str) -> dict[str, Any]:
        sdk_imports.ensure("braket")
        from braket.aws import AwsQuantumTask

        try:
            metadata: dict[str, Any] = AwsQuantumTask(
                task_arn, aws_session=self._session_for(cloud, task_arn), quiet=True
            ).metadata()
        except Exception as exc:
            raise classify(exc) from None
        return metadata

    def _cloud_status(self, ref: _Ref) -> ProviderStatus:
        cloud = self._require_cloud()
        states = []
        for task_arn in ref.tasks:
            metadata = self._task_metadata(cloud, task_arn)
            state = _TASK_STATES.get(str(metadata.get("status")), ProviderState.QUEUED)
            if state is ProviderState.FAILED:
                reason = _scrub(str(metadata.get("failureReason") or "no reason given"))[:300]
                return ProviderStatus(ProviderState.FAILED, f"Braket task failed: {reason}")
            states.append(state)
        for state in (ProviderState.CANCELLED, ProviderState.RUNNING, ProviderState.QUEUED):
            if state in states:
                return ProviderStatus(state)
        return ProviderStatus(ProviderState.DONE)

    def _cloud_result(self, ref: _Ref) -> Result:
        sdk_imports.ensure("braket")
        from braket.schema_common import BraketSchemaBase
        from braket.task_result import GateModelTaskResult
        from braket.tasks import GateModelQuantumTaskResult

        cloud = self._require_cloud()
        counts = []
        shots = 0
        device = ""
        for task_arn, registers in zip(ref.tasks, ref.registers, strict=True):
            metadata = self._task_metadata(cloud, task_arn)
            session = self._session_for(cloud, task_arn)
            key = f"{metadata['outputS3Directory']}/{RESULTS_FILENAME}"
            try:
                body = session.s3_client.get_object(Bucket=metadata["outputS3Bucket"], Key=key)["Body"].read()
            except Exception as exc:
                raise classify(exc) from None
            try:
                raw = BraketSchemaBase.parse_raw_schema(body.decode("utf-8"))
                if not isinstance(raw, GateModelTaskResult):
                    raise TypeError(type(raw).__name__)
                task = GateModelQuantumTaskResult.from_object(raw)
            except Exception as exc:  # pydantic, json and the SDK's own errors for a malformed result
                pass_internal(exc)
                raise PermanentError(f"Braket returned a result this gateway cannot read: {_first_line(exc)}") from None
            counts.append(register_counts(list(task.measured_qubits), task.measurements, registers))
            shots += int(raw.taskMetadata.shots)
            device = str(raw.taskMetadata.deviceId)
        # Braket bills per task and per shot; the gateway prices that from its table.
        return Result(
            counts=tuple(counts), metadata={"tasks": str(len(ref.tasks)), "shots": str(shots), "device": device}
        )

    def _cloud_usage(self, ref: _Ref) -> Usage:
        """How many of the job's tasks (one per circuit) completed. Braket bills a task that completed,
        not one cancelled or failed: the SDK's own cost tracker prices those at $0
        (braket/tracking/tracker.py, `_get_qpu_task_cost`)."""
        cloud = self._require_cloud()
        completed = [self._task_metadata(cloud, task).get("status") == "COMPLETED" for task in ref.tasks]
        return Usage(circuits_run=sum(completed))

    def _cloud_cancel(self, ref: _Ref) -> None:
        sdk_imports.ensure("braket")
        from braket.aws import AwsQuantumTask

        cloud = self._require_cloud()
        for task_arn in ref.tasks:
            try:
                AwsQuantumTask(task_arn, aws_session=self._session_for(cloud, task_arn), quiet=True).cancel()
            except Exception as exc:
                raise classify(exc) from None


# -- translation -------------------------------------------------------------------------------


def translate(source: str, operations: frozenset[str], max_qubits: int | None) -> _Program:
    """Our OpenQASM as a Braket OpenQASM 3 program for a device offering `operations`.

    Gates outside the device's set are decomposed by Qiskit into the ones it has; measurements
    must come last on each qubit, one per qubit and bit (Braket measures once, at the end).
    """
    sdk_imports.ensure("qiskit")
    import qiskit

    try:
        circuit = qasm.load(source)
    except qasm.CircuitSourceError as exc:
        raise PermanentError(str(exc)) from None
    if max_qubits is not None and circuit.num_qubits > max_qubits:
        raise PermanentError(f"The circuit uses {circuit.num_qubits} qubits; this device has {max_qubits}.")
    basis = {q: b for q, b in QISKIT_TO_BRAKET.items() if b in operations}
    if any(i.operation.name not in basis and i.operation.name not in ("measure", "barrier") for i in circuit.data):
        sdk_imports.ensure("transpiler")
        try:
            circuit = qiskit.transpile(circuit, basis_gates=[*basis, "measure"], optimization_level=1)
        except Exception as exc:  # the transpiler raises its own errors for gates it cannot decompose
            pass_internal(exc)
            raise PermanentError(
                f"The circuit cannot be expressed in this device's gates ({', '.join(sorted(operations))}): "
                f"{_first_line(exc)}"
            ) from None
    return _export(circuit, basis)


def _export(circuit: QuantumCircuit, basis: dict[str, str]) -> _Program:
    sdk_imports.ensure("qiskit")
    import qiskit.qasm3
    from qiskit import ClassicalRegister, QuantumCircuit, QuantumRegister

    measures = [i for i in circuit.data if i.operation.name == "measure"]
    qubits = QuantumRegister(circuit.num_qubits, "q")
    out = QuantumCircuit(qubits, *([ClassicalRegister(len(measures), "b")] if measures else []))
    measured: set[int] = set()
    source_of: dict[int, int] = {}  # our clbit index -> qubit index
    for instruction in circuit.data:
        op = instruction.operation
        targets = [circuit.find_bit(q).index for q in instruction.qubits]
        if op.name == "barrier":
            continue
        if measured.intersection(targets):
            raise PermanentError("Braket measures each qubit once, at the end: move every measurement last.")
        if op.name == "measure":
            clbit = circuit.find_bit(instruction.clbits[0]).index
            if clbit in source_of:
                raise PermanentError("Each classical bit may be measured into only once on Braket.")
            measured.add(targets[0])
            source_of[clbit] = targets[0]
            out.measure(qubits[targets[0]], out.clbits[len(source_of) - 1])
            continue
        if op.name not in basis or getattr(op, "condition", None) is not None:
            raise PermanentError(f"Braket cannot run the operation {op.name!r} here.")
        renamed = op.to_mutable()
        renamed.name = basis[op.name]
        out.append(renamed, [qubits[t] for t in targets])
    registers = {creg.name: [source_of.get(circuit.find_bit(bit).index) for bit in creg] for creg in circuit.cregs}
    source = qiskit.qasm3.dumps(out, includes=(), basis_gates=tuple(basis.values()))
    return _Program(source=source, registers=registers, qubits=circuit.num_qubits)


def register_counts(
    measured_qubits: list[int], measurements: Sequence[Sequence[int]], registers: dict[str, list[int | None]]
) -> RegisterCounts:
    """Braket's per-shot measurements (one column per measured qubit) as counts per register.

    Bitstrings read as Qiskit's do: the register's highest bit first. A bit never measured is 0.
    """
    column = {int(q): i for i, q in enumerate(measured_qubits)}
    counts: RegisterCounts = {}
    for name, sources in registers.items():
        columns: list[int | None] = []
        for qubit in reversed(sources):
            if qubit is not None and qubit not in column:
                raise PermanentError(f"Braket's result has no measurement of qubit {qubit}.")
            columns.append(None if qubit is None else column[qubit])
        tally = Counter("".join("0" if c is None else str(int(row[c])) for c in columns) for row in measurements)
        counts[name] = dict(tally)
    return counts


# -- small readers -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ref:
    tasks: list[str]
    registers: list[dict[str, list[int | None]]]


def _decode_ref(ref: ProviderRef) -> _Ref:
    try:
        data = json.loads(ref.provider_job_id)
        return _Ref(tasks=[str(t) for t in data["tasks"]], registers=list(data["registers"]))
    except (ValueError, KeyError, TypeError):
        raise PermanentError("The stored Braket task reference is not readable.") from None


def _device_name(backend_id: str) -> str:
    provider, _, name = backend_id.partition("/")
    if provider != PROVIDER:
        raise PermanentError(f"{backend_id[:100]!r} is not a Braket backend.")
    return name


def _check_shots(job: JobSpec, max_shots: int | None) -> None:
    if max_shots is not None and job.shots > max_shots:
        raise PermanentError(f"{job.backend} runs at most {max_shots:,} shots per task; {job.shots:,} were asked.")


def _default_session() -> AwsSession:
    sdk_imports.ensure("braket")
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]
    from braket.aws import AwsSession

    boto_session = boto3.Session(region_name=os.environ.get("AWS_REGION") or None)
    if boto_session.region_name is None:
        boto_session = boto3.Session(region_name=DEFAULT_REGION)
    # Short connect timeout and bounded retries: an unreachable endpoint must not stall listing.
    config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
    return AwsSession(boto_session=boto_session, config=config)


@functools.cache
def _local_properties(simulator: str) -> tuple[int | None, int | None, frozenset[str]]:
    sdk_imports.ensure("braket")
    from braket.devices import LocalSimulator

    properties = LocalSimulator(simulator).properties
    shots = properties.service.shotsRange
    operations = properties.action[OPENQASM_ACTION].supportedOperations
    # The simulators accept any shot count (sys.maxsize); no cap is shown rather than that number.
    max_shots = int(shots[1]) if int(shots[1]) < 2**31 else None
    return int(properties.paradigm.qubitCount), max_shots, frozenset(str(o).lower() for o in operations)


def _parse_device(arn: str, answer: dict[str, Any]) -> _Device:
    try:
        capabilities = json.loads(answer.get("deviceCapabilities") or "{}")
    except ValueError:
        capabilities = {}
    action = capabilities.get("action") or {}
    shots_range = (capabilities.get("service") or {}).get("shotsRange") or []
    qubits = (capabilities.get("paradigm") or {}).get("qubitCount")
    openqasm = action.get(OPENQASM_ACTION) or {}
    queue = [
        int(entry["queueSize"])
        for entry in answer.get("deviceQueueInfo") or []
        if entry.get("queue") == "QUANTUM_TASKS_QUEUE" and str(entry.get("queueSize", "")).isdigit()
    ]
    return _Device(
        arn=arn,
        status=str(answer.get("deviceStatus", "OFFLINE")),
        simulator=answer.get("deviceType") == "SIMULATOR",
        qubits=int(qubits) if isinstance(qubits, int) else None,
        max_shots=int(shots_range[1]) if len(shots_range) == 2 else None,
        operations=frozenset(str(o).lower() for o in openqasm.get("supportedOperations") or []),
        runs_openqasm=bool(openqasm),
        queue_depth=sum(queue) if queue else None,
    )


def _scrub(text: str) -> str:
    return _ACCESS_KEY_ID.sub("<key>", _PRINCIPAL.sub("<principal>", text))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
