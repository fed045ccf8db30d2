//! The chaos clients: callers looping `GetCollectionToken` and `WatchToken`
//! streams that resume with `after_version`, recording into a shared
//! [`Recorder`] every token (as a hash) and every failed read.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use token_broker::grpc::pb::{self, WatchTokenRequest};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::history::{Failed, Ms, Received, Token, Via, hash, now_ms};
use super::proc;

/// Deadline of each `Get` the callers send.
pub const GET_DEADLINE: Duration = Duration::from_secs(3);
/// A stream that floods is closed after this many messages (the checker has
/// enough to name the flood).
const STREAM_CAP: usize = 20_000;
/// A watcher that floods stops watching after this many messages in all, so
/// that a long run's history stays in memory.
const WATCHER_CAP: usize = 50_000;

#[derive(Default)]
pub struct Recorder {
    pub received: Mutex<Vec<Received>>,
    pub failed: Mutex<Vec<Failed>>,
}

fn ms(t: &Option<prost_types::Timestamp>) -> Ms {
    t.and_then(|t| SystemTime::try_from(t).ok())
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as Ms)
}

fn token(t: &pb::Token) -> Token {
    Token {
        collection: t.collection.clone(),
        version: t.version,
        hash: hash(&t.value),
        expires_at: ms(&t.expires_at),
    }
}

impl Recorder {
    fn got(&self, sidecar: usize, t: &pb::Token, via: Via) {
        self.received.lock().unwrap().push(Received {
            sidecar,
            token: token(t),
            at: now_ms(),
            via,
        });
    }

    fn failed(&self, sidecar: usize, collection: &str, code: String, sent: Ms) {
        self.failed.lock().unwrap().push(Failed {
            sidecar,
            collection: collection.to_owned(),
            code,
            sent,
            at: now_ms(),
        });
    }
}

/// Loops `Get(collection)` on the sidecar at `sock` until `stop`, pausing
/// 100-200 ms between reads.
pub fn caller(
    sidecar: usize,
    sock: PathBuf,
    collection: String,
    rec: Arc<Recorder>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = None;
        while !stop.is_cancelled() {
            let sent = now_ms();
            let c = match client.take() {
                Some(c) => c,
                None => match proc::client(&sock).await {
                    Ok(c) => c,
                    Err(_) => {
                        rec.failed(sidecar, &collection, "connect".to_owned(), sent);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            let mut c = c;
            match crate::support::get(&mut c, &collection, GET_DEADLINE).await {
                Ok(t) => {
                    rec.got(sidecar, &t, Via::Get { sent });
                    client = Some(c);
                }
                Err(s) => {
                    rec.failed(sidecar, &collection, format!("{:?}", s.code()), sent);
                    if s.code() != tonic::Code::DeadlineExceeded {
                        // Reconnect: the sidecar may have been restarted.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    } else {
                        client = Some(c);
                    }
                }
            }
            let pause = 100 + rand::random::<u64>() % 100;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
                _ = stop.cancelled() => {}
            }
        }
    })
}

/// A `WatchToken` stream on the sidecar at `sock`, reopened with
/// `after_version` = the last version it received after every break.
pub fn watcher(
    id: usize,
    sidecar: usize,
    sock: PathBuf,
    collection: String,
    rec: Arc<Recorder>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut stream_no = 0;
        let mut after = 0;
        let mut total = 0;
        while !stop.is_cancelled() && total < WATCHER_CAP {
            let opened = async {
                let mut c = proc::client(&sock).await.ok()?;
                c.watch_token(WatchTokenRequest {
                    collection: collection.clone(),
                    after_version: after,
                })
                .await
                .ok()
                .map(tonic::Response::into_inner)
            };
            let Some(mut stream) = opened.await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut count = 0;
            loop {
                tokio::select! {
                    msg = stream.message() => match msg {
                        Ok(Some(m)) => {
                            let Some(t) = m.token else { break };
                            rec.got(sidecar, &t, Via::Watch { watcher: id, stream: stream_no });
                            after = t.version;
                            count += 1;
                            total += 1;
                            if count >= STREAM_CAP || total >= WATCHER_CAP {
                                break;
                            }
                        }
                        _ => break,
                    },
                    _ = stop.cancelled() => return,
                }
            }
            stream_no += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}
