"""Sealed partitions (storage.md, step 4): one immutable SQLite file per seq range,
holding its records zstd-compressed with its own dictionary and every filter index.

`seal_partition` builds one from the records of a range; `SealedPartition` reads it.
"""

from auditd.store.partition.build import PartitionInputError, SealedInfo, seal_partition
from auditd.store.partition.read import PartitionFormatError, SealedPartition

__all__ = ["PartitionFormatError", "PartitionInputError", "SealedInfo", "SealedPartition",
           "seal_partition"]
