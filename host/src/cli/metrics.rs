//! `weir run --metrics ADDR:PORT`: the embedded run's metrics at
//! `/metrics`, the same exposition as the running host's
//! ([`crate::prometheus`]), following the job across its attempts.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::checkpoint::coordinator::CheckpointMetrics;
use crate::dataflow::metrics::{JobMetrics, NodeMetrics};
use crate::prometheus::{self, JobSample};
use crate::runner::Attempt;
use crate::runner::PreparedJob;

/// What the endpoint shows: the current attempt's counters.
pub struct Exposed {
    job: String,
    nodes: Vec<Arc<NodeMetrics>>,
    checkpoints: Option<Arc<CheckpointMetrics>>,
    metrics: Arc<JobMetrics>,
}

impl Exposed {
    pub fn new(job: &PreparedJob) -> Self {
        Self {
            job: job.graph.name.clone(),
            nodes: Vec::new(),
            checkpoints: None,
            metrics: Arc::default(),
        }
    }

    /// A new attempt started.
    pub fn attach(&mut self, running: &Attempt) {
        self.nodes = running.metrics().to_vec();
        self.checkpoints = running.checkpoint_metrics();
        self.metrics = running.job_metrics();
    }

    fn encode(&self) -> String {
        let sample = JobSample {
            job: &self.job,
            nodes: &self.nodes,
            checkpoints: self.checkpoints.as_deref(),
            metrics: &self.metrics,
            upgrades: 0,
            rollbacks: 0,
        };
        prometheus::encode_samples(None, &[sample])
    }
}

/// Listens on `address` and serves `/metrics` until the process ends;
/// returns the URL.
pub async fn serve(address: &str, exposed: Arc<Mutex<Exposed>>) -> Result<String> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("--metrics: cannot listen on {address}"))?;
    let url = format!("http://{}/metrics", listener.local_addr()?);
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(exposed);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "the metrics endpoint stopped");
        }
    });
    Ok(url)
}

async fn metrics(State(exposed): State<Arc<Mutex<Exposed>>>) -> impl IntoResponse {
    let text = exposed.lock().expect("not poisoned").encode();
    (
        [(axum::http::header::CONTENT_TYPE, prometheus::CONTENT_TYPE)],
        text,
    )
}
