"""SIGKILL loop: the daemon is killed at random moments under load and restarted.

Four writer processes (sigkill_writer.py, auditd.client.Client) send events with ids on
their own stream and log every acknowledged id with the seq its reply gave. After 20
real SIGKILLs, each followed by a restart, every acknowledged event must be stored
exactly once under that seq, seq must be gap-free, each stream's stream_seq must be
1..n in send order, and the database must pass `PRAGMA integrity_check`.

The kill moments and the writers' batch sizes come from one seed: AUDITD_SIGKILL_SEED
when set, else a random one, printed at the start and named in every failure so that a
run can be replayed (the moments are relative to progress, not wall-clock exact).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import wait_for
from fault_helpers import assert_integrity_ok, assert_seq_gap_free, log_events_named

WRITERS = 4
KILLS = 20
WRITER = Path(__file__).with_name("sigkill_writer.py")


def read_acks(path: Path) -> dict[str, int]:
    acks: dict[str, int] = {}
    for line in path.read_text().splitlines():
        event_id, seq = line.split()
        assert acks.setdefault(event_id, int(seq)) == int(seq), f"{event_id}: two seqs"
    return acks


SEED_VARIABLE = "AUDITD_SIGKILL_SEED"


def chosen_seed() -> int:
    given = os.environ.get(SEED_VARIABLE)
    return int(given) if given else random.SystemRandom().randrange(1 << 30)


def acked_count(outs: list[Path]) -> int:
    """Acknowledged events so far, over all writers (their files only ever grow)."""
    return sum(out.read_bytes().count(b"\n") for out in outs if out.exists())


def test_every_acknowledged_event_survives_20_sigkills_exactly_once(make_daemon: Any) -> None:
    seed = chosen_seed()
    print(f"SIGKILL loop seed {seed}: replay with {SEED_VARIABLE}={seed}")
    rng = random.Random(seed)
    # Small batches and a short batch delay: commits are frequent, so kills land
    # before, during and after commits, not only between them.
    daemon = make_daemon({"writer": {"batch_max": 256, "batch_delay_ms": 2}})
    stop_file = daemon.root / "stop"
    outs = [daemon.root / f"acks-{n}.txt" for n in range(WRITERS)]
    errs = [(daemon.root / f"writer-{n}.err").open("wb") for n in range(WRITERS)]
    writers = [
        subprocess.Popen([sys.executable, str(WRITER), daemon.ingest_socket, f"w{n}",
                          str(outs[n]), str(stop_file), str(seed + n)],
                         stdout=errs[n], stderr=errs[n])
        for n in range(WRITERS)]
    kills_during_start = 0

    def under_load(what: str) -> None:
        """Until the writers have had some events acknowledged by this daemon."""
        before = acked_count(outs)
        wait_for(lambda: acked_count(outs) > before, 60, f"{what} (seed {seed})")

    try:
        for kill in range(KILLS):
            under_load(f"acknowledgements before kill {kill}")
            # A random moment within the load, so kills land before, during and after
            # commits; what is being waited for is the moment, not a state.
            time.sleep(rng.uniform(0.0, 0.4))
            assert daemon.running, f"seed {seed}: {daemon.log_text()[-4000:]}"
            daemon.kill()
            if kill % 5 == 4:
                # Now and then a second kill lands while the daemon is replaying.
                ready = daemon.log_text().count('"daemon_ready"')
                daemon.start(wait=False)
                time.sleep(rng.uniform(0.0, 0.15))  # a random moment of the start
                daemon.kill()
                kills_during_start += daemon.log_text().count('"daemon_ready"') == ready
            daemon.start()
        under_load("acknowledgements after the last restart")
        stop_file.touch()
        for n, writer in enumerate(writers):
            code = writer.wait(90)
            assert code == 0, (f"seed {seed}: "
                               + (daemon.root / f"writer-{n}.err").read_text()[-4000:])
    finally:
        stop_file.touch()
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        for handle in errs:
            handle.close()
    assert daemon.stop() == 0
    acks: dict[str, int] = {}
    for out in outs:
        acks.update(read_acks(out))
    writer_logs = "".join(
        (daemon.root / f"writer-{n}.err").read_text() for n in range(WRITERS))
    context = f"seed={seed} kills_during_start={kills_during_start}\n{writer_logs[-3000:]}"
    assert len(acks) > 1000, f"too little load to mean anything: {len(acks)}; {context}"
    replayed = sum(e["events"] for e in log_events_named(daemon, "replay_finished"))
    assert replayed > 0, f"no kill left uncommitted events to replay; {context}"

    # Exactly once, under the acknowledged seq.
    rows = dict(daemon.query("SELECT id, seq FROM events"))
    ((count, distinct),) = daemon.query("SELECT count(*), count(DISTINCT id) FROM events")
    assert count == distinct, f"{count - distinct} ids stored twice; {context}"
    lost = sorted(set(acks) - set(rows))
    assert not lost, f"{len(lost)} acknowledged events lost, e.g. {lost[:10]}; {context}"
    extra = sorted(set(rows) - set(acks))
    assert not extra, f"stored but never acknowledged: {extra[:10]}; {context}"
    wrong = {i: (acks[i], rows[i]) for i in acks if rows[i] != acks[i]}
    assert not wrong, (f"seq differs from the reply (acked, stored): "
                       f"{list(wrong.items())[:10]}; {context}")

    # Gap-free seq; a SIGKILL corrupts nothing, so nothing is dead-lettered either.
    top, dead = assert_seq_gap_free(daemon)
    assert not dead, f"dead letters after plain SIGKILLs: {sorted(dead)[:10]}; {context}"
    assert top == count

    # Per stream: stream_seq is 1..n, and follows both seq and the writer's send order.
    for n in range(WRITERS):
        stream = daemon.query(
            "SELECT e.stream_seq, e.seq, e.id FROM events e JOIN names s ON s.id = e.stream"
            " WHERE s.value = ? ORDER BY e.stream_seq", f"w{n}")
        assert [row[0] for row in stream] == list(range(1, len(stream) + 1)), f"w{n} {context}"
        assert [row[1] for row in stream] == sorted(row[1] for row in stream), f"w{n} {context}"
        sent_order = [int(row[2].split("-")[1]) for row in stream]
        assert sent_order == list(range(1, len(stream) + 1)), f"w{n} out of send order {context}"
        versions = daemon.query(
            "SELECT version, last_seq FROM streams WHERE stream ="
            " (SELECT id FROM names WHERE value = ?)", f"w{n}")
        assert versions == [(len(stream), stream[-1][1])], f"w{n} streams row {context}"

    ((committed,),) = daemon.query("SELECT value FROM meta WHERE key = 'committed_seq'")
    assert committed == top, context
    assert_integrity_ok(daemon.db_path)
