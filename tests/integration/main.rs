//! kiln's integration tests: one binary, every test against a real
//! `redis-server` started on a free port (see `util`).

mod acl;
mod admission;
mod audit;
mod auth;
mod bad_input;
mod busy;
mod cache;
mod chaos;
mod cli;
mod cluster;
mod cluster_pubsub;
mod coherence;
mod corpus;
mod frames;
mod heat;
mod layers;
mod limits;
mod pipelines;
mod reads;
mod reload;
mod session;
mod sidecar;
mod snapshot;
mod tls;
mod transparency;
mod transparency_stress;
mod util;
mod warmup;
