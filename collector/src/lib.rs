//! Tracklet's collector: receives event batches from the SDK and stores them.
//!
//! A batch flows through one pipeline, read top to bottom in [`http`]:
//! [`decode`] -> [`auth`] -> [`validate`] -> [`enrich`] -> [`commit`] (group commit into a
//! [`store`]) -> respond. Every error on the way is mapped to a status and a JSON body in
//! exactly one place, [`error`]. [`receipts`] remembers which batches arrived, for
//! `POST /v1/batch/status`.
//!
//! Past one machine, [`queue`] puts NATS JetStream between the pipeline and the store:
//! `serve --queue` publishes instead of committing, `sink` commits what it pulls.

pub mod analytics;
pub mod auth;
pub mod cli;
pub mod commit;
pub mod config;
pub mod dashboard;
pub mod decode;
pub mod enrich;
pub mod error;
pub mod export;
pub mod funnel;
pub mod health;
pub mod http;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod queue;
pub mod ratelimit;
pub mod receipts;
pub mod rollup;
pub mod shutdown;
pub mod stats;
pub mod store;
pub mod transport;
pub mod validate;
pub mod webhooks;
