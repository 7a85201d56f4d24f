"""The wheel an operator installs: built with ``python -m build``, installed into a fresh virtualenv
with no checkout on the path, and serving against SoftHSM2.

Nothing is downloaded here: the build backend and every dependency come from a local wheelhouse
(``make wheelhouse``, which ``make test`` and ``make proof`` run first; or ``$ECNY_WHEELHOUSE``), and
pip runs with ``--no-index``. Without the wheelhouse the test fails and says how to make it.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.procs import free_port

pytestmark = [pytest.mark.package, pytest.mark.softhsm, pytest.mark.slow]

LABEL = "ecny-dev"  # dev-init's token label
SOURCE_IGNORE = shutil.ignore_patterns(".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__",
                                       ".mypy_cache", ".ruff_cache", ".hypothesis", ".import_linter_cache",
                                       ".pytest_cache", "bench", "proof", "tests")


def _wheelhouse() -> Path:
    wheelhouse = Path(os.environ.get("ECNY_WHEELHOUSE", ROOT / "var" / "wheelhouse"))
    if not any(wheelhouse.glob("setuptools-*.whl")):
        pytest.fail(f"no wheelhouse at {wheelhouse}: run `make wheelhouse` (it downloads once; this test never "
                    "downloads) or point ECNY_WHEELHOUSE at one")
    return wheelhouse


def _offline_env(wheelhouse: Path) -> dict[str, str]:
    """The environment without the checkout on the path, and pip pointed at the wheelhouse only."""
    env = {name: value for name, value in os.environ.items()
           if name not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} and not name.startswith("ECNY_")}
    return {**env, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _build(tmp_path: Path, env: dict[str, str]) -> Path:
    """``python -m build`` (an sdist, then the wheel from it) on a copy of the source tree."""
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=SOURCE_IGNORE, symlinks=True)
    built = _run([sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(source)], env, tmp_path)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("ecny_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _check_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    shipped_profiles = {p.name for p in (ROOT / "gateway" / "hsm" / "profiles").glob("*.toml")}
    assert {f"gateway/hsm/profiles/{name}" for name in shipped_profiles} <= names
    for dialect in ("sqlite", "postgresql"):
        migrations = {p.name for p in (ROOT / "gateway" / "ledger" / "migrations" / dialect).glob("*.sql")}
        assert migrations and {f"gateway/ledger/migrations/{dialect}/{m}" for m in migrations} <= names
    assert "gateway/api/static/docs.js" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata["License-Expression"] == "Apache-2.0"
    assert {"tui", "postgres", "serial", "dev"} <= set(metadata.get_all("Provides-Extra") or [])
    requires = metadata.get_all("Requires-Dist") or []
    for package, extra in (("textual", "tui"), ("psycopg", "postgres"), ("pyserial", "serial")):
        lines = [r for r in requires if r.lower().startswith(package)]
        assert lines and all(f'extra == "{extra}"' in r for r in lines), (package, lines)


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway never ready:\n{log.read_text()[-3000:]}")


def test_wheel_installs_offline_and_serves_against_softhsm(tmp_path: Path) -> None:
    """A wheel missing its HSM profiles or migrations, or a server install that needs the checkout:
    the built wheel alone, installed with only its core dependencies, serves and is ready."""
    wheelhouse = _wheelhouse()
    env = _offline_env(wheelhouse)
    wheel = _build(tmp_path, env)
    _check_wheel_contents(wheel)

    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], env, tmp_path)
    assert made.returncode == 0, made.stderr
    installed = _run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--find-links", str(wheelhouse),
                      str(wheel)], env, tmp_path)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    python = str(venv / "bin" / "python")
    where = _run([python, "-c", "import gateway, importlib.util as u; print(gateway.__file__); "
                  "print([m for m in ('textual', 'psycopg', 'serial') if u.find_spec(m)])"], env, tmp_path)
    location, extras_found = where.stdout.splitlines()
    assert location.startswith(str(venv)), location  # the installed package, not the checkout
    assert extras_found == "[]"  # a server install stays lean

    # The optional parts say which extra to install, in one line, without a traceback.
    teller = _run([str(venv / "bin" / "ecny-teller")], env, tmp_path)
    assert teller.returncode == 2 and "ecny-gateway[tui]" in teller.stderr and "Traceback" not in teller.stderr
    postgres = _run([str(venv / "bin" / "ecny-gateway"), "migrate", "--db", "postgresql://nobody@127.0.0.1:1/x"],
                    env, tmp_path)
    assert postgres.returncode == 2 and "ecny-gateway[postgres]" in postgres.stderr, postgres.stderr
    assert "Traceback" not in postgres.stderr
    device = _run([str(venv / "bin" / "ecny-gateway"), "device-sim", "--port", "loop://"], env, tmp_path, timeout=30)
    assert device.returncode == 2 and "ecny-gateway[serial]" in device.stderr, device.stderr
    assert "Traceback" not in device.stderr

    # The development set-up and `serve`, from the installed console script, against a fresh token.
    var = tmp_path / "var"
    conf = _run([str(ROOT / "softhsm" / "init-token.sh"), str(var / "hsm"), LABEL], env, tmp_path)
    assert conf.returncode == 0, conf.stderr
    env = {**env, "SOFTHSM2_CONF": conf.stdout.strip(), "ECNY_SERVER__PORT": str(free_port())}
    provisioned = _run([str(venv / "bin" / "ecny-gateway"), "dev-init", "--var", str(var)], env, tmp_path)
    assert provisioned.returncode == 0, provisioned.stderr[-3000:]
    doctor = _run([str(venv / "bin" / "ecny-gateway"), "hsm", "doctor", "--config", str(var / "gateway.toml")],
                  env, tmp_path)
    assert doctor.returncode == 0 and "HSM matches the profile" in doctor.stdout, doctor.stdout + doctor.stderr
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen([str(venv / "bin" / "ecny-gateway"), "serve", "--config", str(var / "gateway.toml")],
                                   env=env, cwd=tmp_path, stdout=output, stderr=output, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{env['ECNY_SERVER__PORT']}", process, log)
        # The API reference page's files are package data too (gateway/api/static, the Swagger UI package).
        for path in ("/docs", "/docs/assets/docs.js", "/docs/assets/swagger-ui-bundle.js"):
            with urllib.request.urlopen(f"http://127.0.0.1:{env['ECNY_SERVER__PORT']}{path}", timeout=10) as answer:
                assert answer.status == 200 and answer.read(), path
    finally:
        process.terminate()
        process.wait(timeout=30)
