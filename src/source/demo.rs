//! The `demo` source: mints a random token with a fixed lifetime. Used by
//! `serve --dev` and for trying the API without an upstream.

use std::time::Duration;

use rand::Rng;
use rand::distr::Alphanumeric;

use super::{BoxFuture, FetchContext, FetchError, Fetched, Source};
use crate::token::Secret;

#[derive(Debug, Clone)]
pub struct DemoSource {
    ttl: Duration,
}

impl DemoSource {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl }
    }
}

impl Source for DemoSource {
    fn kind(&self) -> &'static str {
        "demo"
    }

    fn fetch(&self, ctx: FetchContext) -> BoxFuture<'_, Result<Fetched, FetchError>> {
        let value: String = rand::rng()
            .sample_iter(Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        let fetched = Fetched::token(
            Secret::new(format!("demo-{value}")),
            Some(ctx.now + self.ttl),
        );
        Box::pin(async move { Ok(fetched) })
    }
}
