"""Settings of offline payments: the caps written into device certificates, validity periods and
how reconciliation checks signatures.

Meant as the ``[offline]`` section of the gateway's settings (``ECNY_OFFLINE__…``); until the
section is wired into :class:`gateway.config.Settings` these defaults apply (:func:`offline_settings`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.errors import ConfigError


class TierCaps(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    per_payment_fen: Annotated[int, Field(ge=1)]
    """Largest single offline payment."""
    balance_fen: Annotated[int, Field(ge=1)]
    """Largest offline balance a device may hold (loads beyond it are refused)."""
    payments_per_sync: Annotated[int, Field(ge=1)]
    """Most payments a device may make between two syncs."""


def _default_caps() -> dict[str, TierCaps]:
    # Tier 4 (phone only) hard wallets: ¥500 a payment, ¥1,000 on the device — the usual anonymous-wallet caps.
    return {
        "1": TierCaps(per_payment_fen=1_000_000, balance_fen=5_000_000, payments_per_sync=1_000),
        "2": TierCaps(per_payment_fen=500_000, balance_fen=2_000_000, payments_per_sync=500),
        "3": TierCaps(per_payment_fen=200_000, balance_fen=500_000, payments_per_sync=200),
        "4": TierCaps(per_payment_fen=50_000, balance_fen=100_000, payments_per_sync=100),
    }


class OfflineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    caps: dict[str, TierCaps] = Field(default_factory=_default_caps)
    """Offline caps per wallet tier "1".."4", copied into each device certificate at registration."""
    certificate_days: Annotated[int, Field(ge=1, le=3650)] = 730
    """Validity of a device certificate; payments dated after it are flagged ``certificate-expired``."""
    voucher_minutes: Annotated[int, Field(ge=1, le=7 * 24 * 60)] = 24 * 60
    """A load voucher must be loaded onto the device within this long."""
    clock_skew_seconds: Annotated[int, Field(ge=0, le=86_400)] = 300
    """Device clocks drift: a payee's log must hold a payment dated at least this long before its export,
    or the payer's record is flagged ``unmatched-payer-record``."""
    signature_checks: Literal["each", "endorsed"] = "each"
    """``each``: verify every payment's own signature once. ``endorsed``: a payment in its payer's own
    device-signed log export is authenticated by the export's signature (one check per export); payments
    met only in a payee's log are still verified one by one. See docs/device-protocol.md."""
    key_id: str | None = None
    """Key that signs certificates, vouchers and acknowledgements; by default the one key with usage ``voucher``."""

    def tier_caps(self, tier: int) -> TierCaps:
        caps = self.caps.get(str(tier))
        if caps is None:
            raise ConfigError(f"offline.caps.{tier} is not configured")
        return caps


def offline_settings(settings: Any) -> OfflineSettings:
    """The ``offline`` section of the gateway settings, or the defaults while it has none."""
    section = getattr(settings, "offline", None)
    return section if isinstance(section, OfflineSettings) else OfflineSettings()
