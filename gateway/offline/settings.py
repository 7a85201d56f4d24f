"""Settings of offline payments: the caps written into device certificates, validity periods and
how reconciliation checks signatures.

The ``[offline]`` section of the gateway's settings (``ECNY_OFFLINE__…``) is defined in
:mod:`gateway.config` with the other sections (the configuration sits below the offline flows);
it is named here too for the offline modules, with :func:`offline_settings` for settings without it.
"""

from __future__ import annotations

from typing import Any

from gateway.config import OfflineSettings, TierCaps

__all__ = ["OfflineSettings", "TierCaps", "offline_settings"]


def offline_settings(settings: Any) -> OfflineSettings:
    """The ``offline`` section of the gateway settings, or the defaults while it has none."""
    section = getattr(settings, "offline", None)
    return section if isinstance(section, OfflineSettings) else OfflineSettings()
