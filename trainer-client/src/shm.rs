//! The client's side of the same-host path: Unix-socket connections to loaders, the
//! shared-memory region each may be granted ([`conveyor_proto::shm`]), and batches whose bytes
//! stay in it.
//!
//! A tensor the loader sent as a [`SharedSlice`] becomes `Bytes` over the region (no copy); the
//! batch's entry is marked released when the last of its tensors' bytes is dropped, and the
//! loader reuses the space. Regions are found by the id the client gave in its hello, so a batch
//! keeps its region mapped after the connection that brought it is gone.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use conveyor_proto::{
    shm::{self, DATA_OFFSET, Hello, NUM_ENTRIES, RELEASED, Region},
    v1::{BatchResponse, SharedSlice},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Environment variable that turns shared memory off (`CONVEYOR_SHM=0`): Unix-socket loaders
/// then send every batch over the socket.
pub const SHM_ENV: &str = "CONVEYOR_SHM";

/// Regions of open connections, by id. A connection removes its own when it closes; batches
/// hold their region on their own.
static REGIONS: Mutex<BTreeMap<u64, Arc<Region>>> = Mutex::new(BTreeMap::new());

/// Ids for this process's regions.
static NEXT_REGION: AtomicU64 = AtomicU64::new(1);

fn regions() -> std::sync::MutexGuard<'static, BTreeMap<u64, Arc<Region>>> {
    REGIONS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `CONVEYOR_SHM` leaves shared memory on (unset, or anything but `0`/`false`/`off`).
pub fn enabled_by_env() -> bool {
    !matches!(std::env::var(SHM_ENV).as_deref(), Ok("0" | "false" | "off"))
}

/// A connection to a loader's Unix socket; holds its region in the registry while open.
#[derive(Debug)]
pub(crate) struct UnixConnection {
    stream: tokio::net::UnixStream,
    region_id: Option<u64>,
}

impl Drop for UnixConnection {
    fn drop(&mut self) {
        if let Some(id) = self.region_id {
            regions().remove(&id);
        }
    }
}

/// Connects to the loader listening on `path` and, when `max_shm_bytes > 0`, asks for a region
/// of at most that size (a loader that refuses, or has it off, leaves the connection plain).
///
/// # Errors
/// When the socket cannot be reached in `timeout`, or the hello fails.
pub(crate) async fn connect_unix(path: &Path, max_shm_bytes: u64, timeout: Duration) -> io::Result<UnixConnection> {
    let path = path.to_owned();
    let connect = move || -> io::Result<(std::os::unix::net::UnixStream, Option<(u64, Region)>)> {
        let mut stream = std::os::unix::net::UnixStream::connect(&path)?;
        let mut granted = None;
        if max_shm_bytes > 0 {
            stream.set_read_timeout(Some(timeout))?;
            let id = NEXT_REGION.fetch_add(1, Ordering::Relaxed);
            stream.write_all(&Hello { region_id: id, max_bytes: max_shm_bytes }.encode())?;
            if let Some((len, fd)) = shm::recv_grant(&stream)? {
                granted = Some((id, Region::open(fd, len)?));
                tracing::debug!(path = %path.display(), bytes = len, "shared-memory region granted");
            }
            stream.set_read_timeout(None)?;
        }
        stream.set_nonblocking(true)?;
        Ok((stream, granted))
    };
    let (stream, granted) = match tokio::time::timeout(timeout, tokio::task::spawn_blocking(connect)).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join_error)) => return Err(io::Error::other(join_error)),
        Err(_) => {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connecting to the loader's Unix socket timed out"));
        }
    };
    let stream = tokio::net::UnixStream::from_std(stream)?;
    // Registered only once the connection exists: its drop unregisters it.
    let region_id = granted.map(|(id, region)| {
        regions().insert(id, Arc::new(region));
        id
    });
    Ok(UnixConnection { stream, region_id })
}

impl AsyncRead for UnixConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for UnixConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// One batch's claim on its extent: released when the last tensor bytes of the batch go.
struct Lease {
    region: Arc<Region>,
    region_id: u64,
    entry: u32,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.region.entry(self.entry).store(RELEASED, Ordering::Release);
    }
}

/// A tensor's bytes in a region.
struct SharedBytes {
    lease: Arc<Lease>,
    offset: usize,
    len: usize,
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `resolve` checked [offset, offset + len) lies in the region, which stays mapped
        // while the lease holds it, and is sealed against shrinking (reads cannot fault). The
        // loader writes these bytes only before sending the batch and after the lease's release.
        unsafe { std::slice::from_raw_parts(self.lease.region.as_ptr().add(self.offset), self.len) }
    }
}

/// Replaces every tensor sent as a shared slice by bytes over the region it names.
///
/// # Errors
/// A message naming the field when its region is unknown (not granted on this connection) or
/// its slice lies outside the region.
pub(crate) fn resolve(response: &mut BatchResponse) -> Result<(), String> {
    let mut lease: Option<Arc<Lease>> = None;
    for tensor in &mut response.tensors {
        let Some(SharedSlice { region, entry, offset, length }) = tensor.shared.take() else { continue };
        let lease = match &lease {
            Some(lease) if lease.entry == entry && lease.region_id == region => lease.clone(),
            _ => {
                let mapped = regions().get(&region).cloned().ok_or_else(|| {
                    format!(
                        "field {:?} was sent in shared-memory region {region}, which this client does not hold",
                        tensor.field
                    )
                })?;
                if entry >= NUM_ENTRIES {
                    return Err(format!(
                        "field {:?} names shared-memory entry {entry} (of {NUM_ENTRIES})",
                        tensor.field
                    ));
                }
                let new = Arc::new(Lease { region: mapped, region_id: region, entry });
                lease = Some(new.clone());
                new
            }
        };
        let end = offset.checked_add(length);
        if offset < DATA_OFFSET as u64 || end.is_none_or(|end| end > lease.region.len() as u64) {
            return Err(format!(
                "field {:?}: shared slice {offset}+{length} lies outside the region's data ({DATA_OFFSET}..{})",
                tensor.field,
                lease.region.len()
            ));
        }
        tensor.data = Bytes::from_owner(SharedBytes { lease, offset: offset as usize, len: length as usize });
    }
    Ok(())
}

/// Regions this process holds in the registry (for tests).
pub fn num_open_regions() -> usize {
    regions().len()
}

#[cfg(test)]
mod tests {
    use conveyor_proto::{
        shm::{FREE, IN_USE, MIN_REGION_BYTES},
        v1::Tensor,
    };

    use super::*;

    fn register(len: u64) -> (u64, Arc<Region>) {
        let region = Arc::new(Region::create(len).expect("memfd"));
        let id = NEXT_REGION.fetch_add(1, Ordering::Relaxed);
        regions().insert(id, region.clone());
        (id, region)
    }

    fn shared(field: &str, region: u64, entry: u32, offset: u64, length: u64) -> Tensor {
        Tensor { field: field.into(), shared: Some(SharedSlice { region, entry, offset, length }), ..Tensor::default() }
    }

    #[test]
    fn shared_tensors_are_the_region_bytes_and_release_their_entry_with_the_last_view() {
        let (id, region) = register(MIN_REGION_BYTES);
        region.entry(7).store(IN_USE, Ordering::Release);
        // SAFETY: inside the region; nothing else uses it.
        unsafe { std::ptr::copy_nonoverlapping([1u8, 2, 3, 4].as_ptr(), region.as_ptr().add(DATA_OFFSET + 64), 4) };
        let mut response = BatchResponse {
            tensors: vec![shared("a", id, 7, DATA_OFFSET as u64, 64), shared("b", id, 7, DATA_OFFSET as u64 + 64, 4)],
            ..BatchResponse::default()
        };
        resolve(&mut response).expect("resolved");
        let b = response.tensors[1].data.clone();
        assert_eq!(&b[..], &[1, 2, 3, 4]);
        // SAFETY: as above.
        assert_eq!(b.as_ptr(), unsafe { region.as_ptr().add(DATA_OFFSET + 64) }.cast_const(), "no copy");
        drop(response);
        assert_eq!(region.entry(7).load(Ordering::Acquire), IN_USE, "a view is still alive");
        drop(b);
        assert_eq!(region.entry(7).load(Ordering::Acquire), RELEASED);
        regions().remove(&id);
        assert_eq!(region.entry(8).load(Ordering::Acquire), FREE);
    }

    #[test]
    fn slices_outside_the_region_or_of_unknown_regions_are_refused() {
        let (id, _region) = register(MIN_REGION_BYTES);
        for (tensor, needle) in [
            (shared("x", id, 1, MIN_REGION_BYTES - 8, 16), "outside"),
            (shared("x", id, 1, 0, 16), "outside"),
            (shared("x", id, 1, u64::MAX, 2), "outside"),
            (shared("x", id, NUM_ENTRIES, DATA_OFFSET as u64, 16), "entry"),
            (shared("x", u64::MAX, 1, DATA_OFFSET as u64, 16), "does not hold"),
        ] {
            let mut response = BatchResponse { tensors: vec![tensor], ..BatchResponse::default() };
            let error = resolve(&mut response).expect_err("refused");
            assert!(error.contains(needle) && error.contains("\"x\""), "{error}");
        }
        regions().remove(&id);
    }
}
