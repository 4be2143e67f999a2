"""The store: SQLite connections, the writer's batches, dead letters, recovery, migrations."""
