//! Where a replica is: a TCP address, or a Unix socket on this host.

use std::{fmt, net::SocketAddr, path::Path, sync::Arc};

/// One replica's address: what a `--loader` value resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReplicaAddr {
    /// `host:port`, resolved.
    Tcp(SocketAddr),
    /// `unix:PATH`: a loader on this host, reached through its `--listen-unix` socket.
    Unix(Arc<Path>),
}

impl ReplicaAddr {
    /// The Unix socket named by a `unix:PATH` loader value, if it is one.
    pub fn unix(spec: &str) -> Option<ReplicaAddr> {
        let path = spec.strip_prefix("unix://").or_else(|| spec.strip_prefix("unix:"))?;
        (!path.is_empty()).then(|| ReplicaAddr::Unix(Arc::from(Path::new(path))))
    }
}

impl fmt::Display for ReplicaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplicaAddr::Tcp(addr) => addr.fmt(f),
            ReplicaAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl From<SocketAddr> for ReplicaAddr {
    fn from(addr: SocketAddr) -> ReplicaAddr {
        ReplicaAddr::Tcp(addr)
    }
}
