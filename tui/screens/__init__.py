"""The teller UI's screens, one module per section."""
