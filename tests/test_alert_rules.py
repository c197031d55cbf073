"""The alerting rules and the Grafana dashboard in deploy/: promtool checks the rules and runs their
unit tests, a real Prometheus scrapes a real gateway that ran a job and loads the rules, and every
query of the rules and the dashboard is valid PromQL naming only series the gateway has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from qpu_gateway.config import Config, Database
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.telemetry.metrics import read_state

from .support import BELL2, body, free_port, http_client, new_key, start_http_server, stop_process, wait_listening

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
RULES = DEPLOY / "prometheus" / "qpu-gateway.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "qpu-gateway.rules.test.yml"
EXAMPLE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "qpu-gateway.json"
ALERTS = {
    "QpuGatewayStorm",
    "QpuGatewayBudgetNearCap",
    "QpuGatewayBreakerOpen",
    "QpuGatewayOldQueuedJobs",
    "QpuGatewayApprovalsWaiting",
    "QpuGatewayProviderErrorRate",
}
# The policy of the tests (conftest's), with a daily cost cap so a budget ratio is scraped too.
POLICY = """
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
loop_guard = { max_repeats = 100000, window_minutes = 1 }
agent_quota = { cost_usd = { day = "10.00" } }

[prices."faulty/*"]
model = "free"
"""
JOB = ("aer/simulator", "succeeded")  # the backend and end of the job the gateway runs
WAIT_S = 60.0  # bounds every wait for Prometheus; it usually takes a second or two


def tool(name: str) -> str:
    """The path of promtool or prometheus: Debian's `prometheus` package has both."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if found is None:
        pytest.fail(
            f"{name} is not installed: .ci/run installs it (Debian's prometheus package: apt-get install prometheus)"
        )
    return found


def promtool(*args: str | Path) -> str:
    done = subprocess.run(
        [tool("promtool"), *map(str, args)], cwd=RULES.parent, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"promtool {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_promtool_finds_the_rules_file_and_the_example_configuration_valid() -> None:
    assert "SUCCESS: 6 rules found" in promtool("check", "rules", RULES)
    assert "SUCCESS: 1 rule files found" in promtool("check", "config", EXAMPLE_CONFIG)


def test_each_alert_fires_on_the_series_it_is_for_and_not_on_the_others() -> None:
    # Each alert's group in the test file feeds series that fire it and series that must not
    # (two replicas, a flapping breaker, a storm's new series, too few provider calls, ...).
    assert "SUCCESS" in promtool("test", "rules", RULE_TESTS)
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text(encoding="utf-8")))
    assert tested == ALERTS


# -- a real Prometheus scraping a real gateway --------------------------------------------------


@dataclass
class Scraped:
    """The Prometheus scraping a gateway that ran a job and refused one, and what it answered for the job."""

    prometheus: str  # base URL of its HTTP API
    finished: list[dict[str, Any]]  # what /api/v1/query returned for qpu_gateway_jobs_finished_total
    defined: frozenset[str]  # every series name the gateway's code defines

    def get(self, path: str, **params: str) -> Any:
        answer = httpx2.get(self.prometheus + path, params=params, timeout=10)
        assert answer.status_code == 200, answer.text
        reply = answer.json()
        assert reply["status"] == "success", reply
        return reply["data"]


async def run_a_job_and_a_refusal(url: str, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    async with http_client(url, key) as client:
        submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100}))
        done = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]}))
        refused = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": "aer/made-up-1"}))
    return done, refused


async def defined_series(config: Config) -> frozenset[str]:
    """The series names of every family the code defines: a real GatewayMetrics registry's, and the
    database gauges of read_state (many appear on a scrape only after their event: a storm, ...)."""
    gateway = Gateway(config)
    async with gateway.running(workers=False):
        families = [*gateway.metrics.registry.collect(), *await read_state(gateway.store, gateway.policy)]
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return frozenset(family.name + suffix for family in families for suffix in suffixes[family.type])


def wait_for(what: str, check: Callable[[], bool]) -> None:
    """Call `check` until it holds; fail after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"Prometheus: {what} not seen within {WAIT_S} s")


@contextmanager
def prometheus_scraping(folder: Path, target_port: int) -> Iterator[str]:
    """A real Prometheus on a free loopback port, scraping 127.0.0.1:`target_port` every second with
    the rules file loaded; yields its base URL, and stops it with SIGTERM (it must exit 0)."""
    config = folder / "prometheus.yml"
    config.write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{RULES}"]
scrape_configs:
  - job_name: qpu-gateway
    static_configs: [{{targets: ["127.0.0.1:{target_port}"]}}]
""",
        encoding="utf-8",
    )
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_listening(process, port, what="prometheus")
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_process(process)  # SIGTERM: Prometheus closes its TSDB and exits
    assert process.returncode == 0, log.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    folder = tmp_path_factory.mktemp("alerts")
    (folder / "policy.toml").write_text(POLICY, encoding="utf-8")
    config = Config(
        database=Database(path=folder / "gateway.db"),
        policy_path=folder / "policy.toml",
        data_dir=folder,
        lease_s=3.0,
        poll_interval_s=0.1,
        retry_base_s=0.01,
    )
    key = anyio.run(new_key, config.database, "alice")
    gateway = start_http_server(config)
    try:
        with prometheus_scraping(folder, gateway.port) as url:
            done, refused = anyio.run(run_a_job_and_a_refusal, gateway.url, key)
            assert done["state"] == "succeeded" and refused["code"] == "unsupported_backend"
            scraped = Scraped(url, [], anyio.run(defined_series, config))

            def after_the_calls() -> bool:
                # A scrape taken after both calls (one between them has the job and no refusal).
                scraped.finished = scraped.get("/api/v1/query", query="qpu_gateway_jobs_finished_total")["result"]
                ours = [r for r in scraped.finished if (r["metric"]["backend"], r["metric"]["state"]) == JOB]
                return bool(ours and scraped.get("/api/v1/query", query="qpu_gateway_jobs_refused_total")["result"])

            wait_for("the job's and the refusal's series", after_the_calls)
            wait_for("every rule evaluated", lambda: rule_health(scraped) == {"ok"})
            yield scraped
    finally:
        gateway.stop()


def rules(scraped: Scraped) -> list[dict[str, Any]]:
    return [rule for group in scraped.get("/api/v1/rules")["groups"] for rule in group["rules"]]


def rule_health(scraped: Scraped) -> set[str]:
    return {rule["health"] for rule in rules(scraped)}


def test_prometheus_scraping_a_gateway_answers_a_query_with_the_series_of_the_job_just_run(scraped: Scraped) -> None:
    (series,) = scraped.finished
    assert series["metric"] == {
        "__name__": "qpu_gateway_jobs_finished_total",
        "backend": "aer/simulator",
        "state": "succeeded",  # and code "": Prometheus keeps no empty label
        "instance": series["metric"]["instance"],
        "job": "qpu-gateway",
    }
    assert series["value"][1] == "1"
    refused = scraped.get("/api/v1/query", query="qpu_gateway_jobs_refused_total")["result"]
    assert [(r["metric"]["code"], r["metric"]["backend"], r["value"][1]) for r in refused] == [
        ("unsupported_backend", "other", "1")
    ]


def test_prometheus_loads_the_rules_file_with_every_alert_and_what_to_do(scraped: Scraped) -> None:
    loaded = rules(scraped)
    assert {rule["name"] for rule in loaded} == ALERTS and len(loaded) == len(ALERTS)
    for rule in loaded:
        assert rule["type"] == "alerting" and rule["health"] == "ok", rule
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule
        assert rule["annotations"]["summary"] and "qpu-gateway " in rule["annotations"]["description"], rule
    # Nothing is wrong with a gateway that ran one job: no alert fires (nor waits to).
    assert scraped.get("/api/v1/alerts")["alerts"] == []


# -- every query names a series that exists -------------------------------------------------------

# PromQL words that are not metric names; a name followed by `(` is a function or an aggregation.
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
KEYWORDS |= {"inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (enough for ours: no @, no subqueries)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and its Grafana variable
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    return {
        m.group()
        for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text)
        if m.group() not in KEYWORDS and not text[m.end() :].lstrip().startswith("(")
    }


def test_the_name_reader_finds_metrics_and_skips_functions_labels_and_keywords() -> None:
    expr = (
        'sum by (agent, le) (rate(qpu_gateway_a_total{code="x{y}", name=~"b.*"}[$__rate_interval])) / 1e3 > 0.8 '
        "or max(qpu_gateway_b unless qpu_gateway_b offset 10m) and on (job) (up offset 10m) * bool 2"
    )
    assert metric_names(expr) == {"qpu_gateway_a_total", "qpu_gateway_b", "up"}


def known_names(scraped: Scraped) -> frozenset[str]:
    """What Prometheus scraped (the gateway's series, and its own `up` and scrape_*), and what the
    gateway's code defines; the scraped qpu_gateway_ names are all among the defined ones."""
    stored = set(scraped.get("/api/v1/label/__name__/values"))
    assert {name for name in stored if name.startswith("qpu_gateway_")} <= scraped.defined
    return frozenset(stored | scraped.defined)


def grafana_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["schemaVersion"] >= 39
    (variable,) = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    queries = []
    for panel in dashboard["panels"]:
        assert panel["type"] in {"row", "timeseries", "stat", "table"}, panel["title"]  # no external plugin
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        queries += [(panel["title"], target["expr"]) for target in panel["targets"]]
    return queries


def test_every_dashboard_query_is_valid_and_names_series_the_gateway_has(scraped: Scraped) -> None:
    known = known_names(scraped)
    queries = grafana_queries()
    used: set[str] = set()
    for title, expr in queries:
        names = metric_names(expr)
        assert names and names <= known, f"{title}: {expr} names {names - known or 'nothing'}"
        used |= names
        # Prometheus itself parses and runs it (Grafana's interval variables as Grafana fills them).
        concrete = expr.replace("$__rate_interval", "1m")
        assert "$" not in concrete, expr
        scraped.get("/api/v1/query", query=concrete)
    # The dashboard shows every family the gateway has (a histogram through its buckets).
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in scraped.defined}
    shown = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    assert families <= shown, families - shown


def test_every_alert_rule_names_series_the_gateway_has(scraped: Scraped) -> None:
    known = known_names(scraped)
    for rule in rules(scraped):
        names = metric_names(rule["query"])
        assert names and names <= known, f"{rule['name']}: {rule['query']} names {names - known or 'nothing'}"
