"""Administration of the teller UI's users: disable, enable, change a role, end every session.

Each takes effect from the user's next request, in every process (sessions read the user's current
role and disabled flag: gateway/auth/users.py), and is audited in the same transaction. An
administrator cannot disable or change the role of the account they are logged in with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.api.call import Call
from gateway.api.codecs import json_response
from gateway.api.endpoints import Endpoint
from gateway.api.models import UserDocument, UserRoleRequest
from gateway.audit.chain import append
from gateway.auth import users
from gateway.auth.roles import Permission, Role
from gateway.errors import SelfAdministration
from gateway.ledger.store import Tx

USER = "/v1/users/{username}"


def _not_oneself(call: Call, username: str, what: str) -> None:
    if call.actor.kind == "user" and call.actor.name == username:
        raise SelfAdministration(f"you cannot {what} the account you are logged in with; ask another administrator")


async def _administer(call: Call, action: str, change: Callable[[Tx, str], dict[str, Any]]) -> web.Response:
    """Run ``change`` on the named user and audit it in the same transaction; answer the user's
    document. ``change`` returns what the audit entry says besides the username."""
    username = call.request.match_info["username"]

    def work(tx: Tx) -> dict[str, Any]:
        result = change(tx, username)
        append(tx, [call.audit_entry(action, decision="allowed", result={"username": username, **result})])
        return users.user_document(tx, username) | {"sessions_ended": result.get("sessions_ended", 0)}

    return json_response(await call.runtime.database.write(work))


async def disable(call: Call) -> web.Response:
    _not_oneself(call, call.request.match_info["username"], "disable")
    return await _administer(call, "users.disable", lambda tx, name: {"sessions_ended": users.disable_user(tx, name)})


async def enable(call: Call) -> web.Response:
    def change(tx: Tx, name: str) -> dict[str, Any]:
        users.enable_user(tx, name)
        return {}

    return await _administer(call, "users.enable", change)


async def set_role(call: Call) -> web.Response:
    body: UserRoleRequest = call.body
    _not_oneself(call, call.request.match_info["username"], "change the role of")
    role = Role(body.role)
    return await _administer(call, "users.set_role", lambda tx, name: {
        "previous_role": users.set_role(tx, name, role), "role": role.value})


async def end_sessions(call: Call) -> web.Response:
    return await _administer(call, "users.end_sessions",
                             lambda tx, name: {"sessions_ended": users.end_sessions(tx, name)})


ENDPOINTS = [
    Endpoint("POST", USER + "/disable", disable, "Disable a user and end their sessions (admin)",
             Permission.USERS_MANAGE, "users", response_model=UserDocument, audited_action="users.disable",
             responses={403: "Not allowed for this role, or your own account"}),
    Endpoint("POST", USER + "/enable", enable, "Let a disabled user log in again (admin)", Permission.USERS_MANAGE,
             "users", response_model=UserDocument, audited_action="users.enable"),
    Endpoint("POST", USER + "/role", set_role, "Change a user's role; their live sessions have it at once (admin)",
             Permission.USERS_MANAGE, "users", request_model=UserRoleRequest, response_model=UserDocument,
             audited_action="users.set_role", responses={403: "Not allowed for this role, or your own account"}),
    Endpoint("DELETE", USER + "/sessions", end_sessions, "End every session of a user (admin)",
             Permission.USERS_MANAGE, "users", response_model=UserDocument, audited_action="users.end_sessions"),
]
