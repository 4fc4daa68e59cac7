//! Where a loader is: the `--loader` values (`host:port`, `http(s)://host:port`, `unix:PATH`)
//! parsed and checked, and a replica's resolved address (a TCP address, or a Unix socket on this
//! host).

use std::{fmt, net::SocketAddr, path::Path, sync::Arc};

use crate::error::ClientError;

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

impl ReplicaAddr {
    /// Every address a checked `--loader` value ([`parse_loader`]) resolves to, in the
    /// resolver's order.
    ///
    /// # Errors
    /// [`ClientError::Unresolved`] when the name resolves to nothing.
    pub(crate) async fn resolve(loader: &str) -> Result<Vec<ReplicaAddr>, ClientError> {
        if let Some(addr) = ReplicaAddr::unix(loader) {
            return Ok(vec![addr]);
        }
        let unresolved = |source| ClientError::Unresolved { spec: loader.to_owned(), source };
        let addrs: Vec<ReplicaAddr> =
            tokio::net::lookup_host(loader).await.map_err(unresolved)?.map(ReplicaAddr::Tcp).collect();
        if addrs.is_empty() {
            return Err(unresolved(std::io::Error::new(std::io::ErrorKind::NotFound, "no address")));
        }
        Ok(addrs)
    }
}

/// For a one-off call: `dial` on each address `loader` resolves to until one answers (as a TCP
/// client tries each address of a name, `localhost` resolving to `::1` and `127.0.0.1`, say).
///
/// # Errors
/// [`ClientError::Unresolved`], or the last address's error.
pub(crate) async fn first_reachable<T, F>(
    loader: &str,
    mut dial: impl FnMut(ReplicaAddr) -> F,
) -> Result<T, ClientError>
where
    F: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut last = None;
    for addr in ReplicaAddr::resolve(loader).await? {
        match dial(addr).await {
            Ok(done) => return Ok(done),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::BadAddress { spec: loader.to_owned() }))
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

/// Whether a `--loader` value asks for TLS (`https://host:port`).
pub fn loader_uses_tls(spec: &str) -> bool {
    spec.starts_with("https://")
}

/// Strips an optional `http://` or `https://` from a `--loader` value and checks it is
/// `host:port`; a `unix:PATH` value (a loader's `--listen-unix` socket on this host) is kept as
/// it is.
///
/// # Errors
/// [`ClientError::BadAddress`] naming the value.
pub fn parse_loader(spec: &str) -> Result<String, ClientError> {
    let bad = || ClientError::BadAddress { spec: spec.to_owned() };
    if let Some(addr) = ReplicaAddr::unix(spec) {
        return Ok(addr.to_string());
    }
    let rest =
        spec.strip_prefix("http://").or_else(|| spec.strip_prefix("https://")).unwrap_or(spec).trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() || rest.contains('/') {
        return Err(bad());
    }
    Ok(rest.to_owned())
}

/// The host part of `host:port` (without the brackets of an IPv6 address).
pub(crate) fn host_of(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_addresses() {
        assert_eq!(parse_loader("127.0.0.1:7070").expect("valid"), "127.0.0.1:7070");
        assert_eq!(parse_loader("http://loader:7070/").expect("valid"), "loader:7070");
        assert!(parse_loader("loader").is_err());
        assert_eq!(parse_loader("unix:/run/conveyor/a.sock").expect("valid"), "unix:/run/conveyor/a.sock");
        assert_eq!(parse_loader("unix:///run/a.sock").expect("valid"), "unix:/run/a.sock");
        assert!(parse_loader("unix:").is_err());
        assert!(parse_loader("loader:port").is_err());
        assert!(parse_loader("http://a:1/x").is_err());
        assert_eq!(parse_loader("https://loader:7070").expect("valid"), "loader:7070");
        assert_eq!(host_of("loader-0.loader:7070"), "loader-0.loader");
        assert_eq!(host_of("[::1]:7070"), "::1");
    }

    #[tokio::test]
    async fn a_one_off_call_tries_each_address_of_a_name_until_one_answers() {
        let addrs = ReplicaAddr::resolve("127.0.0.1:7070").await.expect("resolves");
        assert_eq!(addrs, [ReplicaAddr::Tcp("127.0.0.1:7070".parse().expect("addr"))]);
        let unix = ReplicaAddr::resolve("unix:/run/a.sock").await.expect("a socket needs no resolving");
        assert_eq!(unix, [ReplicaAddr::unix("unix:/run/a.sock").expect("unix")]);
        let all = ReplicaAddr::resolve("localhost:7070").await.expect("localhost resolves");
        let last = all.last().cloned().expect("at least one");
        let mut tried = Vec::new();
        let reached = first_reachable("localhost:7070", |addr| {
            tried.push(addr.clone());
            let last = last.clone();
            async move { if addr == last { Ok(addr) } else { Err(ClientError::BadAddress { spec: addr.to_string() }) } }
        })
        .await
        .expect("the last address answers");
        assert_eq!((reached, tried), (last, all), "every address tried, in order");
        let failed = first_reachable("127.0.0.1:7070", |addr| async move {
            Err::<(), _>(ClientError::BadAddress { spec: addr.to_string() })
        })
        .await;
        assert!(matches!(failed, Err(ClientError::BadAddress { spec }) if spec == "127.0.0.1:7070"));
    }
}
