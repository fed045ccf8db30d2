//! [`FakeHttp`]: a generic scriptable server (any method, any path) answered
//! by a closure, the upstream of `http_json` sources.

use std::sync::Arc;

use super::http::{Core, Recorded, Reply, Running};

type Handler = Arc<dyn Fn(&Recorded, usize) -> Reply + Send + Sync>;

/// A generic scriptable server: any method, any path.
pub struct FakeHttp {
    core: Arc<Core>,
    running: Running,
}

impl FakeHttp {
    /// `handler` answers every request that no script entry answers; it gets
    /// the request and the 1-based call number (counting scripted calls too).
    pub async fn start(
        handler: impl Fn(&Recorded, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let core = Arc::new(Core::default());
        let handler: Handler = Arc::new(handler);
        let c = core.clone();
        let running = Running::start(|_| {
            Arc::new(move |rec: Recorded| {
                let (n, scripted) = c.arrive(&rec);
                scripted.unwrap_or_else(|| handler(&rec, n))
            })
        })
        .await;
        Self { core, running }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.running.base())
    }

    /// The next N requests get these replies, in order, before the handler
    /// answers again.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.core.script(replies);
    }

    /// All requests received.
    pub fn calls(&self) -> usize {
        self.core.calls()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.core.requests()
    }
}
