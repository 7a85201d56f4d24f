"""``ecny-teller``: start the teller UI, or say which extra to install when Textual is absent.

A server install (``pip install ecny-gateway``) has no Textual: the UI is the ``tui`` extra. The
console script is installed either way, so it checks first and answers with one line and exit
status 2 instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib.util
import sys

MISSING_TEXTUAL = ("ecny-teller: the teller UI needs Textual, which this install lacks; "
                   "install the 'tui' extra: pip install 'ecny-gateway[tui]'")


def main(argv: list[str] | None = None) -> int:
    if importlib.util.find_spec("textual") is None:
        print(MISSING_TEXTUAL, file=sys.stderr)
        return 2
    # Optional dependency: tui.app imports Textual, so it is imported only once Textual is known present.
    from tui.app import main as run_teller

    return run_teller(argv)


if __name__ == "__main__":
    raise SystemExit(main())
