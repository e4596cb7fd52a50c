"""A rank that dies or hangs must not leave the others waiting in a collective forever.

Every rank runs a thread that bumps its own counter in the launcher's rendezvous store every few
seconds and reads the other ranks' counters. The thread keeps beating while its main thread
waits in a collective, so the only counters that stop are those of ranks that are gone
(SIGKILLed, SIGSTOPped, their node lost). Once a rank's counter has not moved for
train.dist_timeout_s, or the store itself stopped answering that long, this process prints one
line naming the rank and exits with LOST_RANK_EXIT without writing anything: checkpoints/latest
still names the last complete checkpoint, and rerunning the command resumes from it.

A dead peer usually shows sooner, as a connection error inside a collective; the trainer then
calls `explain(error)`, which names the rank whose counter stopped within a few heartbeats and
exits the same way (or returns, and the error is raised as it is, if every rank is alive).
"""
from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time

from ..dist import store_client

LOST_RANK_EXIT = 69  # EX_UNAVAILABLE: another rank is gone; rerun (or let Slurm requeue) to resume
# what a collective raises when a peer is gone (gloo, NCCL, the c10d store)
PEER_LOST = re.compile(r"Connection (reset|closed|refused)|Broken pipe|peer|communicator was aborted|"
                       r"NCCL (error|communicator)|Socket Timeout|timed out", re.IGNORECASE)


class RankWatchdog:
    def __init__(self, rank: int, world: int, timeout_s: float, on_lost=None):
        self.rank, self.world, self.timeout = rank, world, timeout_s
        self.interval = max(0.5, min(10.0, timeout_s / 10))
        self.on_lost = on_lost  # called with the message before the exit (e.g. to log an event)
        self.stale_after = timeout_s  # a counter still this long names its rank (shorter once a collective failed)
        self._stop = threading.Event()
        self.thread = None
        self.hosts: dict[int, str] = {}  # rank -> host name, read from the store once every rank wrote it

    def start(self) -> "RankWatchdog":
        store = store_client(timeout_s=max(2 * self.interval, 5.0))
        if store is not None:
            now = time.monotonic()
            self.store_ok = now  # when a round of store reads last completed
            self.last = {r: (-1, now) for r in range(self.world) if r != self.rank}  # counter, when it moved
            # store I/O can block for good (a SIGSTOPped store host); the watch thread never waits on it
            threading.Thread(target=self._beat, args=(store,), name="mmscale-heartbeat", daemon=True).start()
            self.thread = threading.Thread(target=self._watch, name="mmscale-watchdog", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def explain(self, error: BaseException) -> None:
        """After a collective failed: if it looks like a lost peer, wait a few heartbeats for the
        watch thread to name the rank (it then exits the process); return if none went quiet."""
        if self.thread is None or not PEER_LOST.search(str(error)):
            return
        self.stale_after = 3 * self.interval
        deadline = time.monotonic() + self.timeout
        while self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(self.interval / 4)

    def _key(self, rank: int) -> str:
        return f"mmscale/alive/{rank}"

    def _host_key(self, rank: int) -> str:
        return f"mmscale/host/{rank}"

    def _beat(self, store) -> None:
        try:  # which host each rank runs on, so a lost node is named (a store that fails now: _watch says so)
            store.set(self._host_key(self.rank), socket.gethostname())
        except Exception:  # noqa: BLE001
            pass
        while not self._stop.wait(self.interval):
            try:
                if not self.hosts and store.check([self._host_key(r) for r in self.last]):
                    self.hosts = {r: store.get(self._host_key(r)).decode() for r in self.last}
                store.add(self._key(self.rank), 1)
                for r, (value, since) in list(self.last.items()):
                    seen = store.add(self._key(r), 0)
                    if seen != value:
                        self.last[r] = (seen, time.monotonic())
                self.store_ok = time.monotonic()
            except Exception:  # noqa: BLE001 - the store's host is gone; the watch thread will say so
                pass

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - self.store_ok > self.stale_after:
                self._lost(f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                           f"(on rank 0, or the launcher) has not answered for {now - self.store_ok:.0f} s")
            stale = [r for r, (_, since) in self.last.items() if now - since > self.stale_after]
            if stale:
                # ranks lost together (a node) went quiet up to a beat apart: name all of them, not
                # only the first past the limit
                quiet = max(2 * self.interval, self.stale_after - 2 * self.interval)
                stale = sorted(r for r, (_, since) in self.last.items() if now - since > quiet)
                idle = max(now - self.last[r][1] for r in stale)
                self._lost(f"{self.describe(stale)} stopped answering (no heartbeat for {idle:.0f} s)")

    def describe(self, ranks: list[int]) -> str:
        """'ranks 2, 3 (on node2)': the ranks and the hosts they ran on, as they told the store
        (no host named where all of them ran on this one)."""
        hosts = sorted({self.hosts[r] for r in ranks if r in self.hosts})
        where = f" (on {', '.join(hosts)})" if hosts and hosts != [socket.gethostname()] else ""
        return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}{where}"

    def _lost(self, what: str) -> None:
        message = (f"mmscale: rank {self.rank}: {what} (train.dist_timeout_s={self.timeout:g}); exiting (code "
                   f"{LOST_RANK_EXIT}) without a checkpoint: rerun to resume from checkpoints/latest")
        try:
            if self.on_lost:
                self.on_lost(message)
        finally:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(LOST_RANK_EXIT)
