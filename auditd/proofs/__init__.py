"""The tamper-evident log (proofs.md): the Merkle tree kept at ingest, signed
checkpoints, proofs and their offline checks, and `auditd verify`."""
