"""Create a SoftHSM2 token without putting its PINs on a command line.

softhsm2-util reads PINs from a terminal when they are not given as arguments, so this runs it on
a pseudo-terminal and answers its prompts. Stdlib only: it runs before the venv exists.

    python3 softhsm/init_token.py LABEL SO_PIN_FILE USER_PIN_FILE
(SOFTHSM2_CONF must be set.)
"""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time


def main() -> int:
    label, so_pin_file, user_pin_file = sys.argv[1:4]
    so_pin = open(so_pin_file, encoding="ascii").read().strip()
    user_pin = open(user_pin_file, encoding="ascii").read().strip()
    answers = [(b"SO PIN:", so_pin), (b"SO PIN:", so_pin), (b"user PIN:", user_pin), (b"user PIN:", user_pin)]
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("softhsm2-util", ["softhsm2-util", "--init-token", "--free", "--label", label])
    seen = b""
    deadline = time.monotonic() + 60
    while True:
        # Never block past the deadline: a prompt that never comes (or an answer lost) ends the child.
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            shown = seen[-200:].decode(errors="replace").replace(user_pin, "***").replace(so_pin, "***")
            print(f"softhsm2-util did not finish within 60 s: {shown}", file=sys.stderr)
            os.waitpid(pid, 0)
            return 1
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
        if answers and seen.rstrip().endswith(answers[0][0]):
            os.write(fd, answers.pop(0)[1].encode() + b"\n")
            seen = b""
    _, status = os.waitpid(pid, 0)
    output = seen.decode(errors="replace").replace(user_pin, "***").replace(so_pin, "***")
    if os.waitstatus_to_exitcode(status) != 0 or answers:
        print(f"softhsm2-util failed: {output.strip()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
