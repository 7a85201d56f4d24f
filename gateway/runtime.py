"""What a running gateway holds: one instance per application, reached through ``app[RUNTIME]``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from gateway.approvals.workflow import Approvals
from gateway.audit.chain import AuditLog
from gateway.audit.refusals import RefusalTally
from gateway.auth.credentials import Authenticator
from gateway.config import Settings
from gateway.evm.rpc import EvmRpc
from gateway.evm.transactions import EvmTransactions
from gateway.evm.typed_data import EvmTypedData
from gateway.hsm.profile import HsmProfile
from gateway.hsm.signer import CountedSigner
from gateway.keys import KeyDirectory, Usage
from gateway.ledger.store import Database
from gateway.metrics import Metrics
from gateway.monitor.worker import RiskMonitor
from gateway.signing import Signer
from gateway.wallets.accounts import Wallets


@dataclass
class Runtime:
    settings: Settings
    profile: HsmProfile
    database: Database
    signer: Signer
    authenticator: Authenticator
    audit: AuditLog
    metrics: Metrics
    wallets: Wallets
    evm: EvmTransactions
    typed_data: EvmTypedData
    approvals: Approvals
    refusals: RefusalTally  # anonymous refusals, written as one audit entry per window and cause
    monitor: RiskMonitor  # the risk rules, after commit (nudged after every write request)
    evm_rpc: EvmRpc  # the Ethereum JSON-RPC signer (POST /v1/evm/rpc)
    keys: KeyDirectory = field(default_factory=KeyDirectory)
    started_at: float = field(default_factory=time.monotonic)

    def signer_for(self, usage: Usage) -> Signer:
        """The signer, counting what it signs under ``usage`` in ``ecny_signatures_total``."""
        return CountedSigner(self.signer, self.metrics.signatures, usage)


RUNTIME = web.AppKey("runtime", Runtime)
