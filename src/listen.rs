//! Listen addresses: TCP (`127.0.0.1:50051`) or a Unix domain socket
//! (`unix:/path/to.sock`).
//!
//! Contract: binding a Unix socket replaces a stale socket file (one nobody
//! answers on) but refuses to steal a live one or to delete a non-socket file;
//! the socket gets mode 0660 and is removed when the [`Listener`] is dropped.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Default for ListenAddr {
    fn default() -> Self {
        Self::Tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 50051)))
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "unix: needs a socket path, e.g. unix:/run/token-broker/grpc.sock".into(),
                );
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Self::Tcp).map_err(|_| {
            format!(
                "{s:?} is not an address: use IP:PORT (e.g. 127.0.0.1:50051) or unix:/path/to.sock"
            )
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listener. Dropping it removes a Unix socket file.
#[derive(Debug)]
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, SocketFile),
}

/// Removes the socket file on drop.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Self::Tcp(tokio::net::TcpListener::bind(a).await?)),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                let listener = tokio::net::UnixListener::bind(path)?;
                let guard = SocketFile(path.clone());
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                Ok(Self::Unix(listener, guard))
            }
        }
    }

    /// The address actually bound (the real port when binding port 0).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Self::Unix(_, SocketFile(p)) => Ok(ListenAddr::Unix(p.clone())),
        }
    }
}

/// Which setting chose a listen address: its config field, the flag that
/// overrides it, and whether the flag did. Only for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub field: &'static str,
    pub flag: &'static str,
    pub by_flag: bool,
}

impl Origin {
    /// The token API: `server.listen` / `--listen`.
    pub const fn token_api(by_flag: bool) -> Self {
        Self {
            field: "server.listen",
            flag: "--listen",
            by_flag,
        }
    }

    /// The admin listener: `admin.listen` / `--admin-listen`.
    pub const fn admin(by_flag: bool) -> Self {
        Self {
            field: "admin.listen",
            flag: "--admin-listen",
            by_flag,
        }
    }

    /// The name that set the address: the flag when it did, else the field.
    pub fn name(&self) -> &'static str {
        if self.by_flag { self.flag } else { self.field }
    }
}

/// A listener that could not be bound, worded the same for every listener
/// and wherever its address came from: `server.listen: cannot listen on
/// 127.0.0.1:50051: address already in use (another process holds it; set
/// server.listen or --listen to another address)`.
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot listen on {addr}: {reason}", origin.name())]
pub struct BindError {
    pub origin: Origin,
    pub addr: String,
    pub reason: String,
}

impl BindError {
    pub fn new(origin: Origin, addr: &impl fmt::Display, e: &io::Error) -> Self {
        let fix = format!("set {} or {} to another address", origin.field, origin.flag);
        let reason = match e.kind() {
            io::ErrorKind::AddrInUse => {
                format!("address already in use (another process holds it; {fix})")
            }
            io::ErrorKind::AddrNotAvailable => {
                format!("address not available (no local interface has that IP; {fix})")
            }
            io::ErrorKind::PermissionDenied => format!("permission denied ({e}; {fix})"),
            _ => e.to_string(),
        };
        Self {
            origin,
            addr: addr.to_string(),
            reason,
        }
    }
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", path.display()),
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!(
            "127.0.0.1:1".parse::<ListenAddr>().unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert_eq!(
            "unix:/tmp/x.sock"
                .parse::<ListenAddr>()
                .unwrap()
                .to_string(),
            "unix:/tmp/x.sock"
        );
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("localhost".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn bind_errors_name_the_setting_and_the_fix() {
        let in_use = io::Error::from(io::ErrorKind::AddrInUse);
        let addr = "127.0.0.1:50051".parse::<ListenAddr>().unwrap();
        assert_eq!(
            BindError::new(Origin::token_api(false), &addr, &in_use).to_string(),
            "server.listen: cannot listen on 127.0.0.1:50051: address already in use \
             (another process holds it; set server.listen or --listen to another address)"
        );
        assert_eq!(
            BindError::new(Origin::admin(true), &"127.0.0.1:9464", &in_use).to_string(),
            "--admin-listen: cannot listen on 127.0.0.1:9464: address already in use \
             (another process holds it; set admin.listen or --admin-listen to another address)"
        );
    }

    #[tokio::test]
    async fn unix_socket_is_0660_replaces_stale_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A stale socket file: bound once, listener gone, file left behind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let addr = ListenAddr::Unix(path.clone());
        let l = Listener::bind(&addr).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A live socket is not stolen.
        assert_eq!(
            Listener::bind(&addr).await.unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(l);
        assert!(!path.exists());
        // A regular file is never deleted.
        std::fs::write(&path, b"data").unwrap();
        assert!(Listener::bind(&addr).await.is_err());
        assert!(path.exists());
    }
}
