//! The Node.js client example (`examples/clients/node`, `@grpc/grpc-js`)
//! against the real binary, run as its README says (`node example.js ...
//! --demo-api --watch 60`): the README's output line by line (get, a 401 from
//! the example's local API, one `InvalidateToken` of that version, a 200 with
//! the replacement, three rotations watched in order), then a restart of the
//! broker on the same socket, after which the watcher resumes with
//! `after_version`; Ctrl-C stops it cleanly; its output holds no token value
//! (see `client_example`). Its packages come from `scripts/node-env` (`npm ci`
//! of the example's lockfile into `target/node`).

use std::path::PathBuf;

use crate::client_example::{Client, readme_scenario};

/// `TOKEN_BROKER_TEST_NODE_MODULES` (set by `scripts/node-env`). Panics with
/// the way to get it, so a missing tool is a failure, never a skipped test.
fn node_modules() -> PathBuf {
    let dir = std::env::var_os("TOKEN_BROKER_TEST_NODE_MODULES").map(PathBuf::from);
    match dir {
        Some(d) if d.join("@grpc/grpc-js").is_dir() => d,
        _ => panic!(
            "the Node.js example's packages are missing: run scripts/test \
             (or `source scripts/node-env`), which needs Node.js 18+ with npm"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client_runs_as_its_readme_says_and_watches_across_a_restart() {
    let modules = node_modules();
    readme_scenario(Client {
        dir: "node",
        program: "node",
        run_with: "node".into(),
        env: vec![("NODE_PATH", modules.into())],
    })
    .await;
}
