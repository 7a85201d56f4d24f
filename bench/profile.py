"""Optional py-spy sampling of the gateway's main process during a benchmark (``run.py --profile``).

``py-spy record --threads --nonblocking -f raw`` writes collapsed stacks ("thread (tid): name;frame;frame N").
Idle threads are not sampled by default, so a thread's sample count over ``rate × duration`` is the
fraction of the time it was running Python (or in C code called from Python, such as SQLite) —
how busy the event loop and the store threads were.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import VENV_BIN

RATE = 200


def py_spy() -> str | None:
    candidate = VENV_BIN / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def start(pid: int, duration: float, output: Path) -> subprocess.Popen[bytes] | None:
    binary = py_spy()
    if binary is None:
        return None
    return subprocess.Popen([binary, "record", "-p", str(pid), "-d", str(int(duration)), "-r", str(RATE),
                             "--threads", "--nonblocking", "-f", "raw", "-o", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _frame_name(frame: str) -> str:
    # "work (gateway/api/transfers.py:41)" -> "work (gateway/api/transfers.py)": lines merged per function
    return re.sub(r":\d+\)$", ")", frame.strip())


def summarize(raw: Path, duration: float, top: int = 12) -> dict[str, Any]:
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\):\s*", "", frames[0]).strip()
        thread = re.sub(r"_\d+$", "", thread)  # sqlite-writer_0 -> sqlite-writer
        threads[thread] += count
        total += count
        names = [_frame_name(f) for f in frames[1:]]
        if names:
            self_time[f"{thread}: {names[-1]}"] += count
        for name in set(names):
            inclusive[f"{thread}: {name}"] += count
    possible = RATE * duration
    return {
        "samples": total,
        "duration_s": duration,
        "threads": [(name, count, count / possible) for name, count in threads.most_common(8)],
        "self": [(name, count, count / total if total else 0.0) for name, count in self_time.most_common(top)],
        "inclusive": inclusive,
    }


def inclusive_share(summary: dict[str, Any], thread: str, needle: str) -> float:
    """Share of one thread's samples spent in frames whose name contains ``needle``."""
    thread_total = dict((name, count) for name, count, _ in summary["threads"]).get(thread, 0)
    if not thread_total:
        return 0.0
    best = 0
    for key, count in summary["inclusive"].items():
        if key.startswith(thread + ": ") and needle in key:
            best = max(best, count)
    return best / thread_total
