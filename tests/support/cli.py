"""`graft ARGS` as a script runs it: output piped, against the server at ``url``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_graft(
    url: str, *args: str, columns: int | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """The command's result; ``columns``: a terminal's width (COLUMNS), else none set."""
    env = {**os.environ, "GRAFT_URL": url}
    env.pop("GRAFT_API_KEY", None)
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "graft.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def run_graft_in_terminal(
    url: str, *args: str, columns: int = 80, rows: int = 40, answer: str = ""
) -> str:
    """What `graft ARGS` shows in a real terminal (a pseudo-terminal of ``columns`` x
    ``rows``) where the user types ``answer``, with colour codes and carriage returns
    removed."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    env = {**os.environ, "GRAFT_URL": url, "TERM": "xterm"}
    for name in ("GRAFT_API_KEY", "COLUMNS", "LINES", "NO_COLOR"):
        env.pop(name, None)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "graft.cli", *args],
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    if answer:
        os.write(leader, answer.encode())
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=600)
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", text).replace("\r", "")
