"""Debian's runc driven from the daemon: one short-lived runc process per call (start, kill,
delete, state, update, exec), run as an asyncio subprocess. `runc create` is not here: the
container's monitor (ctrmon) runs it, so that it is the container's parent.

Errors carry runc's own message and map to the CRI's codes: an unknown container is NotFound, a
container in the wrong state FailedPrecondition, anything else Internal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from criserver import spawn
from criserver.errors import CriError, FailedPrecondition, Internal, NotFound

log = logging.getLogger(__name__)

CANDIDATES = ("/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc", "/usr/local/bin/runc")
CALL_TIMEOUT = 60.0  # a runc call that takes longer is stuck (a frozen cgroup, a dead fs)


def find_runc(configured: str) -> str:
    """The runc binary: the configured path or name on PATH, else the usual places ("" if
    none)."""
    if configured:
        return shutil.which(configured) or ""
    for path in CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("runc") or ""


def error_for(what: str, code: int, detail: str) -> CriError:
    lowered = detail.lower()
    message = f"{what}: runc exited {code}: {detail}"
    if "does not exist" in lowered or "container not found" in lowered:
        return NotFound(message)
    if "not running" in lowered or "already" in lowered or "cannot" in lowered:
        return FailedPrecondition(message)
    return Internal(message)


def _message(stderr: bytes) -> str:
    """runc's error: its stderr is logrus text (`time=... level=error msg="..."`) or a plain
    line; the msg part is what a user needs."""
    text = stderr.decode(errors="replace").strip()
    for line in reversed(text.splitlines()):
        if 'msg="' in line:
            return line.split('msg="', 1)[1].rstrip('"').replace('\\"', '"')
    return text[-2000:]


class Runc:
    """One runc binary and state root (`--root`)."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *args]

    async def run(self, *args: str, what: str, stdin: bytes | None = None,
                  timeout: float = CALL_TIMEOUT) -> bytes:
        """Run `runc <args>` to its end and return its stdout.

        :raises CriError: runc failed (see `error_for`) or did not finish within `timeout`.
        """
        proc = await spawn.spawn(
            self.argv(*args), stdin=spawn.PIPE if stdin is not None else spawn.DEVNULL,
            stdout=spawn.PIPE, stderr=spawn.PIPE)
        if stdin is not None and proc.stdin is not None:
            proc.stdin.write(stdin)
            proc.stdin.close()
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise Internal(f"{what}: runc did not finish in {timeout:.0f}s") from None
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0:
            raise error_for(what, proc.returncode or 0, _message(err))
        return out

    async def start(self, container_id: str) -> None:
        await self.run("start", container_id, what=f"start container {container_id}")

    async def kill(self, container_id: str, signum: int, *, all_processes: bool = False) -> None:
        """Signal the container's init (or, `all_processes`, every process in its cgroup).

        :raises NotFound, FailedPrecondition: it does not exist or no longer runs.
        """
        args = ["kill", *(["--all"] if all_processes else []), container_id, str(signum)]
        await self.run(*args, what=f"signal container {container_id}")

    async def delete(self, container_id: str) -> None:
        """Remove the container, killing it first if it still runs; idempotent."""
        try:
            await self.run("delete", "--force", container_id,
                           what=f"delete container {container_id}")
        except NotFound:
            pass

    async def state(self, container_id: str) -> dict[str, Any] | None:
        """`runc state` (status "created", "running", "paused" or "stopped"), None if runc has
        no such container."""
        try:
            out = await self.run("state", container_id, what=f"state of {container_id}")
        except NotFound:
            return None
        try:
            state: dict[str, Any] = json.loads(out)
        except ValueError as exc:
            raise Internal(f"runc state {container_id}: not JSON: {out[:200]!r}") from exc
        return state

    async def update(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply an OCI `LinuxResources` document to the running container."""
        await self.run("update", "--resources", "-", container_id,
                       what=f"update resources of {container_id}",
                       stdin=json.dumps(resources).encode())
