//! The MongoDB materializer (being built): a durable JetStream consumer that
//! writes one document per key and one per session, guarded by stream
//! sequence.
