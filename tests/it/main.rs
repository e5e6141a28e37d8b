//! The one integration-test binary. Every test here runs against real
//! servers started by `bstore-testkit` and the real `baileys-store` binary.

mod auth;
mod bad_input;
mod claims;
mod cluster;
mod deltas;
mod enumeration;
mod erasure;
mod faults;
mod harness;
mod integrity_log;
mod integrity_mongo;
mod integrity_redis;
mod isolation;
mod keys;
mod mapping;
mod materializer_concurrency;
mod metrics;
mod migration;
mod ownership;
mod projections;
mod rebuild;
mod restore;
mod snapshots;
mod spine;
mod tools;
mod trust;
