//! Tests of the configuration: defaults, bounds, errors naming the field.

use super::*;
use crate::source::{Body, ClientAuth, ExpiresFormat, Grant, JsonSpec};
use crate::token::Secret;

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse("[collections.demo]\nsource = { kind = \"demo\" }\n").unwrap();
    assert_eq!(c.collections.len(), 1);
    assert_eq!(
        c.collections[0].source,
        SourceConfig::Demo {
            ttl: Duration::from_secs(30)
        }
    );
    assert!(c.collections[0].prefetch);
    assert_eq!(c.collections[0].policy, Policy::default());
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:50051");
}

fn err(text: &str) -> ConfigError {
    Config::parse(text).unwrap_err()
}

#[test]
fn admin_listener_and_required_collections() {
    let demo = "[collections.a]\nsource = { kind = \"demo\" }\n";
    let c = Config::parse(demo).unwrap();
    assert_eq!(c.admin, Some(AdminConfig::default()));
    assert_eq!(c.admin.unwrap().listen.to_string(), "127.0.0.1:9464");
    assert!(!c.collections[0].required);
    let c = Config::parse(&format!("[admin]\nlisten = \"0.0.0.0:9500\"\n{demo}")).unwrap();
    assert_eq!(c.admin.unwrap().listen.to_string(), "0.0.0.0:9500");
    let c = Config::parse(&format!("[admin]\nenabled = false\n{demo}")).unwrap();
    assert_eq!(c.admin, None);
    let e = err(&format!("[admin]\nlisten = \"unix:/x.sock\"\n{demo}"));
    assert_eq!(e.field, "admin.listen", "{e}");
    let e = err(&format!("[admin]\nport = 1\n{demo}"));
    assert_eq!(e.field, "admin.port", "{e}");
    let c =
        Config::parse("[collections.a]\nrequired = true\nsource = { kind = \"demo\" }\n").unwrap();
    assert!(c.collections[0].required);
    let e =
        err("[collections.a]\nrequired = true\nprefetch = false\nsource = { kind = \"demo\" }\n");
    assert_eq!(e.field, "collections.a.required", "{e}");
    // The demo of `serve --dev` is required: health waits for its token.
    assert!(Config::dev(Duration::from_secs(30)).unwrap().collections[0].required);
}

#[test]
fn worker_threads_and_shutdown_delay_are_bounded() {
    let demo = "[collections.a]\nsource = { kind = \"demo\" }\n";
    let c = Config::parse(demo).unwrap();
    assert_eq!(c.server.worker_threads, 2);
    assert_eq!(c.server.shutdown_delay, Duration::ZERO);
    let c = Config::parse(&format!(
        "[server]\nworker_threads = 64\nshutdown_delay = \"5m\"\n{demo}"
    ))
    .unwrap();
    assert_eq!(c.server.worker_threads, 64);
    assert_eq!(c.server.shutdown_delay, Duration::from_secs(300));
    for n in [0, 65] {
        let e = err(&format!("[server]\nworker_threads = {n}\n{demo}"));
        assert_eq!(e.field, "server.worker_threads", "{e}");
        assert!(e.reason.contains("between 1 and 64"), "{e}");
    }
    let e = err(&format!("[server]\nshutdown_delay = \"301s\"\n{demo}"));
    assert_eq!(e.field, "server.shutdown_delay", "{e}");
    assert!(e.reason.contains("at most 5m"), "{e}");
}

#[test]
fn the_store_section_loads_without_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let url = secret_file(&dir, "url", "postgres://u:pw@127.0.0.1:5432/db");
    // A collection whose secret variable is unset, and an unknown field
    // elsewhere: neither matters to the store section alone.
    let text = format!(
        "[store]\ndatabase_url_file = \"{url}\"\npool_size = 3\n[server]\nnonsense = 1\n\
         [collections.o]\nsource = {{ kind = \"oauth2_client_credentials\", token_url = \"https://x.example/t\", \
         client_id = \"i\", client_secret_env = \"TB_TEST_SURELY_UNSET_SECRET\" }}\n"
    );
    assert!(Config::parse(&text).is_err());
    let store = parse_store(&text).unwrap().unwrap();
    assert_eq!(store.pool_size, 3);
    assert!(parse_store("[collections.a]\n").unwrap().is_none());
    let e = parse_store(&format!(
        "[store]\ndatabase_url_file = \"{url}\"\npool_size = 0\n"
    ))
    .unwrap_err();
    assert_eq!(e.field, "store.pool_size", "{e}");
    let e = parse_store(&format!(
        "[store]\ndatabase_url_file = \"{url}\"\nconnect_timeout = \"5s\"\nstartup_timeout = \"2s\"\n"
    ))
    .unwrap_err();
    assert_eq!(e.field, "store.startup_timeout", "{e}");
    assert_eq!(store.startup_timeout, Duration::from_secs(20));
    let e = parse_store("[store]\nbogus = 1\n").unwrap_err();
    assert_eq!(e.field, "store.bogus", "{e}");
    let e = parse_store("[store]\n").unwrap_err();
    assert_eq!(e.field, "store.database_url_env", "{e}");
    assert_eq!(parse_store("not toml").unwrap_err().field, "config");
}

#[test]
fn errors_name_the_field() {
    let e = err("[collections.demo]\nsource = { kind = \"demo\", ttl = \"5x\" }\n");
    assert_eq!(e.field, "collections.demo.source.ttl", "{e}");
    let e = err(
        "[collections.demo]\nsource = { kind = \"demo\" }\n[collections.demo.policy]\nrefresh_fractio = 0.5\n",
    );
    assert_eq!(e.field, "collections.demo.policy.refresh_fractio", "{e}");
    assert!(e.reason.contains("unknown field"), "{e}");
    let e = err(
        "[collections.demo]\nsource = { kind = \"demo\" }\n[collections.demo.policy]\nrefresh_fraction = 1.5\n",
    );
    assert_eq!(e.field, "collections.demo.policy.refresh_fraction");
    let e = err("[collections.\"bad name\"]\nsource = { kind = \"demo\" }\n");
    assert!(e.field.starts_with("collections."), "{e}");
    let e = err("[collections.x]\nsource = { kind = \"nope\" }\n");
    assert_eq!(e.field, "collections.x.source.kind", "{e}");
    let e = err("[collections.x]\nsource = { kind = \"demo\", secret = \"s\" }\n");
    assert_eq!(e.field, "collections.x.source.secret", "{e}");
    assert!(e.reason.contains("unknown field `secret`"), "{e}");
    let e =
        err("[server]\nlisten = \"0.0.0.0:x\"\n[collections.x]\nsource = { kind = \"demo\" }\n");
    assert_eq!(e.field, "server.listen", "{e}");
    let e = err("[server]\n");
    assert_eq!(e.field, "collections");
    let e = err("this is not toml");
    assert_eq!(e.field, "config");
}

#[test]
fn names_are_checked() {
    assert!(CollectionName::parse("overdrive-main.v1_x").is_ok());
    assert!(CollectionName::parse("").is_err());
    assert!(CollectionName::parse("a/b").is_err());
    assert!(CollectionName::parse(&"a".repeat(128)).is_ok());
    assert!(CollectionName::parse(&"a".repeat(129)).is_err());
}

/// A secret file in a temp dir, so no test touches the environment.
fn secret_file(dir: &tempfile::TempDir, name: &str, value: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, format!("{value}\n")).unwrap();
    p.display().to_string()
}

#[test]
fn every_source_kind_parses() {
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_file(&dir, "secret", "s3cret");
    let rt = secret_file(&dir, "rt", "seed-rt");
    let text = format!(
        r#"
[http]
timeout = "3s"
max_response_bytes = 4096

[collections.od-oauth.source]
kind = "oauth2_client_credentials"
token_url = "https://login.example.com/token"
client_id = "id"
client_secret_file = "{secret}"
scope = "a b"
client_auth = "body"

[collections.mail.source]
kind = "oauth2_refresh_token"
token_url = "https://login.example.com/token"
client_id = "public"
refresh_token_file = "{rt}"

[collections.od-main.source]
kind = "overdrive"
oauth = "od-oauth"
library_id = 4425
advantage_account_id = "12"

[collections.api.source]
kind = "http_json"
url = "https://api.example.com/session"
headers = {{ "X-Api-Key" = {{ file = "{secret}" }}, Accept = "application/json" }}
json = {{ user = "svc", password = {{ file = "{secret}" }}, opts = {{ ttl = 60 }} }}
bearer_from = "mail"
token_pointer = "/data/token"
expires_pointer = "/data/expires_at"
expires_format = "rfc3339"
"#
    );
    let c = Config::parse(&text).unwrap();
    assert_eq!(c.http.timeout, Duration::from_secs(3));
    assert_eq!(c.http.max_response_bytes, 4096);
    let by = |n: &str| &c.collections.iter().find(|c| c.name == n).unwrap().source;
    let SourceConfig::OAuth(o) = by("od-oauth") else {
        panic!()
    };
    assert_eq!(o.client_secret.as_ref().unwrap().expose(), "s3cret");
    assert_eq!(o.client_auth, ClientAuth::Body);
    assert_eq!(o.grant, Grant::ClientCredentials);
    let SourceConfig::OAuth(m) = by("mail") else {
        panic!()
    };
    assert!(m.client_secret.is_none());
    assert_eq!(
        m.grant,
        Grant::RefreshToken {
            seed: Secret::new("seed-rt")
        }
    );
    let SourceConfig::OverDrive(od) = by("od-main") else {
        panic!()
    };
    assert_eq!(od.library_id, "4425");
    assert_eq!(od.api_base.as_str(), "https://api.overdrive.com/");
    let SourceConfig::HttpJson(h) = by("api") else {
        panic!()
    };
    assert_eq!(h.method, reqwest::Method::POST);
    assert_eq!(h.expires_format, ExpiresFormat::Rfc3339);
    let Body::Json(JsonSpec::Object(fields)) = &h.body else {
        panic!()
    };
    assert!(
        fields
            .iter()
            .any(|(k, v)| k == "password" && matches!(v, JsonSpec::Secret(_)))
    );
    // The config's Debug output never holds a secret.
    assert!(!format!("{c:?}").contains("s3cret"));
    assert!(!format!("{c:?}").contains("seed-rt"));
}

#[test]
fn secrets_are_by_reference_and_must_resolve() {
    let base = |extra: &str| {
        format!(
            "[collections.o.source]\nkind = \"oauth2_client_credentials\"\ntoken_url = \"https://x.example/t\"\nclient_id = \"id\"\n{extra}"
        )
    };
    let e = err(&base(""));
    assert_eq!(e.field, "collections.o.source.client_secret_env", "{e}");
    let e = err(&base("client_secret = \"inline\"\n"));
    assert_eq!(e.field, "collections.o.source.client_secret", "{e}");
    assert!(e.reason.contains("unknown field"), "{e}");
    let e = err(&base(
        "client_secret_env = \"TOKEN_BROKER_TEST_SURELY_UNSET\"\n",
    ));
    assert_eq!(e.field, "collections.o.source.client_secret_env", "{e}");
    assert!(
        e.reason
            .contains("TOKEN_BROKER_TEST_SURELY_UNSET is not set"),
        "{e}"
    );
    let e = err(&base("client_secret_file = \"/nonexistent/secret\"\n"));
    assert_eq!(e.field, "collections.o.source.client_secret_file", "{e}");
    let e = err(&base(
        "client_secret_file = \"/x\"\nclient_secret_env = \"Y\"\n",
    ));
    assert!(e.reason.contains("only one"), "{e}");
    let e = err(&base("client_secret_env = \"PATH\"\n").replace("https://x.example/t", "ftp://x"));
    assert_eq!(e.field, "collections.o.source.token_url", "{e}");
}

#[test]
fn dependencies_must_exist_and_not_cycle() {
    let od = |name: &str, oauth: &str| {
        format!(
            "[collections.{name}.source]\nkind = \"overdrive\"\noauth = \"{oauth}\"\nlibrary_id = \"1\"\n"
        )
    };
    let e = err(&od("a", "nope"));
    assert_eq!(e.field, "collections.a.source.oauth", "{e}");
    assert!(e.reason.contains("unknown collection \"nope\""), "{e}");
    let e = err(&od("a", "a"));
    assert_eq!(e.field, "collections.a.source.oauth", "{e}");
    assert!(e.reason.contains("a -> a"), "{e}");
    let json = "[collections.c.source]\nkind = \"http_json\"\nurl = \"https://x.example/\"\nbearer_from = \"a\"\n";
    let e = err(&format!("{}{}{json}", od("a", "b"), od("b", "c")));
    assert!(
        e.reason.contains("dependency cycle: a -> b -> c -> a"),
        "{e}"
    );
    // A chain without a cycle is fine.
    let ok = format!("{}[collections.b.source]\nkind = \"demo\"\n", od("a", "b"));
    assert!(Config::parse(&ok).is_ok());
}

#[test]
fn http_section_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bad = secret_file(&dir, "ca.pem", "not a certificate");
    let demo = "[collections.d.source]\nkind = \"demo\"\n";
    let e = err(&format!("[http]\nca_file = \"{bad}\"\n{demo}"));
    assert_eq!(e.field, "http.ca_file", "{e}");
    let e = err(&format!("[http]\nca_file = \"/nonexistent.pem\"\n{demo}"));
    assert_eq!(e.field, "http.ca_file", "{e}");
    let e = err(&format!("[http]\nmax_response_bytes = 10\n{demo}"));
    assert_eq!(e.field, "http.max_response_bytes", "{e}");
    let e = err(&format!("[http]\nproxy = \"x\"\n{demo}"));
    assert_eq!(e.field, "http.proxy", "{e}");
}

#[test]
fn store_section_is_checked_and_secrets_stay_out_of_errors() {
    let dir = tempfile::tempdir().unwrap();
    let demo = "[collections.d.source]\nkind = \"demo\"\n";
    let password = "pw-4f1c9a77";
    let url = secret_file(
        &dir,
        "url",
        &format!("postgres://tb:{password}@db.internal:5432/tokens"),
    );
    let key = format!(
        "k2:{}\nk1:{}",
        "A".repeat(43) + "=",
        "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
    );
    let key_file = secret_file(&dir, "key", &key);
    let ok = Config::parse(&format!(
        "[store]\ndatabase_url_file = \"{url}\"\nencryption_key_file = \"{key_file}\"\npool_size = 3\n{demo}"
    ))
    .unwrap();
    let store = ok.store.as_ref().unwrap();
    assert_eq!(store.pool_size, 3);
    assert_eq!(store.keyring.current_id(), Some("k2"));
    assert!(store.migrate);
    let debug = format!("{ok:?}");
    assert!(
        !debug.contains(password) && !debug.contains(&"A".repeat(43)),
        "{debug}"
    );
    assert!(Config::parse(demo).unwrap().store.is_none());

    let e = err(&format!("[store]\npool_size = 2\n{demo}"));
    assert_eq!(e.field, "store.database_url_env", "{e}");
    let not_pg = secret_file(&dir, "bad-url", &format!("mysql://root:{password}@x/db"));
    let e = err(&format!(
        "[store]\ndatabase_url_file = \"{not_pg}\"\n{demo}"
    ));
    assert_eq!(e.field, "store.database_url", "{e}");
    assert!(!e.to_string().contains(password), "{e}");
    // The listener's own URL: optional, checked like the pool's.
    assert!(store.listener_url.is_none());
    let direct = secret_file(
        &dir,
        "direct",
        &format!("postgres://u:{password}@pg:5432/db"),
    );
    let ok = Config::parse(&format!(
        "[store]\ndatabase_url_file = \"{url}\"\nlistener_url_file = \"{direct}\"\n{demo}"
    ))
    .unwrap();
    let listener = ok.store.as_ref().unwrap().listener_url.as_ref().unwrap();
    assert!(listener.expose().ends_with("@pg:5432/db"));
    let e = err(&format!(
        "[store]\ndatabase_url_file = \"{url}\"\nlistener_url_file = \"{not_pg}\"\n{demo}"
    ));
    assert_eq!(e.field, "store.listener_url", "{e}");
    assert!(!e.to_string().contains(password), "{e}");
    let short = secret_file(&dir, "short-key", "k1:AAAA");
    let e = err(&format!(
        "[store]\ndatabase_url_file = \"{url}\"\nencryption_key_file = \"{short}\"\n{demo}"
    ));
    assert_eq!(e.field, "store.encryption_key_file", "{e}");
    assert!(e.reason.contains("32 bytes"), "{e}");
    let e = err(&format!(
        "[store]\ndatabase_url_file = \"{url}\"\npool_size = 0\n{demo}"
    ));
    assert_eq!(e.field, "store.pool_size", "{e}");
    let e = err(&format!(
        "[store]\ndatabase_url_file = \"{url}\"\nheartbeat_interval = \"1ms\"\n{demo}"
    ));
    assert_eq!(e.field, "store.heartbeat_interval", "{e}");
    let e = err(&format!("[store]\ndatabase_url = \"postgres://x\"\n{demo}"));
    assert_eq!(
        e.field, "store.database_url",
        "inline URLs are refused: {e}"
    );
}

#[test]
fn broker_sources_are_checked_naming_the_field() {
    use crate::grpc::remote::RemoteAddr;
    let broker =
        |fields: &str| format!("[collections.api]\nsource = {{ kind = \"broker\", {fields} }}\n");
    // Defaults: the remote name is the collection's own; loopback http and
    // Unix sockets need no TLS.
    let c = Config::parse(&broker(
        r#"addrs = ["http://127.0.0.1:7443", "http://localhost:7443", "unix:/run/tb.sock"]"#,
    ))
    .unwrap();
    let SourceConfig::Broker(spec) = &c.collections[0].source else {
        panic!("not a broker source")
    };
    assert_eq!(spec.collection, "api");
    assert_eq!(spec.connect_timeout, Duration::from_secs(2));
    assert_eq!(
        spec.addrs[2],
        RemoteAddr::Unix(std::path::PathBuf::from("/run/tb.sock"))
    );

    let cases = [
        ("addrs = []", "collections.api.source.addrs"),
        (
            r#"addrs = ["ftp://127.0.0.1:1"]"#,
            "collections.api.source.addrs[0]",
        ),
        (
            r#"addrs = ["unix:relative.sock"]"#,
            "collections.api.source.addrs[0]",
        ),
        (
            r#"addrs = ["https://b:7443/path"]"#,
            "collections.api.source.addrs[0]",
        ),
        // Tokens in clear across the network: refused without `insecure`.
        (
            r#"addrs = ["unix:/x.sock", "http://10.0.0.7:7443"]"#,
            "collections.api.source.addrs[1]",
        ),
        (
            r#"addrs = ["https://b:7443"]"#,
            "collections.api.source.ca_file",
        ),
        (
            r#"addrs = ["http://127.0.0.1:1"], ca_file = "/nonexistent/ca.crt""#,
            "collections.api.source.ca_file",
        ),
        (
            r#"addrs = ["127.0.0.1:1"], collection = "bad name""#,
            "collections.api.source.addrs[0]",
        ),
        (
            r#"addrs = ["unix:/x.sock"], collection = "bad name""#,
            "collections.api.source.collection",
        ),
        (
            r#"addrs = ["unix:/x.sock"], connect_timeout = "1ms""#,
            "collections.api.source.connect_timeout",
        ),
    ];
    for (fields, field) in cases {
        let e = err(&broker(fields));
        assert_eq!(e.field, field, "{fields}: {e}");
    }
    // TLS files are checked as a connection uses them: a CA bundle that
    // parses, a key that is the certificate's.
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let a = rcgen::generate_simple_self_signed(vec!["a.example".to_owned()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["b.example".to_owned()]).unwrap();
    let ca = write("ca.crt", &a.cert.pem());
    let cert = write("tls.crt", &a.cert.pem());
    let key = write("tls.key", &a.signing_key.serialize_pem());
    let other_key = write("other.key", &b.signing_key.serialize_pem());
    let garbage = write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64\n");
    let tls = |ca: &str, cert: &str, key: &str| {
        broker(&format!(
            r#"addrs = ["https://b:7443"], ca_file = "{ca}", cert_file = "{cert}", key_file = "{key}""#
        ))
    };
    Config::parse(&tls(&ca, &cert, &key)).unwrap();
    for (text, field) in [
        (tls(&garbage, &cert, &key), "collections.api.source.ca_file"),
        (tls(&ca, &garbage, &key), "collections.api.source.cert_file"),
        (
            tls(&ca, &cert, &other_key),
            "collections.api.source.key_file",
        ),
        (tls(&ca, &cert, &garbage), "collections.api.source.key_file"),
    ] {
        let e = err(&text);
        assert_eq!(e.field, field, "{e}");
        assert!(!e.reason.contains("BEGIN"), "a file's content in {e}");
    }

    // `insecure = true` allows http to another host.
    Config::parse(&broker(
        r#"addrs = ["http://10.0.0.7:7443"], insecure = true"#,
    ))
    .unwrap();
}
