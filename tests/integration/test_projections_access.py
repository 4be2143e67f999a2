"""Projections under the access rules of step 3: a caller that is neither an admin nor a
reader gets counts and actor summaries of the events its own uid wrote, and a 404 for
an actor it never wrote as (another uid's actor does not leak)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from as_other_uid import can_run_as_other_uid, run_as
from conftest import DaemonProcess
from projection_truth import http, stored_rows, truth, wait_projections_live

from auditd.client import Client

NOBODY = 65534
READER_GID = 65532
OPEN = {"status": {"socket_mode": "0666", "reader_gids": [READER_GID]},
        "ingest": {"socket_mode": "0666"}, "storage": {"partition_events": 500}}

pytestmark = pytest.mark.skipif(not can_run_as_other_uid(),
                                reason="calling as another uid needs root")

_GET = r"""
import http.client, json, socket, sys
path, url = sys.argv[1:3]
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
answers = []
for one in json.loads(url):
    conn = Conn("auditd", timeout=30)
    conn.request("GET", one)
    response = conn.getresponse()
    answers.append([response.status, json.loads(response.read())])
    conn.close()
print(json.dumps(answers))
"""

_SEND = """
import json, sys
from auditd.client import Client
with Client(sys.argv[1], raise_on_reject=False) as client:
    for start in range(0, 1200, 100):
        client.send_batch([{"type": "nobody." + str(i % 3), "actor": "shared" if i % 2
                            else "mine"} for i in range(start, start + 100)])
"""


def get_as(uid: int, daemon: DaemonProcess, urls: list[str],
           groups: tuple[int, ...] = ()) -> list[tuple[int, Any]]:
    out = run_as(uid, _GET, daemon.status_socket, json.dumps(urls), groups=groups)
    return [(status, body) for status, body in json.loads(out)]


def test_a_non_reader_counts_only_its_own_events(make_daemon: Any) -> None:
    daemon = make_daemon(OPEN)
    for folder in (daemon.root.parent, daemon.root):
        os.chmod(folder, 0o755)
    with Client(daemon.ingest_socket) as client:
        for start in range(0, 1000, 100):
            client.send_batch([{"type": f"root.{i % 2}", "actor": "shared" if i % 2
                                else "root-only"} for i in range(start, start + 100)])
    run_as(NOBODY, _SEND, daemon.ingest_socket, imports=["auditd.client"])
    wait_projections_live(daemon)
    rows = stored_rows(daemon.db_path)
    assert {r[4] for r in rows} == {0, NOBODY}
    mine = [r for r in rows if r[4] == NOBODY]
    urls = ["/counts?by=type", "/counts?by=uid", "/counts?by=actor&interval=1d",
            "/counts?by=uid&uid=0", "/actors/shared", "/actors/root-only", "/actors/mine"]
    answers = get_as(NOBODY, daemon, urls)
    assert all(status in (200, 404) for status, _ in answers), answers

    def counted(document: dict[str, Any]) -> dict[tuple[str, Any], int]:
        return {(start, value): n for start, value, n in document["buckets"]}

    assert counted(answers[0][1]) == truth(mine, "type")
    assert counted(answers[1][1]) == truth(mine, "uid") and len(answers[1][1]["buckets"]) == 1
    assert counted(answers[2][1]) == truth(mine, "actor", 24)
    assert answers[3] == (200, {**answers[3][1], "buckets": []})  # another uid: nothing
    shared = answers[4][1]
    assert answers[4][0] == 200 and shared["total"] == 600
    assert shared["last_event"]["uid"] == NOBODY
    assert answers[5][0] == 404 and "root-only" in answers[5][1]["message"]
    assert answers[6][0] == 200 and answers[6][1]["total"] == 600
    # A reader (a member of status.reader_gids) and the admin see the sums.
    reader = get_as(NOBODY, daemon, ["/counts?by=type", "/actors/shared"],
                    groups=(READER_GID,))
    assert {(s, v): n for s, v, n in reader[0][1]["buckets"]} == truth(rows, "type")
    assert reader[1][1]["total"] == 1100
    status, admin = http(daemon, "GET", "/actors/shared")
    assert status == 200 and admin["total"] == 1100
    # A non-admin may not rebuild.
    refused = run_as(NOBODY, _POST, daemon.status_socket)
    assert json.loads(refused)[0] == 403


_POST = r"""
import http.client, json, socket, sys
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])
conn = Conn("auditd", timeout=30)
conn.request("POST", "/projections/rebuild", body=json.dumps({"name": "counts_by_type"}),
             headers={"Content-Type": "application/json"})
response = conn.getresponse()
print(json.dumps([response.status, json.loads(response.read())]))
"""
