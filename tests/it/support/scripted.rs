//! Scripted upstream sources for in-process brokers: a [`Source`] that counts
//! calls, follows a script of [`Step`]s (then repeats one), can be slowed down
//! or gated, and the `CollectionSpec` helpers that put one behind a
//! collection (`spec`, `steady`, `required`) with a test-friendly `policy`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use token_broker::broker::{CollectionSpec, Policy};
use token_broker::source::{BoxFuture, FailureClass, FetchContext, FetchError, Fetched, Source};
use token_broker::token::Secret;
use tokio::sync::Semaphore;

/// What the scripted upstream does on one call.
#[derive(Debug, Clone)]
pub enum Step {
    /// A fresh token `tok-N` (N = call number) living `ttl` (None: opaque).
    Token(Option<Duration>),
    /// A token with this exact value, living `ttl`.
    Value(&'static str, Duration),
    Fail(FailureClass),
    Panic,
}

/// An upstream that counts calls, follows a script (then repeats `then`), can
/// be slowed down, and can be gated so calls block until the test opens it.
pub struct Scripted {
    calls: AtomicUsize,
    script: Mutex<VecDeque<Step>>,
    then: Mutex<Step>,
    delay: Mutex<Duration>,
    gate: Option<Arc<Semaphore>>,
    /// Wall-clock time of each call, as the broker saw it.
    pub call_times: Mutex<Vec<SystemTime>>,
}

impl Scripted {
    pub fn new(script: impl IntoIterator<Item = Step>, then: Step) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            script: Mutex::new(script.into_iter().collect()),
            then: Mutex::new(then),
            delay: Mutex::new(Duration::ZERO),
            gate: None,
            call_times: Mutex::new(Vec::new()),
        })
    }

    /// Tokens living `ttl`, forever.
    pub fn tokens(ttl: Duration) -> Arc<Self> {
        Self::new([], Step::Token(Some(ttl)))
    }

    /// Like `new`, but every call waits for a permit from the returned gate.
    pub fn gated(
        script: impl IntoIterator<Item = Step>,
        then: Step,
    ) -> (Arc<Self>, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let mut s = Arc::into_inner(Self::new(script, then)).unwrap();
        s.gate = Some(gate.clone());
        (Arc::new(s), gate)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }
}

impl Source for Scripted {
    fn kind(&self) -> &'static str {
        "scripted"
    }

    fn fetch(&self, ctx: FetchContext) -> BoxFuture<'_, Result<Fetched, FetchError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.call_times.lock().unwrap().push(ctx.now);
            let step = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| self.then.lock().unwrap().clone());
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            let delay = *self.delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            match step {
                Step::Token(ttl) => Ok(Fetched::token(
                    Secret::new(format!("tok-{n}")),
                    ttl.map(|t| ctx.now + t),
                )),
                Step::Value(v, ttl) => Ok(Fetched::token(Secret::new(v), Some(ctx.now + ttl))),
                Step::Fail(class) => Err(FetchError::new(class, format!("scripted failure {n}"))),
                Step::Panic => panic!("scripted panic"),
            }
        })
    }
}

/// A prefetched collection whose upstream always answers with a 300 s token.
pub fn steady(name: &str) -> CollectionSpec {
    spec(
        name,
        Scripted::tokens(Duration::from_secs(300)),
        policy(),
        true,
    )
}

pub fn spec(name: &str, source: Arc<Scripted>, policy: Policy, prefetch: bool) -> CollectionSpec {
    CollectionSpec {
        name: name.to_owned(),
        source,
        policy,
        prefetch,
        required: false,
    }
}

/// `spec` marked required: readiness waits for its token.
pub fn required(spec: CollectionSpec) -> CollectionSpec {
    CollectionSpec {
        required: true,
        ..spec
    }
}

/// A policy with short, test-friendly numbers and no refresh jitter.
pub fn policy() -> Policy {
    Policy {
        refresh_jitter: 0.0,
        ..Policy::default()
    }
}
