"""Schema 7: the prune points retention records (proofs.md "After retention").

Each row is one retention step that deleted the seqs 1..`size` (whole partitions, the
oldest first): `compact` is the compact range of the tree's first `size` leaves (its
perfect subtrees' roots, largest first, 32 bytes each: at most log2(size) hashes),
`checkpoint` a signed checkpoint of that size, so every checkpoint and proof at or
above the newest prune point still verifies with the records below it gone. Rows are
append-only, like the checkpoints: the newest (largest size) is the store's prune
point.

Up creates the empty table on any store. Down drops it: a store that retention pruned
then no longer verifies (its first seqs are gone with nothing to say why), so
`auditd migrate` counts the rows as a loss and asks for `--yes-delete-events`.
"""

from __future__ import annotations

from auditd.store.migrations.m0005_merkle import no_change

UP: tuple[str, ...] = (
    """CREATE TABLE prune_points (
        size INTEGER PRIMARY KEY,
        compact BLOB NOT NULL,
        checkpoint TEXT NOT NULL,
        pruned_at INTEGER NOT NULL,
        events INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    )""",
    *no_change("prune_points"),
)

DOWN: tuple[str, ...] = ("DROP TABLE prune_points",)
