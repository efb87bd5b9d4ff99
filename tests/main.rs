//! Integration tests: the real server against the machine's real Postgres and Redis, one file per
//! behaviour. Each test has its own database and Redis key prefix, so they run in parallel.

mod support;

mod assertion;
mod cli;
mod connections;
mod failover;
mod feed;
mod flood;
mod fuzz;
mod gray;
mod grpc;
mod hostile;
mod idle;
mod lane;
mod logging;
mod login;
mod logout;
mod overload;
mod pgbouncer;
mod policy;
mod readiness;
mod redis_cluster;
mod redis_sentinel;
mod redis_tls;
mod redis_trust;
mod refresh;
mod relay;
mod revocation;
mod startup;
mod synchronous;
mod throttle;
mod tracing;
mod verify;
