//! How a dependent source reaches its parent collection: through the broker's
//! own read and compare-and-invalidate paths, so a parent token is shared by
//! every child and every client, and many children reporting one rejected
//! parent version cause one parent refresh.
//!
//! Contract: waits end at the deadline given at construction (inside the
//! child's fetch timeout); broker errors become classified [`FetchError`]s
//! (a failing parent's class carries over, so a permanent parent failure
//! makes the child's failure permanent too).

use std::sync::Arc;

use tokio::time::Instant;

use super::{Broker, BrokerError, Inner, Rejected, Served};
use crate::source::{BoxFuture, FailureClass, FetchError, ParentToken, Parents};

pub(super) struct BrokerParents {
    broker: Broker,
    /// The parent version the child's current token was fetched with, when
    /// that version was reported rejected: the child needs a newer one.
    rejected: Option<u64>,
    deadline: Instant,
}

impl BrokerParents {
    pub(super) fn new(inner: Arc<Inner>, rejected: Option<u64>, deadline: Instant) -> Self {
        Self {
            broker: Broker { inner },
            rejected,
            deadline,
        }
    }

    async fn newer_than(&self, parent: &str, version: u64) -> Result<ParentToken, FetchError> {
        let (served, _) = self
            .broker
            .invalidate(parent, Rejected::Version(version), self.deadline)
            .await
            .map_err(|e| dependency_error(parent, e))?;
        if served.token.version > version {
            return Ok(parent_token(served));
        }
        // The parent could not be refreshed in time (rate limit or backoff):
        // fail this attempt so that the child backs off instead of retrying
        // with a token the upstream already refused.
        Err(FetchError::new(
            FailureClass::Dependency,
            format!(
                "collection {parent:?}: token version {version} was rejected and has no replacement yet"
            ),
        ))
    }
}

fn parent_token(served: Served) -> ParentToken {
    ParentToken {
        value: served.token.value.clone(),
        version: served.token.version,
    }
}

fn dependency_error(parent: &str, e: BrokerError) -> FetchError {
    let class = match &e {
        BrokerError::UpstreamFailing { class, .. } => *class,
        BrokerError::UnknownCollection(_) => FailureClass::Internal,
        BrokerError::DeadlineExceeded { .. } | BrokerError::ShuttingDown => {
            FailureClass::Dependency
        }
    };
    let what = match &e {
        BrokerError::UpstreamFailing {
            class, failures, ..
        } => {
            format!("upstream failing ({class}, {failures} consecutive failures)")
        }
        BrokerError::UnknownCollection(_) => "not configured".to_owned(),
        BrokerError::DeadlineExceeded { .. } => "no token within the fetch timeout".to_owned(),
        BrokerError::ShuttingDown => "shutting down".to_owned(),
    };
    FetchError::new(class, format!("depends on collection {parent:?}: {what}"))
}

impl Parents for BrokerParents {
    fn token<'a>(&'a self, parent: &'a str) -> BoxFuture<'a, Result<ParentToken, FetchError>> {
        Box::pin(async move {
            if let Some(v) = self.rejected {
                return self.newer_than(parent, v).await;
            }
            self.broker
                .get(parent, None, self.deadline)
                .await
                .map(parent_token)
                .map_err(|e| dependency_error(parent, e))
        })
    }

    fn reject<'a>(
        &'a self,
        parent: &'a str,
        version: u64,
    ) -> BoxFuture<'a, Result<ParentToken, FetchError>> {
        Box::pin(self.newer_than(parent, version))
    }
}
