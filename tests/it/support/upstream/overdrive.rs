//! [`OverDriveServer`]: `GET /v1/libraries/{id}` and
//! `GET /v1/libraries/{id}/advantageAccounts`, authorised by bearer tokens that
//! an [`OAuthServer`] issued and has not revoked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::http::{Core, Recorded, Reply, Running};
use super::oauth::{OAuthServer, OAuthState};

#[derive(Default)]
struct OverDriveData {
    /// library id -> collection token
    libraries: HashMap<String, String>,
    /// library id -> [(account id, collection token)] in insertion order
    advantage: HashMap<String, Vec<(String, String)>>,
}

struct OverDriveState {
    oauth: Arc<OAuthState>,
    base: String,
    data: Mutex<OverDriveData>,
    library_calls: AtomicUsize,
    advantage_calls: AtomicUsize,
    unauthorized: AtomicUsize,
}

enum OdRoute<'a> {
    Library(&'a str),
    Advantage(&'a str),
    Other,
}

fn od_route(path: &str) -> OdRoute<'_> {
    let Some(rest) = path.strip_prefix("/v1/libraries/") else {
        return OdRoute::Other;
    };
    match rest.split_once('/') {
        None if !rest.is_empty() => OdRoute::Library(rest),
        Some((id, "advantageAccounts")) if !id.is_empty() => OdRoute::Advantage(id),
        _ => OdRoute::Other,
    }
}

/// A number if `id` is all digits, else a string (OverDrive ids are numeric).
fn id_value(id: &str) -> Value {
    match id.parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => json!(id),
    }
}

fn od_json(status: u16, body: Value) -> Reply {
    Reply::json(status, body)
}

impl OverDriveState {
    fn respond(&self, rec: &Recorded) -> Reply {
        let route = od_route(&rec.path);
        if matches!(route, OdRoute::Other) {
            return od_json(
                404,
                json!({ "errorCode": "NotFound", "message": "The requested resource could not be found." }),
            );
        }
        if rec.method != "GET" {
            return od_json(
                405,
                json!({ "errorCode": "MethodNotAllowed", "message": "The requested method is not allowed." }),
            )
            .header("allow", "GET");
        }
        let bearer = rec.header("authorization").and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
        if !bearer.is_some_and(|t| self.oauth.is_valid(t)) {
            return od_json(
                401,
                json!({ "errorCode": "Unauthorized", "message": "An unexpected error has occurred." }),
            );
        }
        let data = self.data.lock().unwrap();
        let not_found = || {
            od_json(
                404,
                json!({ "errorCode": "NotFound", "message": "The requested library could not be found." }),
            )
        };
        match route {
            OdRoute::Library(id) => match data.libraries.get(id) {
                Some(token) => od_json(200, self.library_doc(id, token)),
                None => not_found(),
            },
            OdRoute::Advantage(id) => {
                if !data.libraries.contains_key(id) {
                    return not_found();
                }
                let accounts: Vec<Value> = data
                    .advantage
                    .get(id)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|(acct, token)| self.advantage_doc(id, acct, token))
                    .collect();
                od_json(
                    200,
                    json!({
                        "totalItems": accounts.len(),
                        "links": {
                            "self": {
                                "href": format!("{}/v1/libraries/{id}/advantageAccounts", self.base),
                                "type": "application/vnd.overdrive.api+json",
                            }
                        },
                        "advantageAccounts": accounts,
                    }),
                )
            }
            OdRoute::Other => not_found(),
        }
    }

    fn library_doc(&self, id: &str, token: &str) -> Value {
        let base = &self.base;
        json!({
            "id": id_value(id),
            "name": format!("Library {id}"),
            "type": "Library",
            "collectionToken": token,
            "links": {
                "self": {
                    "href": format!("{base}/v1/libraries/{id}"),
                    "type": "application/vnd.overdrive.api+json",
                },
                "products": {
                    "href": format!("{base}/v1/collections/{token}/products"),
                    "type": "application/vnd.overdrive.api+json",
                },
                "advantageAccounts": {
                    "href": format!("{base}/v1/libraries/{id}/advantageAccounts"),
                    "type": "application/vnd.overdrive.api+json",
                },
                "dlrHomepage": {
                    "href": format!("https://library{id}.example.overdrive.com"),
                    "type": "text/html",
                },
            },
            "formats": [
                { "id": "audiobook-mp3", "name": "OverDrive MP3 Audiobook" },
                { "id": "ebook-epub-adobe", "name": "Adobe EPUB eBook" },
                { "id": "ebook-overdrive", "name": "OverDrive Read" },
                { "id": "ebook-kindle", "name": "Kindle Book" },
            ],
        })
    }

    fn advantage_doc(&self, library: &str, account: &str, token: &str) -> Value {
        let base = &self.base;
        json!({
            "id": id_value(account),
            "name": format!("Advantage {account} of Library {library}"),
            "collectionToken": token,
            "links": {
                "self": {
                    "href": format!("{base}/v1/libraries/{library}/advantageAccounts/{account}"),
                    "type": "application/vnd.overdrive.api+json",
                },
                "products": {
                    "href": format!("{base}/v1/collections/{token}/products"),
                    "type": "application/vnd.overdrive.api+json",
                },
            },
        })
    }
}

/// An OverDrive-shaped library API authorised by an [`OAuthServer`].
pub struct OverDriveServer {
    core: Arc<Core>,
    state: Arc<OverDriveState>,
    oauth: Arc<OAuthServer>,
    running: Running,
}

impl OverDriveServer {
    pub async fn start(oauth: Arc<OAuthServer>) -> Arc<Self> {
        let core = Arc::new(Core::default());
        let mut state = None;
        let running = Running::start(|base| {
            let st = Arc::new(OverDriveState {
                oauth: oauth.state.clone(),
                base: base.to_owned(),
                data: Mutex::new(OverDriveData::default()),
                library_calls: AtomicUsize::new(0),
                advantage_calls: AtomicUsize::new(0),
                unauthorized: AtomicUsize::new(0),
            });
            state = Some(st.clone());
            let c = core.clone();
            Arc::new(move |rec: Recorded| {
                match od_route(&rec.path) {
                    OdRoute::Library(_) => st.library_calls.fetch_add(1, Ordering::SeqCst),
                    OdRoute::Advantage(_) => st.advantage_calls.fetch_add(1, Ordering::SeqCst),
                    OdRoute::Other => 0,
                };
                let (_, scripted) = c.arrive(&rec);
                let reply = scripted.unwrap_or_else(|| st.respond(&rec));
                if reply.status == 401 {
                    st.unauthorized.fetch_add(1, Ordering::SeqCst);
                }
                reply
            })
        })
        .await;
        Arc::new(Self {
            core,
            state: state.expect("Running::start calls make"),
            oauth,
            running,
        })
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        self.running.base()
    }

    /// The OAuth server whose tokens this API accepts.
    pub fn oauth(&self) -> &Arc<OAuthServer> {
        &self.oauth
    }

    /// Adds (or replaces) a library.
    pub fn set_library(&self, library_id: &str, collection_token: &str) {
        self.state
            .data
            .lock()
            .unwrap()
            .libraries
            .insert(library_id.to_owned(), collection_token.to_owned());
    }

    /// Adds (or replaces) an Advantage account of a library; the library
    /// itself must also be set for the listing to answer 200.
    pub fn set_advantage(&self, library_id: &str, account_id: &str, collection_token: &str) {
        let mut data = self.state.data.lock().unwrap();
        let accounts = data.advantage.entry(library_id.to_owned()).or_default();
        match accounts.iter_mut().find(|(a, _)| a == account_id) {
            Some(entry) => entry.1 = collection_token.to_owned(),
            None => accounts.push((account_id.to_owned(), collection_token.to_owned())),
        }
    }

    /// The next N requests (to any endpoint) get these replies verbatim.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.core.script(replies);
    }

    /// `/v1/libraries/{id}` requests received (any method, scripted included).
    pub fn library_calls(&self) -> usize {
        self.state.library_calls.load(Ordering::SeqCst)
    }

    /// `/v1/libraries/{id}/advantageAccounts` requests received.
    pub fn advantage_calls(&self) -> usize {
        self.state.advantage_calls.load(Ordering::SeqCst)
    }

    /// Requests answered 401 (scripted 401s included).
    pub fn unauthorized(&self) -> usize {
        self.state.unauthorized.load(Ordering::SeqCst)
    }

    /// All requests received.
    pub fn calls(&self) -> usize {
        self.core.calls()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.core.requests()
    }
}
