"""Maker-checker approvals (dual control): request, list and read, decide, expire; see :mod:`.workflow`."""
