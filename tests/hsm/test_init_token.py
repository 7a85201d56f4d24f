"""softhsm/init-token.sh, which `make run` and the test suite use to make SoftHSM2 tokens, keeps one token per
label however many tokens share its directory."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.softhsm

SCRIPT = ROOT / "softhsm" / "init-token.sh"


def _labels(directory: Path) -> list[str]:
    slots = subprocess.run(["softhsm2-util", "--show-slots"], env={**os.environ,
                           "SOFTHSM2_CONF": str(directory / "softhsm2.conf")}, capture_output=True, text=True,
                           check=True).stdout
    return [line.split(":", 1)[1].strip() for line in slots.splitlines() if line.strip().startswith("Label:")]


def test_a_label_already_made_is_kept_beside_many_tokens(tmp_path: Path) -> None:
    """A second token with the same label (the script's check piped the slot list into ``grep -q`` under
    ``pipefail``: with a long list grep stopped reading first, softhsm2-util got SIGPIPE, the check
    "failed" and a duplicate was made — then every user of the label is refused: more than one token
    matches). Run again for the first and the last label of thirty, each still names one token, and its
    PIN files are the ones first written."""
    labels = [f"t{n:02d}" for n in range(30)]
    for label in labels:
        subprocess.run([str(SCRIPT), str(tmp_path), label], check=True, capture_output=True)
    pins = {label: (tmp_path / f"{label}.user-pin").read_bytes() for label in (labels[0], labels[-1])}
    for _ in range(3):
        for label in (labels[0], labels[-1]):
            subprocess.run([str(SCRIPT), str(tmp_path), label], check=True, capture_output=True)
    made = [label for label in _labels(tmp_path) if label]
    assert sorted(made) == labels  # thirty tokens, one per label
    assert {label: (tmp_path / f"{label}.user-pin").read_bytes() for label in pins} == pins
