//! Integration tests: the real server against the machine's real Postgres and Redis. Each test
//! has its own database and Redis key prefix, so they run in parallel.

mod support;

mod feed;
mod hostile;
mod overload;
mod policy;
mod sessions;
mod verify;
