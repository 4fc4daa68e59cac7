//! Accepted connections and their bounds: at most `--max-connections` open at once, and each one
//! closed when it has made no Loader call within `--handshake-timeout` of being accepted (a peer
//! that never completes the TCP/TLS/HTTP/2 handshakes, or only probes health) or has had no call
//! in progress for `--idle-timeout`.
//!
//! The bound is enforced in the socket's read path: hyper always has a read pending on a live
//! connection, so a deadline polled there wakes it, and the read error it returns makes hyper
//! close the connection.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TlsConnectInfo};

use conveyor_proto::shm;

use super::{
    shm::{Reservation, SharedRegion},
    stats::Stats,
};

/// The timeouts and the cap that apply to every connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once (`--max-connections`).
    pub max_connections: usize,
    /// Time from accept to the first Loader call (`--handshake-timeout`).
    pub handshake_timeout: Duration,
    /// Time with no Loader call in progress (`--idle-timeout`).
    pub idle_timeout: Duration,
}

/// What the service knows about the connection a call arrived on (tonic puts it in the
/// request's extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's address.
    pub remote: Option<SocketAddr>,
    /// Calls in progress on this connection.
    pub activity: Arc<Activity>,
    /// The shared-memory region its client asked for (Unix-socket connections only).
    pub region: Option<Arc<SharedRegion>>,
}

impl ConnInfo {
    /// The connection a call arrived on, over TCP or TLS.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&ConnInfo> {
        let extensions = request.extensions();
        extensions.get::<ConnInfo>().or_else(|| extensions.get::<TlsConnectInfo<ConnInfo>>().map(|tls| tls.get_ref()))
    }
}

/// Calls in progress on one connection and when it last had none.
#[derive(Debug)]
pub struct Activity {
    /// When the connection was accepted.
    accepted: Instant,
    /// Loader calls in progress.
    calls: AtomicUsize,
    /// Whether any Loader call was made.
    used: AtomicBool,
    /// Milliseconds after `accepted` when `calls` last dropped to zero.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            accepted: Instant::now(),
            calls: AtomicUsize::new(0),
            used: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// Marks a call in progress until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Relaxed);
        self.used.store(true, Relaxed);
        CallGuard(self.clone())
    }

    /// Why the connection must close now, or when to look again.
    fn expiry(&self, now: Instant, limits: &ConnectionLimits) -> Result<Instant, &'static str> {
        if !self.used.load(Relaxed) {
            let deadline = self.accepted + limits.handshake_timeout;
            return if now >= deadline { Err("no Loader call within --handshake-timeout") } else { Ok(deadline) };
        }
        if self.calls.load(Relaxed) > 0 {
            return Ok(now + limits.idle_timeout);
        }
        let deadline = self.accepted + Duration::from_millis(self.idle_since_ms.load(Relaxed)) + limits.idle_timeout;
        if now >= deadline { Err("no Loader call in progress for --idle-timeout") } else { Ok(deadline) }
    }
}

/// A Loader call in progress; dropping it ends the call.
#[derive(Debug)]
pub struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        // Stamp the idle start before the count can read zero, so that the deadline check never
        // sees zero calls with an older stamp.
        let elapsed = u64::try_from(self.0.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(elapsed, Relaxed);
        self.0.calls.fetch_sub(1, Relaxed);
    }
}

/// An accepted TCP or Unix-socket connection.
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Calls `$method` on whichever stream the socket is.
macro_rules! on_socket {
    ($socket:expr, $stream:ident => $call:expr) => {
        match $socket {
            Socket::Tcp($stream) => $call,
            Socket::Unix($stream) => $call,
        }
    };
}

/// An accepted connection with its slot under `--max-connections` and its deadlines.
#[derive(Debug)]
pub struct Guarded {
    stream: Socket,
    info: ConnInfo,
    limits: ConnectionLimits,
    /// When to check the deadlines again.
    deadline: Pin<Box<Sleep>>,
    /// Where timeouts are counted.
    stats: Arc<Stats>,
    _slot: OwnedSemaphorePermit,
}

impl Guarded {
    /// A connection just accepted (and, on a Unix socket, past its hello): its deadlines start
    /// now.
    fn new(
        stream: Socket,
        remote: Option<SocketAddr>,
        region: Option<Arc<SharedRegion>>,
        limits: ConnectionLimits,
        stats: Arc<Stats>,
        slot: OwnedSemaphorePermit,
    ) -> Guarded {
        let info = ConnInfo { remote, activity: Arc::new(Activity::new()), region };
        let deadline = Box::pin(tokio::time::sleep(limits.handshake_timeout));
        Guarded { stream, info, limits, deadline, stats, _slot: slot }
    }

    /// Returns an error once a deadline has passed; otherwise arms the timer for the next check.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.deadline.as_mut().poll(cx).is_ready() {
            match self.info.activity.expiry(Instant::now(), &self.limits) {
                Ok(next) => self.deadline.as_mut().reset(next),
                Err(reason) => {
                    tracing::info!(peer = ?self.info.remote, "closing connection: {reason}");
                    self.stats.connections_timed_out.fetch_add(1, Relaxed);
                    return Err(io::Error::new(io::ErrorKind::TimedOut, reason));
                }
            }
        }
        Ok(())
    }
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Err(error) = self.check_deadline(cx) {
            return Poll::Ready(Err(error));
        }
        on_socket!(&mut self.stream, stream => Pin::new(stream).poll_read(cx, buf))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        on_socket!(&mut self.stream, stream => Pin::new(stream).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_socket!(&mut self.stream, stream => Pin::new(stream).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        on_socket!(&self.stream, stream => stream.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(&mut self.stream, stream => Pin::new(stream).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_socket!(&mut self.stream, stream => Pin::new(stream).poll_shutdown(cx))
    }
}

impl Connected for Guarded {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Accepts connections on `listener` forever, closing at once those past `--max-connections`;
/// refusals and timeouts are counted in `stats`.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    stats: Arc<Stats>,
) -> impl Stream<Item = io::Result<Guarded>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    futures::stream::unfold((listener, slots), move |(listener, slots)| {
        let stats = stats.clone();
        async move {
            loop {
                let (stream, remote) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: pause instead of spinning, and
                        // keep serving the connections already open.
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    stats.connections_refused.fetch_add(1, Relaxed);
                    if let Some(not_logged) = stats.refusal_log.admit() {
                        tracing::warn!(
                            peer = %remote,
                            max = limits.max_connections,
                            not_logged,
                            "refusing a connection: --max-connections are open"
                        );
                    }
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let guarded = Guarded::new(Socket::Tcp(stream), Some(remote), None, limits, stats, slot);
                return Some((Ok(guarded), (listener, slots)));
            }
        }
    })
}

/// Who may use the Unix socket and the shared memory its connections may ask for.
#[derive(Debug, Clone)]
pub struct UnixAccess {
    /// User ids allowed to connect (`--unix-allow-uid`); empty: anyone who can open the socket.
    pub allow_uid: Vec<u32>,
    /// One connection's region at most (`--shm-bytes`; 0: none).
    pub shm_bytes: u64,
    /// All regions together at most (`--max-shm-bytes`).
    pub max_shm_bytes: u64,
}

/// Accepts connections on a Unix socket forever: each one's optional shared-memory hello is
/// read in its own task (within `--handshake-timeout`), so a slow peer holds up no other.
pub fn incoming_unix(
    listener: UnixListener,
    limits: ConnectionLimits,
    access: UnixAccess,
    stats: Arc<Stats>,
) -> impl Stream<Item = io::Result<Guarded>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Handshakes finish in any order; at most --max-connections are in progress or queued.
    let (ready_tx, ready_rx) = mpsc::channel(limits.max_connections);
    tokio::spawn(async move {
        loop {
            let mut stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept a Unix-socket connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = ready_tx.closed() => return,
            };
            // Who may connect is checked before anything is read or mapped (--unix-allow-uid).
            let allowed = &access.allow_uid;
            if !allowed.is_empty() {
                let uid = rustix::net::sockopt::socket_peercred(&stream).map(|cred| cred.uid.as_raw()).ok();
                if !uid.is_some_and(|uid| allowed.contains(&uid)) {
                    stats.unix_peers_refused.fetch_add(1, Relaxed);
                    if let Some(not_logged) = stats.refusal_log.admit() {
                        tracing::warn!(
                            uid = ?uid,
                            not_logged,
                            "closing a Unix-socket connection: its user id is not in --unix-allow-uid"
                        );
                    }
                    continue;
                }
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                stats.connections_refused.fetch_add(1, Relaxed);
                if let Some(not_logged) = stats.refusal_log.admit() {
                    tracing::warn!(
                        max = limits.max_connections,
                        not_logged,
                        "refusing a Unix-socket connection: --max-connections are open"
                    );
                }
                continue;
            };
            let (stats, ready_tx) = (stats.clone(), ready_tx.clone());
            let shm = ShmLimits {
                region_bytes: access.shm_bytes,
                total_bytes: access.max_shm_bytes,
                in_use: stats.shm_bytes_in_use.clone(),
            };
            tokio::spawn(async move {
                let region = match tokio::time::timeout(limits.handshake_timeout, hello(&mut stream, &shm)).await {
                    Ok(Ok(region)) => region,
                    Ok(Err(error)) => {
                        tracing::info!(%error, "closing a Unix-socket connection: its shared-memory hello failed");
                        return;
                    }
                    Err(_) => {
                        stats.connections_timed_out.fetch_add(1, Relaxed);
                        return;
                    }
                };
                match &region {
                    Hello::Granted(_) => stats.shm_regions.fetch_add(1, Relaxed),
                    Hello::OverTotal => stats.shm_regions_refused.fetch_add(1, Relaxed),
                    Hello::None => 0,
                };
                let region = match region {
                    Hello::Granted(region) => Some(region),
                    Hello::OverTotal | Hello::None => None,
                };
                let guarded = Guarded::new(Socket::Unix(stream), None, region, limits, stats, slot);
                let _ = ready_tx.send(Ok(guarded)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(ready_rx)
}

/// The shared-memory bounds a hello is answered within.
struct ShmLimits {
    /// One connection's region at most (`--shm-bytes`; 0: none).
    region_bytes: u64,
    /// All regions together (`--max-shm-bytes`).
    total_bytes: u64,
    /// What the regions granted and alive hold.
    in_use: Arc<AtomicU64>,
}

/// How a connection's hello ended.
enum Hello {
    /// A region was granted.
    Granted(Arc<SharedRegion>),
    /// A region was asked for, but the regions alive hold `--max-shm-bytes` already.
    OverTotal,
    /// No region: none asked for, shared memory off, or it could not be created.
    None,
}

/// Reads a client's shared-memory hello, if its first byte says it sends one (an HTTP/2 client
/// starts with its preface instead, which is left unread), and answers it with a region of at
/// most `--shm-bytes`, when the regions alive leave room under `--max-shm-bytes`.
async fn hello(stream: &mut UnixStream, shm: &ShmLimits) -> io::Result<Hello> {
    let mut first = [0u8; 1];
    let peeked = loop {
        stream.readable().await?;
        let peek = || Ok(rustix::net::recv(&*stream, &mut first, rustix::net::RecvFlags::PEEK)?.1);
        match stream.try_io(tokio::io::Interest::READABLE, peek) {
            Ok(n) => break n,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    };
    if peeked == 0 || first[0] != shm::MAGIC[0] {
        return Ok(Hello::None);
    }
    let mut bytes = [0u8; shm::HELLO_BYTES];
    tokio::io::AsyncReadExt::read_exact(stream, &mut bytes).await?;
    let hello = shm::Hello::decode(&bytes).ok_or_else(|| io::Error::other("not a Conveyor shared-memory hello"))?;
    let len = hello.max_bytes.min(shm.region_bytes);
    let answer = if len < shm::MIN_REGION_BYTES {
        Hello::None
    } else {
        match Reservation::take(&shm.in_use, len, shm.total_bytes) {
            None => {
                tracing::info!(
                    bytes = len,
                    total = shm.total_bytes,
                    "no shared-memory region for this connection: --max-shm-bytes is in use; its batches go inline"
                );
                Hello::OverTotal
            }
            Some(reservation) => match SharedRegion::create(hello.region_id, len) {
                Ok(region) => Hello::Granted(Arc::new(region.reserved(reservation))),
                Err(error) => {
                    tracing::warn!(%error, bytes = len, "cannot create a shared-memory region; this connection goes without");
                    Hello::None
                }
            },
        }
    };
    loop {
        stream.writable().await?;
        let region = match &answer {
            Hello::Granted(region) => Some(region.region()),
            Hello::OverTotal | Hello::None => None,
        };
        let grant = || shm::send_grant(&*stream, region);
        match stream.try_io(tokio::io::Interest::WRITABLE, grant) {
            Ok(()) => return Ok(answer),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 4,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unused_connection_expires_at_the_handshake_timeout() {
        let activity = Activity::new();
        let start = Instant::now();
        assert_eq!(activity.expiry(start, &limits()), Ok(start + Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(activity.expiry(Instant::now(), &limits()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_in_progress_keeps_the_connection_and_its_end_starts_the_idle_clock() {
        let activity = Arc::new(Activity::new());
        let call = activity.begin();
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(activity.expiry(Instant::now(), &limits()).is_ok(), "busy for longer than both timeouts");
        drop(call);
        let ended = Instant::now();
        assert_eq!(activity.expiry(ended, &limits()), Ok(ended + Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(activity.expiry(Instant::now(), &limits()).is_ok());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(activity.expiry(Instant::now(), &limits()), Err("no Loader call in progress for --idle-timeout"));
    }
}
