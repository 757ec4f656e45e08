"""The discovery core: parsing sources and node files, and the rules of the
roster and the schedule (pigeon._core.discovery), with no I/O."""

from __future__ import annotations

import pytest

from pigeon import ConfigurationError
from pigeon._core.discovery import (
    MIN_GAP,
    Roster,
    Schedule,
    Source,
    SourceKind,
    check_address,
    parse_nameserver,
    parse_node_file,
    parse_source,
    tcp_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:///etc/pigeon/nodes.txt", Source(SourceKind.FILE, "/etc/pigeon/nodes.txt")),
        ("file://nodes.txt", Source(SourceKind.FILE, "nodes.txt")),
        (
            "dns://Nodes.Example.internal:5555",
            Source(SourceKind.DNS, "nodes.example.internal", 5555, 10.0),
        ),
        ("dns://localhost:1", Source(SourceKind.DNS, "localhost", 1, 10.0)),
        ("dns://[::1]:5555", Source(SourceKind.DNS, "::1", 5555, 10.0)),
        ("dns://10.0.0.1:5555", Source(SourceKind.DNS, "10.0.0.1", 5555, 10.0)),
        (
            "srv://_pigeon._tcp.example.internal",
            Source(SourceKind.SRV, "_pigeon._tcp.example.internal", 0, 10.0),
        ),
        (
            "srv://_pigeon._tcp.example.internal.",
            Source(SourceKind.SRV, "_pigeon._tcp.example.internal", 0, 10.0),
        ),
    ],
)
def test_sources_parse(url: str, expected: Source) -> None:
    assert parse_source(url) == expected


def test_a_source_prints_as_its_url() -> None:
    for url in (
        "file:///x/nodes.txt",
        "dns://host.example:5555",
        "dns://[::1]:5",
        "srv://_p._tcp.x",
    ):
        assert str(parse_source(url)) == url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "nodes.txt",
        "http://example.com/nodes",
        "tcp://127.0.0.1:5555",
        "file://",
        "dns://host",  # no port
        "dns://host:0",
        "dns://host:65536",
        "dns://host:port",
        "dns://host:5555/path",
        "dns://user@host:5555",
        "dns://bad_name!:5555",
        "dns://-lead.example:5555",
        "dns://[not-ipv6]:5555",
        "srv://",
        "srv://has space.example",
        "srv://" + "a" * 64 + ".example",
    ],
)
def test_bad_sources_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_source(url)


def test_a_source_is_a_string() -> None:
    with pytest.raises(ConfigurationError, match="URL string"):
        parse_source(42)


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf"), True, "1"])
def test_bad_intervals_are_refused(interval: object) -> None:
    with pytest.raises(ConfigurationError, match="discover_interval"):
        parse_source("file:///x", interval)  # type: ignore[arg-type]


def test_interval_defaults_by_kind() -> None:
    assert parse_source("file:///x").interval == 1.0
    assert parse_source("dns://h:1").interval == 10.0
    assert parse_source("srv://_p._tcp.h", 0.25).interval == 0.25


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_nameservers_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["", "dns.example", "dns.example:53", "127.0.0.1:0", "1.2.3.4:x"])
def test_bad_nameservers_are_refused(text: str) -> None:
    with pytest.raises(ConfigurationError, match="nameserver"):
        parse_nameserver(text)


def test_node_file_lines_comments_and_blanks() -> None:
    text = (
        "# the nodes of the east rack\n"
        "\n"
        "tcp://10.0.0.1:5555\n"
        "   tcp://Node-2.example:5555   # the second one\n"
        "ipc:///run/pigeon/node.sock\n"
        "tcp://[::1]:5555\n"
        "tcp://10.0.0.1:5555\n"
    )
    assert parse_node_file(text) == [
        "tcp://10.0.0.1:5555",
        "tcp://node-2.example:5555",
        "ipc:///run/pigeon/node.sock",
        "tcp://[::1]:5555",
        "tcp://10.0.0.1:5555",  # (duplicates are the roster's to drop)
    ]


@pytest.mark.parametrize(
    "line",
    ["10.0.0.1:5555", "tcp://10.0.0.1", "tcp://*:5555", "inproc://x", "ipc://", "udp://h:1"],
)
def test_a_bad_line_names_its_number(line: str) -> None:
    with pytest.raises(ConfigurationError, match="line 2"):
        parse_node_file(f"tcp://10.0.0.1:5555\n{line}\n")


def test_addresses_and_urls() -> None:
    assert check_address("tcp://[::1]:7") == "tcp://[::1]:7"
    assert tcp_url("::1", 7) == "tcp://[::1]:7"
    assert tcp_url("10.1.2.3", 7) == "tcp://10.1.2.3:7"


# -- the roster -------------------------------------------------------------

A, B, C = "tcp://10.0.0.1:1", "tcp://10.0.0.2:1", "tcp://10.0.0.3:1"


def test_rule2_a_good_read_adds_and_removes_only_the_difference() -> None:
    roster = Roster()
    first = roster.found([A, B])
    assert (first.added, first.removed) == ([A, B], [])
    second = roster.found([B, C])
    assert (second.added, second.removed) == ([C], [A])
    assert not roster.found([B, C])
    assert roster.current == [B, C] and roster.reads == 3 and roster.errors == 0


def test_rule2_duplicates_count_once() -> None:
    roster = Roster()
    assert roster.found([A, A, B]).added == [A, B]
    assert roster.current == [A, B]


@pytest.mark.parametrize("failure", ["failed", "empty"])
def test_rule1_a_failed_or_empty_read_keeps_the_last_good_set(failure: str) -> None:
    roster = Roster()
    roster.found([A, B])
    if failure == "failed":
        roster.failed("permission denied")
    else:
        assert not roster.found([])
    assert roster.current == [A, B]
    assert roster.errors == 1 and roster.last_error
    assert roster.found([A]).removed == [B]  # the next good read applies as usual


def test_rule3_the_callers_addresses_are_never_the_sources() -> None:
    roster = Roster(fixed=[A])
    assert roster.found([A, B]).added == [B]
    change = roster.found([A])  # a good read: only the caller's node is listed
    assert change.removed == [B] and not change.added and roster.current == []


def test_rule6_a_failed_part_is_counted_and_the_rest_applies() -> None:
    roster = Roster()
    change = roster.found([A], problems=["target b.example: no address"])
    assert change.added == [A] and roster.errors == 1 and roster.reads == 1
    assert not roster.found([], problems=["target a.example: timed out"])
    assert roster.current == [A] and roster.errors == 2  # (counted once, not twice)


def test_forget_takes_an_address_out_so_a_later_read_tries_again() -> None:
    roster = Roster()
    roster.found([A, B])
    roster.forget(B, "libzmq refused it")
    assert roster.current == [A] and roster.errors == 1 and B in roster.last_error
    assert roster.found([A, B]).added == [B]


def test_rule4_a_file_is_read_once_per_signature() -> None:
    roster = Roster()
    assert roster.changed((1, 10, 100))
    assert not roster.changed((1, 10, 100))
    assert roster.changed(("missing", 2))
    assert not roster.changed(("missing", 2))  # a missing file is counted once
    assert roster.changed((2, 10, 100))


# -- the schedule -----------------------------------------------------------


def test_rule4_looks_come_every_interval() -> None:
    schedule = Schedule(5.0)
    assert schedule.wait(100.0) == 0  # the first look is at once
    schedule.looked(100.0)
    assert schedule.wait(101.0) == 4.0
    assert schedule.wait(106.0) == 0


def test_rule5_a_lost_link_hurries_the_next_look_but_not_too_soon() -> None:
    schedule = Schedule(30.0)
    schedule.looked(100.0)
    schedule.hurry(100.2)
    assert schedule.wait(100.2) == pytest.approx(MIN_GAP - 0.2)
    schedule.looked(101.0)
    schedule.hurry(110.0)
    assert schedule.wait(110.0) == 0
    schedule.looked(110.0)
    schedule.hurry(140.5)  # already due: hurrying never delays
    assert schedule.wait(140.5) == 0
