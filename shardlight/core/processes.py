"""Whether a process still runs, for code that cleans up after processes that may have been killed.

A zombie (exited, not yet reaped by its parent) counts as gone: it runs nothing and holds nothing but its
process-table entry. Another user's process counts as running (we may not signal it, but it is there).
"""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True  # no /proc to tell a zombie (macOS): the signal's answer stands
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # exited since the signal
        return False
