"""Forwarding to NATS JetStream (step 8): what the store has committed, exactly once in
the stream through JetStream's message-id dedupe, behind a persisted cursor."""
