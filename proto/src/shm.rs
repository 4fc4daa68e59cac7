//! The same-host shared-memory transport's contract, used by both sides (docs/shared-memory.md).
//!
//! A client that reaches a loader over a Unix socket may, before HTTP/2 starts, send a [`Hello`]
//! asking for a region of at most `max_bytes`. The loader answers with the region's size (0:
//! refused) and, when it grants one, passes an anonymous sealed `memfd` with `SCM_RIGHTS`. From
//! then on gRPC runs on the same socket as always, but the loader may answer a tensor with a
//! [`SharedSlice`](crate::v1::SharedSlice) into the region instead of its bytes.
//!
//! The region starts with an entry table of [`NUM_ENTRIES`] `u32` states, one per batch the
//! loader has placed there; batch data follows at [`DATA_OFFSET`]. The loader marks an entry
//! [`IN_USE`] before it sends the batch; the client stores [`RELEASED`] when it has dropped
//! every tensor of the batch; the loader reclaims released entries when it needs space. The loader
//! keeps its own record of where each entry's bytes are and never trusts the table for anything
//! but the release, so a client can at worst spoil its own batches.
//!
//! Nothing has a name: a SIGKILL on either side leaks nothing, since the kernel frees the memory
//! with the last descriptor and mapping.

use std::{
    fs::File,
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::AtomicU32,
};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// First bytes of a client's hello; an HTTP/2 client starts with `PRI `, so one byte tells them
/// apart.
pub const MAGIC: [u8; 8] = *b"CVYSHM01";
/// Bytes of a [`Hello`] on the wire.
pub const HELLO_BYTES: usize = 24;
/// Batches a region can hold at once (entries in its table).
pub const NUM_ENTRIES: u32 = 4096;
/// Where batch data starts: after the entry table, page-aligned.
pub const DATA_OFFSET: usize = 16384;
/// Alignment of every tensor's data in the region (a cache line; more than any dtype needs).
pub const DATA_ALIGN: usize = 64;
/// Smallest region worth granting: the entry table and one MiB of data.
pub const MIN_REGION_BYTES: u64 = DATA_OFFSET as u64 + (1 << 20);

/// Entry state: not used by any batch.
pub const FREE: u32 = 0;
/// Entry state: its batch was sent and the client may still hold it.
pub const IN_USE: u32 = 1;
/// Entry state: the client dropped the batch; the loader may reuse its bytes.
pub const RELEASED: u32 = 2;

/// What a client asks for before HTTP/2 starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The client's name for the region; echoed in every [`SharedSlice`](crate::v1::SharedSlice).
    pub region_id: u64,
    /// The largest region the client will map.
    pub max_bytes: u64,
}

impl Hello {
    /// The hello's wire bytes.
    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[..8].copy_from_slice(&MAGIC);
        out[8..16].copy_from_slice(&self.region_id.to_le_bytes());
        out[16..].copy_from_slice(&self.max_bytes.to_le_bytes());
        out
    }

    /// Parses a hello; `None` when the magic is wrong.
    pub fn decode(bytes: &[u8; HELLO_BYTES]) -> Option<Hello> {
        if bytes[..8] != MAGIC {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
        Some(Hello { region_id: word(8), max_bytes: word(16) })
    }
}

/// A region mapped shared and read-write.
#[derive(Debug)]
pub struct Region {
    map: memmap2::MmapRaw,
    /// Kept so the loader can pass it on; the client closes its copy after mapping.
    fd: Option<OwnedFd>,
}

impl Region {
    /// Creates an anonymous region of `len` bytes whose size is sealed (a client cannot shrink
    /// it under the loader), zeroed, and maps it.
    ///
    /// # Errors
    /// When the kernel refuses the memfd, the size or the mapping.
    pub fn create(len: u64) -> io::Result<Region> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let fd = rustix::fs::memfd_create("conveyor-batches", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        rustix::fs::ftruncate(&fd, len)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let file = File::from(fd);
        let map = memmap2::MmapOptions::new().len(usize::try_from(len).map_err(io::Error::other)?).map_raw(&file)?;
        Ok(Region { map, fd: Some(file.into()) })
    }

    /// Maps a region received from a loader, after checking it is `len` bytes and sealed
    /// against shrinking (so reading it can never fault).
    ///
    /// # Errors
    /// When the descriptor is not such a region or cannot be mapped.
    pub fn open(fd: OwnedFd, len: u64) -> io::Result<Region> {
        let seals = rustix::fs::fcntl_get_seals(&fd)?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(io::Error::other("the loader's shared-memory region is not sealed against shrinking"));
        }
        let file = File::from(fd);
        let actual = file.metadata()?.len();
        if actual != len || len < MIN_REGION_BYTES {
            return Err(io::Error::other(format!(
                "the loader's shared-memory region is {actual} bytes, not the {len} it announced"
            )));
        }
        let map = memmap2::MmapOptions::new().len(usize::try_from(len).map_err(io::Error::other)?).map_raw(&file)?;
        Ok(Region { map, fd: None })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the region is empty (never, for one that was granted).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The descriptor to pass to the client (the loader's side only).
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.fd.as_ref().map(AsFd::as_fd)
    }

    /// The state word of `entry`.
    ///
    /// # Panics
    /// When `entry >= NUM_ENTRIES` (callers check entries from the wire first).
    pub fn entry(&self, entry: u32) -> &AtomicU32 {
        assert!(entry < NUM_ENTRIES, "shared-memory entry {entry} out of range");
        // SAFETY: the table lies inside the mapping (regions are at least MIN_REGION_BYTES),
        // entry * 4 is 4-aligned in a page-aligned mapping, and AtomicU32 has u32's layout. The
        // other process only ever accesses these words atomically too.
        unsafe { &*self.map.as_ptr().add(entry as usize * 4).cast::<AtomicU32>() }
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
}

/// The loader's answer to a hello: the region's size (0: refused) and its descriptor.
///
/// # Errors
/// The socket's error; `WouldBlock` on a non-blocking socket that cannot take 8 bytes yet.
pub fn send_grant(socket: impl AsFd, region: Option<&Region>) -> io::Result<()> {
    let size = region.map_or(0, |r| r.len() as u64).to_le_bytes();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = region.and_then(Region::fd) {
        fds = [fd];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let sent = rustix::net::sendmsg(socket, &[io::IoSlice::new(&size)], &mut control, SendFlags::NOSIGNAL)?;
    if sent != size.len() {
        return Err(io::Error::other("short write of the shared-memory grant"));
    }
    Ok(())
}

/// Reads the loader's grant on a blocking socket: the region's size and descriptor (`None`
/// when refused).
///
/// # Errors
/// The socket's error, or a grant that is cut short or has a size without a descriptor.
pub fn recv_grant(socket: impl AsFd) -> io::Result<Option<(u64, OwnedFd)>> {
    let mut size = [0u8; 8];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received =
        rustix::net::recvmsg(&socket, &mut [io::IoSliceMut::new(&mut size)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for received_fd in fds {
                fd.get_or_insert(received_fd);
            }
        }
    }
    if received.bytes != size.len() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the loader closed during the shared-memory hello"));
    }
    match (u64::from_le_bytes(size), fd) {
        (0, _) => Ok(None),
        (len, Some(fd)) => Ok(Some((len, fd))),
        (_, None) => Err(io::Error::other("the loader granted shared memory but sent no descriptor")),
    }
}

/// Rounds `len` up to [`DATA_ALIGN`].
pub fn aligned(len: usize) -> usize {
    len.div_ceil(DATA_ALIGN) * DATA_ALIGN
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixStream, sync::atomic::Ordering};

    use super::*;

    #[test]
    fn hello_round_trips_and_http2_is_not_a_hello() {
        let hello = Hello { region_id: 7, max_bytes: 1 << 30 };
        assert_eq!(Hello::decode(&hello.encode()), Some(hello));
        let mut preface = [0u8; HELLO_BYTES];
        preface.copy_from_slice(&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nxxxxxxxxx"[..HELLO_BYTES]);
        assert_eq!(Hello::decode(&preface), None);
    }

    #[test]
    fn a_granted_region_is_the_same_memory_on_both_sides() {
        let (loader, client) = UnixStream::pair().expect("socket pair");
        let region = Region::create(MIN_REGION_BYTES).expect("memfd");
        send_grant(&loader, Some(&region)).expect("grant");
        let (len, fd) = recv_grant(&client).expect("received").expect("granted");
        assert_eq!(len, MIN_REGION_BYTES);
        let mapped = Region::open(fd, len).expect("mapped");
        region.entry(3).store(IN_USE, Ordering::Release);
        // SAFETY: the offset is inside both mappings and nothing else touches it.
        unsafe { region.as_ptr().add(DATA_OFFSET).write(42) };
        assert_eq!(mapped.entry(3).load(Ordering::Acquire), IN_USE);
        // SAFETY: as above.
        assert_eq!(unsafe { mapped.as_ptr().add(DATA_OFFSET).read() }, 42);
        mapped.entry(3).store(RELEASED, Ordering::Release);
        assert_eq!(region.entry(3).load(Ordering::Acquire), RELEASED);
    }

    #[test]
    fn a_refusal_carries_no_descriptor_and_a_region_cannot_shrink() {
        let (loader, client) = UnixStream::pair().expect("socket pair");
        send_grant(&loader, None).expect("refusal");
        assert!(recv_grant(&client).expect("received").is_none());
        let region = Region::create(MIN_REGION_BYTES).expect("memfd");
        let fd = region.fd().expect("loader side").try_clone_to_owned().expect("dup");
        assert!(rustix::fs::ftruncate(&fd, 4096).is_err(), "sealed against shrinking");
        assert!(Region::open(fd, MIN_REGION_BYTES + 1).is_err(), "size mismatch refused");
    }
}
