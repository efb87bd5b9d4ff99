//! Integration tests: the real server against the machine's real Postgres and Redis. Each test
//! has its own database and Redis key prefix, so they run in parallel.

mod support;

// Fleet: private Postgres clusters, PgBouncer, failover, connection budget.
mod cluster;
mod connections;
mod failover;
mod pgbouncer;

mod feed;
mod hostile;
mod overload;
mod sessions;
mod verify;
