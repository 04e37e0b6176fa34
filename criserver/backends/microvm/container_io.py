"""A running container's two long waits, seen from the host: its output, pumped from the agent
into the CRI log file, and its exit, reported once the output has drained.

The agent keeps output in an offset-addressed buffer. The offset of what is in the log file
(whole lines only) is saved in the pod's state dir shortly after it moves, so a restarted
daemon resumes the log where it stopped: nothing is lost while the agent still holds it, and
only output from the last SAVE_DELAY before a crash can be written twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from criserver import files
from criserver.backends.microvm.channel import AgentClient, ConnState
from criserver.errors import CriError, DeadlineExceeded, Unavailable
from criserver.runtime import exit_codes
from criserver.runtime.container_log import ContainerLog
from vmagent.api import agent_pb2 as pb

log = logging.getLogger(__name__)

OnExit = Callable[[str, int, str, str, int], Awaitable[None]]
# An exit is reported once its output is all in the log, however long that takes while output
# keeps coming; a pump that moves nothing for this long (the VM gone, a broken stream) is given up.
DRAIN_STALL = 5.0
SAVE_DELAY = 0.05
RETRY_DELAY = 0.5
WAIT_CALL_TIMEOUT = 365 * 24 * 3600.0  # WaitContainer returns when the container exits
STREAMS: dict[int, str] = {pb.StdioChunk.STDOUT: "stdout", pb.StdioChunk.STDERR: "stderr"}
# An exit reason is a word (Completed, Error, OOMKilled): a longer one from the guest is cut.
MAX_REASON = 128


def stream_name(stream: int) -> str | None:
    """The log stream of a chunk; None for a value the protocol does not define (the agent's
    answers are untrusted: a broken or hostile guest may send anything)."""
    return STREAMS.get(stream)


def exit_report(status: pb.ExitStatus) -> tuple[int, str, str, int]:
    """(exit code, reason, message, finished at) of an exit the agent reports, as the runtime
    records it: a missing reason is "Error", a missing or negative time is now."""
    message = f"killed by signal {status.signal}" if status.signal else ""
    finished = status.finished_at_unix_nanos
    return (status.exit_code, (status.reason or "Error")[:MAX_REASON], message,
            finished if finished > 0 else time.time_ns())


class ContainerIO:
    def __init__(self, agent: AgentClient, container_id: str, log_path: str,
                 offset_file: Path, on_exit: OnExit) -> None:
        self.agent = agent
        self.container_id = container_id
        self.log = ContainerLog(log_path, container_id=container_id) if log_path else None
        self.offset_file = offset_file
        self.on_exit = on_exit
        self.exited = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._waiter: asyncio.Task[None] | None = None
        self._logged_offset = 0  # everything before it is in the log file
        self._chunks = 0  # chunks received: the pump's progress, seen while draining
        self._saved_offset = 0
        self._saver: asyncio.Task[None] | None = None
        self._bad_stream_logged = False

    def start(self) -> None:
        if self.log is not None:
            self._pump = asyncio.create_task(self._pump_output(),
                                             name=f"log-{self.container_id[:12]}")
        self._waiter = asyncio.create_task(self._wait_exit(), name=f"wait-{self.container_id[:12]}")

    async def reopen_log(self) -> None:
        if self.log is not None:
            await self.log.reopen()

    async def close(self) -> None:
        """Stop following (daemon shutdown or pod gone); the container itself is untouched."""
        for task in (self._waiter, self._pump, self._saver):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:  # closing must not fail: it runs on the way out
                    log.exception("container io task failed container=%s", self.container_id)
        if self._logged_offset != self._saved_offset:
            await asyncio.to_thread(self._save_offset, self._logged_offset)
        if self.log is not None:
            await self.log.close()

    # -- output ----------------------------------------------------------------------------

    async def _pump_output(self) -> None:
        assert self.log is not None
        offset = self._logged_offset = self._saved_offset = await asyncio.to_thread(
            self._load_offset)
        request = pb.ReadStdioRequest(container_id=self.container_id, follow=True)
        while True:
            request.offset = offset
            try:
                async for chunk in self.agent.stream("ReadStdio", request):
                    self._chunks += 1
                    stream = stream_name(chunk.stream)
                    if chunk.data and stream is not None:
                        await self.log.write(stream, chunk.data, chunk.time_unix_nanos or None)
                    elif chunk.data and not self._bad_stream_logged:
                        self._bad_stream_logged = True
                        log.warning("container output on an undefined stream dropped "
                                    "container=%s stream=%d", self.container_id, chunk.stream)
                    offset = chunk.offset + len(chunk.data)
                    if chunk.eof:
                        await asyncio.to_thread(self._save_offset, offset)
                        return
                    if not self.log.has_partial:  # all of it is in the file now
                        self._logged(offset)
            except (Unavailable, DeadlineExceeded) as exc:
                log.info("container output interrupted container=%s error=%s: retrying",
                         self.container_id, exc.message)
            except CriError:
                if self.agent.state is not ConnState.CLOSED:
                    raise
            if self.agent.state is ConnState.CLOSED:
                return  # the pod's VM is gone: nothing more will come
            await asyncio.sleep(RETRY_DELAY)

    def _logged(self, offset: int) -> None:
        self._logged_offset = offset
        if self._saver is None or self._saver.done():
            self._saver = asyncio.create_task(self._save_soon())

    async def _save_soon(self) -> None:
        """Save the logged offset a moment after it moves: one write for a burst of chunks."""
        await asyncio.sleep(SAVE_DELAY)
        while self._saved_offset != self._logged_offset:
            offset = self._logged_offset
            await asyncio.to_thread(self._save_offset, offset)
            self._saved_offset = offset

    def _load_offset(self) -> int:
        try:
            return int(self.offset_file.read_text())
        except (OSError, ValueError):
            return 0

    def _save_offset(self, offset: int) -> None:
        files.write_atomic(self.offset_file, str(offset))

    # -- exit ------------------------------------------------------------------------------

    async def _drain_output(self) -> None:
        """Wait for the pump to write the rest of the output: it ends at the agent's end of
        output, which follows the exit. Whoever sees EXITED (it is reported after this) then
        finds every byte in the file, as kubelet and critest expect."""
        pump = self._pump
        if pump is None:
            return
        while not pump.done():
            chunks = self._chunks
            await asyncio.wait({pump}, timeout=DRAIN_STALL)
            if not pump.done() and self._chunks == chunks:
                log.warning("container output stalled after its exit, logging what came "
                            "container=%s", self.container_id)
                pump.cancel()
                await asyncio.wait({pump})
        if not pump.cancelled() and pump.exception() is not None:
            log.warning("container output not all logged container=%s error=%s",
                        self.container_id, pump.exception())

    async def _wait_exit(self) -> None:
        request = pb.WaitContainerRequest(container_id=self.container_id)
        while True:
            try:
                status = await self.agent.call("WaitContainer", request, timeout=WAIT_CALL_TIMEOUT)
                break
            except (Unavailable, DeadlineExceeded) as exc:
                log.info("waiting for container interrupted container=%s error=%s: retrying",
                         self.container_id, exc.message)
                await asyncio.sleep(RETRY_DELAY)
            except CriError as exc:
                if self.agent.state is ConnState.CLOSED:
                    return  # the VM is gone: the pod's end reports the container's
                # The agent does not know the container (its guest restarted): it is gone.
                log.warning("container lost container=%s error=%s", self.container_id,
                            exc.message)
                status = pb.ExitStatus(exit_code=exit_codes.LOST, reason=exit_codes.ERROR,
                                       finished_at_unix_nanos=time.time_ns())
                break
        await self._drain_output()
        if self.log is not None:
            await self.log.close()
        self.exited.set()
        await self.on_exit(self.container_id, *exit_report(status))
