"""``pigeon demo``: the classic fountain / processors / responders system on
pigeon, with a tally that proves no word was lost.

By default the six services run in this process; ``--processes`` gives each
its own OS process over tcp loopback, and ``--chaos`` kills (-9) a processor
and a responder while it runs and starts them again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections import Counter
from typing import Any

from . import demo_roles

PROCESSORS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Tally:
    """Counts what was produced and processed; the demo's summary."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.produced: set[str] = set()
        self.processed: Counter[str] = Counter()
        self.by_processor: Counter[str] = Counter()
        self.by_responder: Counter[str] = Counter()
        self.redelivered = 0
        self.kills: list[dict[str, Any]] = []
        self.drained = asyncio.Event()
        self.drain_report: dict[str, Any] = {}

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("ev")
        if kind == "produced":
            self.produced.add(event["id"])
        elif kind == "processed":
            self.processed[event["id"]] += 1
            self.by_processor[f"processor-{event['processor']}"] += 1
            self.by_responder[event["responder"]] += 1
            self.redelivered += bool(event["redelivered"])
            if not self.quiet:
                print(event["processor"], event["word"], flush=True)
        elif kind == "drained":
            self.drain_report = event.get("queue", {})
            self.drained.set()

    def note(self, text: str) -> None:
        print(text, file=sys.stderr if self.quiet else sys.stdout, flush=True)

    def summary(self) -> dict[str, Any]:
        lost = self.produced - set(self.processed)
        return {
            "produced": len(self.produced),
            "processed": len(set(self.processed) & self.produced),
            "lost": len(lost),
            "duplicates": sum(n - 1 for n in self.processed.values() if n > 1),
            "redelivered": self.redelivered,
            "by_processor": dict(sorted(self.by_processor.items())),
            "by_responder": dict(sorted(self.by_responder.items())),
            "kills": self.kills,
        }


def _plan(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any]]]:
    """Role name → (role, keyword arguments), with the addresses wired up."""
    fountain_url = f"tcp://127.0.0.1:{free_port()}"
    responder_urls = {case: f"tcp://127.0.0.1:{free_port()}" for case in demo_roles.CASES}
    plan: dict[str, tuple[str, dict[str, Any]]] = {}
    for case, url in responder_urls.items():
        plan[f"responder-{case}"] = ("responder", {"case": case, "bind": url})
    for n in range(1, PROCESSORS + 1):
        plan[f"processor-{n}"] = ("processor", {
            "number": n, "fountain_url": fountain_url,
            "responder_urls": list(responder_urls.values()),
        })
    plan["fountain"] = ("fountain", {
        "bind": fountain_url, "rate": args.rate, "seconds": args.seconds,
    })
    return plan


async def _run_in_process(args: argparse.Namespace, tally: Tally, interrupted: asyncio.Event) -> None:
    plan = _plan(args)
    stop_all = asyncio.Event()
    stop_fountain = interrupted
    tasks = []
    for name, (role, kwargs) in plan.items():
        stop = stop_fountain if role == "fountain" else stop_all
        coro = demo_roles.ROLES[role](tally.on_event, stop, **kwargs)
        tasks.append(asyncio.create_task(coro, name=name))
    fountain_task = tasks[-1]
    await fountain_task
    stop_all.set()
    await asyncio.gather(*tasks[:-1])


class _Child:
    """One role in its own OS process, its JSON-line events fed to the tally."""

    def __init__(self, name: str, role: str, kwargs: dict[str, Any], tally: Tally) -> None:
        self.name, self.role, self.kwargs, self.tally = name, role, kwargs, tally
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pigeon.cli.demo_roles", self.role, json.dumps(self.kwargs),
            stdout=asyncio.subprocess.PIPE,
        )
        self.reader = asyncio.create_task(self._read(self.proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.tally.on_event(event)

    def kill(self) -> int:
        assert self.proc is not None
        pid = self.proc.pid
        os.kill(pid, signal.SIGKILL)
        return pid

    async def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self.reader is not None:
            await self.reader


async def _chaos(children: dict[str, _Child], tally: Tally, seconds: float) -> None:
    # Kill a quarter of the way in, restart a second later, then the next.
    for name in ("processor-2", "responder-lower"):
        await asyncio.sleep(seconds * 0.25)
        child = children[name]
        pid = child.kill()
        tally.kills.append({"role": name, "pid": pid})
        tally.note(f"chaos: kill -9 {name} (pid {pid})")
        await asyncio.sleep(1.0)
        assert child.proc is not None
        await child.proc.wait()
        await child.start()
        assert child.proc is not None
        tally.note(f"chaos: restarted {name} (pid {child.proc.pid})")


async def _run_processes(args: argparse.Namespace, tally: Tally, interrupted: asyncio.Event) -> None:
    plan = _plan(args)
    children = {name: _Child(name, role, kwargs, tally) for name, (role, kwargs) in plan.items()}
    for child in children.values():
        await child.start()
    fountain = children["fountain"]
    chaos = asyncio.create_task(_chaos(children, tally, args.seconds or 20.0)) if args.chaos else None

    async def forward_interrupt() -> None:
        await interrupted.wait()
        if fountain.proc is not None and fountain.proc.returncode is None:
            fountain.proc.terminate()  # it stops producing, drains, and exits

    forwarder = asyncio.create_task(forward_interrupt())
    assert fountain.reader is not None
    await fountain.reader
    if chaos is not None:
        chaos.cancel()
    forwarder.cancel()
    for child in children.values():
        await child.stop()


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="run the fountain/processors/responders demo")
    parser.add_argument("--seconds", type=float, default=None,
                        help="produce for N seconds, then drain and stop (default: until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=2.5, help="words per second (default 2.5)")
    parser.add_argument("--processes", action="store_true",
                        help="run each service in its own OS process over tcp loopback")
    parser.add_argument("--chaos", action="store_true",
                        help="kill -9 a processor and a responder while running (implies --processes)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the summary")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.rate <= 0:
        raise SystemExit("pigeon demo: --rate must be > 0")
    if args.seconds is not None and args.seconds <= 0:
        raise SystemExit("pigeon demo: --seconds must be > 0")
    if args.chaos:
        args.processes = True
    tally = Tally(quiet=False)

    async def main() -> None:
        interrupted = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted.set)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, interrupted.set)
        runner = _run_processes if args.processes else _run_in_process
        await runner(args, tally, interrupted)

    asyncio.run(main())
    summary = tally.summary()
    print(
        f"produced {summary['produced']}, processed {summary['processed']}, "
        f"lost {summary['lost']}, duplicates {summary['duplicates']}, "
        f"redelivered {summary['redelivered']}"
    )
    print(f"by processor: {summary['by_processor']}; by responder: {summary['by_responder']}")
    if args.json:
        print(json.dumps(summary), flush=True)
    return 1 if summary["lost"] else 0
