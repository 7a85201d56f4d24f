"""deploy/: the systemd unit passes ``systemd-analyze verify`` and its offline security review, and the
sample production configuration — every commented option included — is accepted by the config loader.

``systemd-analyze`` comes with Debian's systemd package (``make system`` installs it where a minimal
image lacks it); without it these tests fail, they never skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.hsm.profile import load_named_profile
from tests.conftest import ROOT

UNIT = ROOT / "deploy" / "ecny-gateway.service"
UNITS = [UNIT, ROOT / "deploy" / "ecny-gateway-risk-monitor.service"]  # the server, the risk evaluator beside it
SAMPLE = ROOT / "deploy" / "gateway.toml"
INSTALLED_BIN = "/opt/ecny-gateway/bin/"
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 (locked down) .. 10 (exposed), --threshold in tenths; unit: 1.3


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: install the 'systemd' package (`make system` does)")
    return found


def _unit_here(tmp_path: Path, text: str | None = None, source: Path = UNIT) -> Path:
    """The unit with its ExecStart pointing at this environment's console script (verify checks the
    binary exists; production installs it under /opt/ecny-gateway)."""
    here = Path(sys.executable).parent
    assert (here / "ecny-gateway").is_file(), "the package's console script is not installed next to python"
    unit = tmp_path / source.name
    unit.write_text((text or source.read_text()).replace(INSTALLED_BIN, f"{here}/"))
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          cwd=unit.parent)


@pytest.mark.parametrize("source", UNITS, ids=lambda unit: unit.stem)
def test_systemd_unit_verifies_without_a_warning(tmp_path: Path, source: Path) -> None:
    """A unit whose hardening line is mistyped is silently ignored by systemd: verify must print nothing."""
    result = _verify(_unit_here(tmp_path, source=source))
    assert result.returncode == 0 and result.stderr == "" and result.stdout == "", result.stderr
    # The check sees a mistyped key (systemd would ignore it and run unhardened, with exit status 0).
    broken = _verify(_unit_here(tmp_path, source.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"),
                                source))
    assert "Unknown key 'NoNewPrivilege'" in broken.stderr


@pytest.mark.parametrize("source", UNITS, ids=lambda unit: unit.stem)
def test_systemd_unit_is_hardened(tmp_path: Path, source: Path) -> None:
    """A signing service with the run of the host (writable system, new privileges, devices, /tmp shared):
    the unit's offline security exposure stays at or below 2.0 and names each hardening directive."""
    text = source.read_text()
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
                      "ReadWritePaths=/var/lib/ecny-gateway", "CapabilityBoundingSet=\n", "UMask=0077",
                      "SystemCallFilter=@system-service", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert directive in text, directive
    result = subprocess.run([_systemd_analyze(), "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
                             str(_unit_here(tmp_path, source=source))], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert exposure is not None and float(exposure.group(1)) <= MAX_EXPOSURE


def test_unit_and_sample_config_agree() -> None:
    """The unit and the configuration drifting apart (a witness or store outside the writable path)."""
    unit = UNIT.read_text()
    settings = load_settings(SAMPLE, environ={})
    assert "Environment=ECNY_CONFIG=/etc/ecny-gateway/gateway.toml" in unit
    writable = re.findall(r"^ReadWritePaths=(\S+)", unit, re.MULTILINE)
    assert settings.audit.witness_file is not None
    assert any(str(settings.audit.witness_file).startswith(path + "/") for path in writable)
    assert settings.hsm.pin_file is not None and str(settings.hsm.pin_file).startswith("/etc/ecny-gateway/")
    assert settings.hsm.pin is None  # the PIN is never in the file


def _uncommented(text: str) -> str:
    """The sample with every commented ``#key = value`` option enabled, unless its key is set already."""
    lines, seen, section = [], set(), ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line
        match = re.match(r"^#?([a-z_]+) = ", line)
        if match:
            key = (section, match.group(1))
            if line.startswith("#"):
                if key in seen:
                    continue
                line = line[1:]
            seen.add(key)
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_sample_production_config_loads(tmp_path: Path) -> None:
    """A sample that the loader refuses (or options in comments that do not exist): the sample and
    every commented option in it load, and its profile is a shipped one."""
    settings = load_settings(SAMPLE, environ={})
    assert settings.store.dsn.startswith("postgresql://") and settings.server.host == "127.0.0.1"
    assert load_named_profile(settings.hsm.profile).name
    every_option = tmp_path / "gateway.toml"
    every_option.write_text(_uncommented(SAMPLE.read_text()))
    enabled = load_settings(every_option, environ={})
    assert enabled.server.tls_client_ca is not None and enabled.server.mtls_identities
    assert enabled.hsm.module is not None
    assert len(tomllib.loads(every_option.read_text())) >= 8
