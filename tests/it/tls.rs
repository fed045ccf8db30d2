//! TLS on the token API (client certificates, rotation without a restart, a
//! bad rotation kept out), caller identities (certificate SANs, Unix peer
//! credentials) and per-collection `readers` (PERMISSION_DENIED that tells
//! nothing of a collection's existence; health and reflection stay open),
//! and the config errors around them from the real binary.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::{Duration, Instant};

use token_broker::config::Config;
use token_broker::grpc::pb::token_broker_client::TokenBrokerClient;
use token_broker::grpc::pb::{self, InvalidateTokenRequest, WatchTokenRequest};
use token_broker::listen::{ListenAddr, Listener};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::support::TestServer;
use crate::support::pki::{Ca, Leaf, TlsDir};

const BIN: &str = env!("CARGO_BIN_EXE_token-broker");
const WEB: &str = "spiffe://cluster.local/ns/app/sa/web";
const OTHER: &str = "spiffe://cluster.local/ns/app/sa/other";
const DENIED: &str = "the caller is not permitted to read this collection";

/// `[server]` on 127.0.0.1:0 with `tls`'s files, and `collections`.
fn config(tls: &TlsDir, tls_extra: &str, collections: &str) -> Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}\n{collections}",
        tls.toml(tls_extra)
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

async fn start(config: &Config) -> (TestServer, SocketAddr) {
    let listener = Listener::bind(&config.server.listen).await.unwrap();
    let server = TestServer::from_config(config, listener).await;
    let ListenAddr::Tcp(addr) = server.addr else {
        panic!("tcp expected")
    };
    (server, addr)
}

/// A new TLS connection trusting only `trust`, presenting `identity`.
async fn connect(
    addr: SocketAddr,
    trust: &Ca,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(trust.pem()))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn get(channel: &Channel, collection: &str) -> Result<pb::Token, tonic::Status> {
    crate::support::get(
        &mut TokenBrokerClient::new(channel.clone()),
        collection,
        Duration::from_secs(5),
    )
    .await
}

/// A new connection trusting only `trust` that gets a token, or why not.
async fn fresh_get(addr: SocketAddr, trust: &Ca, identity: &Leaf) -> Result<pb::Token, String> {
    let channel = connect(addr, trust, Some(identity))
        .await
        .map_err(|e| format!("{e:?}"))?;
    get(&channel, "open").await.map_err(|s| format!("{s:?}"))
}

fn metric(server: &TestServer, series: &str) -> u64 {
    let text = server.broker.metrics().encode();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

const OPEN: &str = "[collections.open]\nsource = { kind = \"demo\" }\n";

#[tokio::test]
async fn tls_round_trip_with_a_client_certificate_and_none_without_one() {
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    let dir = TlsDir::new(&server_ca.server(), &client_ca);
    let (server, addr) = start(&config(&dir, "", OPEN)).await;
    let web = client_ca.client(&[WEB], &[]);

    let channel = connect(addr, &server_ca, Some(&web)).await.unwrap();
    assert_eq!(get(&channel, "open").await.unwrap().collection, "open");

    // client_cert = "required" (the default with a CA): no certificate, no call.
    let refused = match connect(addr, &server_ca, None).await {
        Err(e) => format!("{e:?}"),
        Ok(channel) => format!("{:?}", get(&channel, "open").await.unwrap_err()),
    };
    assert!(refused.contains("CertificateRequired"), "{refused}");
    // A certificate from another CA is refused too.
    let stranger = Ca::new("stranger").client(&[WEB], &[]);
    assert!(fresh_get(addr, &server_ca, &stranger).await.is_err());
    // The server is not plain TCP.
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plain {
        assert!(get(&channel, "open").await.is_err());
    }
    server.stop(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_silent_client_does_not_hold_up_other_handshakes() {
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    let dir = TlsDir::new(&server_ca.server(), &client_ca);
    let (server, addr) = start(&config(&dir, "", OPEN)).await;
    // Connected, and never says a word (the handshake would wait for it).
    let silent: Vec<_> = silent_connections(addr, 3).await;
    let web = client_ca.client(&[WEB], &[]);
    let started = Instant::now();
    fresh_get(addr, &server_ca, &web).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
    server.stop(Duration::from_secs(10)).await;
}

async fn silent_connections(addr: SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Let the server accept them before the real client comes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    v
}

#[tokio::test]
async fn client_cert_optional_lets_an_anonymous_caller_in() {
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    let dir = TlsDir::new(&server_ca.server(), &client_ca);
    let collections = format!(
        "{OPEN}[collections.secret]\nsource = {{ kind = \"demo\" }}\nreaders = [\"{WEB}\"]\n"
    );
    let (server, addr) = start(&config(&dir, "client_cert = \"optional\"", &collections)).await;
    let anonymous = connect(addr, &server_ca, None).await.unwrap();
    assert!(get(&anonymous, "open").await.is_ok());
    let status = get(&anonymous, "secret").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let web = connect(addr, &server_ca, Some(&client_ca.client(&[WEB], &[])))
        .await
        .unwrap();
    assert!(get(&web, "secret").await.is_ok());
    server.stop(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart_and_a_bad_one_is_kept_out() {
    let (ca_v1, ca_v2, client_ca) = (Ca::new("v1"), Ca::new("v2"), Ca::new("clients"));
    let mut dir = TlsDir::new(&ca_v1.server(), &client_ca);
    let (server, addr) = start(&config(&dir, "reload_interval = \"100ms\"", OPEN)).await;
    let web = client_ca.client(&[WEB], &[]);
    let old = connect(addr, &ca_v1, Some(&web)).await.unwrap();
    get(&old, "open").await.unwrap();
    assert!(
        fresh_get(addr, &ca_v2, &web).await.is_err(),
        "v2 before rotation"
    );

    // Rotate to a certificate from a new CA, by symlink swap.
    let v2 = ca_v2.server();
    dir.write(&v2.cert, &v2.key, &client_ca.pem());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fresh_get(addr, &ca_v2, &web).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "v2 never served: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fresh_get(addr, &ca_v1, &web).await.is_err(),
        "v1 still served"
    );
    // The connection made before the rotation keeps working.
    get(&old, "open").await.unwrap();
    assert_eq!(
        metric(&server, "token_broker_tls_reloads_total{outcome=\"ok\"}"),
        1
    );

    // A broken rotation: the last good material stays, the failure is
    // counted once (not at every check).
    dir.write("not a certificate", &v2.key, &client_ca.pem());
    tokio::time::sleep(Duration::from_millis(800)).await;
    fresh_get(addr, &ca_v2, &web).await.unwrap();
    get(&old, "open").await.unwrap();
    assert_eq!(
        metric(
            &server,
            "token_broker_tls_reloads_total{outcome=\"failed\"}"
        ),
        1
    );
    assert_eq!(
        metric(&server, "token_broker_tls_reloads_total{outcome=\"ok\"}"),
        1
    );

    // A key that does not match its certificate is kept out the same way.
    let v3 = ca_v1.server();
    dir.write(&v3.cert, &v2.key, &client_ca.pem());
    tokio::time::sleep(Duration::from_millis(800)).await;
    fresh_get(addr, &ca_v2, &web).await.unwrap();
    assert_eq!(
        metric(
            &server,
            "token_broker_tls_reloads_total{outcome=\"failed\"}"
        ),
        2
    );
    server.stop(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn readers_refuse_other_identities_over_tls_without_telling_what_exists() {
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    let dir = TlsDir::new(&server_ca.server(), &client_ca);
    let collections = format!(
        "{OPEN}[collections.secret]\nsource = {{ kind = \"demo\" }}\nreaders = [\"{WEB}\", \"dns:leaf.example\"]\n"
    );
    let (server, addr) = start(&config(&dir, "", &collections)).await;

    let web = connect(addr, &server_ca, Some(&client_ca.client(&[WEB], &[])))
        .await
        .unwrap();
    let token = get(&web, "secret").await.unwrap();
    assert_eq!(token.collection, "secret");
    // A DNS SAN is an identity too (`dns:<name>`).
    let leaf = connect(
        addr,
        &server_ca,
        Some(&client_ca.client(&[], &["leaf.example"])),
    )
    .await
    .unwrap();
    get(&leaf, "secret").await.unwrap();

    let other = connect(
        addr,
        &server_ca,
        Some(&client_ca.client(&[OTHER], &["other.example"])),
    )
    .await
    .unwrap();
    let mut client = TokenBrokerClient::new(other.clone());
    let refused = get(&other, "secret").await.unwrap_err();
    let unknown = get(&other, "no-such-collection").await.unwrap_err();
    for status in [&refused, &unknown] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert_eq!(status.message(), DENIED);
        assert!(!status.message().contains(&token.value));
    }
    let invalidate = client
        .invalidate_token(InvalidateTokenRequest {
            collection: "secret".into(),
            version: token.version,
            value: String::new(),
            reason: "401".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(invalidate.code(), Code::PermissionDenied, "{invalidate:?}");
    let watch = client
        .watch_token(WatchTokenRequest {
            collection: "secret".into(),
            after_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(watch.code(), Code::PermissionDenied, "{watch:?}");
    assert_eq!(watch.message(), DENIED);
    // An unprotected collection stays open to the same caller.
    get(&other, "open").await.unwrap();

    let refusals = |rpc: &str| {
        metric(
            &server,
            &format!("token_broker_authz_refusals_total{{rpc=\"{rpc}\"}}"),
        )
    };
    assert_eq!(refusals("GetCollectionToken"), 2);
    assert_eq!(refusals("InvalidateToken"), 1);
    assert_eq!(refusals("WatchToken"), 1);

    // Health and reflection answer the refused caller.
    let health = HealthClient::new(other.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
    assert!(
        reflection_lists(other)
            .await
            .contains(&"token_broker.v1.TokenBroker".to_owned())
    );
    server.stop(Duration::from_secs(10)).await;
}

async fn reflection_lists(channel: Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    match stream.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn readers_over_a_unix_socket_are_the_peer_uid_and_gid() {
    let dir = tempfile::tempdir().unwrap();
    let mine = std::fs::metadata(dir.path()).unwrap();
    let (uid, gid) = (mine.uid(), mine.gid());
    let sock = dir.path().join("tb.sock");
    let text = format!(
        "[server]\nlisten = \"unix:{}\"\n{OPEN}\
         [collections.theirs]\nsource = {{ kind = \"demo\" }}\nreaders = [\"uid:{}\"]\n\
         [collections.mine]\nsource = {{ kind = \"demo\" }}\nreaders = [\"uid:{uid}\"]\n\
         [collections.group]\nsource = {{ kind = \"demo\" }}\nreaders = [\"gid:{gid}\"]\n",
        sock.display(),
        uid + 1,
    );
    let config = Config::parse(&text).unwrap();
    let listener = Listener::bind(&config.server.listen).await.unwrap();
    let server = TestServer::from_config(&config, listener).await;
    let mut client = server.client().await;
    let t = Duration::from_secs(5);
    let status = crate::support::get(&mut client, "theirs", t)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), DENIED);
    crate::support::get(&mut client, "mine", t).await.unwrap();
    crate::support::get(&mut client, "group", t).await.unwrap();
    crate::support::get(&mut client, "open", t).await.unwrap();
    assert_eq!(
        metric(
            &server,
            "token_broker_authz_refusals_total{rpc=\"GetCollectionToken\"}"
        ),
        1
    );
    drop(client);
    server.stop(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn plain_tcp_is_anonymous_to_readers() {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{OPEN}\
         [collections.secret]\nsource = {{ kind = \"demo\" }}\nreaders = [\"{WEB}\", \"uid:0\"]\n"
    );
    let config = Config::parse(&text).unwrap();
    let listener = Listener::bind(&config.server.listen).await.unwrap();
    let server = TestServer::from_config(&config, listener).await;
    let mut client = server.client().await;
    let t = Duration::from_secs(5);
    let status = crate::support::get(&mut client, "secret", t)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    crate::support::get(&mut client, "open", t).await.unwrap();
    server.stop(Duration::from_secs(10)).await;
}

fn check_config(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn plain_tcp_on_a_reachable_address_needs_tls_or_insecure() {
    let (code, out) = check_config(&format!("[server]\nlisten = \"0.0.0.0:7443\"\n{OPEN}"));
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("config error: server.listen: plain TCP on 0.0.0.0:7443"),
        "{out}"
    );
    let (code, out) = check_config(&format!("[server]\nlisten = \"[::]:7443\"\n{OPEN}"));
    assert_eq!(code, Some(64), "{out}");

    let (code, out) = check_config(&format!(
        "[server]\nlisten = \"0.0.0.0:7443\"\ninsecure = true\n{OPEN}"
    ));
    assert_eq!(code, Some(0), "{out}");
    for fine in ["127.0.0.1:7443", "[::1]:7443", "unix:/tmp/x.sock"] {
        let (code, out) = check_config(&format!("[server]\nlisten = \"{fine}\"\n{OPEN}"));
        assert_eq!(code, Some(0), "{fine}: {out}");
    }

    // The same rule when the address comes from the flag, naming it.
    // Spawned, not `output()`: were the check missing, it would serve forever.
    let mut child = Command::new(BIN)
        .args(["serve", "--dev", "--no-admin", "--listen", "0.0.0.0:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve --listen 0.0.0.0:0 started instead of failing");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("config error: --listen: plain TCP on 0.0.0.0:0"),
        "{err}"
    );
}

#[test]
fn tls_and_readers_config_errors_name_the_field() {
    let ca = Ca::new("ca");
    let dir = TlsDir::new(&ca.server(), &ca);
    let server = |tls: &str| format!("[server]\nlisten = \"0.0.0.0:7443\"\n{tls}\n{OPEN}");

    // Good TLS makes a reachable address fine.
    let (code, out) = check_config(&server(&dir.toml("")));
    assert_eq!(code, Some(0), "{out}");

    let missing = format!(
        "[server.tls]\ncert_file = \"/nonexistent/tls.crt\"\nkey_file = {:?}\n",
        dir.path("tls.key")
    );
    let (code, out) = check_config(&server(&missing));
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("config error: server.tls.cert_file: cannot read /nonexistent/tls.crt"),
        "{out}"
    );

    let other_key = Ca::new("other").server().key;
    let keydir = tempfile::tempdir().unwrap();
    let key = keydir.path().join("other.key");
    std::fs::write(&key, &other_key).unwrap();
    let mismatched = format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {key:?}\n",
        dir.path("tls.crt")
    );
    let (code, out) = check_config(&server(&mismatched));
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("config error: server.tls.key_file: "), "{out}");
    assert!(out.contains("does not match"), "{out}");
    assert!(
        !out.contains(other_key.lines().nth(1).unwrap()),
        "key material in {out}"
    );

    let bad_ca = format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
        dir.path("tls.crt"),
        dir.path("tls.key"),
        key
    );
    let (code, out) = check_config(&server(&bad_ca));
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("config error: server.tls.client_ca_file: "),
        "{out}"
    );

    let (code, out) = check_config(&format!(
        "{OPEN}[collections.secret]\nsource = {{ kind = \"demo\" }}\nreaders = []\n"
    ));
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("config error: collections.secret.readers: must not be empty"),
        "{out}"
    );
    let (code, out) = check_config(&format!(
        "{OPEN}[collections.secret]\nsource = {{ kind = \"demo\" }}\nreaders = [\"web\"]\n"
    ));
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("config error: collections.secret.readers: \"web\" is not an identity"),
        "{out}"
    );
}

/// The client subcommands speak TLS: `get` and `wait` with `--ca-file`,
/// `--cert-file`, `--key-file` and `--server-name` reach a broker that
/// requires a client certificate and has `readers`; without `--ca-file` (plain
/// TCP) or without a certificate they fail; TLS to a Unix socket and a
/// certificate without its key are usage errors (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_commands_speak_tls() {
    let (server_ca, client_ca) = (Ca::new("server ca"), Ca::new("client ca"));
    let dir = TlsDir::new(&server_ca.server(), &client_ca);
    let collections =
        format!("[collections.secret]\nsource = {{ kind = \"demo\" }}\nreaders = [\"{WEB}\"]\n");
    let (server, addr) = start(&config(&dir, "", &collections)).await;
    // The client's own files: its certificate (WEB) and the server's CA.
    let mine = TlsDir::new(&client_ca.client(&[WEB], &[]), &server_ca);
    let path = |name: &str| mine.path(name).display().to_string();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || Command::new(BIN).args(&args).output().unwrap())
    };
    let tls = |cert: bool| {
        let mut a = vec![
            "--addr".to_owned(),
            addr.to_string(),
            "--ca-file".to_owned(),
            path("ca.crt"),
            "--server-name".to_owned(),
            "localhost".to_owned(),
        ];
        if cert {
            a.extend([
                "--cert-file".to_owned(),
                path("tls.crt"),
                "--key-file".to_owned(),
                path("tls.key"),
            ]);
        }
        a
    };

    let mut args = vec!["get".to_owned(), "secret".to_owned()];
    args.extend(tls(true));
    let out = run(args).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("collection: secret"), "{stdout}");

    let mut args = vec!["wait".to_owned(), "--timeout".to_owned(), "10s".to_owned()];
    args.extend(tls(true));
    let out = run(args).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Plain TCP to the TLS port, and TLS without a client certificate: no token.
    let plain = run(vec![
        "get".into(),
        "secret".into(),
        "--addr".into(),
        addr.to_string(),
        "--timeout".into(),
        "3s".into(),
    ])
    .await
    .unwrap();
    assert_eq!(plain.status.code(), Some(1), "plain TCP got an answer");
    let mut args = vec!["get".to_owned(), "secret".to_owned()];
    args.extend(tls(false));
    let anonymous = run(args).await.unwrap();
    assert_eq!(
        anonymous.status.code(),
        Some(1),
        "no certificate got an answer"
    );

    // Usage errors.
    let unix = run(vec![
        "get".into(),
        "secret".into(),
        "--addr".into(),
        "unix:/tmp/x.sock".into(),
        "--ca-file".into(),
        path("ca.crt"),
    ])
    .await
    .unwrap();
    assert_eq!(unix.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unix.stderr).contains("--ca-file"));
    let no_key = run(vec![
        "get".into(),
        "secret".into(),
        "--ca-file".into(),
        path("ca.crt"),
        "--cert-file".into(),
        path("tls.crt"),
    ])
    .await
    .unwrap();
    assert_eq!(no_key.status.code(), Some(2));
    server.stop(Duration::from_secs(10)).await;
}
