"""Starting helper processes with multiprocessing's spawn method (signer workers, the risk evaluator)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def without_main_module() -> Iterator[None]:
    """Start a spawned process without re-running the parent's ``__main__``.

    spawn re-imports the parent's main module in the child (as ``__mp_main__``), by path or, under
    ``python -m``, by name. For the ``ecny-gateway`` console script that means importing the whole
    gateway (aiohttp, pydantic, the EVM libraries…) into every helper process: seconds of start-up
    and ~40 MB each, for nothing — the helper's target is importable by name. Hiding ``__file__``
    and ``__spec__`` for the duration of ``Process.start()`` (synchronous, on this thread) makes
    spawn skip that step.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None  # `python -m gateway.cli` would be re-imported by name otherwise
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


@contextlib.contextmanager
def without_environment(*names: str) -> Iterator[None]:
    """Start a spawned process without the variables ``names`` (the child's environment is this process's
    at ``Process.start()``), e.g. a metrics directory whose counts the parent reports itself."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
