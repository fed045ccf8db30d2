//! The recorded history of a chaos run and the checker that judges it.
//!
//! Everything here is plain data: the driver (`run.rs`) and the scripted
//! upstream (`upstream.rs`) fill a [`History`]; [`check`] is a pure function
//! over it, so each rule is proven on small hand-made histories below.
//! Times are Unix milliseconds on the test process's clock (the sidecars'
//! clocks, one of which may be offset, play no part). Token values and refresh
//! tokens appear only as hashes ([`hash`]).
//!
//! The rules (each names the first violation, in time order):
//! - `expired`: a token was received at or after its `expires_at` (a `Get` is
//!   judged by when it was sent, a watch message by when it arrived, less
//!   [`WATCH_SLACK_MS`]);
//! - `two-values`: one (collection, version) carried two values anywhere in
//!   the fleet;
//! - `watch-order`: a watch stream's versions did not strictly increase;
//! - `watch-flood`: a watcher (all its streams) got more messages than the
//!   distinct values the fleet served for its collection, plus one per stream;
//! - `failed-read`: a read failed on a sidecar that had been running for
//!   [`GRACE_MS`] and kept running, while a token with [`MARGIN_MS`] of life
//!   left was servable: anywhere in the fleet, or, while the database was down
//!   (plus [`OUTAGE_TAIL_MS`]), on that sidecar itself; "servable" means the
//!   newest version received there so far (an older one that a newer version
//!   replaced is no longer held, even if it would still be valid);
//! - `upstream-calls`: a collection's upstream saw more calls than distinct
//!   values served + injected failures + 1 per holder killed with a call in
//!   flight + 1 per sidecar per database outage (plus 1 per sidecar per
//!   refresh interval, 40% of the shortest lifetime, it lasted) + the run's
//!   documented extras
//!   (key rotation steps, rollbacks) + 1 (a token issued as the run ended);
//! - `stall`: a collection had no servable token anywhere (no token received
//!   by any client that had not yet expired), reads failed meanwhile on
//!   running sidecars, and neither an upstream fault (an injected failure or
//!   `invalid_grant`) nor a database outage within [`STALL_EXCUSE_MS`] before
//!   or during the gap explains it. A killed lease holder does not: the
//!   refresh schedule must leave room for a takeover;
//! - `refresh-reuse`: a spent refresh token was presented again, other than
//!   once after its spender was killed holding the answer uncommitted (in
//!   flight, or within [`ORPHAN_MS`] of database availability after the
//!   answer: [`killed_holding`]); an excused reuse that got a new token is the
//!   spender from then on (so two holders killed in a row excuse two reuses).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use sha2::{Digest, Sha256};

/// Unix time in milliseconds.
pub type Ms = i64;

/// A restarted sidecar is not judged for this long after its start.
pub const GRACE_MS: Ms = 5_000;
/// A token counts as servable only with this much life left.
pub const MARGIN_MS: Ms = 500;
/// A watch message may arrive this long after the server checked its expiry.
pub const WATCH_SLACK_MS: Ms = 250;
/// After a database outage ends, reads are judged by the outage rule this
/// much longer (reconnect and resync).
pub const OUTAGE_TAIL_MS: Ms = 5_000;
/// How long before a lapse an upstream fault or a database outage still
/// explains it.
pub const STALL_EXCUSE_MS: Ms = 10_000;
/// A call whose sidecar was killed this soon after its answer arrived (or
/// while it was in flight), counting only time the database was reachable,
/// may not have committed what it got.
pub const ORPHAN_MS: Ms = 2_000;
/// After a database outage, a sidecar takes up to this long to reconnect.
pub const RECONNECT_MS: Ms = 1_000;
/// A call that reached the upstream this soon after its sidecar's kill was
/// stamped may have been sent before the signal landed.
pub const KILL_SLACK_MS: Ms = 200;

/// The first 16 hex digits of SHA-256: how values and refresh tokens appear.
pub fn hash(secret: &str) -> String {
    let d = Sha256::digest(secret.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

pub fn now_ms() -> Ms {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Ms)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub collection: String,
    pub version: u64,
    pub hash: String,
    pub expires_at: Ms,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    /// A `GetCollectionToken` sent at `sent`.
    Get { sent: Ms },
    /// A `WatchToken` message on `stream` of `watcher`.
    Watch { watcher: usize, stream: usize },
}

/// One token a client received.
#[derive(Clone, Debug)]
pub struct Received {
    pub sidecar: usize,
    pub token: Token,
    pub at: Ms,
    pub via: Via,
}

/// One read that failed.
#[derive(Clone, Debug)]
pub struct Failed {
    pub sidecar: usize,
    pub collection: String,
    pub code: String,
    pub sent: Ms,
    pub at: Ms,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A token was issued (its hash, lifetime in seconds).
    Issued { hash: String, expires_in: u64 },
    /// A fault the upstream injected (5xx, 429, hang): the fleet may retry.
    Injected(String),
    /// `invalid_grant` (a spent or unknown refresh token, or a revoked grant).
    InvalidGrant,
    /// Still in flight when the history was taken.
    Pending,
}

/// One upstream call.
#[derive(Clone, Debug)]
pub struct Call {
    pub collection: String,
    /// The sidecar that made it (from its client id), if known.
    pub sidecar: Option<usize>,
    pub grant: String,
    pub start: Ms,
    pub end: Option<Ms>,
    /// Hash of the refresh token presented.
    pub presented: Option<String>,
    /// Hash of the refresh token issued.
    pub issued_refresh: Option<String>,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub from: Ms,
    /// `None`: until the end of the run.
    pub to: Option<Ms>,
}

impl Window {
    fn contains(&self, from: Ms, to: Ms) -> bool {
        self.from <= from && self.to.is_none_or(|t| to <= t)
    }
    fn overlaps(&self, from: Ms, to: Ms, tail: Ms) -> bool {
        self.from <= to && self.to.is_none_or(|t| t + tail >= from)
    }
}

#[derive(Clone, Debug)]
pub struct Kill {
    pub sidecar: usize,
    pub at: Ms,
}

#[derive(Clone, Debug, Default)]
pub struct History {
    /// When the run began: violations are reported relative to it.
    pub start: Ms,
    /// When the clients stopped.
    pub end: Ms,
    pub sidecars: usize,
    pub received: Vec<Received>,
    pub failed: Vec<Failed>,
    pub calls: Vec<Call>,
    /// Per sidecar: when its process ran (start to kill or stop).
    pub up: Vec<Vec<Window>>,
    /// When the database was unreachable (cut, black hole, restart).
    pub outages: Vec<Window>,
    pub kills: Vec<Kill>,
    /// Upstream calls a documented event may cost, per collection (e.g. one
    /// per key rotation step: a row one pod cannot open costs one refetch).
    pub extra_calls: HashMap<String, usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub at: Ms,
    pub rule: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}] at +{:.1}s: {}",
            self.rule,
            self.at as f64 / 1000.0,
            self.detail
        )
    }
}

/// Every violation, earliest first (times relative to `h.start`, as are
/// the times in their details); empty when the history is clean.
pub fn check(h: &History) -> Vec<Violation> {
    let mut v = Vec::new();
    expired(h, &mut v);
    two_values(h, &mut v);
    watches(h, &mut v);
    failed_reads(h, &mut v);
    upstream_calls(h, &mut v);
    refresh_reuse(h, &mut v);
    stalls(h, &mut v);
    for x in &mut v {
        x.at -= h.start;
    }
    v.sort_by(|a, b| (a.at, a.rule).cmp(&(b.at, b.rule)));
    v
}

/// A one-paragraph verdict: PASS, or the first violation and counts per rule.
pub fn verdict(violations: &[Violation]) -> String {
    let Some(first) = violations.first() else {
        return "PASS: no violation".to_owned();
    };
    let mut per_rule: BTreeMap<&str, usize> = BTreeMap::new();
    for x in violations {
        *per_rule.entry(x.rule).or_default() += 1;
    }
    let mut s = format!(
        "FAIL: {} violation(s) {per_rule:?}\nfirst: {first}",
        violations.len()
    );
    for x in violations.iter().skip(1).take(9) {
        s.push_str(&format!("\n  then: {x}"));
    }
    // The first of each rule not shown yet.
    let shown: Vec<&str> = violations.iter().take(10).map(|x| x.rule).collect();
    for rule in per_rule.keys().filter(|r| !shown.contains(r)) {
        if let Some(x) = violations.iter().find(|x| x.rule == *rule) {
            s.push_str(&format!("\n  first {rule}: {x}"));
        }
    }
    s
}

/// `t` as seconds since the run's start.
fn rel(h: &History, t: Ms) -> String {
    format!("{:+.1}s", (t - h.start) as f64 / 1000.0)
}

/// Failed reads: how many, how many on running sidecars past their start-up
/// grace, and per code.
pub fn failed_summary(h: &History) -> String {
    let running: Vec<&Failed> = h.failed.iter().filter(|f| on_running(h, f)).collect();
    let mut codes: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &running {
        *codes.entry(&f.code).or_default() += 1;
    }
    format!(
        "{} failed reads, {} of them on running sidecars past their start-up grace {codes:?}",
        h.failed.len(),
        running.len()
    )
}

fn expired(h: &History, out: &mut Vec<Violation>) {
    for r in &h.received {
        let judged = match r.via {
            Via::Get { sent } => sent,
            Via::Watch { .. } => r.at - WATCH_SLACK_MS,
        };
        if judged >= r.token.expires_at {
            out.push(Violation {
                at: r.at,
                rule: "expired",
                detail: format!(
                    "sidecar {} served {} v{} ({}) {} ms after its expires_at, via {:?}",
                    r.sidecar,
                    r.token.collection,
                    r.token.version,
                    r.token.hash,
                    judged - r.token.expires_at,
                    r.via
                ),
            });
        }
    }
}

fn two_values(h: &History, out: &mut Vec<Violation>) {
    let mut first: HashMap<(&str, u64), &Received> = HashMap::new();
    let mut reported = HashSet::new();
    let mut by_time: Vec<&Received> = h.received.iter().collect();
    by_time.sort_by_key(|r| r.at);
    for r in by_time {
        let key = (r.token.collection.as_str(), r.token.version);
        let e = first.entry(key).or_insert(r);
        if e.token.hash != r.token.hash && reported.insert((key, r.token.hash.clone())) {
            out.push(Violation {
                at: r.at,
                rule: "two-values",
                detail: format!(
                    "{} v{} carried {} (sidecar {}) and {} (sidecar {})",
                    key.0, key.1, e.token.hash, e.sidecar, r.token.hash, r.sidecar
                ),
            });
        }
    }
}

/// Distinct values the fleet served per collection.
fn distinct_values(h: &History) -> HashMap<&str, usize> {
    let mut seen: HashMap<&str, HashSet<&str>> = HashMap::new();
    for r in &h.received {
        seen.entry(&r.token.collection)
            .or_default()
            .insert(&r.token.hash);
    }
    seen.into_iter().map(|(c, s)| (c, s.len())).collect()
}

fn watches(h: &History, out: &mut Vec<Violation>) {
    let mut streams: BTreeMap<(usize, usize), Vec<&Received>> = BTreeMap::new();
    for r in &h.received {
        if let Via::Watch { watcher, stream } = r.via {
            streams.entry((watcher, stream)).or_default().push(r);
        }
    }
    for ((watcher, stream), msgs) in &streams {
        for pair in msgs.windows(2) {
            if pair[1].token.version <= pair[0].token.version {
                out.push(Violation {
                    at: pair[1].at,
                    rule: "watch-order",
                    detail: format!(
                        "watcher {watcher} (sidecar {}) stream {stream}: {} v{} after v{}",
                        pair[1].sidecar,
                        pair[1].token.collection,
                        pair[1].token.version,
                        pair[0].token.version
                    ),
                });
                break;
            }
        }
    }
    let values = distinct_values(h);
    let mut per_watcher: BTreeMap<usize, (usize, HashSet<usize>, Option<&Received>)> =
        BTreeMap::new();
    for ((watcher, stream), msgs) in &streams {
        let e = per_watcher.entry(*watcher).or_default();
        e.0 += msgs.len();
        e.1.insert(*stream);
        e.2 = e.2.or(msgs.last().copied());
    }
    for (watcher, (count, streams, last)) in per_watcher {
        let Some(last) = last else { continue };
        let bound = values
            .get(last.token.collection.as_str())
            .copied()
            .unwrap_or(0)
            + streams.len();
        if count > bound {
            out.push(Violation {
                at: last.at,
                rule: "watch-flood",
                detail: format!(
                    "watcher {watcher} (sidecar {}, {}) got {count} messages on {} stream(s); \
                     the fleet served {} distinct values",
                    last.sidecar,
                    last.token.collection,
                    streams.len(),
                    bound - streams.len()
                ),
            });
        }
    }
}

fn failed_reads(h: &History, out: &mut Vec<Violation>) {
    for f in &h.failed {
        let Some(window) =
            h.up.get(f.sidecar)
                .and_then(|ws| ws.iter().find(|w| w.contains(f.sent, f.at)))
        else {
            continue;
        };
        if f.sent < window.from + GRACE_MS {
            continue;
        }
        let db_down = h
            .outages
            .iter()
            .any(|o| o.overlaps(f.sent, f.at, OUTAGE_TAIL_MS));
        // Where the read could have been served from: anywhere in the fleet,
        // or while the database is down only the sidecar itself.
        let reachable = |r: &&Received| {
            r.token.collection == f.collection
                && r.at <= f.sent
                && (!db_down || (r.sidecar == f.sidecar && r.at >= window.from))
        };
        // A token a newer version had already replaced there is not one the
        // fleet still holds: sidecars move to the newest version even when
        // it expires sooner.
        let newest = h
            .received
            .iter()
            .filter(reachable)
            .map(|r| r.token.version)
            .max();
        let servable =
            h.received.iter().filter(reachable).find(|r| {
                Some(r.token.version) == newest && r.token.expires_at > f.sent + MARGIN_MS
            });
        if let Some(r) = servable {
            out.push(Violation {
                at: f.at,
                rule: "failed-read",
                detail: format!(
                    "sidecar {} failed a read of {} with {} ({} ms after sending){} while v{} \
                     (seen on sidecar {}) had {} ms left",
                    f.sidecar,
                    f.collection,
                    f.code,
                    f.at - f.sent,
                    if db_down {
                        " during a database outage"
                    } else {
                        ""
                    },
                    r.token.version,
                    r.sidecar,
                    r.token.expires_at - f.sent
                ),
            });
        }
    }
}

/// Whether `f` failed on a sidecar that ran, past its start-up grace,
/// throughout the read.
fn on_running(h: &History, f: &Failed) -> bool {
    h.up.get(f.sidecar).is_some_and(|ws| {
        ws.iter()
            .any(|w| w.contains(f.sent, f.at) && f.sent >= w.from + GRACE_MS)
    })
}

fn stalls(h: &History, out: &mut Vec<Violation>) {
    // Per collection, each value's cover: first received anywhere to expiry.
    let mut cover: BTreeMap<&str, HashMap<&str, (Ms, Ms)>> = BTreeMap::new();
    for r in &h.received {
        let e = cover
            .entry(&r.token.collection)
            .or_default()
            .entry(&r.token.hash)
            .or_insert((r.at, r.token.expires_at));
        e.0 = e.0.min(r.at);
        e.1 = e.1.max(r.token.expires_at);
    }
    for (collection, values) in cover {
        let mut spans: Vec<(Ms, Ms)> = values.into_values().collect();
        spans.sort();
        let mut gaps = Vec::new();
        let mut covered = spans[0].1;
        for (from, to) in spans.iter().skip(1) {
            if *from > covered {
                gaps.push((covered, *from));
            }
            covered = covered.max(*to);
        }
        if covered < h.end {
            gaps.push((covered, h.end));
        }
        for (from, to) in gaps {
            let failed: Vec<&Failed> = h
                .failed
                .iter()
                .filter(|f| {
                    f.collection == collection && f.sent >= from && f.sent < to && on_running(h, f)
                })
                .collect();
            let Some(first) = failed.first() else {
                continue;
            };
            let since = from - STALL_EXCUSE_MS;
            let fault = h.calls.iter().any(|c| {
                c.collection == collection
                    && c.start >= since
                    && c.start <= to
                    && matches!(c.outcome, Outcome::Injected(_) | Outcome::InvalidGrant)
            });
            let outage = h.outages.iter().any(|o| o.overlaps(since, to, 0));
            if fault || outage {
                continue;
            }
            let kills: Vec<String> = h
                .kills
                .iter()
                .filter(|k| k.at >= since && k.at <= to)
                .map(|k| format!("sidecar {} killed at {}", k.sidecar, rel(h, k.at)))
                .collect();
            out.push(Violation {
                at: first.at,
                rule: "stall",
                detail: format!(
                    "{collection} had no servable token anywhere from {} to {} ({} ms); {} \
                     read(s) failed on running sidecars (first on sidecar {}: {}); no upstream \
                     fault or database outage explains it{}",
                    rel(h, from),
                    rel(h, to),
                    to - from,
                    failed.len(),
                    first.sidecar,
                    first.code,
                    if kills.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", kills.join(", "))
                    }
                ),
            });
        }
    }
}

/// Whether `call` may not have been committed: its sidecar was killed while
/// it was in flight or within [`ORPHAN_MS`] of its answer.
fn orphaned(h: &History, call: &Call) -> Option<Ms> {
    let s = call.sidecar?;
    h.kills
        .iter()
        .find(|k| k.sidecar == s && killed_holding(call, k.at, &h.outages))
        .map(|k| k.at)
}

/// Whether a kill at `kill` of the sidecar that made `call` may have taken
/// its answer with it, uncommitted: the call was in flight, or the database
/// was reachable for at most [`ORPHAN_MS`] between the answer and the kill
/// (during an outage, plus [`RECONNECT_MS`] after it, the answer lives only
/// in the spender's memory). The upstream's reuse grace and the checker use
/// this one rule.
pub fn killed_holding(call: &Call, kill: Ms, outages: &[Window]) -> bool {
    // The kill is stamped before the signal is sent: a request the process
    // sent just before it died can reach the upstream a moment later.
    if kill + KILL_SLACK_MS < call.start {
        return false;
    }
    let Some(end) = call.end.filter(|e| *e <= kill) else {
        return true;
    };
    let mut reachable = kill - end;
    for w in outages {
        let from = w.from.max(end);
        let to = w.to.map_or(kill, |t| (t + RECONNECT_MS).min(kill));
        if to > from {
            reachable -= to - from;
        }
    }
    reachable <= ORPHAN_MS
}

fn upstream_calls(h: &History, out: &mut Vec<Violation>) {
    let values = distinct_values(h);
    let mut per: BTreeMap<&str, Vec<&Call>> = BTreeMap::new();
    for c in &h.calls {
        per.entry(&c.collection).or_default().push(c);
    }
    for (collection, calls) in per {
        let injected = calls
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Injected(_)))
            .count();
        let orphans = calls.iter().filter(|c| orphaned(h, c).is_some()).count();
        let served = values.get(collection).copied().unwrap_or(0);
        // Per sidecar per outage: one local refresh, plus one per refresh
        // interval (40% of the shortest lifetime issued) the outage lasted.
        let interval = calls
            .iter()
            .filter_map(|c| match c.outcome {
                Outcome::Issued { expires_in, .. } => Some(expires_in as Ms * 400),
                _ => None,
            })
            .min()
            .unwrap_or(Ms::MAX)
            .max(1);
        let outages: usize = h
            .outages
            .iter()
            .map(|o| {
                let len = o.to.unwrap_or(h.end) - o.from;
                h.sidecars * (1 + (len / interval) as usize)
            })
            .sum();
        let extra = h.extra_calls.get(collection).copied().unwrap_or(0);
        let bound = served + injected + orphans + outages + extra + 1;
        if calls.len() > bound {
            let last = calls.iter().map(|c| c.start).max().unwrap_or(0);
            out.push(Violation {
                at: last,
                rule: "upstream-calls",
                detail: format!(
                    "{collection}: {} upstream calls > {bound} allowed ({served} values served + \
                     {injected} injected faults + {orphans} calls of killed holders + {outages} \
                     for outages + {extra} documented extras + 1)",
                    calls.len()
                ),
            });
        }
    }
}

fn refresh_reuse(h: &History, out: &mut Vec<Violation>) {
    let mut calls: Vec<&Call> = h
        .calls
        .iter()
        .filter(|c| c.grant == "refresh_token" && c.presented.is_some())
        .collect();
    calls.sort_by_key(|c| c.start);
    // Refresh token -> the call that spent it (got a new one for it), and
    // whether its one excused reuse is used up.
    let mut spent: HashMap<(&str, &str), (&Call, bool)> = HashMap::new();
    for c in calls {
        let rt = c.presented.as_deref().unwrap_or_default();
        let key = (c.collection.as_str(), rt);
        if let Some((by, excused)) = spent.get_mut(&key) {
            let orphan = orphaned(h, by);
            if orphan.is_some() && !*excused {
                *excused = true;
                // The excused reuse spent the token again: if it got a new
                // one, it is the spender now, and its own death in flight
                // excuses one more reuse (two holders killed in a row).
                if c.issued_refresh.is_some() {
                    *by = c;
                    *excused = false;
                }
            } else {
                out.push(Violation {
                    at: c.start,
                    rule: "refresh-reuse",
                    detail: format!(
                        "{}: sidecar {:?} presented refresh token {rt}, spent at {} by sidecar \
                         {:?}{}",
                        c.collection,
                        c.sidecar,
                        rel(h, by.start),
                        by.sidecar,
                        match orphan {
                            Some(k) => format!(
                                " (killed at {}; its one excused reuse was used)",
                                rel(h, k)
                            ),
                            None => " (which was not killed with the answer in flight)".to_owned(),
                        }
                    ),
                });
            }
            continue;
        }
        if c.issued_refresh.is_some() {
            spent.insert(key, (c, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(c: &str, version: u64, value: &str, expires_at: Ms) -> Token {
        Token {
            collection: c.to_owned(),
            version,
            hash: hash(value),
            expires_at,
        }
    }

    fn get(sidecar: usize, token: Token, at: Ms) -> Received {
        Received {
            sidecar,
            token,
            at,
            via: Via::Get { sent: at - 5 },
        }
    }

    fn watch(sidecar: usize, watcher: usize, stream: usize, token: Token, at: Ms) -> Received {
        Received {
            sidecar,
            token,
            at,
            via: Via::Watch { watcher, stream },
        }
    }

    fn call(collection: &str, sidecar: usize, start: Ms, outcome: Outcome) -> Call {
        Call {
            collection: collection.to_owned(),
            sidecar: Some(sidecar),
            grant: "client_credentials".to_owned(),
            start,
            end: Some(start + 100),
            presented: None,
            issued_refresh: None,
            outcome,
        }
    }

    fn issued(value: &str) -> Outcome {
        Outcome::Issued {
            hash: hash(value),
            expires_in: 10,
        }
    }

    /// Two sidecars up from 0, two values for `c` (v1 until 10 s, v2 until
    /// 20 s), each fetched once, each seen on both sidecars.
    fn clean() -> History {
        let mut h = History {
            end: 20_000,
            sidecars: 2,
            up: vec![vec![Window { from: 0, to: None }]; 2],
            ..History::default()
        };
        h.calls.push(call("c", 0, 0, issued("a")));
        h.calls.push(call("c", 1, 5_000, issued("b")));
        for s in 0..2 {
            h.received.push(get(s, tok("c", 1, "a", 10_000), 1_000));
            h.received
                .push(watch(s, s, 0, tok("c", 1, "a", 10_000), 1_000));
            h.received
                .push(watch(s, s, 0, tok("c", 2, "b", 20_000), 5_200));
            h.received.push(get(s, tok("c", 2, "b", 20_000), 6_000));
        }
        h
    }

    fn rules(h: &History) -> Vec<&'static str> {
        check(h).iter().map(|v| v.rule).collect()
    }

    #[test]
    fn a_clean_history_passes() {
        assert_eq!(check(&clean()), vec![]);
        assert_eq!(verdict(&[]), "PASS: no violation");
    }

    #[test]
    fn a_token_received_at_its_expiry_fails() {
        let mut h = clean();
        h.received.push(get(1, tok("c", 2, "b", 20_000), 20_005));
        assert_eq!(rules(&h), ["expired"]);
        let mut h = clean();
        h.received
            .push(watch(0, 0, 0, tok("c", 3, "c", 20_000), 20_250));
        h.calls.push(call("c", 0, 15_000, issued("c")));
        assert_eq!(rules(&h), ["expired"]);
    }

    #[test]
    fn one_version_with_two_values_anywhere_fails() {
        let mut h = clean();
        h.received.push(get(1, tok("c", 2, "other", 20_000), 7_000));
        h.calls.push(call("c", 1, 6_500, issued("other")));
        let v = check(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].rule, "two-values");
        assert!(v[0].detail.contains("c v2"), "{}", v[0].detail);
        assert!(verdict(&v).starts_with("FAIL: 1 violation"));
    }

    #[test]
    fn a_watch_stream_going_backwards_fails_but_a_new_stream_may_restart() {
        let mut h = clean();
        h.received
            .push(watch(0, 0, 0, tok("c", 1, "a", 10_000), 5_300));
        assert_eq!(rules(&h), ["watch-order"]);
        // A resumed stream (stream 1) starting at v2 again is fine.
        let mut h = clean();
        h.received
            .push(watch(0, 0, 1, tok("c", 2, "b", 20_000), 8_000));
        assert_eq!(rules(&h), Vec::<&str>::new());
    }

    #[test]
    fn a_watcher_flooded_beyond_the_rotations_fails() {
        let mut h = clean();
        // Versions rising without new values: a ping-pong between pods.
        for (i, v) in (3..8).enumerate() {
            h.received
                .push(watch(0, 0, 0, tok("c", v, "b", 20_000), 6_000 + i as Ms));
        }
        assert!(rules(&h).contains(&"watch-flood"), "{:?}", check(&h));
    }

    #[test]
    fn a_failed_read_while_a_peer_holds_a_servable_token_fails() {
        let mut h = clean();
        h.failed.push(Failed {
            sidecar: 1,
            collection: "c".to_owned(),
            code: "DeadlineExceeded".to_owned(),
            sent: 7_000,
            at: 9_000,
        });
        assert_eq!(rules(&h), ["failed-read"]);
    }

    #[test]
    fn a_token_replaced_by_a_newer_version_no_longer_counts_as_servable() {
        // v2 (valid until 20 s) is replaced by v3, which expires at 12 s; a
        // read failing at 13 s finds nothing the fleet still holds.
        let mut h = clean();
        h.calls.push(call("c", 0, 8_000, issued("c")));
        h.received.push(get(0, tok("c", 3, "c", 12_000), 8_500));
        h.failed.push(Failed {
            sidecar: 1,
            collection: "c".to_owned(),
            code: "Unavailable".to_owned(),
            sent: 13_000,
            at: 13_001,
        });
        assert!(!rules(&h).contains(&"failed-read"), "{:?}", check(&h));
        // Before v3 existed, the same failure is one.
        let mut h = clean();
        h.failed.push(Failed {
            sidecar: 1,
            collection: "c".to_owned(),
            code: "Unavailable".to_owned(),
            sent: 7_000,
            at: 7_001,
        });
        assert_eq!(rules(&h), ["failed-read"]);
    }

    #[test]
    fn failed_reads_in_documented_windows_pass() {
        let fail = |sidecar, sent| Failed {
            sidecar,
            collection: "c".to_owned(),
            code: "Unavailable".to_owned(),
            sent,
            at: sent + 2_000,
        };
        // No token servable anywhere (between v2's expiry and the end).
        let mut h = clean();
        h.failed.push(fail(0, 20_000));
        assert_eq!(check(&h), vec![]);
        // The sidecar was killed during the read, or restarted < GRACE_MS ago.
        let mut h = clean();
        h.up[1] = vec![
            Window {
                from: 0,
                to: Some(7_500),
            },
            Window {
                from: 8_000,
                to: None,
            },
        ];
        h.failed.push(fail(1, 7_000));
        h.failed.push(fail(1, 9_000));
        assert_eq!(check(&h), vec![]);
        // The database was down and this sidecar held no servable token since
        // its restart; a peer's token does not count.
        h.outages.push(Window {
            from: 8_500,
            to: Some(12_000),
        });
        h.failed.push(fail(1, 13_500));
        assert_eq!(check(&h), vec![]);
        // But its own servable token does, outage or not.
        h.received.push(get(1, tok("c", 2, "b", 20_000), 14_000));
        h.failed.push(fail(1, 14_500));
        assert_eq!(rules(&h), ["failed-read"]);
    }

    #[test]
    fn extra_upstream_calls_fail_unless_accounted_for() {
        let mut h = clean();
        // 2 values served: 3 calls allowed (one for a token issued at the end).
        h.calls.push(call("c", 0, 9_000, issued("x")));
        assert_eq!(check(&h), vec![]);
        h.calls.push(call("c", 1, 9_100, issued("y")));
        assert_eq!(rules(&h), ["upstream-calls"]);
        // An injected fault, a killed holder, an outage each excuse one.
        let mut h2 = h.clone();
        h2.calls
            .push(call("c", 0, 9_200, Outcome::Injected("503".into())));
        h2.calls
            .push(call("c", 0, 9_300, Outcome::Injected("hang".into())));
        assert_eq!(rules(&h2), ["upstream-calls"]);
        h.kills.push(Kill {
            sidecar: 1,
            at: 9_150,
        });
        h.up[1] = vec![Window {
            from: 0,
            to: Some(9_150),
        }];
        assert_eq!(check(&h), vec![]);
        let mut h3 = clean();
        h3.calls.push(call("c", 0, 9_000, issued("x")));
        h3.calls.push(call("c", 1, 9_100, issued("y")));
        h3.outages.push(Window {
            from: 8_000,
            to: Some(9_500),
        });
        assert_eq!(check(&h3), vec![]);
        h3.extra_calls.insert("c".to_owned(), 1);
        h3.calls.push(call("c", 1, 9_700, issued("z")));
        h3.calls.push(call("c", 1, 9_800, issued("w")));
        assert_eq!(check(&h3), vec![]);
    }

    #[test]
    fn a_lapse_with_failed_reads_fails_unless_the_upstream_or_database_explains_it() {
        // v1 until 10 s; v2 first received at 12 s: a 2 s lapse.
        let mut h = History {
            end: 30_000,
            sidecars: 2,
            up: vec![vec![Window { from: 0, to: None }]; 2],
            ..History::default()
        };
        h.calls.push(call("c", 0, 0, issued("a")));
        h.calls.push(call("c", 1, 11_800, issued("b")));
        h.received.push(get(0, tok("c", 1, "a", 10_000), 1_000));
        h.received.push(get(1, tok("c", 2, "b", 30_000), 12_000));
        assert_eq!(check(&h), vec![], "a lapse nobody noticed");
        h.failed.push(Failed {
            sidecar: 1,
            collection: "c".to_owned(),
            code: "DeadlineExceeded".to_owned(),
            sent: 10_500,
            at: 11_900,
        });
        // A killed holder does not explain it.
        h.kills.push(Kill {
            sidecar: 0,
            at: 6_000,
        });
        h.up[0] = vec![Window {
            from: 0,
            to: Some(6_000),
        }];
        let v = check(&h);
        assert_eq!(v.iter().map(|v| v.rule).collect::<Vec<_>>(), ["stall"]);
        assert!(
            v[0].detail.contains("sidecar 0 killed at +6.0s"),
            "{}",
            v[0].detail
        );
        // An injected fault or an outage does.
        let mut faulty = h.clone();
        faulty
            .calls
            .push(call("c", 1, 5_000, Outcome::Injected("hang".into())));
        assert_eq!(check(&faulty), vec![]);
        h.outages.push(Window {
            from: 3_000,
            to: Some(4_000),
        });
        assert_eq!(check(&h), vec![]);
    }

    fn refresh(sidecar: usize, start: Ms, presented: &str, new: Option<&str>) -> Call {
        Call {
            grant: "refresh_token".to_owned(),
            presented: Some(hash(presented)),
            issued_refresh: new.map(hash),
            outcome: match new {
                Some(v) => issued(v),
                None => Outcome::InvalidGrant,
            },
            ..call("c", sidecar, start, Outcome::Pending)
        }
    }

    /// Seed 11's case: the spender got its answer just before a database
    /// cut and was killed just after it, so the rotated token never left its
    /// memory: one reuse is excused. Killed as long after an answer with the
    /// database up all along, it is not.
    #[test]
    fn a_spender_killed_before_the_database_returned_died_with_the_answer() {
        let spent = refresh(1, 5_000, "rt1", Some("rt2")); // answered at 5_100
        let cut = Window {
            from: 5_200,
            to: Some(8_500),
        };
        assert!(killed_holding(&spent, 8_600, std::slice::from_ref(&cut)));
        assert!(!killed_holding(&spent, 8_600, &[]));
        // Reachable 5_100..5_200 and 9_500..11_400: 2 s in all, still excused;
        // a moment later, not.
        assert!(killed_holding(&spent, 11_400, std::slice::from_ref(&cut)));
        assert!(!killed_holding(&spent, 11_500, std::slice::from_ref(&cut)));
        // A request that reached the upstream just after the kill was stamped
        // was sent by the dying process; one a second later was not.
        let late = refresh(1, 8_650, "rt1", Some("rt2"));
        assert!(killed_holding(&late, 8_600, &[]));
        let later = refresh(1, 9_600, "rt1", Some("rt2"));
        assert!(!killed_holding(&later, 8_600, &[]));
        // An outage still open at the kill counts up to the kill.
        let open = Window {
            from: 5_200,
            to: None,
        };
        assert!(killed_holding(&spent, 30_000, &[open]));

        let mut h = clean();
        h.calls = vec![
            refresh(0, 0, "rt0", Some("rt1")),
            spent.clone(),
            refresh(0, 12_000, "rt1", Some("rt3")),
        ];
        h.kills.push(Kill {
            sidecar: 1,
            at: 8_600,
        });
        h.up[1] = vec![Window {
            from: 0,
            to: Some(8_600),
        }];
        h.received.push(get(0, tok("c", 3, "rt3", 40_000), 12_500));
        assert_eq!(rules(&h), ["refresh-reuse"]);
        h.outages.push(cut);
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn a_reused_refresh_token_fails_unless_its_spender_died_with_the_answer() {
        let mut h = clean();
        h.calls = vec![
            refresh(0, 0, "rt0", Some("rt1")),
            refresh(1, 5_000, "rt1", Some("rt2")),
        ];
        assert_eq!(check(&h), vec![]);
        h.calls.push(refresh(0, 9_000, "rt1", None));
        let v = check(&h);
        assert_eq!(
            v.iter().map(|v| v.rule).collect::<Vec<_>>(),
            ["refresh-reuse"]
        );
        assert!(v[0].detail.contains(&hash("rt1")));
        assert!(!v[0].detail.contains("rt1 "), "no plaintext");

        // Sidecar 1 was killed 1 s after its answer (commit in flight): sidecar 0
        // may present rt1 once more; a second reuse still fails.
        let mut h = clean();
        h.calls = vec![
            refresh(0, 0, "rt0", Some("rt1")),
            refresh(1, 5_000, "rt1", Some("rt2")),
            refresh(0, 6_500, "rt1", Some("rt3")),
        ];
        h.kills.push(Kill {
            sidecar: 1,
            at: 6_000,
        });
        h.up[1] = vec![Window {
            from: 0,
            to: Some(6_000),
        }];
        h.received.push(get(0, tok("c", 3, "rt3", 30_000), 7_000));
        assert_eq!(check(&h), vec![]);
        h.calls.push(refresh(0, 8_000, "rt1", None));
        assert_eq!(rules(&h), ["refresh-reuse"]);

        // Two holders killed in a row: sidecar 0's excused reuse dies in
        // flight too, so one more reuse (by the restarted sidecar 1) is excused.
        let mut h = clean();
        h.calls = vec![
            refresh(0, 0, "rt0", Some("rt1")),
            refresh(1, 5_000, "rt1", Some("rt2")),
            refresh(0, 6_500, "rt1", Some("rt3")),
            refresh(1, 8_000, "rt1", Some("rt4")),
        ];
        h.kills.push(Kill {
            sidecar: 1,
            at: 6_000,
        });
        h.kills.push(Kill {
            sidecar: 0,
            at: 7_000,
        });
        h.up[0] = vec![
            Window {
                from: 0,
                to: Some(7_000),
            },
            Window {
                from: 7_500,
                to: None,
            },
        ];
        h.up[1] = vec![
            Window {
                from: 0,
                to: Some(6_000),
            },
            Window {
                from: 6_500,
                to: None,
            },
        ];
        assert!(!rules(&h).contains(&"refresh-reuse"), "{:?}", check(&h));
        // A third reuse, with nobody killed since, is one.
        h.calls.push(refresh(0, 9_000, "rt1", None));
        assert!(rules(&h).contains(&"refresh-reuse"), "{:?}", check(&h));
    }
}
