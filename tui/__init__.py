"""ecny-teller: the Textual terminal UI for tellers and supervisors (a client of the HTTP API only)."""
