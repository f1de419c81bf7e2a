"""A watchdog that stops a process group once the process that started it is gone.

`cxrelay serve` runs the embedded Prefect server in a session of its own (its CLI runs the API
in a child, and a stop must reach both). A `serve` killed with SIGKILL forwards nothing, so the
server lived on. This watchdog runs beside it, in a session of its own too, so that a kill of
`serve`'s whole group leaves it standing: when its parent (`serve`) is gone, it stops the
group (SIGTERM, SIGKILL after a grace) and exits. Standard library only: it starts in ~50 ms.

    python -m cxrelay.app.orphans --parent <serve pid> --group <server pgid> [--grace 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from pathlib import Path

POLL_SECONDS = 0.5


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(group: int) -> list[int]:
    """The processes of `group` (Linux /proc), zombies left out."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def stop_group(group: int, grace: float) -> None:
    """SIGTERM the group, SIGKILL what is left after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not group_members(group):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def watch(parent: int, group: int, grace: float) -> None:
    """Until `parent` is gone (this process is handed to another parent), or the group is."""
    while os.getppid() == parent:
        if not group_alive(group):
            return
        time.sleep(POLL_SECONDS)
    if group_alive(group):
        stop_group(group, grace)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--group", type=int, required=True)
    parser.add_argument("--grace", type=float, default=10.0)
    args = parser.parse_args()
    # Signals meant for `serve`'s terminal or group are not ours to act on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(args.parent, args.group, args.grace)


if __name__ == "__main__":
    main()
