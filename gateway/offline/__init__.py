"""Offline payments: hard-wallet registration, loads and unloads, and the reconciliation of device
logs with the ledger (docs/spec.md §8)."""
