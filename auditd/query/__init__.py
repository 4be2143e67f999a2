"""Finding events: a query's spec, the hot tail's in-memory index, and the engine that
runs a query over the ring window, the hot index and the sealed partitions."""
