//! The OverDrive collection token.
//!
//! Contract:
//! - The token lives in the library account document, `GET
//!   {api_base}/v1/libraries/{library_id}` (field `collectionToken`), or for an
//!   Advantage account in `GET .../advantageAccounts` (the entry whose `id` is
//!   `advantage_account_id`). Both are fetched with the parent collection's
//!   OAuth token as `Authorization: Bearer`; that token is shared through the
//!   broker, never minted here.
//! - A 401 means the OAuth token was rejected: the source reports it
//!   (compare-and-invalidate on its version, so many children cause one OAuth
//!   refresh) and retries once with the replacement. A second 401 is
//!   `invalid_credentials`.
//! - An error document is never a token: a body with `errorCode` (even with
//!   HTTP 200), a 404, a missing account or a missing `collectionToken` is an
//!   error. The token has no expiry of its own (`max_age`/`max_stale` apply).

use reqwest::{Method, StatusCode, Url};

use super::http::{HttpClient, Response, string_at};
use super::{BoxFuture, FailureClass, FetchContext, FetchError, Fetched, ParentToken, Source};
use crate::token::Secret;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverDriveSpec {
    /// The OAuth collection this one depends on.
    pub oauth: String,
    pub api_base: Url,
    pub library_id: String,
    pub advantage_account_id: Option<String>,
}

pub struct OverDriveSource {
    spec: OverDriveSpec,
    http: HttpClient,
    url: Url,
}

/// The document fetch's outcome: a token, or a 401 to retry after.
enum Outcome {
    Token(Secret),
    Unauthorized,
}

impl OverDriveSource {
    pub fn new(spec: OverDriveSpec, http: HttpClient) -> Result<Self, String> {
        let mut url = spec.api_base.clone();
        {
            let mut segments = url
                .path_segments_mut()
                .map_err(|()| "api_base cannot be a base URL".to_owned())?;
            segments
                .pop_if_empty()
                .extend(["v1", "libraries", &spec.library_id]);
            if spec.advantage_account_id.is_some() {
                segments.push("advantageAccounts");
            }
        }
        Ok(Self { spec, http, url })
    }

    async fn document(
        &self,
        ctx: &FetchContext,
        oauth: &ParentToken,
    ) -> Result<Outcome, FetchError> {
        let req = self
            .http
            .request(Method::GET, self.url.clone())
            .bearer_auth(oauth.value.expose())
            .header(reqwest::header::ACCEPT, "application/json");
        let resp = self.http.send(req).await?;
        if resp.status == StatusCode::UNAUTHORIZED {
            return Ok(Outcome::Unauthorized);
        }
        if !resp.is_success() {
            let mut err = match resp.status {
                StatusCode::NOT_FOUND => FetchError::new(
                    FailureClass::Rejected,
                    format!(
                        "{}: HTTP 404: library {} not found",
                        resp.target, self.spec.library_id
                    ),
                ),
                _ => resp.status_error(ctx.now),
            };
            if let Some(code) = resp.json().ok().as_ref().and_then(error_code) {
                err.detail = format!("{} (errorCode {code})", err.detail);
            }
            return Err(err);
        }
        let doc = resp.json()?;
        if let Some(code) = error_code(&doc) {
            return Err(resp.bad(format!("error document (errorCode {code})")));
        }
        let token = match &self.spec.advantage_account_id {
            None => string_at(&resp, &doc, "/collectionToken")?,
            Some(id) => advantage_token(&resp, &doc, id)?,
        };
        Ok(Outcome::Token(Secret::new(token)))
    }
}

/// OverDrive's `errorCode`, if the document has one; only a short word of
/// letters is repeated in messages.
fn error_code(doc: &serde_json::Value) -> Option<String> {
    let code = doc.get("errorCode")?;
    let word = code
        .as_str()
        .filter(|s| !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or("?");
    Some(word.to_owned())
}

fn advantage_token(
    resp: &Response,
    doc: &serde_json::Value,
    id: &str,
) -> Result<String, FetchError> {
    let Some(accounts) = doc.get("advantageAccounts").and_then(|a| a.as_array()) else {
        return Err(resp.bad("field /advantageAccounts is missing or not a list"));
    };
    let same_id = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s == id,
        serde_json::Value::Number(n) => n.to_string() == id,
        _ => false,
    };
    let Some(pos) = accounts
        .iter()
        .position(|a| a.get("id").is_some_and(same_id))
    else {
        return Err(resp.bad(format!("advantage account {id} is not listed")));
    };
    string_at(
        resp,
        doc,
        &format!("/advantageAccounts/{pos}/collectionToken"),
    )
}

impl Source for OverDriveSource {
    fn kind(&self) -> &'static str {
        "overdrive"
    }

    fn parent(&self) -> Option<&str> {
        Some(&self.spec.oauth)
    }

    fn fetch(&self, ctx: FetchContext) -> BoxFuture<'_, Result<Fetched, FetchError>> {
        Box::pin(async move {
            let oauth = ctx.parents.token(&self.spec.oauth).await?;
            let (value, used) = match self.document(&ctx, &oauth).await? {
                Outcome::Token(v) => (v, oauth.version),
                Outcome::Unauthorized => {
                    let fresh = ctx.parents.reject(&self.spec.oauth, oauth.version).await?;
                    match self.document(&ctx, &fresh).await? {
                        Outcome::Token(v) => (v, fresh.version),
                        Outcome::Unauthorized => {
                            return Err(FetchError::new(
                                FailureClass::InvalidCredentials,
                                format!(
                                    "{}: HTTP 401 twice: the library endpoint rejected a fresh OAuth token of collection {:?}",
                                    super::http::describe(&self.url),
                                    self.spec.oauth
                                ),
                            ));
                        }
                    }
                }
            };
            Ok(Fetched {
                parent_version: Some(used),
                ..Fetched::token(value, None)
            })
        })
    }
}
