"""IBM Quantum through qiskit-ibm-runtime: SamplerV2 on IBM QPUs, and on fake devices offline.

Two paths share one adapter. `ibm/fake_<name>` backends run the SDK's own local testing mode
(SamplerV2 with a fake V2 backend as its mode executes on Aer with the device's noise model):
free, no credentials, good for dry runs. Every other `ibm/<name>` is a QPU reached through
`QiskitRuntimeService`, whose account comes from the SDK's own convention: QISKIT_IBM_TOKEN,
QISKIT_IBM_INSTANCE, QISKIT_IBM_CHANNEL, QISKIT_IBM_URL, or a saved account.

Exactly-once: every cloud job carries the tag `qpu-gateway:<our job id>`, and submit looks the
tag up before sending anything, so a worker that crashed after the request went out finds the
job instead of paying for it twice. All Qiskit calls run on `sdk_thread`.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
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
    from qiskit import QuantumCircuit

# ibm-cloud-sdk-core turns on http.client's wire trace for the whole process when its logger is at
# DEBUG as a client is built (its base_service.py): every SDK's request headers, Azure's API key
# among them, would then reach the log. Its own debug lines are such traces too.
logging.getLogger("ibm-cloud-sdk-core").setLevel(logging.INFO)

PROVIDER = "ibm"
FAKE_PREFIX = "fake_"
LOCAL_REF_PREFIX = "local:"  # provider refs of local-mode runs, which live only in this process
TAG_PREFIX = "qpu-gateway:"
TRANSPILE_OPTIMIZATION_LEVEL = 1

# Fake V2 devices offered offline: small ones that simulate in milliseconds, and the large
# Eagle/Heron snapshots users target on the cloud. All exist in qiskit-ibm-runtime 0.51.
FAKE_BACKENDS = {
    "fake_manila": "FakeManilaV2",
    "fake_lima": "FakeLimaV2",
    "fake_quito": "FakeQuitoV2",
    "fake_belem": "FakeBelemV2",
    "fake_nairobi": "FakeNairobiV2",
    "fake_jakarta": "FakeJakartaV2",
    "fake_perth": "FakePerth",
    "fake_lagos": "FakeLagosV2",
    "fake_guadalupe": "FakeGuadalupeV2",
    "fake_kolkata": "FakeKolkataV2",
    "fake_brisbane": "FakeBrisbane",
    "fake_sherbrooke": "FakeSherbrooke",
    "fake_kyiv": "FakeKyiv",
    "fake_torino": "FakeTorino",
    "fake_fez": "FakeFez",
}

NO_ACCOUNT_REASON = (
    "No IBM Quantum account: set QISKIT_IBM_TOKEN and QISKIT_IBM_INSTANCE (optionally QISKIT_IBM_CHANNEL, "
    "QISKIT_IBM_URL) in the gateway's environment, or save an account with "
    "QiskitRuntimeService.save_account(). The ibm/fake_* backends work without one."
)

# -- error classification ---------------------------------------------------------------------
# One table per kind of evidence, consulted in this order by `classify`: what the message says
# about quota (IBM reports a used-up plan with several HTTP statuses), then the HTTP status the
# SDK recorded, then the exception type (by class name, anywhere in its MRO or its chain, since
# the SDK is imported lazily), then other phrases. Anything unmatched is permanent: retrying an
# error we do not understand only spends the retry budget.

QUOTA_PHRASES: dict[str, type[AdapterError]] = {
    "usage limit": QuotaError,  # "This instance has met its usage limit" / "usage_limit_reached"
    "no more time available": QuotaError,  # the plan's allocation is spent
    "quota": QuotaError,
    "monthly limit": QuotaError,
}

HTTP_STATUS_ERRORS: dict[int, type[AdapterError]] = {
    400: PermanentError,  # the request itself is wrong (bad circuit, bad options)
    401: PermanentError,  # token rejected: an operator must fix the account
    403: PermanentError,  # no access to this instance or backend
    404: PermanentError,  # no such job, program or backend
    408: TransientError,  # request timeout
    409: PermanentError,  # conflicting state (e.g. cancelling a finished job)
    413: PermanentError,  # payload too large: the job can never be sent as it is
    422: PermanentError,  # invalid circuit or options
    429: TransientError,  # throttled
    500: TransientError,
    502: TransientError,
    503: TransientError,  # maintenance or overload
    504: TransientError,
    520: TransientError,  # Cloudflare in front of the API
    521: TransientError,
    522: TransientError,
    524: TransientError,
}

EXCEPTION_ERRORS: dict[str, type[AdapterError]] = {
    "IBMNotAuthorizedError": PermanentError,  # 401 from the runtime API
    "InvalidAccountError": PermanentError,  # the token or instance cannot be used
    "AccountNotFoundError": PermanentError,  # no credentials at all
    "IBMInputValueError": PermanentError,  # the SDK refused an input before sending it
    "IBMBackendValueError": PermanentError,
    "QiskitBackendNotFoundError": PermanentError,  # no such device on this account
    "RuntimeJobNotFound": PermanentError,
    "RuntimeProgramNotFound": PermanentError,
    "RuntimeJobFailureError": PermanentError,  # the job ran and failed
    "RuntimeJobMaxTimeoutError": PermanentError,  # ran past its max execution time
    "RuntimeInvalidStateError": PermanentError,  # e.g. result of a cancelled job
    "TranspilerError": PermanentError,  # the circuit cannot be mapped onto the device
    "CircuitError": PermanentError,
    "CircuitSourceError": PermanentError,  # our own OpenQASM screen
    "IBMBackendApiProtocolError": TransientError,  # a malformed answer from the API
    "Timeout": TransientError,  # requests.exceptions.Timeout (connect and read)
    "TimeoutError": TransientError,
    "ConnectionError": TransientError,  # requests' and the builtin one: network down, DNS, reset
    "ChunkedEncodingError": TransientError,
    "RuntimeJobTimeoutError": TransientError,  # our wait ran out, the job did not fail
    "BackendOfflineError": TransientError,  # raised by this adapter for a non-operational device
}

# Transport failures that decide when they are the cause of whatever the SDK raised instead.
TRANSPORT_CAUSES = frozenset({"ConnectionError", "Timeout", "TimeoutError", "ChunkedEncodingError"})

MESSAGE_ERRORS: dict[str, type[AdapterError]] = {
    "maintenance mode": TransientError,  # the SDK's text for a 503 it re-raises without a status
    "is not operational": TransientError,  # device offline or paused
    "offline": TransientError,
    "temporarily unavailable": TransientError,
    "too many requests": TransientError,
    "not supported": PermanentError,  # unsupported gate or instruction
    "unsupported": PermanentError,
    "not in the target": PermanentError,
    "invalid": PermanentError,
}


class BackendOfflineError(Exception):
    """The device exists but reports that it is not operational (classified transient)."""


def status_code_of(exc: BaseException) -> int | None:
    """The HTTP status the SDK recorded on this exception or anything it wraps."""
    for link in _chain(exc):
        code = getattr(link, "status_code", None)
        if isinstance(code, int) and code > 0:
            return code
        response = getattr(link, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int) and code > 0:
            return code
    return None


def classify(exc: BaseException) -> AdapterError:
    """The adapter error for any exception the SDK raised, with a message safe to show an agent.

    A failure of this process (`INTERNAL_ERRORS`) is raised again as it is: it is not the provider's.
    """
    pass_internal(exc)
    if isinstance(exc, AdapterError):
        return type(exc)(scrub(str(exc)), code=exc.code)
    kind = _kind_of(exc)
    status = status_code_of(exc)
    return kind(describe(exc), code=f"http_{status}" if status is not None else type(exc).__name__)


def _kind_of(exc: BaseException) -> type[AdapterError]:
    """Which kind of failure an SDK exception is: transient, quota or permanent."""
    lowered = " ".join(str(link) for link in _chain(exc)).lower()
    for phrase, kind in QUOTA_PHRASES.items():
        if phrase in lowered:
            return kind
    code = status_code_of(exc)
    if code is not None and code in HTTP_STATUS_ERRORS:
        return HTTP_STATUS_ERRORS[code]
    # The SDK reports an IAM or API it cannot reach as a bad account (InvalidAccountError, "Unable
    # to retrieve instances") caused by the connection error: the network failed, not the account.
    if any(cls.__name__ in TRANSPORT_CAUSES for link in _chain(exc)[1:] for cls in type(link).__mro__):
        return TransientError
    for link in _chain(exc):
        for cls in type(link).__mro__:
            if cls.__name__ in EXCEPTION_ERRORS:
                return EXCEPTION_ERRORS[cls.__name__]
    for phrase, kind in MESSAGE_ERRORS.items():
        if phrase in lowered:
            return kind
    if code is not None and code >= 500:
        return TransientError
    return PermanentError


def describe(exc: BaseException) -> str:
    """`IBM Quantum: <type>: <first line>`, at most 300 characters, with any credential removed."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return scrub(f"IBM Quantum: {type(exc).__name__}: {first}"[:300])


def scrub(text: str) -> str:
    """Remove the configured IBM token from a message, wherever the SDK echoed it."""
    token = os.environ.get("QISKIT_IBM_TOKEN")
    if token and len(token) >= 4:
        text = text.replace(token, "***")
    return text


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything it wraps (`raise ... from None` still keeps `__context__`)."""
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in seen and len(seen) < 10:
        seen.append(link)
        link = link.__cause__ or link.__context__
    return seen


def job_tag(job_id: str) -> str:
    """The runtime job tag that carries our job id (looked up before any resubmit)."""
    return f"{TAG_PREFIX}{job_id}"


# -- the adapter ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LocalRun:
    job: Any  # qiskit_ibm_runtime LocalRuntimeJob


class IbmAdapter:
    """IBM Quantum: fake devices in local testing mode, and QPUs through Qiskit Runtime."""

    provider = PROVIDER

    def __init__(self, service_options: dict[str, Any] | None = None) -> None:
        # Extra keyword arguments for QiskitRuntimeService (e.g. `url_resolver`); the account
        # itself always comes from the environment or the saved account file.
        self._service_options = dict(service_options or {})
        self._service: Any = None
        self._fakes: dict[str, Any] = {}
        self._local: dict[str, _LocalRun] = {}
        self._lock = threading.Lock()
        self.submissions = 0  # provider jobs this adapter actually created (tests count re-sends)

    # -- backends

    async def backends(self) -> list[Backend]:
        fakes = await sdk_thread.run_sync(self._fake_backends)
        try:
            cloud = await sdk_thread.run_sync(self._cloud_backends)
        except Exception as exc:  # one unreachable account must not hide the offline backends
            if _is_missing_account(exc):
                cloud = [_unavailable(NO_ACCOUNT_REASON)]
            else:
                error = classify(exc)
                retry = LIST_RETRY_S if isinstance(error, TransientError) else None
                cloud = [_unavailable(str(error.args[0]), retry_after_s=retry)]
        return fakes + cloud

    def _fake_backends(self) -> list[Backend]:
        found = []
        for name in FAKE_BACKENDS:
            config = self._fake(name).configuration()
            found.append(
                Backend(
                    id=f"{PROVIDER}/{name}",
                    provider=PROVIDER,
                    name=name,
                    qubits=int(config.n_qubits),
                    simulator=True,
                    status="online",
                    max_shots=int(config.max_shots) if getattr(config, "max_shots", None) else None,
                    basis_gates=tuple(config.basis_gates),
                )
            )
        return found

    def _cloud_backends(self) -> list[Backend]:
        service = self._connect()
        found = []
        for device in service.backends():
            try:
                status = device.status()
                state = "online" if status.operational else "offline"
                queue: int | None = int(status.pending_jobs)
            except Exception:  # a status call that fails leaves the device listed, state unknown
                state, queue = "offline", None
            config = device.configuration()
            found.append(
                Backend(
                    id=f"{PROVIDER}/{device.name}",
                    provider=PROVIDER,
                    name=device.name,
                    qubits=int(device.num_qubits),
                    simulator=bool(getattr(config, "simulator", False)),
                    status=state,
                    max_shots=int(config.max_shots) if getattr(config, "max_shots", None) else None,
                    basis_gates=tuple(config.basis_gates),
                    queue_depth=queue,
                )
            )
        return found

    # -- jobs

    async def submit(self, job: JobSpec) -> ProviderRef:
        name = _device_name(job.backend)
        try:
            if name.startswith(FAKE_PREFIX):
                return await sdk_thread.run_sync(lambda: self._submit_local(job, name))
            return await sdk_thread.run_sync(lambda: self._submit_cloud(job, name))
        except Exception as exc:
            raise classify(exc) from None

    async def status(self, ref: ProviderRef) -> ProviderStatus:
        try:
            if ref.provider_job_id.startswith(LOCAL_REF_PREFIX):
                return await sdk_thread.run_sync(lambda: self._status_local(ref))
            return await sdk_thread.run_sync(lambda: self._status_cloud(ref))
        except Exception as exc:
            raise classify(exc) from None

    async def result(self, ref: ProviderRef) -> Result:
        try:
            if ref.provider_job_id.startswith(LOCAL_REF_PREFIX):
                return await sdk_thread.run_sync(lambda: self._result_local(ref))
            return await sdk_thread.run_sync(lambda: self._result_cloud(ref))
        except Exception as exc:
            raise classify(exc) from None

    async def cancel(self, ref: ProviderRef) -> None:
        try:
            if ref.provider_job_id.startswith(LOCAL_REF_PREFIX):
                await sdk_thread.run_sync(lambda: self._cancel_local(ref))
            else:
                await sdk_thread.run_sync(lambda: self._cancel_cloud(ref))
        except Exception as exc:
            raise classify(exc) from None

    async def usage(self, ref: ProviderRef) -> Usage:
        if ref.provider_job_id.startswith(LOCAL_REF_PREFIX):
            return Usage(cost_micro_usd=0)  # the fake devices run here, free
        try:
            return await sdk_thread.run_sync(lambda: self._usage_cloud(ref))
        except Exception as exc:
            raise classify(exc) from None

    async def find(self, job_id: str) -> ProviderRef | None:
        """The provider job already created for our `job_id`, if any (by its tag)."""
        try:
            return await sdk_thread.run_sync(lambda: self._find_cloud(job_id))
        except Exception as exc:
            raise classify(exc) from None

    # -- local testing mode

    def _fake(self, name: str) -> Any:
        sdk_imports.ensure("ibm")
        from qiskit_ibm_runtime import fake_provider

        with self._lock:
            if name not in self._fakes:
                if name not in FAKE_BACKENDS:
                    raise PermanentError(f"Unknown fake backend ibm/{name}; see list_backends for the ibm/fake_* ids.")
                self._fakes[name] = getattr(fake_provider, FAKE_BACKENDS[name])()
            return self._fakes[name]

    def _submit_local(self, job: JobSpec, name: str) -> ProviderRef:
        sdk_imports.ensure("ibm")
        from qiskit_ibm_runtime import SamplerV2

        ref = ProviderRef(f"{LOCAL_REF_PREFIX}{job.job_id}")
        with self._lock:
            if job.job_id in self._local:  # the same job sent again: it is already running here
                return ref
        device = self._fake(name)
        circuits = _isa_circuits(job, device)
        run = SamplerV2(mode=device).run(circuits, shots=job.shots)
        with self._lock:
            if job.job_id in self._local:
                run.cancel()
                return ref
            self._local[job.job_id] = _LocalRun(run)
            self.submissions += 1
        return ref

    def _local_run(self, ref: ProviderRef) -> _LocalRun | None:
        with self._lock:
            return self._local.get(ref.provider_job_id.removeprefix(LOCAL_REF_PREFIX))

    def _status_local(self, ref: ProviderRef) -> ProviderStatus:
        run = self._local_run(ref)
        if run is None:
            # A local run lives only in the process that started it; another process must run it again.
            return ProviderStatus(ProviderState.UNKNOWN, "the simulation ran in a process that has stopped")
        state = run.job.status().name  # qiskit JobStatus: QUEUED, RUNNING, DONE, ERROR, CANCELLED
        if state == "ERROR":
            return ProviderStatus(ProviderState.FAILED, _local_error(run.job))
        return ProviderStatus(RUNTIME_STATES.get(state, ProviderState.QUEUED))

    def _result_local(self, ref: ProviderRef) -> Result:
        run = self._local_run(ref)
        if run is None:
            raise PermanentError("no result held for this job")
        result = run.job.result()
        with self._lock:
            self._local.pop(ref.provider_job_id.removeprefix(LOCAL_REF_PREFIX), None)
        return Result(
            counts=tuple(_register_counts(pub.data) for pub in result),
            qpu_seconds=float(run.job.usage() or 0),
            metadata={"mode": "local", "backend": run.job.backend().name},
        )

    def _cancel_local(self, ref: ProviderRef) -> None:
        with self._lock:
            run = self._local.pop(ref.provider_job_id.removeprefix(LOCAL_REF_PREFIX), None)
        if run is not None:
            run.job.cancel()  # stops it if it has not started; a running simulation is abandoned

    # -- Qiskit Runtime (cloud)

    def _connect(self) -> Any:
        sdk_imports.ensure("ibm")
        from qiskit_ibm_runtime import QiskitRuntimeService

        with self._lock:
            if self._service is None:
                self._service = QiskitRuntimeService(**self._service_options)
            return self._service

    def _find_cloud(self, job_id: str) -> ProviderRef | None:
        jobs = self._connect().jobs(job_tags=[job_tag(job_id)], limit=1)
        return ProviderRef(jobs[0].job_id()) if jobs else None

    def _submit_cloud(self, job: JobSpec, name: str) -> ProviderRef:
        sdk_imports.ensure("ibm")
        from qiskit_ibm_runtime import SamplerV2

        existing = self._find_cloud(job.job_id)
        if existing is not None:  # sent before a crash or a lost answer: never pay twice
            return existing
        device = self._connect().backend(name)
        status = device.status()
        if not status.operational:
            raise BackendOfflineError(f"ibm/{name} is not operational ({status.status_msg})")
        circuits = _isa_circuits(job, device)
        sampler = SamplerV2(mode=device)
        sampler.options.environment.job_tags = [job_tag(job.job_id)]
        submitted = sampler.run(circuits, shots=job.shots)
        with self._lock:
            self.submissions += 1
        return ProviderRef(submitted.job_id())

    def _status_cloud(self, ref: ProviderRef) -> ProviderStatus:
        job = self._connect().job(ref.provider_job_id)
        state = str(job.status())
        if state == "ERROR":
            return ProviderStatus(ProviderState.FAILED, _job_error(job))
        return ProviderStatus(RUNTIME_STATES.get(state, ProviderState.QUEUED), None)

    def _result_cloud(self, ref: ProviderRef) -> Result:
        job = self._connect().job(ref.provider_job_id)
        result = job.result()
        return Result(
            counts=tuple(_register_counts(pub.data) for pub in result),
            qpu_seconds=_usage_seconds(job.metrics()),
            metadata={"mode": "cloud", "ibm_job_id": ref.provider_job_id},
        )

    def _usage_cloud(self, ref: ProviderRef) -> Usage:
        # IBM charges the QPU time a job used, also when it was cancelled while running.
        return Usage(qpu_seconds=_usage_seconds(self._connect().job(ref.provider_job_id).metrics()))

    def _cancel_cloud(self, ref: ProviderRef) -> None:
        job = self._connect().job(ref.provider_job_id)
        if str(job.status()) in ("DONE", "ERROR", "CANCELLED"):
            return
        job.cancel()


# RuntimeJobV2.status() strings -> our provider states ("ERROR" is handled with its message).
RUNTIME_STATES: dict[str, ProviderState] = {
    "INITIALIZING": ProviderState.QUEUED,
    "QUEUED": ProviderState.QUEUED,
    "RUNNING": ProviderState.RUNNING,
    "DONE": ProviderState.DONE,
    "CANCELLED": ProviderState.CANCELLED,
}


def _device_name(backend_id: str) -> str:
    provider, _, name = backend_id.partition("/")
    if provider != PROVIDER or not name:
        raise PermanentError(f"{backend_id!r} is not an IBM backend id (ibm/<name>).")
    return name


def _isa_circuits(job: JobSpec, device: Any) -> list[QuantumCircuit]:
    """Parse, check against the device and transpile to its basis gates and coupling map."""
    sdk_imports.ensure("transpiler")
    from qiskit.transpiler import generate_preset_pass_manager

    circuits = [qasm.load(source) for source in job.circuits]
    qubits = int(device.num_qubits)
    for circuit in circuits:
        if circuit.num_qubits > qubits:
            raise PermanentError(f"The circuit uses {circuit.num_qubits} qubits; ibm/{device.name} has {qubits}.")
    max_shots = getattr(device.configuration(), "max_shots", None)
    if max_shots and job.shots > int(max_shots):
        raise PermanentError(f"{job.shots} shots is more than ibm/{device.name} allows ({max_shots}).")
    manager = generate_preset_pass_manager(optimization_level=TRANSPILE_OPTIMIZATION_LEVEL, backend=device)
    return list(manager.run(circuits))


def _register_counts(data: Any) -> RegisterCounts:
    """Counts per classical register, named as the circuit named them."""
    return {name: dict(value.get_counts()) for name, value in data.items() if hasattr(value, "get_counts")}


def _usage_seconds(metrics: dict[str, Any]) -> float | None:
    """The QPU time IBM charges for the job, from its metrics (None while not yet final)."""
    usage = metrics.get("usage") or {}
    for key in ("qpu_charge_time_seconds", "quantum_seconds", "seconds"):
        value = usage.get(key)
        if isinstance(value, int | float):
            return float(value)
    return None


def _job_error(job: Any) -> str:
    try:
        text = job.error_message() or "the job failed at IBM Quantum"
    except Exception as exc:  # the error text itself could not be fetched
        return describe(exc)
    lines = [line for line in str(text).splitlines() if line.strip()]
    return scrub((lines[-1] if lines else str(text))[:300])


def _local_error(job: Any) -> str:
    try:
        job.result()
    except Exception as exc:
        return describe(exc)
    return "the local simulation failed"


def _is_missing_account(exc: BaseException) -> bool:
    return any(type(link).__name__ == "AccountNotFoundError" for link in _chain(exc))


def _unavailable(reason: str, *, retry_after_s: float | None = None) -> Backend:
    return Backend(
        id=f"{PROVIDER}/*",
        provider=PROVIDER,
        name="*",
        qubits=None,
        simulator=False,
        status="unavailable",
        reason=reason,
        retry_after_s=retry_after_s,
    )
