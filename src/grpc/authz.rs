//! Per-collection authorization: which callers may read which collection.
//!
//! Contract:
//! - A collection with `readers` answers only a [`Caller`] holding at least
//!   one listed identity (exact string match; DNS names lower-cased on both
//!   sides). A collection without `readers` answers anyone who can connect.
//! - While any collection has `readers`, a name that is not configured is
//!   refused exactly like a protected collection, so that a refused caller
//!   learns nothing of which collections exist. While none has, an unknown
//!   name stays NOT_FOUND (the broker's answer).
//! - Identity syntax ([`check_reader`]) is one of: a URI with a scheme
//!   (`spiffe://trust.domain/path`), `dns:<name>`, `uid:<digits>`,
//!   `gid:<digits>`; config loading rejects anything else.
//!
//! The broker core never sees any of this: the gRPC service asks [`Authz`]
//! after validating a request and before calling the broker.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::peer::Caller;

/// Who may read each collection; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Authz {
    /// Every configured collection, with its readers when it has any.
    collections: Arc<BTreeMap<String, Option<BTreeSet<String>>>>,
    /// Some collection has readers (so unknown names are refused).
    any_protected: bool,
}

impl Authz {
    /// Anyone may read anything (no collection has readers).
    pub fn open() -> Self {
        Self::default()
    }

    /// From each configured collection's name and `readers` (already
    /// checked by [`check_reader`]).
    pub fn new<'a>(collections: impl IntoIterator<Item = (&'a str, Option<&'a [String]>)>) -> Self {
        let collections: BTreeMap<_, _> = collections
            .into_iter()
            .map(|(name, readers)| {
                let readers = readers.map(|r| r.iter().map(|i| normalize(i)).collect());
                (name.to_owned(), readers)
            })
            .collect();
        let any_protected = collections.values().any(Option::is_some);
        Self {
            collections: Arc::new(collections),
            any_protected,
        }
    }

    /// Whether `caller` may read `collection` (a name as asked, already
    /// validated).
    pub fn allows(&self, collection: &str, caller: &Caller) -> bool {
        if !self.any_protected {
            return true;
        }
        match self.collections.get(collection) {
            None => false,
            Some(None) => true,
            Some(Some(readers)) => caller
                .identities()
                .iter()
                .any(|i| readers.contains(i.as_str())),
        }
    }
}

/// DNS names compare case-insensitively; everything else as written.
fn normalize(identity: &str) -> String {
    match identity.strip_prefix("dns:") {
        Some(name) => format!("dns:{}", name.to_ascii_lowercase()),
        None => identity.to_owned(),
    }
}

/// Checks one `readers` entry's form; the error says which forms exist.
pub fn check_reader(entry: &str) -> Result<(), String> {
    const FORMS: &str = "use spiffe://trust.domain/path (or another URI), dns:NAME, uid:N or gid:N";
    let digits = |n: &str| !n.is_empty() && n.parse::<u32>().is_ok();
    if let Some(n) = entry
        .strip_prefix("uid:")
        .or_else(|| entry.strip_prefix("gid:"))
    {
        return if digits(n) {
            Ok(())
        } else {
            Err(format!("{entry:?}: uid: and gid: take a number; {FORMS}"))
        };
    }
    if let Some(name) = entry.strip_prefix("dns:") {
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*'));
        return if ok {
            Ok(())
        } else {
            Err(format!("{entry:?}: dns: takes a host name; {FORMS}"))
        };
    }
    match url::Url::parse(entry) {
        Ok(u) if entry.contains("://") && !u.cannot_be_a_base() => Ok(()),
        _ => Err(format!("{entry:?} is not an identity; {FORMS}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(ids: &[&str]) -> Caller {
        Caller::new(ids.iter().map(|s| (*s).to_owned()).collect())
    }

    #[test]
    fn readers_forms() {
        for ok in [
            "spiffe://cluster.local/ns/app/sa/web",
            "https://example.com/x",
            "dns:leaf.example",
            "uid:1000",
            "gid:0",
        ] {
            assert_eq!(check_reader(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "web", "uid:", "uid:x", "gid:-1", "dns:", "dns:a b", "spiffe:x",
        ] {
            assert!(check_reader(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn protected_known_and_unknown() {
        let web = vec!["spiffe://td/web".to_owned(), "dns:Leaf.Example".to_owned()];
        let authz = Authz::new([("open", None), ("secret", Some(web.as_slice()))]);
        assert!(authz.allows("open", &Caller::default()));
        assert!(authz.allows("secret", &caller(&["spiffe://td/web"])));
        assert!(authz.allows("secret", &caller(&["dns:leaf.example"])));
        assert!(!authz.allows("secret", &caller(&["spiffe://td/other"])));
        assert!(!authz.allows("secret", &Caller::default()));
        // Unknown names are refused like a protected one.
        assert!(!authz.allows("nope", &caller(&["spiffe://td/web"])));
        // Without readers anywhere, nothing is refused (NOT_FOUND stays).
        let open = Authz::new([("open", None)]);
        assert!(open.allows("nope", &Caller::default()));
        assert!(Authz::open().allows("x", &Caller::default()));
    }
}
