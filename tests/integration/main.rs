//! kiln's integration tests: one binary, every test against a real
//! `redis-server` started on a free port (see `util`).

mod cache;
mod session;
mod transparency;
mod util;
