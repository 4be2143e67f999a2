"""Ingest: the socket, frames, validation and sequencing, up to the journal's reply."""
