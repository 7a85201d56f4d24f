"""Roles and what each may do (docs/spec.md §5). Anything not listed is refused with 403.

Permissions are named ``resource.verb``. Endpoints declare the permission they need; the table
below is the single place that grants them, and the authorization test walks all of it.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    BACKEND = "backend"
    TELLER = "teller"
    SUPERVISOR = "supervisor"
    AUDITOR = "auditor"
    ADMIN = "admin"


class Permission(StrEnum):
    SERVICE_READ = "service.read"  # /metrics, /openapi.json: operational data, no secrets
    KEYS_READ = "keys.read"
    KEYS_CREATE = "keys.create"
    KEYS_SIGN = "keys.sign"  # raw digest signing and batches, `raw` keys only
    AUDIT_READ = "audit.read"
    CLIENTS_MANAGE = "clients.manage"
    USERS_MANAGE = "users.manage"
    WALLETS_READ = "wallets.read"
    WALLETS_OPEN = "wallets.open"
    WALLETS_CASH = "wallets.cash"
    WALLETS_TIER = "wallets.tier"
    WALLETS_FREEZE = "wallets.freeze"
    WALLETS_UNFREEZE = "wallets.unfreeze"  # also close
    TRANSFERS_CREATE = "transfers.create"
    TRANSFERS_READ = "transfers.read"
    DEVICES_OPERATE = "devices.operate"  # register, load, sync, unload
    DEVICES_READ = "devices.read"
    DEVICES_REVOKE = "devices.revoke"
    RECONCILIATION_READ = "reconciliation.read"
    RECONCILIATION_RESOLVE = "reconciliation.resolve"
    APPROVALS_READ = "approvals.read"
    APPROVALS_DECIDE = "approvals.decide"  # and only by a person (a user's session), never an API client
    APPROVALS_READ_ALL = "approvals.read_all"  # everyone's approvals; others see only their owner's
    EVM_READ = "evm.read"
    EVM_SIGN = "evm.sign"
    EVM_NONCES = "evm.nonces"
    SESSIONS_END = "sessions.end"  # log out: every role a person can hold (backend is for API clients only)
    RISK_REPORTS_READ = "risk_reports.read"  # the signed daily risk report and the risk chart (whole institution)
    RISK_DELIVERIES_READ = "risk_deliveries.read"  # webhook deliveries of risk events, the dead letters
    RISK_DELIVERIES_REPLAY = "risk_deliveries.replay"  # send a dead delivery again
    RISK_READ = "risk.read"  # risk events: a backend client only those that name it
    RISK_READ_ALL = "risk.read_all"  # every risk event
    RISK_TRIAGE = "risk.triage"  # acknowledge, assign, close (never an event that names you)


_READ_ALL = frozenset(p for p in Permission if p.value.endswith(".read"))

_TELLER = frozenset(
    {
        Permission.SERVICE_READ,
        Permission.KEYS_READ,
        Permission.WALLETS_READ,
        Permission.WALLETS_OPEN,
        Permission.WALLETS_CASH,
        Permission.WALLETS_TIER,
        Permission.WALLETS_FREEZE,
        Permission.TRANSFERS_CREATE,
        Permission.TRANSFERS_READ,
        Permission.DEVICES_OPERATE,
        Permission.DEVICES_READ,
        Permission.RECONCILIATION_READ,
        Permission.APPROVALS_READ,
        Permission.SESSIONS_END,
    }
)

GRANTS: dict[Role, frozenset[Permission]] = {
    Role.BACKEND: frozenset(
        {
            Permission.SERVICE_READ,
            Permission.KEYS_READ,
            Permission.KEYS_SIGN,
            Permission.TRANSFERS_CREATE,
            Permission.TRANSFERS_READ,
            Permission.EVM_READ,
            Permission.EVM_SIGN,
            Permission.WALLETS_READ,
            Permission.APPROVALS_READ,
            Permission.RISK_READ,
        }
    ),
    Role.TELLER: _TELLER,
    Role.SUPERVISOR: _TELLER
    | {
        Permission.WALLETS_UNFREEZE,
        Permission.APPROVALS_DECIDE,
        Permission.APPROVALS_READ_ALL,
        Permission.RECONCILIATION_RESOLVE,
        Permission.DEVICES_REVOKE,
        Permission.RISK_REPORTS_READ,
        Permission.RISK_READ,
        Permission.RISK_READ_ALL,
        Permission.RISK_TRIAGE,
    },
    Role.AUDITOR: _READ_ALL | {Permission.APPROVALS_READ_ALL, Permission.SESSIONS_END, Permission.RISK_READ_ALL,
                               Permission.RISK_TRIAGE},
    Role.ADMIN: frozenset(
        {
            Permission.SERVICE_READ,
            Permission.KEYS_READ,
            Permission.KEYS_CREATE,
            Permission.CLIENTS_MANAGE,
            Permission.USERS_MANAGE,
            Permission.EVM_READ,
            Permission.EVM_NONCES,
            Permission.AUDIT_READ,
            Permission.SESSIONS_END,
            Permission.RISK_DELIVERIES_READ,
            Permission.RISK_DELIVERIES_REPLAY,
        }
    ),
}


def allows(role: Role, permission: Permission) -> bool:
    return permission in GRANTS[role]
