"""The risk monitor: reads the outbox of signals (:mod:`gateway.risk.signals`) after commit, evaluates
the configured rules over their time windows, stores what they find as risk events and delivers them."""
