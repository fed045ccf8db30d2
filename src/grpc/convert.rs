//! Validation of incoming messages and conversion between protobuf and domain
//! types.

use std::time::Duration;

use tonic::metadata::MetadataMap;

use super::pb;
use super::status::ApiError;
use crate::broker::Served;
use crate::config::CollectionName;

/// Longest accepted `reason` in `InvalidateToken`.
pub const MAX_REASON_BYTES: usize = 1024;
/// Longest accepted `min_remaining`.
const MAX_MIN_REMAINING: Duration = Duration::from_secs(7 * 24 * 3600);

/// A caller-sent collection name as it may appear in logs and spans: escaped,
/// and cut after 128 characters with the full length noted, so a caller
/// cannot copy 64 KiB into every log line of its call. Formats lazily (no
/// allocation on the hot path).
pub struct Loggable<'a>(pub &'a str);

impl std::fmt::Display for Loggable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = crate::config::MAX_NAME_LEN;
        match self.0.char_indices().nth(SHOWN) {
            None => write!(f, "{}", self.0.escape_debug()),
            Some((cut, _)) => write!(
                f,
                "{}...({} bytes)",
                self.0[..cut].escape_debug(),
                self.0.len()
            ),
        }
    }
}

pub fn collection(name: &str) -> Result<CollectionName<'_>, ApiError> {
    CollectionName::parse(name).map_err(|reason| ApiError::invalid("collection", reason))
}

pub fn min_remaining(d: Option<prost_types::Duration>) -> Result<Option<Duration>, ApiError> {
    let Some(d) = d else { return Ok(None) };
    let d = Duration::try_from(d)
        .map_err(|_| ApiError::invalid("min_remaining", "must be a non-negative duration"))?;
    if d > MAX_MIN_REMAINING {
        return Err(ApiError::invalid("min_remaining", "must be at most 7 days"));
    }
    Ok(Some(d))
}

pub fn reason(reason: &str) -> Result<&str, ApiError> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(ApiError::invalid(
            "reason",
            format!(
                "must be at most {MAX_REASON_BYTES} bytes, got {}",
                reason.len()
            ),
        ));
    }
    Ok(reason)
}

pub fn token(collection: &str, served: &Served) -> pb::Token {
    let t = &served.token;
    pb::Token {
        collection: collection.to_owned(),
        value: t.value.expose().to_owned(),
        version: t.version,
        fetched_at: Some(t.fetched_at.into()),
        expires_at: Some(t.expires_at.into()),
        refresh_at: Some(t.refresh_at.into()),
        stale: served.stale,
    }
}

/// The caller's deadline from the `grpc-timeout` header, capped by the server's
/// request timeout. The result is a little earlier than the caller's deadline so
/// that our DEADLINE_EXCEEDED (or a last-moment answer) reaches it before its own
/// timer fires.
pub fn deadline(metadata: &MetadataMap, request_timeout: Duration) -> tokio::time::Instant {
    let budget = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(request_timeout, |t| t.min(request_timeout));
    let margin = (budget / 20).min(Duration::from_millis(100));
    tokio::time::Instant::now() + (budget - margin)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(s: &str) -> Option<Duration> {
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_in_logs() {
        let loggable = |s: &str| Loggable(s).to_string();
        assert_eq!(loggable("demo"), "demo");
        assert_eq!(loggable("a\nb"), "a\\nb");
        let long = "x".repeat(64 * 1024);
        let shown = loggable(&long);
        assert!(shown.len() < 200, "{}", shown.len());
        assert!(shown.ends_with("...(65536 bytes)"));
    }

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }
}
