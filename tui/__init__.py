"""ecny-teller: the Textual terminal UI for tellers, supervisors and auditors (a client of the HTTP API only)."""
