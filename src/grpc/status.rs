//! The one place where errors become gRPC statuses.
//!
//! | error | code |
//! |---|---|
//! | malformed field | INVALID_ARGUMENT (message names the field) |
//! | collection not configured | NOT_FOUND |
//! | no servable token, upstream failing transiently | UNAVAILABLE (class, next retry time) |
//! | no servable token, upstream failing permanently | FAILED_PRECONDITION (class, next retry time) |
//! | caller's deadline passed while waiting | DEADLINE_EXCEEDED |
//! | caller not among the collection's readers (or unknown collection while some are protected) | PERMISSION_DENIED (names neither the collection nor a token) |
//! | concurrency or stream limit reached | RESOURCE_EXHAUSTED |
//! | server shutting down | UNAVAILABLE |
//!
//! Messages carry collection names, failure classes and times only: never
//! tokens, secrets, upstream bodies or store errors. UNAVAILABLE and
//! FAILED_PRECONDITION for a failing upstream also carry `grpc-retry-pushback-ms`
//! and the failure class in [`FAILURE_CLASS_HEADER`] (a follower broker takes
//! the class over, so its callers see the root's).

use tonic::{Code, Status};

use crate::broker::BrokerError;

/// The trailer naming the failure class of a failing upstream.
pub const FAILURE_CLASS_HEADER: &str = "token-broker-failure-class";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{0}")]
    Overloaded(&'static str),
    /// The same words whether the collection exists or not.
    #[error("the caller is not permitted to read this collection")]
    PermissionDenied,
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl ApiError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let message = e.to_string();
        match e {
            ApiError::InvalidArgument { .. } => Status::invalid_argument(message),
            ApiError::Overloaded(_) => Status::resource_exhausted(message),
            ApiError::PermissionDenied => Status::permission_denied(message),
            ApiError::Broker(b) => match b {
                BrokerError::UnknownCollection(_) => Status::not_found(message),
                BrokerError::UpstreamFailing {
                    class, retry_in, ..
                } => {
                    let code = if class.is_permanent() {
                        Code::FailedPrecondition
                    } else {
                        Code::Unavailable
                    };
                    let mut status = Status::new(code, message);
                    if let Ok(v) = retry_in.as_millis().to_string().parse() {
                        status.metadata_mut().insert("grpc-retry-pushback-ms", v);
                    }
                    status.metadata_mut().insert(
                        FAILURE_CLASS_HEADER,
                        tonic::metadata::MetadataValue::from_static(class.as_str()),
                    );
                    status
                }
                BrokerError::DeadlineExceeded { .. } => Status::deadline_exceeded(message),
                BrokerError::ShuttingDown => Status::unavailable(message),
            },
        }
    }
}
