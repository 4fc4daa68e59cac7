//! The loader's side of shared memory: one region per Unix-socket connection that asked for one,
//! and the extents of it that batches occupy (layout and handshake in
//! [`conveyor_proto::shm`]).
//!
//! A batch is written into one extent (its tensors each 64-byte aligned) and named by one entry of
//! the region's table; the client marks the entry released when it drops the batch, and the
//! allocator takes released extents back the next time it places a batch. A batch that does not
//! fit is sent inline over the socket instead: shared memory never makes a stream wait.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use conveyor_proto::{
    shm::{self, DATA_OFFSET, FREE, IN_USE, NUM_ENTRIES, RELEASED, Region},
    v1::SharedSlice,
    wire::OutgoingBatch,
};

/// A connection's region and what occupies it.
#[derive(Debug)]
pub struct SharedRegion {
    region: Region,
    /// Its bytes counted against `--max-shm-bytes` while it lives.
    _reservation: Option<Reservation>,
    /// The client's name for the region, echoed in every slice.
    id: u64,
    extents: Mutex<Extents>,
}

/// Bytes counted in a shared total while it lives (a region under `--max-shm-bytes`).
#[derive(Debug)]
pub struct Reservation {
    in_use: Arc<AtomicU64>,
    bytes: u64,
}

impl Reservation {
    /// Counts `bytes` in `in_use` when the total stays within `limit`; `None` otherwise.
    pub fn take(in_use: &Arc<AtomicU64>, bytes: u64, limit: u64) -> Option<Reservation> {
        in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= limit)
            })
            .ok()
            .map(|_| Reservation { in_use: in_use.clone(), bytes })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.in_use.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Free and used extents of the data area.
#[derive(Debug)]
struct Extents {
    /// Free extents, offset to length, coalesced.
    free: BTreeMap<usize, usize>,
    /// Per entry: the extent its batch occupies.
    used: Vec<Option<(usize, usize)>>,
    /// Entries in use, to scan for releases.
    in_use: Vec<u32>,
    /// Entries not in use.
    idle: Vec<u32>,
}

impl Extents {
    fn new(len: usize) -> Extents {
        Extents {
            free: BTreeMap::from([(DATA_OFFSET, len - DATA_OFFSET)]),
            used: vec![None; NUM_ENTRIES as usize],
            in_use: Vec::new(),
            idle: (0..NUM_ENTRIES).rev().collect(),
        }
    }

    /// Takes back the extents of entries the client released.
    fn reclaim(&mut self, region: &Region) {
        let mut kept = Vec::with_capacity(self.in_use.len());
        for entry in std::mem::take(&mut self.in_use) {
            if region.entry(entry).load(Ordering::Acquire) != RELEASED {
                kept.push(entry);
                continue;
            }
            if let Some((offset, len)) = self.used[entry as usize].take() {
                self.give_back(offset, len);
            }
            region.entry(entry).store(FREE, Ordering::Relaxed);
            self.idle.push(entry);
        }
        self.in_use = kept;
    }

    /// First fit: the lowest free extent of at least `len` bytes, and an entry to name it.
    fn take(&mut self, len: usize) -> Option<(u32, usize)> {
        let (&offset, &free_len) = self.free.iter().find(|&(_, &free_len)| free_len >= len)?;
        let entry = self.idle.pop()?;
        self.free.remove(&offset);
        if free_len > len {
            self.free.insert(offset + len, free_len - len);
        }
        self.used[entry as usize] = Some((offset, len));
        self.in_use.push(entry);
        Some((entry, offset))
    }

    /// Frees an extent, merged with its free neighbours.
    fn give_back(&mut self, mut offset: usize, mut len: usize) {
        if let Some((&next, &next_len)) = self.free.range(offset + len..).next()
            && next == offset + len
        {
            self.free.remove(&next);
            len += next_len;
        }
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            self.free.remove(&prev);
            offset = prev;
            len += prev_len;
        }
        self.free.insert(offset, len);
    }
}

impl SharedRegion {
    /// A region of `len` bytes for the client that calls it `id`.
    ///
    /// # Errors
    /// When the kernel refuses the memory.
    pub fn create(id: u64, len: u64) -> std::io::Result<SharedRegion> {
        let region = Region::create(len)?;
        let extents = Mutex::new(Extents::new(region.len()));
        Ok(SharedRegion { region, _reservation: None, id, extents })
    }

    /// This region, its bytes given back to `reservation`'s count when it is dropped.
    pub fn reserved(mut self, reservation: Reservation) -> SharedRegion {
        self._reservation = Some(reservation);
        self
    }

    /// The mapped region (to pass its descriptor).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Writes the batch's tensors into a free extent and points them there; `false` (the batch
    /// unchanged, to go inline) when no extent or entry is free. Copies on the calling thread:
    /// call it off the async runtime.
    pub fn place(&self, batch: &mut OutgoingBatch) -> bool {
        let sizes: Vec<usize> = batch.tensors.iter().map(|t| shm::aligned(t.data_len())).collect();
        let total: usize = sizes.iter().sum();
        if total == 0 || batch.error.is_some() {
            return false;
        }
        let taken = {
            let mut extents = self.extents.lock().unwrap_or_else(|p| p.into_inner());
            extents.reclaim(&self.region);
            extents.take(total)
        };
        let Some((entry, start)) = taken else { return false };
        self.region.entry(entry).store(IN_USE, Ordering::Relaxed);
        let mut offset = start;
        for (tensor, size) in batch.tensors.iter_mut().zip(sizes) {
            let len = tensor.data_len();
            // SAFETY: [offset, offset + len) lies in this batch's extent, inside the mapping (the
            // allocator hands out extents of the data area only), and the extent is this call's
            // alone until the batch is sent and the client releases it. The client may write into
            // its copy of the mapping meanwhile only to spoil its own batch; the memfd is sealed
            // against shrinking, so the writes cannot fault.
            let mut out = unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr().add(offset), len) };
            tensor.write_data(&mut out);
            debug_assert!(out.is_empty(), "the tensor filled its slice");
            tensor.move_to_shared(SharedSlice { region: self.id, entry, offset: offset as u64, length: len as u64 });
            offset += size;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use conveyor_proto::{DType, shm::MIN_REGION_BYTES, wire::OutgoingTensor};
    use proptest::prelude::*;

    use super::*;

    fn batch(lens: &[usize]) -> OutgoingBatch {
        let tensors = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let data: Vec<u8> = (0..len).map(|b| (b + i) as u8).collect();
                OutgoingTensor::owned(format!("f{i}"), DType::Uint8, vec![len as u64], Bytes::from(data))
            })
            .collect();
        OutgoingBatch::new(1, Vec::new(), tensors, 0)
    }

    #[test]
    fn placed_tensors_hold_their_bytes_in_the_region_and_released_space_is_reused() {
        let region = SharedRegion::create(5, MIN_REGION_BYTES).expect("memfd");
        let mut first = batch(&[1000, 3]);
        assert!(region.place(&mut first));
        let slices: Vec<SharedSlice> = first.tensors.iter().map(|t| *t.shared().expect("placed")).collect();
        assert!(slices.iter().all(|s| s.region == 5 && s.offset % 64 == 0 && s.entry == slices[0].entry));
        for (i, slice) in slices.iter().enumerate() {
            // SAFETY: the slice is inside the mapping and nothing writes it now.
            let bytes = unsafe {
                std::slice::from_raw_parts(region.region().as_ptr().add(slice.offset as usize), slice.length as usize)
            };
            assert!(bytes.iter().enumerate().all(|(b, &v)| v == (b + i) as u8), "tensor {i} bytes");
        }
        // The data area is 1 MiB: a second 600 KB batch fits beside the first, a third does not.
        let mut second = batch(&[600_000]);
        assert!(region.place(&mut second));
        let mut third = batch(&[600_000]);
        assert!(!region.place(&mut third), "full: goes inline");
        assert!(third.tensors[0].shared().is_none());
        let second_entry = second.tensors[0].shared().expect("placed").entry;
        region.region().entry(second_entry).store(RELEASED, Ordering::Release);
        assert!(region.place(&mut third), "the released extent is reused");
        assert_eq!(
            third.tensors[0].shared().expect("placed").offset,
            second.tensors[0].shared().expect("placed").offset
        );
    }

    proptest! {
        /// Any order of places and releases keeps extents disjoint and inside the data area, and
        /// releasing everything gives the whole area back as one extent.
        #[test]
        fn extents_never_overlap(ops in proptest::collection::vec((1usize..200_000, any::<bool>()), 1..60)) {
            let region = SharedRegion::create(1, MIN_REGION_BYTES).expect("memfd");
            let mut held: Vec<u32> = Vec::new();
            for (len, release_one) in ops {
                if release_one && !held.is_empty() {
                    let entry = held.remove(len % held.len());
                    region.region().entry(entry).store(RELEASED, Ordering::Release);
                }
                let mut b = batch(&[len]);
                if region.place(&mut b) {
                    held.push(b.tensors[0].shared().expect("placed").entry);
                }
                let extents = region.extents.lock().expect("lock");
                let mut spans: Vec<(usize, usize)> = extents.used.iter().flatten().copied().chain(extents.free.iter().map(|(&o, &l)| (o, l))).collect();
                spans.sort_unstable();
                let mut end = DATA_OFFSET;
                for (offset, len) in spans {
                    prop_assert_eq!(offset, end, "extents tile the data area");
                    end = offset + len;
                }
                prop_assert_eq!(end, region.region().len());
            }
            for entry in held {
                region.region().entry(entry).store(RELEASED, Ordering::Release);
            }
            let mut extents = region.extents.lock().expect("lock");
            extents.reclaim(region.region());
            prop_assert_eq!(extents.free.len(), 1);
            prop_assert_eq!(extents.in_use.len(), 0);
        }
    }
}
