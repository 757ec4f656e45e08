"""Store faults through a real node, with real files, mounts and processes.

A value that cannot be stored, a store file that turns read-only, a full
disk, the disk-free floor, and garbage in the WAL after ``kill -9``: the
producer gets ``StoreError`` at once (never a ``Timeout``), the failure is
counted, the node goes on serving and recovers by itself once the cause is
gone, and damage is found when the store opens instead of being dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from store.writer_child import write_then_kill

import pigeon
from pigeon.errors import StoreError
from pigeon.message import Message
from pigeon.store import Put, SqliteStore
from pigeon.transports.host import QueueHost

PIGEON = [sys.executable, "-m", "pigeon.cli.main"]
WAIT = 30.0  # bound for what takes well under a second on a quiet machine
AT_ONCE = 5.0  # a refusal comes this fast or it is not "at once"


async def refused_at_once(send: Callable[[], object], match: str) -> StoreError:
    """Await ``send()`` (with a long timeout of its own): it must fail with
    StoreError matching ``match`` well before any timeout could."""
    start = time.monotonic()
    with pytest.raises(StoreError, match=match) as info:
        await send()  # type: ignore[misc]
    assert time.monotonic() - start < AT_ONCE
    return info.value


# -- a value that cannot be stored -------------------------------------------------


def test_a_send_that_cannot_be_stored_is_refused_alone_and_the_node_goes_on(tmp_path):
    async def main() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", store=tmp_path / "q.db") as host:
            address = host.stats()["bound"][0]
            async with pigeon.connect(address) as producer:
                await producer.send("jobs", "before", timeout=WAIT)
                # A queue name SQLite cannot bind (a lone surrogate), sent by
                # the host itself: its store refuses this send alone.
                await refused_at_once(
                    lambda: host.send("bad\udc80", "poison", timeout=WAIT), "cannot store"
                )
                for i in range(10):
                    await producer.send("jobs", f"after {i}", timeout=WAIT)
                    await host.send("jobs", f"local {i}", timeout=WAIT)
                stats = host.stats()
                assert stats["store_errors"] == 1
                assert stats["store"]["refused_ops"] == 1
        with SqliteStore(tmp_path / "q.db") as store:
            assert len(store.load()) == 21

    asyncio.run(main())


def test_an_attempt_count_msgpack_cannot_hold_does_not_stop_the_writer(tmp_path):
    """The measured failure: attempt = 2**64-1, then a nack; the next write
    overflowed msgpack and killed the writer thread, and every later send
    hung. Now that write is refused alone and counted."""

    async def main() -> None:
        host = QueueHost(store=SqliteStore(tmp_path / "q.db"))
        try:
            got: list[Message] = []
            poison = Message(id="poison", body=b"x", attempt=2**64 - 1)
            try:
                stored = await host.put_many("q", [poison])
            except StoreError:  # a bound on attempts refuses it before the disk
                stored = []
            if stored == [True]:
                host.subscribe("q", "worker", lambda _q, ms: got.extend(ms), prefetch=1)
                for _ in range(200):
                    if got:
                        break
                    await asyncio.sleep(0.01)
                assert got
                host.settle("q", "worker", nacks=[("poison", 60.0, "boom")])  # a Requeue
                for _ in range(200):
                    if host.store_errors:
                        break
                    await asyncio.sleep(0.01)
            assert host.store_errors == 1
            assert host.committer is not None and host.committer.errors == 1
            # the writer is alive: later sends are confirmed
            for i in range(5):
                assert await host.put_many("q", [Message(id=f"m{i}", body=b"y")]) == [True]
        finally:
            await host.aclose()

    asyncio.run(main())


# -- a read-only store file ------------------------------------------------------


def chattr(flag: str, *paths: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Callable[..., None]]:
    """Makes files immutable (chattr +i: read-only even for root) and undoes it."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    works = chattr("+i", probe)
    if works:
        try:
            with open(probe, "r+b"):
                works = False  # +i did not take on this filesystem
        except OSError:
            pass
        chattr("-i", probe)
    if not works:
        pytest.skip("chattr +i does not work here (no tool, or tmpfs/overlay)")
    marked: list[Path] = []

    def mark(*paths: Path) -> None:
        assert chattr("+i", *paths)
        marked.extend(paths)

    yield mark
    chattr("-i", *marked)


def test_a_store_file_turning_read_only_refuses_sends_at_once_and_recovers(tmp_path, immutable):
    path = tmp_path / "q.db"

    async def main() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", store=path) as host:
            address = host.stats()["bound"][0]
            async with pigeon.connect(address) as producer:
                await producer.send("jobs", "one", timeout=WAIT)
                immutable(path, Path(f"{path}-wal"))
                error = await refused_at_once(
                    lambda: producer.send("jobs", "two", timeout=WAIT), "cannot be written"
                )
                assert "Operation not permitted" in str(error)
                await refused_at_once(lambda: host.send("jobs", "local", timeout=WAIT), "I/O")
                chattr("-i", path, Path(f"{path}-wal"))
                await producer.send("jobs", "three", timeout=WAIT)  # no restart needed
                assert host.stats()["store_errors"] == 2

    asyncio.run(main())


def test_a_read_only_store_file_stops_the_node_from_starting(tmp_path, immutable):
    path = tmp_path / "q.db"
    with SqliteStore(path):
        pass
    immutable(path)

    async def main() -> None:
        with pytest.raises(StoreError, match="read-only"):
            async with pigeon.connect(bind="tcp://127.0.0.1:0", store=path):
                pass

    asyncio.run(main())


# -- a full disk, and the floor ----------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a tmpfs of the given size (root only); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where: Path, leave: int = 0) -> Path:
    """Write a filler file until at most ``leave`` bytes are free."""
    filler = where / "filler"
    with open(filler, "ab", buffering=0) as file:
        for chunk in (1 << 16, 1 << 12, 1 << 9):
            try:
                while True:
                    st = os.statvfs(where)
                    if st.f_bavail * st.f_frsize - chunk < leave:
                        break
                    file.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


def free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def test_a_full_disk_refuses_sends_at_once_and_recovers_without_a_restart(small_disk):
    disk = small_disk("4m")
    path = disk / "q.db"

    async def main() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", store=path, min_free_disk=0) as host:
            address = host.stats()["bound"][0]
            async with pigeon.connect(address) as producer:
                for i in range(5):
                    await producer.send("jobs", f"kept {i}", timeout=WAIT)
                filler = fill(disk)
                big = b"x" * 200_000
                await refused_at_once(
                    lambda: producer.send("jobs", big, timeout=WAIT), "the disk is full"
                )
                await refused_at_once(lambda: host.send("jobs", big, timeout=WAIT), "disk is full")
                assert host.stats()["store_errors"] == 2
                filler.unlink()  # space comes back: the next send goes through
                await producer.send("jobs", big, timeout=WAIT)
                await host.send("jobs", big, timeout=WAIT)

    asyncio.run(main())
    with SqliteStore(path) as store:
        assert len(store.load()) == 7


def test_a_restart_on_a_full_disk_refuses_sends_rather_than_looking_healthy(small_disk):
    disk = small_disk("4m")
    path = disk / "q.db"

    async def first_life() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", store=path, min_free_disk=0) as host:
            for i in range(5):
                await host.send("jobs", f"kept {i}", timeout=WAIT)

    async def second_life() -> None:
        async with pigeon.connect(bind="tcp://127.0.0.1:0", store=path, min_free_disk=0) as host:
            assert host.stats()["restored"] == 5
            address = host.stats()["bound"][0]
            async with pigeon.connect(address) as producer:
                await refused_at_once(
                    lambda: producer.send("jobs", b"y" * 100_000, timeout=WAIT), "disk is full"
                )
                filler.unlink()
                await producer.send("jobs", b"y" * 100_000, timeout=WAIT)

    asyncio.run(first_life())
    filler = fill(disk)
    assert free_bytes(disk) < 4096
    asyncio.run(second_life())


def test_a_store_killed_mid_write_opens_on_a_full_disk_and_its_wal_is_kept(small_disk):
    """On a full disk the check cannot make SQLite's WAL index beside a
    read-only connection: it runs in a child that never closes (closing
    would checkpoint the WAL), so a damaged store is still left as it was."""
    disk = small_disk("8m")
    path = disk / "q.db"
    wal = Path(f"{path}-wal")
    confirmed = write_then_kill(path, seed=1, lines=20, min_free_disk=0)  # no floor on a small disk
    garble_wal_frame(wal, 5)
    before = (path.read_bytes(), wal.read_bytes())
    filler = fill(disk)
    with pytest.raises(StoreError, match=r"committed write\(s\) are missing"):
        SqliteStore(path)
    assert (path.read_bytes(), wal.read_bytes()) == before
    filler.unlink()  # salvage needs room for its copies
    with SqliteStore(path, salvage=True, min_free_disk=0) as store:
        assert {s.message.id for s in store.load()} >= set(confirmed)
    # and a store that is intact opens on a full disk, then refuses writes
    filler = fill(disk)
    with SqliteStore(path, min_free_disk=0) as store:
        assert len(store.load()) >= len(confirmed)
        with pytest.raises(StoreError, match="disk is full"):
            store.apply([Put("q", Message(id="x", body=b"y" * 100_000))])


def test_below_the_disk_free_floor_new_messages_are_refused_and_acks_still_go_through(
    small_disk,
):
    disk = small_disk("16m")
    path = disk / "q.db"
    floor = 8 << 20

    async def main() -> None:
        async with pigeon.connect(
            bind="tcp://127.0.0.1:0", store=path, min_free_disk=floor
        ) as host:
            address = host.stats()["bound"][0]
            async with pigeon.connect(address) as producer, pigeon.connect(address) as worker:
                for i in range(20):
                    await producer.send("jobs", f"m{i}", timeout=WAIT)
                filler = fill(disk, leave=floor - (2 << 20))  # 6 MiB free: under the floor
                await asyncio.sleep(0.2)  # free space is read at most every 0.1 s
                error = await refused_at_once(
                    lambda: producer.send("jobs", "one more", timeout=WAIT), "below the floor"
                )
                assert "min_free_disk is 8.0 MiB" in str(error)
                await refused_at_once(
                    lambda: host.send("jobs", "local", timeout=WAIT), "below the floor"
                )
                # the disk is not full: acks are still written
                done = asyncio.Event()
                handled: list[str] = []

                async def handle(delivery: pigeon.Delivery) -> None:
                    handled.append(delivery.message.text)
                    if len(handled) == 20:
                        done.set()

                await worker.consume("jobs", handle, prefetch=20)
                await asyncio.wait_for(done.wait(), WAIT)
                stats = host.stats()
                for _ in range(100):  # acks are written behind
                    stats = host.stats()
                    if stats["queues"]["jobs"]["acked"] == 20:
                        break
                    await asyncio.sleep(0.05)
                assert stats["store"]["refused_below_floor"] == 2
                assert stats["store_errors"] == 2
                filler.unlink()
                await asyncio.sleep(0.2)  # free space is read again within 0.1 s
                await producer.send("jobs", "after", timeout=WAIT)

    asyncio.run(main())
    with SqliteStore(path, min_free_disk=0) as store:
        # the 20 acked ones are gone from the disk; "after" was (maybe) handled too
        assert {s.message.text for s in store.load()} <= {"after"}


# -- garbage in the WAL after kill -9 of a node ------------------------------------------


class NodeProcess:
    """``pigeon node --store`` in a process of its own; its stdout is read by a thread."""

    def __init__(self, store: Path, logs: Path, *extra: str) -> None:
        self.err = logs / f"node-{time.monotonic_ns()}.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [*PIGEON, "node", "--bind", "tcp://127.0.0.1:0", "--store", str(store), *extra],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.lines = self._banner()
        served = re.search(r"serving (tcp://\S+?);", "".join(self.lines))
        self.url = served.group(1) if served else ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def more(self, timeout: float = WAIT) -> str:
        """The next line of output ("" if none comes within ``timeout``)."""
        try:
            return self._lines.get(timeout=timeout) or ""
        except queue.Empty:
            return ""

    def _banner(self) -> list[str]:
        """Lines up to the "serving" banner, or up to the end if the node
        exits first."""
        lines: list[str] = []
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return lines
            if line is None:
                return lines
            lines.append(line)
            if "serving" in line:
                return lines

    def stderr(self) -> str:
        return self.err.read_text()

    def wait(self) -> int:
        code = self.proc.wait(WAIT)
        self._reader.join(WAIT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.wait() == 0, self.stderr()


def rewritten_frame(wal: Path, start: int) -> int:
    """The first WAL frame from ``start`` on whose page a later frame holds
    again: salvage can leave it out and lose nothing (a page's last copy
    garbled loses its rows, which test_store_integrity covers)."""
    data = wal.read_bytes()
    size = struct.unpack(">I", data[8:12])[0] + 24
    pages = [data[32 + i * size : 36 + i * size] for i in range((len(data) - 32) // size)]
    return next(i for i in range(start, len(pages)) if pages[i] in pages[i + 1 :])


def garble_wal_frame(wal: Path, frame: int) -> None:
    data = wal.read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0]
    with open(wal, "r+b") as file:
        file.seek(32 + frame * (page_size + 24) + 24 + 1000)
        file.write(os.urandom(64))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_garbage_in_the_wal_after_kill_9_is_found_not_dropped_and_salvage_brings_it_back(
    tmp_path,
):
    store = tmp_path / "q.db"
    node = NodeProcess(store, tmp_path)
    assert node.url, f"the node did not start: {node.lines}\n{node.stderr()}"

    async def produce() -> list[str]:
        ids: list[str] = []
        async with pigeon.connect(node.url, connect_grace=WAIT) as producer:
            for start in range(0, 500, 25):  # 20 rounds of 25 concurrent sends
                futures = [producer.send_nowait("jobs", f"m{i}") for i in range(start, start + 25)]
                await asyncio.wait_for(asyncio.gather(*futures), WAIT)
                ids += [f"m{i}" for i in range(start, start + 25)]
        return ids

    confirmed = asyncio.run(produce())
    node.kill()
    wal = Path(f"{store}-wal")
    frames = (wal.stat().st_size - 32) // (struct.unpack(">I", wal.read_bytes()[8:12])[0] + 24)
    garble_wal_frame(wal, rewritten_frame(wal, frames // 3))

    refused = NodeProcess(store, tmp_path)
    assert not refused.url
    assert refused.wait() == 1  # the operation failed (cli.exits): not a usage error
    message = refused.stderr()
    assert "StoreError" in message and "committed write(s) are missing" in message
    assert "--salvage" in message

    salvaged = NodeProcess(store, tmp_path, "--salvage")
    try:
        banner = "".join(salvaged.lines)
        assert salvaged.url, f"{banner}\n{salvaged.stderr()}"
        assert "500 messages restored" in banner
        report = salvaged.more()  # the salvage report follows the banner
        assert "store salvaged" in report and "damaged files are kept" in report

        async def consume() -> list[str]:
            texts: list[str] = []
            done = asyncio.Event()
            async with pigeon.connect(salvaged.url, connect_grace=WAIT) as worker:

                async def handle(delivery: pigeon.Delivery) -> None:
                    texts.append(delivery.message.text)
                    if len(texts) == len(confirmed):
                        done.set()

                await worker.consume("jobs", handle, prefetch=100)
                await asyncio.wait_for(done.wait(), WAIT)
            return texts

        assert sorted(asyncio.run(consume())) == sorted(confirmed)
        info = queues_json(salvaged.url)
        assert info["store"]["salvage"]["missing_commits"] > 0
        assert info["store"]["min_free_disk"] == 64 << 20
    finally:
        salvaged.stop()


def queues_json(url: str) -> dict:
    """What ``pigeon queues URL --json`` says of a node."""
    done = subprocess.run(
        [*PIGEON, "queues", url, "--json"], capture_output=True, text=True, timeout=WAIT, check=True
    )
    return json.loads(done.stdout)


def test_pigeon_node_takes_min_free_disk(tmp_path):
    node = NodeProcess(tmp_path / "q.db", tmp_path, "--min-free-disk", "1G")
    try:
        assert node.url, f"{node.lines}\n{node.stderr()}"
        info = queues_json(node.url)
        assert info["store"]["min_free_disk"] == 1 << 30
    finally:
        node.stop()
    bad = subprocess.run(
        [*PIGEON, "node", "--bind", "tcp://127.0.0.1:0", "--min-free-disk", "lots"],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert bad.returncode == 2 and "not a size in bytes" in bad.stderr


def test_min_free_disk_is_checked_when_the_node_starts(tmp_path):
    async def main() -> None:
        with pytest.raises(pigeon.ConfigurationError, match="min_free_disk"):
            async with pigeon.connect(
                bind="tcp://127.0.0.1:0", store=tmp_path / "q.db", min_free_disk=-1
            ):
                pass

    asyncio.run(main())
