"""The journal: CRC'd records appended before a reply, group-commit fsyncs, replay."""
