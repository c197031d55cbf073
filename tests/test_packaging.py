"""The wheel as a user gets it: built from the repository, then installed alone into a fresh venv."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# setuptools maps three source folders onto one import package (pyproject.toml, package-dir).
SOURCES = {"server": "qpu_gateway", "policy": "qpu_gateway/policy", "adapters": "qpu_gateway/adapters"}


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from a copy of the checkout (so a stale build/ there can neither leak in nor change)."""
    source = tmp_path_factory.mktemp("source") / "qpu-gateway"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".lockenv",
            ".typecheck",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            "node_modules",  # tests/clients: the JavaScript test clients and a Node binary, 340 MB
        ),
    )
    dist = tmp_path_factory.mktemp("dist")
    # Build isolation fetches the pinned build backend (setuptools>=77) from the configured index.
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, source, cwd=dist)
    (built,) = dist.glob("qpu_gateway-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel installed; the dependencies come from the repo's .venv by path.

    The .pth line puts the repo venv's site-packages on sys.path without processing the .pth
    files inside it, so the editable install of this checkout stays switched off.
    """
    root = tmp_path_factory.mktemp("venv") / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root.parent)
    python = root / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=root)
    site_packages = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root)
    (Path(site_packages.stdout.strip()) / "repo-dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n", encoding="utf-8"
    )
    return root


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment minus anything that could point back at the checkout or a real gateway."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QPU_GATEWAY_", "PYTHON"))}
    env.update(XDG_DATA_HOME=str(tmp_path / "xdg"), TMPDIR=str(tmp_path), PYTHONNOUSERSITE="1")
    return env


def test_wheel_holds_the_three_source_folders_package_data_and_the_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points_file,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(entry_points_file).decode())

    assert {
        "qpu_gateway/ops/cli.py",
        "qpu_gateway/policy/admission.py",
        "qpu_gateway/adapters/aer.py",
        "qpu_gateway/store/migrations/sqlite/0001_core.sql",
        "qpu_gateway/policy/default_policy.toml",
        "qpu_gateway/py.typed",
        "qpu_gateway/ops/console/static/console.css",  # the console's assets: no CDN, no build step
        "qpu_gateway/ops/console/static/console.js",
    } <= names
    assert entry_points["console_scripts"]["qpu-gateway"] == "qpu_gateway.ops.cli:main"

    shipped = {
        f"{package}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, package in SOURCES.items()
        for path in (REPO / folder).rglob("*")
        if path.suffix in {".py", ".sql", ".toml"} and "__pycache__" not in path.parts
    }
    assert shipped <= names, sorted(shipped - names)
    assert {name.split("/")[0] for name in names} == {"qpu_gateway", wheel.name.split("-py3")[0] + ".dist-info"}


def test_installed_wheel_runs_from_its_venv_not_from_the_checkout(venv: Path, env: dict[str, str]) -> None:
    script = venv / "bin" / "qpu-gateway"
    assert script.read_text(encoding="utf-8").splitlines()[0] == f"#!{venv / 'bin' / 'python'}"

    helped = run(script, "--help", cwd=venv, env=env)
    assert helped.stdout.startswith("usage: qpu-gateway")

    imported = run(
        venv / "bin" / "python",
        "-c",
        "import qpu_gateway, qpu_gateway.policy.admission as a; print(qpu_gateway.__file__); print(a.__file__)",
        cwd=venv,
        env=env,
    )
    for file in imported.stdout.split():
        assert Path(file).is_relative_to(venv), file
        assert not Path(file).is_relative_to(REPO), file


def test_installed_wheel_finds_its_migrations_and_default_policy(
    venv: Path, env: dict[str, str], tmp_path: Path
) -> None:
    db = tmp_path / "x.db"

    out = run(venv / "bin" / "qpu-gateway", "init", "--db", db, cwd=tmp_path, env=env).stdout

    assert f"Database: {db} (created)" in out
    policy = (tmp_path / "policy.toml").read_text(encoding="utf-8")
    assert policy == (REPO / "policy" / "default_policy.toml").read_text(encoding="utf-8")
    listed = run(venv / "bin" / "qpu-gateway", "keys", "list", "--db", db, cwd=tmp_path, env=env).stdout
    assert listed.splitlines()[1].split()[1:3] == ["local", "default"]


def test_installed_wheel_runs_the_demo_end_to_end(venv: Path, env: dict[str, str], tmp_path: Path) -> None:
    out = run(venv / "bin" / "qpu-gateway", "demo", cwd=tmp_path, env=env).stdout

    assert "final state: succeeded" in out
    assert "register c:" in out
