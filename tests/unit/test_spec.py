"""docs/spec.md stays true to the code: every endpoint the server has and every problem type it can
answer with is written down in the contract.

The endpoints come from the generated OpenAPI document (built from the same endpoint table as the
router), the problem types from the error tree (gateway/errors.py, and any GatewayError subclass
defined beside the code that raises it). A new endpoint or error without its line in docs/spec.md
fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import gateway.app
import gateway.errors
from gateway.api import openapi
from gateway.errors import GatewayError

SPEC = Path(__file__).resolve().parents[2] / "docs" / "spec.md"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def _spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def _documented_operations() -> list[str]:
    """``METHOD /path`` of every operation in the OpenAPI document the server serves."""
    document = openapi.build(gateway.app.all_endpoints())
    return sorted(
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items()
        for method in operations
        if method in HTTP_METHODS
    )


def _error_classes() -> set[type[GatewayError]]:
    """Every GatewayError subclass: those of gateway/errors.py, and those defined elsewhere in the
    gateway (imported with gateway.app)."""
    found: set[type[GatewayError]] = {
        value for value in vars(gateway.errors).values()
        if isinstance(value, type) and issubclass(value, GatewayError)
    }
    pending = [GatewayError]
    while pending:
        cls = pending.pop()
        found.add(cls)
        pending.extend(cls.__subclasses__())
    return {cls for cls in found if cls.__module__.startswith("gateway.")}


def missing_operations(spec: str) -> list[str]:
    """Operations without a row of their own in ``spec``'s endpoint tables: a line that starts
    ``| `METHOD /path`` (the path followed by a closing backquote or a query)."""
    return [
        operation for operation in _documented_operations()
        if not re.search("^" + re.escape(f"| `{operation}") + r"[`?]", spec, re.MULTILINE)
    ]


def missing_problem_types(spec: str) -> list[str]:
    """Problem type codes that appear nowhere in ``spec`` as `` `code` ``."""
    codes = {cls.code for cls in _error_classes()}
    return sorted(code for code in codes if f"`{code}`" not in spec)


def test_every_endpoint_is_in_the_spec() -> None:
    """The contract drifts from the server: an endpoint exists that docs/spec.md does not name."""
    operations = _documented_operations()
    assert len(operations) >= 40  # the whole table, not an empty document
    assert missing_operations(_spec_text()) == []


def test_every_problem_type_is_in_the_spec() -> None:
    """The contract drifts from the server: a problem type a client can receive is undocumented."""
    codes = {cls.code for cls in _error_classes()}
    assert {"bad-request", "policy-refused", "ledger-invariant", "method-not-allowed"} <= codes
    assert missing_problem_types(_spec_text()) == []


def test_a_missing_endpoint_line_is_caught() -> None:
    """The check itself works: deleting an endpoint's row from the spec is noticed."""
    spec = _spec_text()
    row = next(line for line in spec.splitlines() if line.startswith("| `GET /v1/audit/checkpoints"))
    assert missing_operations(spec.replace(row, "")) == ["GET /v1/audit/checkpoints"]


def test_a_missing_problem_type_is_caught() -> None:
    """The check itself works: a problem type named nowhere in the spec is noticed."""
    spec = _spec_text().replace("`login-busy`", "login busy")
    assert missing_problem_types(spec) == ["login-busy"]
