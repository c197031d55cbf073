"""Azure Quantum through azure-quantum: the IonQ, Quantinuum and Rigetti targets of one workspace.

The workspace comes from `AZURE_QUANTUM_RESOURCE_ID` + `AZURE_QUANTUM_LOCATION` (signed in through
azure-identity's `DefaultAzureCredential`) or from `AZURE_QUANTUM_CONNECTION_STRING`. Our job id
is the Azure job id, so a submit that is repeated after a crash finds the job it already created.
Each target gets the input format its SDK target class names, with the least translation:
OpenQASM 2 for Quantinuum, IonQ circuit JSON for IonQ, Quil for Rigetti.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from qpu_gateway.adapters import qasm, sdk_imports, sdk_thread
from qpu_gateway.adapters.base import (
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
    from qiskit import QuantumCircuit

T = TypeVar("T")

PROVIDER = "azure"
_JOB_NAMESPACE = uuid.UUID("6b1f6f4e-5a53-4c1e-9a55-0f3a1c2d7e10")  # fixed: the same job id maps the same way
ENV_RESOURCE_ID = "AZURE_QUANTUM_RESOURCE_ID"
ENV_LOCATION = "AZURE_QUANTUM_LOCATION"
ENV_CONNECTION_STRING = "AZURE_QUANTUM_CONNECTION_STRING"

# Names the variables, never their values: a connection string carries the workspace's API key.
UNCONFIGURED_REASON = (
    f"Azure Quantum is not configured: set {ENV_RESOURCE_ID} and {ENV_LOCATION} (and sign in for "
    f"azure-identity's DefaultAzureCredential: az login, a managed identity, or AZURE_TENANT_ID, "
    f"AZURE_CLIENT_ID and AZURE_CLIENT_SECRET), or set {ENV_CONNECTION_STRING}."
)

# Azure job status -> our provider state.
_STATES = {
    "waiting": ProviderState.QUEUED,
    "queued": ProviderState.QUEUED,
    "executing": ProviderState.RUNNING,
    "finishing": ProviderState.RUNNING,
    "cancellationrequested": ProviderState.RUNNING,  # still running until the provider confirms
    "cancelling": ProviderState.RUNNING,
    "succeeded": ProviderState.DONE,
    "completed": ProviderState.DONE,
    "failed": ProviderState.FAILED,
    "cancelled": ProviderState.CANCELLED,
}
_TERMINAL = {ProviderState.DONE, ProviderState.FAILED, ProviderState.CANCELLED}

# ---------------------------------------------------------------------------------------------
# Error classification. One table, read top to bottom; `classify` applies it.
# ---------------------------------------------------------------------------------------------

# Service error codes that mean a workspace or provider quota is used up. Matched
# case-insensitively against the `error.code` of the response body, before the HTTP status,
# because a quota answer may come as 403 or 429 and must not be retried either way.
QUOTA_ERROR_CODES = frozenset({"quotaexceeded", "insufficientquota", "quotalimitexceeded", "jobquotaexceeded"})

# HTTP status -> class, for HttpResponseError without a quota code. Any other 5xx is transient,
# any other 4xx permanent.
HTTP_STATUS_CLASSES: dict[int, type[AdapterError]] = {
    400: PermanentError,  # invalid input: the job can never succeed as sent
    401: PermanentError,  # credential rejected: an operator must fix the configuration
    403: PermanentError,  # no access to the workspace or target
    404: PermanentError,  # no such workspace or target
    408: TransientError,  # request timeout
    409: PermanentError,  # conflict (a job id in use is resolved before this table)
    429: TransientError,  # throttled
}

# Exceptions that carry no HTTP status: the request never completed.
TRANSPORT_ERRORS = (
    "ServiceRequestError",  # could not connect (DNS, refused, TLS)
    "ServiceResponseError",  # the connection broke while reading the answer
    "ServiceRequestTimeoutError",
    "ServiceResponseTimeoutError",
)


def classify(exc: BaseException) -> AdapterError:
    """The classified error for an SDK exception; the message names the class of failure, never a secret."""
    pass_internal(exc)  # a failure of this process is not the provider's answer
    sdk_imports.ensure("azure")
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

    if isinstance(exc, AdapterError):
        return exc
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = int(exc.status_code)
        code = _error_code(exc)
        said = code or f"http_{status}"
        detail = f"Azure Quantum answered HTTP {status}" + (f" ({code})" if code else "")
        if code and code.lower() in QUOTA_ERROR_CODES:
            return QuotaError(f"{detail}: the workspace's provider quota is used up.", code=said)
        cls = HTTP_STATUS_CLASSES.get(status, TransientError if status >= 500 else PermanentError)
        if cls is TransientError:
            return TransientError(f"{detail}; retrying later.", code=said)
        if status in (401, 403):
            return PermanentError(
                f"{detail}: the gateway's Azure credential was refused; an operator must fix it.", code=said
            )
        return PermanentError(f"{detail}: {_safe_message(exc)}", code=said)
    name = type(exc).__name__
    if isinstance(exc, ClientAuthenticationError):  # azure-identity found no usable credential
        return PermanentError(
            "Azure sign-in failed: the gateway has no usable Azure credential; an operator must fix it.", code=name
        )
    if isinstance(exc, TimeoutError) or any(cls.__name__ in TRANSPORT_ERRORS for cls in type(exc).__mro__):
        return TransientError(f"Azure Quantum could not be reached ({name}); retrying later.", code=name)
    return PermanentError(f"Azure Quantum call failed ({name}).", code=name)


def _error_code(exc: Any) -> str | None:
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    return str(code) if code else None


def _safe_message(exc: Any) -> str:
    # The service's own message about the request (e.g. an invalid input), first line, bounded.
    error = getattr(exc, "error", None)
    text = str(getattr(error, "message", None) or getattr(exc, "reason", None) or "request rejected")
    return text.strip().splitlines()[0][:300] if text.strip() else "request rejected"


# ---------------------------------------------------------------------------------------------
# Workspace construction
# ---------------------------------------------------------------------------------------------

WorkspaceFactory = Callable[[], Any]  # returns an azure.quantum.Workspace, or None when not configured


def workspace_from_environment() -> Any:
    """The workspace the environment names, or None when nothing is configured."""
    resource_id = os.environ.get(ENV_RESOURCE_ID, "").strip()
    location = os.environ.get(ENV_LOCATION, "").strip()
    connection_string = os.environ.get(ENV_CONNECTION_STRING, "").strip()
    if (resource_id and location) or connection_string:
        sdk_imports.ensure("azure")
    if resource_id and location:
        from azure.identity import DefaultAzureCredential
        from azure.quantum import Workspace

        return Workspace(resource_id=resource_id, location=location, credential=DefaultAzureCredential())
    if connection_string:
        from azure.quantum import Workspace

        return Workspace.from_connection_string(connection_string)
    return None


class _Unconfigured(Exception):
    """No workspace: the reason is safe to show."""


# ---------------------------------------------------------------------------------------------
# Translation: our OpenQASM to what each target takes, and its results back to register counts
# ---------------------------------------------------------------------------------------------

# Gates each translation emits; circuits are transpiled to these first (no layout change).
IONQ_BASIS = ("x", "y", "z", "h", "s", "sdg", "t", "tdg", "sx", "sxdg", "rx", "ry", "rz", "cx", "swap")
QUIL_BASIS = ("x", "y", "z", "h", "s", "sdg", "t", "tdg", "rx", "ry", "rz", "cx", "cz", "swap")
_IONQ_NAMES = {"sdg": "si", "tdg": "ti", "sx": "v", "sxdg": "vi"}  # IonQ's names for these gates
_QUIL_NAMES = {
    "x": "X",
    "y": "Y",
    "z": "Z",
    "h": "H",
    "s": "S",
    "sdg": "DAGGER S",
    "t": "T",
    "tdg": "DAGGER T",
    "rx": "RX",
    "ry": "RY",
    "rz": "RZ",
    "cx": "CNOT",
    "cz": "CZ",
    "swap": "SWAP",
}
_META_REGISTERS = "qpu_gateway_registers"  # [[name, size], ...] of the circuit's classical registers
_META_MEASURED = "qpu_gateway_measured"  # IonQ: the qubit measured into each classical bit (or null)
_META_SHOTS = "qpu_gateway_shots"


@dataclass(frozen=True, slots=True)
class _Payload:
    data: bytes
    metadata: dict[str, str]


def _family(target: str) -> str:
    return target.split(".", 1)[0].lower()


def _load(source: str) -> QuantumCircuit:
    try:
        return qasm.load(source)
    except qasm.CircuitSourceError as exc:
        raise PermanentError(str(exc)) from None


def _transpiled(circuit: QuantumCircuit, basis: tuple[str, ...], target: str) -> QuantumCircuit:
    sdk_imports.ensure("transpiler")
    from qiskit import transpile

    if any(inst.operation.name not in (*basis, "measure", "barrier", "reset") for inst in circuit.data):
        try:
            # Barriers pass through untouched; Qiskit 2.6 refuses them among `basis_gates`.
            circuit = transpile(circuit, basis_gates=[*basis, "measure", "reset"], optimization_level=0)
        except Exception as exc:  # qiskit raises several types for circuits it cannot translate
            pass_internal(exc)
            raise PermanentError(
                f"cannot translate the circuit for {target}: {str(exc).splitlines()[0][:200]}"
            ) from None
    for inst in circuit.data:
        if getattr(inst.operation, "condition", None) is not None or inst.operation.name == "if_else":
            raise PermanentError(f"{target} does not run classically controlled operations.")
        if inst.operation.name not in (*basis, "measure", "barrier", "reset"):
            raise PermanentError(f"{target} cannot run the operation {inst.operation.name!r}.")
    return circuit


def _angle(param: Any, target: str) -> float:
    try:
        return float(param)
    except (TypeError, ValueError):
        raise PermanentError(f"{target} needs every gate angle bound to a number.") from None


def _registers(circuit: QuantumCircuit) -> list[list[Any]]:
    return [[creg.name, creg.size] for creg in circuit.cregs]


def to_ionq(source: str, target: str, shots: int) -> _Payload:
    """IonQ circuit JSON (`ionq.circuit.v1`, gateset "qis"); IonQ measures every qubit at the end."""
    circuit = _transpiled(_load(source), IONQ_BASIS, target)
    gates: list[dict[str, Any]] = []
    measured: list[int | None] = [None] * circuit.num_clbits
    done: set[int] = set()
    for inst in circuit.data:
        name = inst.operation.name
        qubits = [circuit.find_bit(q).index for q in inst.qubits]
        if name == "barrier":
            continue
        if name == "reset":
            raise PermanentError(f"{target} does not run reset.")
        if done.intersection(qubits):
            raise PermanentError(f"{target} measures only at the end: no operation may follow a measurement.")
        if name == "measure":
            measured[circuit.find_bit(inst.clbits[0]).index] = qubits[0]
            done.add(qubits[0])
            continue
        gate: dict[str, Any] = {"gate": _IONQ_NAMES.get(name, name), "targets": qubits}
        if name == "cx":
            gate = {"gate": "x", "controls": [qubits[0]], "targets": [qubits[1]]}
        if inst.operation.params:
            gate["rotation"] = _angle(inst.operation.params[0], target)
        gates.append(gate)
    body = {"gateset": "qis", "qubits": circuit.num_qubits, "circuit": gates}
    metadata = {
        _META_REGISTERS: json.dumps(_registers(circuit)),
        _META_MEASURED: json.dumps(measured),
        _META_SHOTS: str(shots),
    }
    return _Payload(json.dumps(body).encode(), metadata)


def to_openqasm2(source: str, target: str, shots: int) -> _Payload:
    """OpenQASM 2 for Quantinuum: our OpenQASM 2 as written, OpenQASM 3 exported through Qiskit."""
    version, _ = _screen(source)
    circuit = _load(source)
    text = source
    if version != 2:
        sdk_imports.ensure("qiskit")
        import qiskit.qasm2

        try:
            text = qiskit.qasm2.dumps(circuit)
        except Exception as exc:  # the exporter refuses constructs OpenQASM 2 cannot express
            pass_internal(exc)
            raise PermanentError(f"cannot express the circuit in OpenQASM 2 for {target}: {exc}"[:300]) from None
    metadata = {_META_REGISTERS: json.dumps(_registers(circuit)), _META_SHOTS: str(shots)}
    return _Payload(text.encode(), metadata)


def to_quil(source: str, target: str, shots: int) -> _Payload:
    """Quil for Rigetti: one BIT memory region per classical register, named as the register."""
    circuit = _transpiled(_load(source), QUIL_BASIS, target)
    lines = [f"DECLARE {creg.name} BIT[{creg.size}]" for creg in circuit.cregs]
    for inst in circuit.data:
        name = inst.operation.name
        qubits = [str(circuit.find_bit(q).index) for q in inst.qubits]
        if name == "barrier":
            continue
        if name == "measure":
            loc = circuit.find_bit(inst.clbits[0]).registers[0]
            lines.append(f"MEASURE {qubits[0]} {loc[0].name}[{loc[1]}]")
        elif name == "reset":
            lines.append(f"RESET {qubits[0]}")
        elif inst.operation.params:
            lines.append(f"{_QUIL_NAMES[name]}({_angle(inst.operation.params[0], target)!r}) {' '.join(qubits)}")
        else:
            lines.append(f"{_QUIL_NAMES[name]} {' '.join(qubits)}")
    metadata = {_META_REGISTERS: json.dumps(_registers(circuit)), _META_SHOTS: str(shots)}
    return _Payload(("\n".join(lines) + "\n").encode(), metadata)


def _screen(source: str) -> tuple[int, str]:
    try:
        return qasm.screen(source)
    except qasm.CircuitSourceError as exc:
        raise PermanentError(str(exc)) from None


_TRANSLATORS: dict[str, Callable[[str, str, int], _Payload]] = {
    "ionq": to_ionq,
    "quantinuum": to_openqasm2,
    "rigetti": to_quil,
}
_BASIS: dict[str, tuple[str, ...]] = {"ionq": IONQ_BASIS, "quantinuum": (), "rigetti": QUIL_BASIS}


def ionq_counts(output: dict[str, Any], metadata: dict[str, str]) -> RegisterCounts:
    """IonQ's histogram (state index -> probability, qubit 0 the lowest bit) as counts per register."""
    histogram = output.get("histogram")
    if not isinstance(histogram, dict):
        raise PermanentError("the IonQ result has no histogram")
    registers = json.loads(metadata[_META_REGISTERS])
    measured: list[int | None] = json.loads(metadata[_META_MEASURED])
    shots = int(metadata[_META_SHOTS])
    counts: RegisterCounts = {str(name): {} for name, _ in registers}
    for state, n in _largest_remainder({int(k): float(v) for k, v in histogram.items()}, shots).items():
        if n == 0:
            continue
        bits = [0 if q is None else (state >> q) & 1 for q in measured]
        offset = 0
        for name, size in registers:
            value = "".join(str(b) for b in reversed(bits[offset : offset + size]))
            counts[name][value] = counts[name].get(value, 0) + n
            offset += size
    return counts


def _largest_remainder(probabilities: dict[int, float], shots: int) -> dict[int, int]:
    """Whole counts that sum to `shots`, from probabilities (the provider reports no raw shots)."""
    total = sum(probabilities.values()) or 1.0
    raw = {k: p / total * shots for k, p in probabilities.items()}
    counts = {k: int(v) for k, v in raw.items()}
    short = shots - sum(counts.values())
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[:short]:
        counts[k] += 1
    return counts


def quantinuum_counts(output: dict[str, Any], metadata: dict[str, str]) -> RegisterCounts:
    """Quantinuum's per-shot register values (`{"c": ["00", "11", ...]}`) as counts per register."""
    return _per_shot_counts(output, metadata, "the Quantinuum result has no register", str)


def rigetti_counts(output: dict[str, Any], metadata: dict[str, str]) -> RegisterCounts:
    """Rigetti's per-shot memory regions (`{"c": [[0, 0], [1, 1], ...]}`) as counts per register."""

    def bitstring(bits: Any) -> str:
        return "".join(str(int(b)) for b in reversed(bits))  # register bit 0 is the rightmost

    return _per_shot_counts(output, metadata, "the Rigetti result has no memory region", bitstring)


def _per_shot_counts(
    output: dict[str, Any], metadata: dict[str, str], missing: str, value_of: Callable[[Any], str]
) -> RegisterCounts:
    """Tally per-shot values into counts, for each of the job's classical registers in order."""
    counts: RegisterCounts = {}
    for name, _ in json.loads(metadata[_META_REGISTERS]):
        shots = output.get(name)
        if not isinstance(shots, list):
            raise PermanentError(f"{missing} {name!r}")
        counts[str(name)] = dict(Counter(value_of(shot) for shot in shots))
    return counts


_COUNTERS: dict[str, Callable[[dict[str, Any], dict[str, str]], RegisterCounts]] = {
    "ionq": ionq_counts,
    "quantinuum": quantinuum_counts,
    "rigetti": rigetti_counts,
}


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------


class AzureAdapter:
    """One Azure Quantum workspace; every SDK call runs on the SDK thread pool."""

    provider = PROVIDER

    def __init__(self, workspace_factory: WorkspaceFactory | None = None) -> None:
        self._factory: WorkspaceFactory = workspace_factory or workspace_from_environment
        self._workspace: Any = None
        self._lock = threading.Lock()

    def _get_workspace(self) -> Any:
        with self._lock:
            if self._workspace is None:
                try:
                    workspace = self._factory()
                except Exception as exc:
                    # The resource-id path looks the workspace up in ARM: a throttled or failed
                    # lookup is worth retrying. Anything else is configuration, reported without
                    # the exception's text, which can quote the connection string and its key.
                    if isinstance(classified := classify(exc), TransientError):
                        raise classified from None
                    raise _Unconfigured(
                        f"The Azure Quantum workspace could not be set up ({type(exc).__name__}); "
                        f"check {ENV_RESOURCE_ID}, {ENV_LOCATION} or {ENV_CONNECTION_STRING}."
                    ) from None
                if workspace is None:
                    raise _Unconfigured(UNCONFIGURED_REASON)
                self._workspace = workspace
            return self._workspace

    async def _call(self, func: Callable[[Any], T]) -> T:
        def run() -> T:
            try:
                workspace = self._get_workspace()
            except _Unconfigured as exc:
                raise PermanentError(str(exc)) from None
            try:
                return func(workspace)
            except Exception as exc:
                raise classify(exc) from None

        return await sdk_thread.run_sync(run)

    async def backends(self) -> list[Backend]:
        try:
            return list(await sdk_thread.run_sync(self._list_backends))
        except _Unconfigured as exc:
            return [_unavailable(str(exc))]

    def _list_backends(self) -> list[Backend]:
        workspace = self._get_workspace()
        try:
            # The public get_targets() drops numQubits; the provider status it reads has them.
            statuses = workspace._get_target_status()
        except Exception as exc:
            raise classify(exc) from None
        found: list[Backend] = []
        for provider_id, status in statuses:
            name = str(status.id)
            family = _family(name)
            availability = _text(status.current_availability).lower()
            supported = family in _TRANSLATORS
            found.append(
                Backend(
                    id=f"{PROVIDER}/{name}",
                    provider=PROVIDER,
                    name=name,
                    qubits=int(status.num_qubits) if status.num_qubits is not None else None,
                    simulator=".sim." in name or name.endswith(".simulator"),
                    status=("online" if availability in ("available", "degraded") else "offline")
                    if supported
                    else "unavailable",
                    basis_gates=_BASIS.get(family, ()),
                    reason=None if supported else f"the gateway does not translate circuits for {provider_id} targets",
                )
            )
        return found

    async def submit(self, job: JobSpec) -> ProviderRef:
        _, _, target = job.backend.partition("/")
        family = _family(target)
        translate = _TRANSLATORS.get(family)
        if translate is None:
            raise PermanentError(f"{job.backend} is not an IonQ, Quantinuum or Rigetti target.")
        if len(job.circuits) != 1:
            raise PermanentError("An Azure Quantum job runs one circuit; submit each circuit as its own job.")
        payload = await sdk_thread.run_sync(lambda: translate(job.circuits[0], target, job.shots))
        azure_id = azure_job_id(job.job_id)
        await self._call(lambda ws: _submit_once(ws, azure_id, target, job.shots, payload))
        return ProviderRef(provider_job_id=azure_id)

    async def status(self, ref: ProviderRef) -> ProviderStatus:
        details = await self._call(lambda ws: _job_details(ws, ref.provider_job_id))
        if details is None:
            return ProviderStatus(ProviderState.UNKNOWN, "Azure Quantum has no job with this id")
        state = _STATES.get(_text(details.status).lower(), ProviderState.QUEUED)
        if state is ProviderState.FAILED:
            code, message = _job_error(details)
            if code and code.lower() in QUOTA_ERROR_CODES:
                raise QuotaError(f"the job failed on a provider quota ({code})")
            return ProviderStatus(state, f"Azure Quantum job failed: {code or 'error'}: {message}"[:400])
        return ProviderStatus(state)

    async def result(self, ref: ProviderRef) -> Result:
        return await self._call(lambda ws: _fetch_result(ws, ref.provider_job_id))

    async def cancel(self, ref: ProviderRef) -> None:
        await self._call(lambda ws: _cancel(ws, ref.provider_job_id))

    async def usage(self, ref: ProviderRef) -> Usage:
        return await self._call(lambda ws: _usage(ws, ref.provider_job_id))


def _unavailable(reason: str) -> Backend:
    return Backend(
        id=f"{PROVIDER}/*",
        provider=PROVIDER,
        name="*",
        qubits=None,
        simulator=False,
        status="unavailable",
        reason=reason,
    )


def azure_job_id(job_id: str) -> str:
    """The Azure job id for our job: a UUID derived from our id, the same on every attempt.

    Azure's own SDK names jobs with UUIDs; deriving ours (uuid5) keeps that form while a
    resubmission after a crash still names, and so finds, the job it already created.
    """
    return str(uuid.uuid5(_JOB_NAMESPACE, job_id))


def _job_details(workspace: Any, job_id: str) -> Any:
    """The job's details, or None if the workspace has no such job."""
    sdk_imports.ensure("azure")
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return workspace.get_job(job_id).details
    except ResourceNotFoundError:
        return None


def _text(value: Any) -> str:
    """An SDK enum member or plain string as its wire value ("Succeeded", not "JobStatus.SUCCEEDED")."""
    return str(getattr(value, "value", value) or "")


def _job_error(details: Any) -> tuple[str | None, str]:
    error = details.error_data
    if error is None:
        return None, "no reason given"
    return (str(error.code) if error.code else None), str(error.message or "no reason given").splitlines()[0][:300]


def _target_class(family: str) -> Any:
    sdk_imports.ensure("azure")
    from azure.quantum.target import IonQ, Quantinuum, Rigetti

    return {"ionq": IonQ, "quantinuum": Quantinuum, "rigetti": Rigetti}[family]


def _submit_once(workspace: Any, job_id: str, target: str, shots: int, payload: _Payload) -> None:
    """Create the job under our id unless it exists: safe to repeat after a crash at any step."""
    sdk_imports.ensure("azure")
    from azure.core.exceptions import ResourceExistsError
    from azure.quantum import Job
    from azure.quantum.storage import remove_sas_token
    from azure.storage.blob import ContainerClient, ContentSettings

    if _job_details(workspace, job_id) is not None:
        return  # created before a crash: never a second job
    # The SDK target class names the formats and content type this target takes.
    sdk_target = _target_class(_family(target))(workspace=workspace, name=target)
    container_uri = workspace.get_container_uri(job_id=job_id)
    blob = ContainerClient.from_container_url(container_uri).get_blob_client("inputData")
    # Overwrite: an upload left by a crashed attempt holds the same circuit.
    blob.upload_blob(
        payload.data,
        overwrite=True,
        content_settings=ContentSettings(content_type=str(sdk_target.content_type), content_encoding=None),
    )
    try:
        Job.from_storage_uri(
            workspace=workspace,
            name=job_id,
            target=target,
            input_data_uri=remove_sas_token(blob.url),
            provider_id=sdk_target.provider_id,
            input_data_format=sdk_target.input_data_format,
            output_data_format=sdk_target.output_data_format,
            container_uri=container_uri,
            job_id=job_id,
            input_params={"shots": shots},
            metadata=payload.metadata,
        )
    except ResourceExistsError:
        # Another worker (or a response lost in transit) created it first: that job is ours.
        if _job_details(workspace, job_id) is None:
            raise


def _fetch_result(workspace: Any, job_id: str) -> Result:
    job = workspace.get_job(job_id)
    details = job.details
    if _STATES.get(_text(details.status).lower()) is not ProviderState.DONE:
        raise PermanentError(f"the Azure Quantum job is {_text(details.status)}, not finished")
    family = _family(str(details.target))
    counter = _COUNTERS.get(family)
    metadata = {str(k): str(v) for k, v in dict(details.metadata or {}).items()}
    if counter is None or _META_REGISTERS not in metadata:
        raise PermanentError("this Azure Quantum job was not submitted by the gateway")
    raw = job.download_data(details.output_data_uri)
    try:
        output = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except ValueError:
        raise PermanentError("the Azure Quantum result is not JSON") from None
    if not isinstance(output, dict):
        raise PermanentError("the Azure Quantum result has an unexpected shape")
    result_meta = {"target": str(details.target), "azure_status": _text(details.status)}
    cost = details.cost_estimate
    if cost is not None and cost.estimated_total is not None:
        result_meta["cost_estimate"] = f"{cost.estimated_total} {cost.currency_code or ''}".strip()
    return Result(counts=(counter(output, metadata),), cost_micro_usd=_usd_micro(cost), metadata=result_meta)


def _usd_micro(cost: Any) -> int | None:
    """A job's cost estimate in micro-dollars; None when Azure gives none, or gives it in another currency."""
    if cost is None or cost.estimated_total is None or str(cost.currency_code or "").upper() != "USD":
        return None
    return int((Decimal(str(cost.estimated_total)) * 1_000_000).to_integral_value())


def _usage(workspace: Any, job_id: str) -> Usage:
    """The job's cost estimate as Azure reports it, finished or cancelled."""
    details = _job_details(workspace, job_id)
    if details is None:
        return Usage(cost_micro_usd=0)  # no job was ever created: nothing ran
    return Usage(cost_micro_usd=_usd_micro(details.cost_estimate))


def _cancel(workspace: Any, job_id: str) -> None:
    sdk_imports.ensure("azure")
    from azure.core.exceptions import ResourceNotFoundError

    try:
        job = workspace.get_job(job_id)
    except ResourceNotFoundError:
        return  # nothing was created: nothing to cancel
    if _STATES.get(_text(job.details.status).lower()) in _TERMINAL:
        return
    workspace.cancel_job(job)
