//! The Python client example (`examples/clients/python`) against the real
//! binary, run as its README says (`example.py ... --demo-api --watch 60`):
//! the README's output line by line (get, a 401 from the example's local API,
//! one `InvalidateToken` of that version, a 200 with the replacement, three
//! rotations watched in order), then a restart of the broker on the same
//! socket, after which the watcher resumes with `after_version`; Ctrl-C stops
//! it cleanly; its output holds no token value (see `client_example`).

use std::path::Path;
use std::process::Command;

use crate::client_example::{Client, readme_scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_runs_as_its_readme_says_and_watches_across_a_restart() {
    let python = crate::support::python();
    // The stubs, generated before the broker starts so that protoc's time does
    // not count against the README's versions (the client would generate them
    // on import).
    let stubs = tempfile::tempdir().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/clients/python");
    let out = Command::new(&python)
        .arg("generate.py")
        .arg(stubs.path())
        .current_dir(&dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    readme_scenario(Client {
        dir: "python",
        program: ".venv/bin/python",
        run_with: python,
        env: vec![
            ("TOKEN_BROKER_STUBS_DIR", stubs.path().into()),
            ("PYTHONDONTWRITEBYTECODE", "1".into()),
        ],
    })
    .await;
}
