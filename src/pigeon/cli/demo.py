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
import sys
import tempfile
from collections import Counter
from typing import Any

import click

from .._ports import quiet_port
from ..security.keys import new_keys
from . import demo_roles

PROCESSORS = 3


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
        self.producing_done = asyncio.Event()
        self.abort = asyncio.Event()  # a second Ctrl-C: stop waiting for the drain
        self.progress = asyncio.Event()  # a word processed, or production ended

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("ev")
        self.progress.set()
        if kind == "produced":
            self.produced.add(event["id"])
        elif kind == "processed":
            self.processed[event["id"]] += 1
            self.by_processor[f"processor-{event['processor']}"] += 1
            self.by_responder[event["responder"]] += 1
            self.redelivered += bool(event["redelivered"])
            if not self.quiet:
                print(event["processor"], event["word"], flush=True)
        elif kind == "producing_done":
            self.producing_done.set()

    def abort_if_failed(self, task: asyncio.Task[None]) -> None:
        """A role that fails ends the demo instead of leaving it waiting."""
        if not task.cancelled() and task.exception() is not None:
            self.abort.set()

    def all_processed(self) -> bool:
        return self.producing_done.is_set() and self.produced.issubset(self.processed)

    async def drain(self, timeout: float) -> None:
        """After production ends, wait until every word produced was processed."""
        waiters = [asyncio.ensure_future(e.wait()) for e in (self.producing_done, self.abort)]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        # Each event that may complete the drain sets ``progress``.
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.all_processed() and not self.abort.is_set():
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self.progress.clear()
            waiters = [asyncio.ensure_future(e.wait()) for e in (self.progress, self.abort)]
            await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
        if not self.all_processed():
            self.note("drain: stopped before every word was processed")

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


def _make_keys(directory: str) -> tuple[dict[str, str], dict[str, str]]:
    """Keys for ``--secure``: one node key for the three nodes that bind, one
    client key for the processors, and an ACL that lets the processors
    consume the words and call ``case``, and nothing else."""
    node = os.path.join(directory, "node")
    client = os.path.join(directory, "processor")
    new_keys(node)
    new_keys(client)
    acl = os.path.join(directory, "acl.toml")
    with open(acl, "w", encoding="utf-8") as f:
        f.write('[clients.processors]\nkey = "processor.key"\nconsume = ["words"]\n')
        f.write('call = ["case"]\n')
    return (
        {"key": node + ".key_secret", "allow": acl},
        {"key": client + ".key_secret", "server_key": node + ".key"},
    )


def _plan(args: argparse.Namespace) -> dict[str, tuple[str, dict[str, Any]]]:
    """Role name → (role, keyword arguments), with the addresses wired up."""
    plan: dict[str, tuple[str, dict[str, Any]]] = {}
    if args.url:
        fountain_where: dict[str, Any] = {"url": args.url}
        processor_where: dict[str, Any] = {"url": args.url}
        responder_where = {case: {"url": args.url} for case in demo_roles.CASES}
    else:
        fountain_url = f"tcp://127.0.0.1:{quiet_port()}"
        responder_where = {
            case: {"bind": f"tcp://127.0.0.1:{quiet_port()}"} for case in demo_roles.CASES
        }
        fountain_where = {"bind": fountain_url}
        processor_where = {
            "fountain_url": fountain_url,
            "responder_urls": [w["bind"] for w in responder_where.values()],
        }
    if args.secure:
        node_keys, client_keys = _make_keys(args.store_dir)
        fountain_where["keys"] = node_keys
        processor_where["keys"] = client_keys
        for where in responder_where.values():
            where["keys"] = node_keys
    for case, where in responder_where.items():
        plan[f"responder-{case}"] = ("responder", {"case": case, **where})
    for n in range(1, PROCESSORS + 1):
        plan[f"processor-{n}"] = ("processor", {"number": n, **processor_where})
    if args.durable:
        fountain_where["store"] = os.path.join(args.store_dir, "words.db")
    plan["fountain"] = ("fountain", {"rate": args.rate, "seconds": args.seconds, **fountain_where})
    return plan


async def _run_in_process(
    args: argparse.Namespace, tally: Tally, interrupted: asyncio.Event
) -> None:
    stop = asyncio.Event()
    tasks = []
    for name, (role, kwargs) in _plan(args).items():
        if role == "fountain":
            kwargs["halt"] = interrupted
        coro = demo_roles.ROLES[role](tally.on_event, stop, **kwargs)
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(tally.abort_if_failed)
        tasks.append(task)
    await tally.drain(args.drain_timeout)
    stop.set()
    await asyncio.gather(*tasks)


class _Child:
    """One role in its own OS process, its JSON-line events fed to the tally."""

    def __init__(self, name: str, role: str, kwargs: dict[str, Any], tally: Tally) -> None:
        self.name, self.role, self.kwargs, self.tally = name, role, kwargs, tally
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None
        self.chaos_kill = False

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pigeon.cli.demo_roles",
            self.role,
            json.dumps(self.kwargs),
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


async def _chaos(
    children: dict[str, _Child], tally: Tally, args: argparse.Namespace, started: float
) -> None:
    """Kill -9 and restart, in turn, a processor, a responder and (with
    --durable) the fountain that hosts the queue."""
    seconds = args.seconds or 20.0
    victims = ["processor-2", "responder-lower"] + (["fountain"] if args.durable else [])
    loop = asyncio.get_running_loop()
    for name in victims:
        await asyncio.sleep(seconds / (len(victims) + 1) - 1.0)
        child = children[name]
        child.chaos_kill = True
        pid = child.kill()
        tally.kills.append({"role": name, "pid": pid})
        tally.note(f"chaos: kill -9 {name} (pid {pid})")
        await asyncio.sleep(1.0)
        assert child.proc is not None
        await child.proc.wait()
        if name == "fountain" and args.seconds is not None:
            # The new fountain produces only for what is left of the run.
            child.kwargs["seconds"] = max(0.1, args.seconds - (loop.time() - started))
        await child.start()
        child.chaos_kill = False
        assert child.proc is not None
        tally.note(f"chaos: restarted {name} (pid {child.proc.pid})")


async def _run_processes(
    args: argparse.Namespace, tally: Tally, interrupted: asyncio.Event
) -> None:
    children = {
        name: _Child(name, role, kwargs, tally) for name, (role, kwargs) in _plan(args).items()
    }
    started = asyncio.get_running_loop().time()
    for child in children.values():
        await child.start()
    fountain = children["fountain"]

    async def forward_interrupt() -> None:
        await interrupted.wait()
        if fountain.proc is not None and fountain.proc.returncode is None:
            fountain.proc.send_signal(signal.SIGUSR1)  # stop producing; keep hosting

    async def watch_fountain() -> None:
        while True:
            proc = fountain.proc
            assert proc is not None
            code = await proc.wait()
            if fountain.chaos_kill:
                while fountain.proc is proc:  # noqa: ASYNC110 - chaos restarts it in a second
                    await asyncio.sleep(0.05)
                continue
            tally.note(f"fountain exited unexpectedly (exit code {code})")
            tally.abort.set()
            return

    helpers = [asyncio.create_task(forward_interrupt()), asyncio.create_task(watch_fountain())]
    if args.chaos:
        helpers.append(asyncio.create_task(_chaos(children, tally, args, started)))
    await tally.drain(args.drain_timeout)
    for helper in helpers:
        helper.cancel()
    for child in children.values():
        await child.stop()


@click.command(name="demo")
@click.option(
    "--seconds",
    type=float,
    default=None,
    help="produce for N seconds, then drain and stop (default: until Ctrl-C)",
)
@click.option("--rate", type=float, default=2.5, help="words per second (default 2.5)")
@click.option(
    "--processes",
    is_flag=True,
    help="run each service in its own OS process over tcp loopback",
)
@click.option(
    "--chaos",
    is_flag=True,
    help="kill -9 a processor and a responder while running (implies --processes)",
)
@click.option("--json", is_flag=True, help="end with one JSON line of the summary")
@click.option(
    "--durable",
    is_flag=True,
    help="keep the word queue in a SQLite store (with --chaos the fountain, "
    "which hosts it, is killed -9 and restarted too)",
)
@click.option(
    "--url",
    default=None,
    metavar="URL",
    help="run on a broker (nats://… or amqp://…) instead of brokerless",
)
@click.option(
    "--secure",
    is_flag=True,
    help="make keys and an ACL first, and run every link with CURVE (brokerless only)",
)
@click.option(
    "--with-seed",
    is_flag=True,
    help="run the seed's own fountain and responders (raw pyzmq, examples/seed/) "
    "with pigeon processors between them, through a pigeon bridge",
)
@click.option(
    "--drain-timeout",
    type=float,
    default=60.0,
    help="seconds to wait for in-flight words after producing (default 60)",
)
def demo(**settings: Any) -> None:
    """Run the fountain/processors/responders demo."""
    sys.exit(run(argparse.Namespace(**settings)))


def run(args: argparse.Namespace) -> int:
    if args.rate <= 0:
        raise SystemExit("pigeon demo: --rate must be > 0")
    if args.seconds is not None and args.seconds <= 0:
        raise SystemExit("pigeon demo: --seconds must be > 0")
    if args.with_seed:
        if args.chaos or args.url or args.secure or args.durable:
            raise SystemExit(
                "pigeon demo: --with-seed runs the seed's raw processes; it takes "
                "--seconds, --rate, --drain-timeout and --json only"
            )
        from . import demo_seed

        return demo_seed.run(args)
    if args.chaos:
        args.processes = True
    if args.url is not None:
        scheme = args.url.partition("://")[0]
        allowed = ("nats", "amqp") if args.processes else ("nats", "amqp", "memory")
        if scheme not in allowed:
            raise SystemExit(
                f"pigeon demo: --url takes {', '.join(s + '://' for s in allowed)} "
                f"(brokerless is the default and needs no URL), not {args.url!r}"
            )
    if args.secure and args.url:
        raise SystemExit("pigeon demo: --secure is for the brokerless links; brokers use TLS")
    if args.durable and args.url:
        raise SystemExit(
            "pigeon demo: --durable is for the brokerless queue; a broker keeps its own"
        )
    tally = Tally(quiet=False)

    async def main() -> None:
        interrupted = asyncio.Event()

        def on_signal() -> None:
            if interrupted.is_set():
                tally.abort.set()
            interrupted.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, on_signal)
        runner = _run_processes if args.processes else _run_in_process
        await runner(args, tally, interrupted)

    with tempfile.TemporaryDirectory(prefix="pigeon-demo-") as store_dir:
        args.store_dir = store_dir
        asyncio.run(main())
    return report(tally.summary(), as_json=args.json)


def report(summary: dict[str, Any], *, as_json: bool) -> int:
    """Print a demo's summary; its exit status (1 if a word was lost)."""
    print(
        f"produced {summary['produced']}, processed {summary['processed']}, "
        f"lost {summary['lost']}, duplicates {summary['duplicates']}, "
        f"redelivered {summary['redelivered']}"
    )
    print(f"by processor: {summary['by_processor']}; by responder: {summary['by_responder']}")
    if as_json:
        print(json.dumps(summary), flush=True)
    return 1 if summary["lost"] else 0
