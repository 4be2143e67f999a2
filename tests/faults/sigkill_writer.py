"""One writer process of the SIGKILL loop (run by test_sigkill.py, not collected).

    python sigkill_writer.py SOCKET NAME OUT STOPFILE SEED

Sends batches of 1..40 events with ids `NAME-<n>` on stream NAME through
auditd.client.Client until STOPFILE exists. The client reconnects and resends the
unacknowledged frame after a kill; if it gives up, the same batch (same ids) is sent
again here. Every acknowledged event is appended to OUT as `id seq` once its reply
arrives, so OUT lists exactly the acknowledged events.
"""

from __future__ import annotations

import os
import random
import sys
import time

from auditd.client import Client, Reply
from auditd.errors import ClientError, RejectedError


def seqs_of(events: list[dict[str, object]], reply: Reply) -> list[int]:
    assert not reply.rejected, reply
    duplicates = dict(reply.duplicates)
    result, next_seq = [], reply.first
    for index in range(len(events)):
        if index in duplicates:
            result.append(duplicates[index])
        else:
            assert next_seq is not None, reply
            result.append(next_seq)
            next_seq += 1
    if reply.ok:
        assert reply.last is not None and next_seq == reply.last + 1, reply
    return result


def main() -> int:
    socket_path, name, out_path, stop_path, seed = sys.argv[1:6]
    rng = random.Random(int(seed))
    counter = 0
    resends = 0
    with open(out_path, "a", encoding="utf-8") as out:
        client = Client(socket_path, reconnect_deadline=60.0, connect_timeout=5.0)
        try:
            while not os.path.exists(stop_path):
                events: list[dict[str, object]] = []
                for _ in range(rng.randint(1, 40)):
                    counter += 1
                    events.append({"type": "kill.loop", "id": f"{name}-{counter}",
                                   "stream": name, "actor": name, "data": counter})
                while True:
                    try:
                        reply = client.send_batch(events)
                        break
                    except RejectedError:
                        raise
                    except ClientError as exc:  # gave up reconnecting: same ids again
                        resends += 1
                        print(f"{name}: resending after {exc!r}", file=sys.stderr, flush=True)
                        client.close()
                        client = Client(socket_path, reconnect_deadline=60.0)
                        time.sleep(0.05)
                seqs = seqs_of(events, reply)
                out.write("".join(f"{e['id']} {s}\n" for e, s in zip(events, seqs, strict=True)))
                out.flush()
        finally:
            client.close()
    print(f"{name}: sent {counter} events, {resends} batch resends", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
