"""GET /events, /events/{seq or id}, /streams/{stream}, /correlations/{id} against a store
of known content, sealed and hot both (small partitions), checked against a brute-force
filter of what was sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from as_other_uid import can_run_as_other_uid, run_as
from conftest import DaemonProcess, UnixHTTPConnection, wait_committed, wait_sealed_through

from auditd.cli.query import table_lines, tree_lines
from auditd.client import Client
from auditd.store.partition.layout import words

PARTITION = 500
COUNT = 1750  # seqs 1-1500 sealed in 3 partitions, 1501-1750 hot
START = 1_767_225_600 * 10**9
TYPES = ["user.login", "file.read", "file.write", "admin.grant", "db.query"]
ACTORS = [f"user{a}@corp.example" for a in range(6)] + ["Zoë Ünal"]
REGIONS = ["eu-west-1", "us-east-1", "ap-south-1"]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota",
         "kappa", "lambda"]


def sent_event(i: int) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": TYPES[i % 5], "id": f"ev-{i}", "actor": ACTORS[i % 7],
        "target": f"/srv/t{i % 13}", "stream": f"acct-{i % 4}",
        "correlation_id": f"op-{i // 10}", "ts": START + i * 10**9,
        "tags": {"env": ["prod", "dev"][i % 2], "region": REGIONS[i % 3]},
        "data": {"msg": f"{WORDS[i % 11]} common", "n": i,
                 **({"rare": "needle"} if i % 250 == 7 else {})}}
    if i % 10:
        event["causation_id"] = f"ev-{i - 1}"
    return event


SENT = [sent_event(i) for i in range(COUNT)]  # event i gets seq i + 1
# What the daemon stamps as `comm`: "pytest" in a plain run, "python3" in a pytest-xdist
# worker (a case holding "python3" matched nothing in one and everything in the other).
OWN_COMM = Path("/proc/self/comm").read_text().strip()


def get(daemon: DaemonProcess, url: str) -> tuple[int, Any]:
    conn = UnixHTTPConnection(daemon.status_socket)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def url_of(path: str, pairs: Sequence[tuple[str, str]]) -> str:
    return path + ("?" + urllib.parse.urlencode(pairs) if pairs else "")


def event_words(event: dict[str, Any]) -> set[str]:
    texts = [event["type"], event["actor"], event["target"], *event["tags"].values(),
             *(v for v in event["data"].values() if isinstance(v, str))]
    return {w for text in texts for w in words(text)}


def brute(pairs: Sequence[tuple[str, str]]) -> list[int]:
    """Seqs of SENT matching `pairs`, in the order asked, up to the limit."""
    wanted: dict[str, list[str]] = {}
    for name, value in pairs:
        wanted.setdefault(name, []).append(value)
    order = wanted.pop("order", ["asc"])[0]
    limit = int(wanted.pop("limit", ["100"])[0])
    after = int(wanted.pop("after", ["0"])[0])
    before = int(wanted.pop("before", [str(1 << 62)])[0])
    since = int(wanted.pop("since", ["0"])[0]) * 10**9
    until = int(wanted.pop("until", [str(1 << 40)])[0]) * 10**9
    found = []
    for i, event in enumerate(SENT):
        seq = i + 1
        if not (after < seq < before and since <= event["ts"] < until):
            continue
        ok = True
        for name, values in wanted.items():
            if name == "q":
                have = event_words(event)
                ok = all(w in have for v in values for w in words(v))
            elif name.startswith("tag."):
                ok = event["tags"].get(name[4:]) in values
            elif name == "uid":
                ok = str(os.getuid()) in values
            elif name == "comm":  # the events are sent from this process
                ok = OWN_COMM in values
            else:
                ok = event.get(name) in values
            if not ok:
                break
        if ok:
            found.append(seq)
    if order == "desc":
        found.reverse()
    return found[:limit]


@pytest.fixture(scope="module")
def store(tmp_path_factory: Any) -> Any:
    import shutil
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="adq"))
    (root / "d").mkdir()
    daemon = DaemonProcess(root / "d", {"storage": {"partition_events": PARTITION}})
    daemon.start()
    with Client(daemon.ingest_socket) as client:
        for start in range(0, COUNT, 250):
            client.send_batch(SENT[start:start + 250])
    wait_committed(daemon, COUNT)
    wait_sealed_through(daemon, 1500)
    yield daemon
    daemon.stop()
    shutil.rmtree(root, ignore_errors=True)


CASES: list[list[tuple[str, str]]] = [
    [],
    [("type", "file.read")],
    [("type", "file.read"), ("type", "db.query")],
    [("actor", "Zoë Ünal")],
    [("target", "/srv/t3"), ("actor", "user2@corp.example")],
    [("stream", "acct-1")],
    [("correlation_id", "op-7")],
    [("causation_id", "ev-1600")],
    [("comm", "python3"), ("type", "admin.grant")],
    [("uid", str(os.getuid())), ("type", "user.login")],
    [("tag.env", "dev"), ("tag.region", "ap-south-1")],
    [("tag.region", "eu-west-1"), ("tag.region", "us-east-1"), ("type", "file.write")],
    [("q", "needle")],
    [("q", "gamma common"), ("type", "file.write")],
    [("q", "zoë")],
    [("since", str(START // 10**9 + 1400)), ("until", str(START // 10**9 + 1600))],
    [("since", str(START // 10**9 + 1000)), ("actor", "user1@corp.example")],
    [("after", "1450"), ("before", "1560"), ("type", "user.login")],
    [("type", "no.such.type")],
]


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("pairs", CASES)
def test_each_filter_gives_exactly_the_brute_force_answer(store: DaemonProcess,
                                                          pairs: list[tuple[str, str]],
                                                          order: str) -> None:
    for limit in ("7", "10000"):
        query = [*pairs, ("order", order), ("limit", limit)]
        status, body = get(store, url_of("/events", query))
        assert status == 200, body
        assert [e["seq"] for e in body["events"]] == brute(query)
        assert body["next"] == (body["events"][-1]["seq"]
                                if len(body["events"]) == int(limit) else None)


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_paging_with_next_visits_every_match_once(store: DaemonProcess, order: str) -> None:
    pairs = [("tag.env", "prod"), ("order", order), ("limit", "97")]
    seen: list[int] = []
    cursor: list[tuple[str, str]] = []
    while True:
        status, body = get(store, url_of("/events", [*pairs, *cursor]))
        assert status == 200, body
        seen += [e["seq"] for e in body["events"]]
        if body["next"] is None:
            break
        cursor = [("after" if order == "asc" else "before", str(body["next"]))]
    assert seen == brute([("tag.env", "prod"), ("order", order), ("limit", "100000")])


def test_an_event_in_json_carries_every_field(store: DaemonProcess) -> None:
    for seq in (3, 1700):  # sealed, hot
        status, event = get(store, f"/events/{seq}")
        assert status == 200, event
        sent = SENT[seq - 1]
        assert {k: event[k] for k in ("id", "type", "actor", "target", "stream",
                                      "correlation_id", "tags", "data")} == \
            {k: sent[k] for k in ("id", "type", "actor", "target", "stream",
                                  "correlation_id", "tags", "data")}
        assert event["causation_id"] == sent.get("causation_id")
        assert event["seq"] == seq and event["stream_seq"] == (seq - 1) // 4 + 1
        assert event["ts"] == _rfc3339(sent["ts"])
        assert event["received_at"].endswith("Z") and len(event["received_at"]) == 30
        assert event["uid"] == os.getuid() and event["pid"] > 0 and event["comm"]
        assert "gid" in event
        status, by_id = get(store, f"/events/{sent['id']}")
        assert status == 200 and by_id == event


def _rfc3339(ns: int) -> str:
    import datetime

    moment = datetime.datetime.fromtimestamp(ns // 10**9, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns % 10**9:09d}Z"


def test_names_with_a_slash(make_daemon: Any) -> None:
    daemon = make_daemon()
    with Client(daemon.ingest_socket) as client:
        client.send_batch([{"type": "t", "id": "a/b", "stream": "s/1", "correlation_id": "c/d"}])
    wait_committed(daemon, 1)
    for url in ("/events/a%2Fb", "/streams/s%2F1", "/correlations/c%2Fd"):
        status, body = get(daemon, url)
        assert status == 200, (url, body)
        assert (body if "id" in body else body["events"][0])["id"] == "a/b"


def test_absent_events_are_404(store: DaemonProcess) -> None:
    for key in ("99999", "no-such-id", "0"):
        status, body = get(store, f"/events/{key}")
        assert status == 404 and body["error"] == "not_found", body


def test_streams_by_stream_seq(store: DaemonProcess) -> None:
    status, body = get(store, "/streams/acct-2?from=100&to=420")
    assert status == 200, body
    expected = [i + 1 for i in range(COUNT) if i % 4 == 2][99:420]
    assert [e["seq"] for e in body["events"]][:100] == expected[:100]
    assert body["next"] == 200
    status, body = get(store, "/streams/acct-2?from=100&to=420&limit=1000")
    assert [e["seq"] for e in body["events"]] == expected
    assert [e["stream_seq"] for e in body["events"]] == list(range(100, 421))
    assert body["next"] is None


def test_a_correlation_with_its_causation_links(store: DaemonProcess) -> None:
    for group in (12, 165):  # sealed, hot
        status, body = get(store, f"/correlations/op-{group}")
        assert status == 200, body
        events = body["events"]
        assert [e["id"] for e in events] == [f"ev-{i}" for i in range(group * 10,
                                                                     group * 10 + 10)]
        assert [e["causation_id"] for e in events] == \
            [None, *(f"ev-{i}" for i in range(group * 10, group * 10 + 9))]


@pytest.mark.parametrize(("query", "parameter"), [
    ("limit=10001", "limit"), ("limit=x", "limit"), ("order=up", "order"),
    ("since=tomorrow", "since"), ("after=-2", "after"), ("uid=me", "uid"),
    ("tag=novalue", "tag"), ("colour=red", "colour"), ("q=%21%21", "q"),
])
def test_bad_parameters_are_400_naming_them(store: DaemonProcess, query: str,
                                            parameter: str) -> None:
    status, body = get(store, f"/events?{query}")
    assert status == 400 and body["error"] == "bad_request", body
    assert body["message"].startswith(parameter), body


def test_bad_stream_and_correlation_parameters(store: DaemonProcess) -> None:
    for url, parameter in (("/streams/acct-1?from=x", "from"), ("/streams/acct-1?sort=1", "sort"),
                           ("/correlations/op-1?limit=0", "limit")):
        status, body = get(store, url)
        assert status == 400 and body["message"].startswith(parameter), body


OTHER_UID = 65533
_AS_USER = r"""
import http.client, json, socket, sys
path, url = sys.argv[1:3]
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
conn = Conn("auditd", timeout=30)
conn.request("GET", url)
response = conn.getresponse()
print(json.dumps({"status": response.status, "body": json.loads(response.read())}))
"""


@pytest.mark.skipif(not can_run_as_other_uid(), reason="calling as another uid needs root")
def test_a_non_reader_sees_only_its_own_events(make_daemon: Any) -> None:
    store = make_daemon({"storage": {"partition_events": 100},
                         "status": {"socket_mode": "0666"}, "ingest": {"socket_mode": "0666"}})
    for folder in (store.root.parent, store.root):
        os.chmod(folder, 0o755)
    with Client(store.ingest_socket) as client:
        client.send_batch(SENT[:250])
    mine = [{"type": "other.uid", "id": f"other-{i}", "correlation_id": "op-other",
             "stream": "acct-other", "data": {"msg": "needle"}} for i in range(3)]
    run_as(OTHER_UID, "import json, sys\nfrom auditd.client import Client\n"
           "with Client(sys.argv[1]) as c:\n    c.send_batch(json.loads(sys.argv[2]))\n",
           store.ingest_socket, json.dumps(mine), imports=["auditd.client"])
    wait_committed(store, 253)
    wait_sealed_through(store, 200)

    def as_other(url: str) -> tuple[int, Any]:
        answer = json.loads(run_as(OTHER_UID, _AS_USER, store.status_socket, url))
        return answer["status"], answer["body"]

    for url in ("/events?limit=10000", "/events?q=needle", "/events?order=desc",
                f"/events?uid={os.getuid()}&uid={OTHER_UID}", "/correlations/op-other",
                "/streams/acct-other"):
        status, body = as_other(url)
        assert status == 200, body
        assert sorted(e["id"] for e in body["events"]) == [f"other-{i}" for i in range(3)], url
    status, body = as_other(f"/events?uid={os.getuid()}")
    assert status == 200 and body["events"] == []
    assert as_other("/events/5")[0] == 404  # another uid's event: as if absent
    assert as_other("/events/ev-5")[0] == 404
    status, body = as_other("/events/251")
    assert status == 200 and body["id"] == "other-0"
    status, body = get(store, "/events?q=needle&limit=10000")  # root: everyone's
    assert [e["id"] for e in body["events"]] == ["ev-7", "other-0", "other-1", "other-2"]


# -- auditd query -----------------------------------------------------------------------


def cli(store: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "auditd.cli", "query", "--status-socket",
                           store.status_socket, *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_query_prints_the_newest_matches_newest_last(store: DaemonProcess) -> None:
    done = cli(store, "--type", "file.read", "--type", "db.query", "--tag", "env=dev",
               "--limit", "20", "--jsonl")
    assert done.returncode == 0, done.stderr
    seqs = [json.loads(line)["seq"] for line in done.stdout.splitlines()]
    pairs = [("type", "file.read"), ("type", "db.query"), ("tag.env", "dev")]
    assert seqs == brute([*pairs, ("order", "desc"), ("limit", "20")])[::-1]
    after = cli(store, "--grep", "needle", "--after", "500", "--json")
    assert [e["seq"] for e in json.loads(after.stdout)["events"]] == \
        brute([("q", "needle"), ("after", "500")])
    since = cli(store, "--since", str(START // 10**9 + 1740), "--jsonl")
    assert [json.loads(line)["seq"] for line in since.stdout.splitlines()] == \
        list(range(1741, 1751))


def test_cli_query_tree_and_usage_errors(store: DaemonProcess) -> None:
    done = cli(store, "--correlation", "op-3", "--tree")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("└─ user.login by user2@corp.example on /srv/t4  (seq 31, ")
    assert [line.index("└─") for line in lines] == [3 * i for i in range(10)]  # a chain
    for bad in (["--since", "yesterday"], ["--limit", "10001"], ["--tree"],
                ["--tag", "novalue"]):
        failed = cli(store, *bad)
        assert failed.returncode == 2 and failed.stderr.count("\n") == 1, (bad, failed.stderr)


def test_tree_and_table_drawing() -> None:
    events = [{"seq": i + 1, "id": f"e{i}", "ts": "2026-01-01T00:00:00.000000000Z",
               "type": f"step.{i}", "actor": "alice", "target": None, "uid": 0,
               "comm": "sh", "causation_id": {0: None, 1: "e0", 2: "e0", 3: "e2"}[i]}
              for i in range(4)]
    assert tree_lines(events) == [
        "└─ step.0 by alice  (seq 1, 2026-01-01T00:00:00.000000000Z)",
        "   ├─ step.1 by alice  (seq 2, 2026-01-01T00:00:00.000000000Z)",
        "   └─ step.2 by alice  (seq 3, 2026-01-01T00:00:00.000000000Z)",
        "      └─ step.3 by alice  (seq 4, 2026-01-01T00:00:00.000000000Z)"]
    table = table_lines(events)
    assert table[0].split() == ["TIME", "SEQ", "TYPE", "ACTOR", "TARGET", "UID", "COMM"]
    assert table[1].split() == ["2026-01-01", "00:00:00.000", "1", "step.0", "alice", "0",
                                "sh"]


# -- paging while a writer inserts --------------------------------------------------------


def test_cursor_paging_while_a_writer_inserts(make_daemon: Any) -> None:
    import threading

    daemon = make_daemon({"storage": {"partition_events": 300}})  # seals while paging
    total = COUNT
    sending_done = threading.Event()

    def send() -> None:
        with Client(daemon.ingest_socket) as client:
            for start in range(0, total, 50):
                client.send_batch(SENT[start:start + 50])
        sending_done.set()

    writer = threading.Thread(target=send)
    writer.start()
    try:
        seen: dict[str, list[int]] = {"all": [], "type": []}
        cursors: dict[str, int] = {"all": 0, "type": 0}
        filters = {"all": [], "type": [("type", "file.read")]}
        desc_first: list[int] = []
        caught_up = False
        while not caught_up:
            finished = sending_done.is_set()
            for name, pairs in filters.items():
                while True:  # asc pages from the cursor until nothing is left now
                    status, body = get(daemon, url_of("/events", [
                        *pairs, ("after", str(cursors[name])), ("limit", "37")]))
                    assert status == 200, body
                    seqs = [e["seq"] for e in body["events"]]
                    seen[name] += seqs
                    if seqs:
                        cursors[name] = seqs[-1]
                    if body["next"] is None:
                        break
            if not desc_first:  # a descending walk from a moment mid-flood
                status, body = get(daemon, "/events?order=desc&limit=1")
                if body["events"] and body["events"][0]["seq"] > 500:
                    top = body["events"][0]["seq"] + 1
                    cursor = top
                    while cursor:
                        status, body = get(daemon, f"/events?order=desc&limit=41&before={cursor}")
                        desc_first += [e["seq"] for e in body["events"]]
                        cursor = body["next"]
                    assert desc_first == list(range(top - 1, 0, -1))
            caught_up = finished and cursors["all"] == total
    finally:
        writer.join()
    assert seen["all"] == list(range(1, total + 1))  # no gap, no repeat
    assert seen["type"] == [i + 1 for i in range(total) if SENT[i]["type"] == "file.read"]
    assert desc_first
