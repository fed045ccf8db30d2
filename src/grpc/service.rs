//! The `TokenBroker` service: admission control, deadlines, validation, then one
//! call into the broker per RPC.
//!
//! Admission: unary calls take a permit from a process-wide semaphore with
//! `try_acquire` (load shedding: over the limit is RESOURCE_EXHAUSTED at once,
//! never a queue); streams take one from a separate semaphore for their whole
//! life. Health and reflection are not limited.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info, info_span};

use super::convert;
use super::pb;
use super::status::ApiError;
use crate::broker::{Broker, BrokerError, Rejected};
use crate::config::ServerConfig;

pub struct TokenBrokerService {
    broker: Broker,
    request_timeout: Duration,
    unary: Arc<Semaphore>,
    streams: Arc<Semaphore>,
}

impl TokenBrokerService {
    pub fn new(broker: Broker, cfg: &ServerConfig) -> Self {
        Self {
            broker,
            request_timeout: cfg.request_timeout,
            unary: Arc::new(Semaphore::new(cfg.max_concurrent_requests)),
            streams: Arc::new(Semaphore::new(cfg.max_streams)),
        }
    }
}

fn admit(sem: &Arc<Semaphore>, what: &'static str) -> Result<OwnedSemaphorePermit, ApiError> {
    sem.clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded(what))
}

/// Logs the outcome of an RPC inside its span and converts the error.
fn finish<T>(result: Result<T, ApiError>) -> Result<T, Status> {
    match result {
        Ok(v) => {
            debug!(code = "OK", "rpc done");
            Ok(v)
        }
        Err(e) => {
            let status = Status::from(e);
            info!(code = ?status.code(), error = status.message(), "rpc failed");
            Err(status)
        }
    }
}

#[tonic::async_trait]
impl pb::token_broker_server::TokenBroker for TokenBrokerService {
    async fn get_collection_token(
        &self,
        request: Request<pb::GetCollectionTokenRequest>,
    ) -> Result<Response<pb::GetCollectionTokenResponse>, Status> {
        let deadline = convert::deadline(request.metadata(), self.request_timeout);
        let req = request.into_inner();
        let span = info_span!("get_collection_token", collection = %req.collection.escape_debug());
        let result = async {
            let _permit = admit(
                &self.unary,
                "too many requests in progress; retry with backoff",
            )?;
            let name = convert::collection(&req.collection)?;
            let min_remaining = convert::min_remaining(req.min_remaining)?;
            let served = self.broker.get(name, min_remaining, deadline).await?;
            Ok(Response::new(pb::GetCollectionTokenResponse {
                token: Some(convert::token(name, &served)),
            }))
        }
        .instrument(span.clone())
        .await;
        span.in_scope(|| finish(result))
    }

    async fn invalidate_token(
        &self,
        request: Request<pb::InvalidateTokenRequest>,
    ) -> Result<Response<pb::InvalidateTokenResponse>, Status> {
        let deadline = convert::deadline(request.metadata(), self.request_timeout);
        let req = request.into_inner();
        let span = info_span!(
            "invalidate_token",
            collection = %req.collection.escape_debug(),
            version = req.version,
        );
        let result = async {
            let _permit = admit(
                &self.unary,
                "too many requests in progress; retry with backoff",
            )?;
            let name = convert::collection(&req.collection)?;
            let reason = convert::reason(&req.reason)?;
            let rejected = match (req.version, req.value.as_str()) {
                (0, "") => {
                    return Err(ApiError::invalid(
                        "version",
                        "give the rejected token's version (or its value)",
                    ));
                }
                (v, "") => Rejected::Version(v),
                (0, value) => Rejected::Value(value),
                (v, value) => Rejected::Both(v, value),
            };
            info!(reason = %reason.escape_debug(), "upstream rejected a token");
            let (served, refreshed) = self.broker.invalidate(name, rejected, deadline).await?;
            info!(
                refreshed,
                current_version = served.token.version,
                "invalidation handled"
            );
            Ok(Response::new(pb::InvalidateTokenResponse {
                token: Some(convert::token(name, &served)),
                refreshed,
            }))
        }
        .instrument(span.clone())
        .await;
        span.in_scope(|| finish(result))
    }

    type WatchTokenStream = ReceiverStream<Result<pb::WatchTokenResponse, Status>>;

    async fn watch_token(
        &self,
        request: Request<pb::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let req = request.into_inner();
        let span = info_span!("watch_token", collection = %req.collection.escape_debug(), after_version = req.after_version);
        let opened = span.in_scope(|| {
            let permit = admit(&self.streams, "too many watch streams open")?;
            let name = convert::collection(&req.collection)?.to_owned();
            let watch = self.broker.watch(&name, req.after_version)?;
            Ok::<_, ApiError>((permit, name, watch))
        });
        let (permit, name, mut watch) = span.in_scope(|| finish(opened))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(
            async move {
                let _permit = permit;
                debug!("watch opened");
                loop {
                    let batch = tokio::select! {
                        biased;
                        () = tx.closed() => break,
                        batch = watch.next() => batch,
                    };
                    let Some(batch) = batch else {
                        let status = Status::from(ApiError::Broker(BrokerError::ShuttingDown));
                        let _ = tx.send(Err(status)).await;
                        break;
                    };
                    for served in batch {
                        let msg = pb::WatchTokenResponse {
                            token: Some(convert::token(&name, &served)),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            debug!("watch closed by the client");
                            return;
                        }
                        debug!(version = served.token.version, "watch sent a token");
                    }
                }
                debug!("watch ended");
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
