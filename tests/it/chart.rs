//! The Helm chart (`helm/token-broker`), checked offline by
//! `tests/chart/check_chart.py` with helm-python-sdk (Helm's own Go SDK): lint
//! (values.schema.json and the YAML of every manifest) and render with the
//! default values, `ci/example-values.yaml` and variants of it, a parent chart
//! that includes the sidecar and a parent with two aliases of the chart, in
//! native and plain sidecar modes; every rendering validated with
//! kubernetes-validate --strict for Kubernetes 1.29 and 1.31 and checked for
//! what the API server refuses beyond the schemas (restartPolicy on a regular
//! container, duplicate names and ports, ...); the sidecar container, its
//! probes and securityContext, the secretKeyRefs, the least-privilege migration
//! hook Job, the PodMonitor, the ConfigMap's TOML; and bad values that the
//! schema or the templates must refuse.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");

fn run_checks(extra: &[&std::ffi::OsStr]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(crate::support::python())
        .arg(root.join("tests/chart/check_chart.py"))
        .arg(root)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(" checks, 0 failed"),
        "chart checks failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn chart_lints_renders_and_refuses_bad_values() {
    run_checks(&[]);
}

/// The configs the chart renders (with `[admin]` and required collections)
/// are accepted by the binary.
#[test]
fn chart_configs_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    run_checks(&["--emit-configs".as_ref(), dir.path().as_os_str()]);
    for name in ["defaults.toml", "example.toml", "parent.toml"] {
        check_config(&dir.path().join(name));
    }
}

/// The plain sidecar mode's config, with `[server] shutdown_delay` (the
/// chart's name for the binary's `serve --shutdown-delay`), is accepted too.
#[test]
fn chart_plain_mode_config_passes_check_config() {
    let dir = tempfile::tempdir().unwrap();
    run_checks(&["--emit-configs".as_ref(), dir.path().as_os_str()]);
    let path = dir.path().join("plain.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("shutdown_delay = \"5s\""),
        "plain.toml:\n{text}"
    );
    check_config(&path);
}

fn check_config(path: &Path) {
    // Dummy values for the variables the configs name: check-config reads
    // them, connects nowhere, and prints names, never values.
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(path)
        .env("PARTNER_CLIENT_SECRET", "dummy-client-secret")
        .env(
            "TOKEN_BROKER_DATABASE_URL",
            "postgres://token_broker@127.0.0.1:1/token_broker",
        )
        .env(
            "TOKEN_BROKER_ENCRYPTION_KEY",
            "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: check-config failed ({}):\n{}{}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Tree mode: the broker's config (`[server.tls]`, `readers`, the store) and
/// the follower sidecar's (`kind = "broker"` collections over https) are
/// accepted by the binary, once the Secret paths they name hold real PEM
/// files (here a throwaway CA's, in place of the mounted Secrets).
#[test]
fn chart_tree_mode_configs_pass_check_config() {
    use crate::support::pki::{Ca, TlsDir};
    let dir = tempfile::tempdir().unwrap();
    run_checks(&["--emit-configs".as_ref(), dir.path().as_os_str()]);
    let (server_ca, client_ca) = (Ca::new("broker ca"), Ca::new("client ca"));
    let broker_tls = TlsDir::new(&server_ca.server(), &client_ca);
    let follower_tls = TlsDir::new(&client_ca.client(&["spiffe://x/y"], &[]), &server_ca);
    for (name, mount, files) in [
        ("broker.toml", "/etc/token-broker/tls/", &broker_tls),
        (
            "follower.toml",
            "/etc/token-broker/broker-tls/",
            &follower_tls,
        ),
    ] {
        let path = dir.path().join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(mount),
            "{name} names no file under {mount}:\n{text}"
        );
        let local = format!("{}/", files.path("tls.crt").parent().unwrap().display());
        std::fs::write(&path, text.replace(mount, &local)).unwrap();
        check_config(&path);
    }
}
