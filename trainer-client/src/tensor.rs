//! Batches as named libtorch tensors on the training device (cargo feature `torch`).
//!
//! Element types map to libtorch kinds one to one, except the unsigned types libtorch lacks:
//! `uint16` widens to `int32` and `uint32` to `int64` (every value is kept exactly);
//! `uint64` has no wider signed type and is refused with an error naming the field — store such
//! fields as `int64`.
//!
//! Copies: [`TensorConverter::convert_shared`] (what `stream --tensors` and `train` use) makes a
//! CPU tensor over the received message itself (`at::from_blob` with a deleter that drops the
//! message's bytes when libtorch frees the tensor): no copy. [`TensorConverter::convert`] copies
//! once, into memory the tensor owns; so do both for the widened types and for data that is not
//! aligned to its element size. With CUDA, the tensor is copied into page-locked memory from
//! libtorch's caching host allocator and from there to the device asynchronously; the allocator
//! reuses a block only once its copy has finished, so page-locked memory stays bounded by the
//! batches whose copies are in flight.

// The unsafe code of this module: the copy into a fresh tensor, and the tensors that share a
// received batch's bytes (an FFI call to csrc/owned_blob.cpp and its deleter).
#![allow(unsafe_code)]

use conveyor_proto::DType;
use tch::{Device, Kind, Tensor};

use crate::batch::{Batch, FieldBatch};

/// Why a batch cannot become tensors.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// A dtype libtorch cannot hold without losing values.
    #[error("field '{field}' is {dtype}, which libtorch has no type for; store it as int64 (or a smaller type)")]
    Unsupported {
        /// Field name.
        field: String,
        /// Its dtype name.
        dtype: &'static str,
    },
    /// The bytes received do not match the field's shape and dtype.
    #[error(
        "field '{field}' holds {got} bytes where its shape and dtype need {expected}; the loader sent a malformed batch"
    )]
    Length {
        /// Field name.
        field: String,
        /// Bytes the shape and dtype need.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// libtorch refused an operation.
    #[error("libtorch failed on field '{field}': {error}")]
    Torch {
        /// Field name.
        field: String,
        /// The error.
        error: tch::TchError,
    },
}

/// The libtorch kind a dtype arrives as.
///
/// # Errors
/// [`TensorError::Unsupported`] for `uint64`.
pub fn kind_of(field: &str, dtype: DType) -> Result<Kind, TensorError> {
    Ok(match dtype {
        DType::Bool => Kind::Bool,
        DType::Uint8 => Kind::Uint8,
        DType::Int8 => Kind::Int8,
        DType::Int16 => Kind::Int16,
        DType::Int32 | DType::Uint16 => Kind::Int,
        DType::Int64 | DType::Uint32 => Kind::Int64,
        DType::Float16 => Kind::Half,
        DType::Float32 => Kind::Float,
        DType::Float64 => Kind::Double,
        DType::Uint64 | DType::Unspecified => {
            return Err(TensorError::Unsupported { field: field.to_owned(), dtype: dtype.name() });
        }
    })
}

/// One batch as tensors on the device.
#[derive(Debug)]
pub struct TensorBatch {
    /// Global sample indices, in order.
    pub indices: Vec<u64>,
    /// `(field name, tensor of shape [batch, ...sample shape])`; for a ragged field, its values
    /// (`[total rows, ...row shape]`).
    pub fields: Vec<(String, Tensor)>,
    /// `(field name, int64 tensor of batch + 1 row offsets)` for each ragged field: sample `i`
    /// is its values' rows `offsets[i]..offsets[i+1]` (with the values,
    /// `torch.nested.nested_tensor_from_jagged(values, offsets)` in Python).
    pub offsets: Vec<(String, Tensor)>,
}

impl TensorBatch {
    /// The tensor of field `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// Converts batches into tensors on one device.
#[derive(Debug, Clone, Copy)]
pub struct TensorConverter {
    device: Device,
}

impl TensorConverter {
    /// A converter for `device`.
    pub fn new(device: Device) -> TensorConverter {
        TensorConverter { device }
    }

    /// The device tensors go to.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The batch's fields as tensors on the device.
    ///
    /// # Errors
    /// [`TensorError`] for a dtype libtorch lacks or a libtorch failure.
    pub fn convert(&self, batch: &Batch) -> Result<TensorBatch, TensorError> {
        let fields = batch
            .fields
            .iter()
            .map(|field| {
                let tensor =
                    if self.device == Device::Cpu { host_tensor(field) } else { device_tensor(field, self.device) };
                tensor.map(|t| (field.name.clone(), t))
            })
            .collect::<Result<_, _>>()?;
        let offsets = self.offsets(&batch.fields);
        Ok(TensorBatch { indices: batch.indices.clone(), fields, offsets })
    }

    /// The batch's fields as tensors on the device, CPU tensors sharing the received bytes
    /// instead of copying them (see the module docs; a field that cannot be shared is copied).
    ///
    /// # Safety
    /// libtorch tensors are writable, and these ones write into the batch's received bytes. The
    /// caller must not read those bytes through another handle (a clone of the batch or of a
    /// field's `data`) while an in-place operation writes to the tensors. Holding no such clone,
    /// as the `stream` and `train` commands do, satisfies this.
    ///
    /// # Errors
    /// As [`TensorConverter::convert`].
    pub unsafe fn convert_shared(&self, batch: Batch) -> Result<TensorBatch, TensorError> {
        let Batch { indices, fields, .. } = batch;
        let offsets = self.offsets(&fields);
        let fields = fields
            .into_iter()
            .map(|field| {
                let name = field.name.clone();
                // SAFETY: the caller keeps the contract above.
                let host = unsafe { shared_host_tensor(field) };
                let tensor =
                    if self.device == Device::Cpu { host } else { host.and_then(|t| to_device(t, &name, self.device)) };
                tensor.map(|t| (name, t))
            })
            .collect::<Result<_, _>>()?;
        Ok(TensorBatch { indices, fields, offsets })
    }

    /// The ragged fields' offsets as int64 tensors on the device.
    fn offsets(&self, fields: &[FieldBatch]) -> Vec<(String, Tensor)> {
        fields
            .iter()
            .filter_map(|field| {
                let offsets: Vec<i64> = field.offsets.as_ref()?.iter().map(|&o| o as i64).collect();
                Some((field.name.clone(), Tensor::from_slice(&offsets).to_device(self.device)))
            })
            .collect()
    }
}

fn shape_of(field: &FieldBatch) -> Vec<i64> {
    field.shape.iter().map(|&d| d as i64).collect()
}

/// A CPU tensor holding the field: one copy (widening the unsigned types libtorch lacks).
pub fn host_tensor(field: &FieldBatch) -> Result<Tensor, TensorError> {
    let kind = kind_of(&field.name, field.dtype)?;
    let shape = shape_of(field);
    let num_elements = shape.iter().product::<i64>() as usize;
    let expected = num_elements * field.dtype.size_bytes();
    if field.data.len() != expected {
        return Err(TensorError::Length { field: field.name.clone(), expected, got: field.data.len() });
    }
    // The tensor's memory holds native-endian values of `kind`.
    let widened: Option<Vec<u8>> = match field.dtype {
        DType::Uint16 => Some(
            field
                .data
                .chunks_exact(2)
                .flat_map(|c| i32::from(u16::from_le_bytes([c[0], c[1]])).to_ne_bytes())
                .collect(),
        ),
        DType::Uint32 => Some(
            field
                .data
                .chunks_exact(4)
                .flat_map(|c| i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_ne_bytes())
                .collect(),
        ),
        _ => None,
    };
    let bytes = widened.as_deref().unwrap_or(&field.data);
    debug_assert_eq!(bytes.len(), num_elements * kind.elt_size_in_bytes());
    // Not `Tensor::from_data_size`: that zero-fills a fresh tensor (on libtorch's OpenMP
    // threads, whose spin-waiting took a quarter of the CPU in a profile) before copying.
    let tensor = Tensor::f_empty(shape.as_slice(), (kind, Device::Cpu))
        .map_err(|error| TensorError::Torch { field: field.name.clone(), error })?;
    // SAFETY: `tensor` was just allocated, contiguous, on the CPU, with `num_elements` values of
    // `kind`, which is `bytes.len()` bytes (the received length was checked above and widening
    // turns each value into exactly one of `kind`); nothing else references it yet, and `bytes`
    // is a separate allocation.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), tensor.data_ptr().cast::<u8>(), bytes.len());
    }
    Ok(tensor)
}

/// A CPU tensor over the field's received bytes, which it keeps alive until libtorch frees it;
/// [`host_tensor`] (a copy) for the widened types and data not aligned to its element size.
///
/// # Safety
/// As [`TensorConverter::convert_shared`]: nothing else reads `field.data`'s bytes while the
/// tensor is written in place.
unsafe fn shared_host_tensor(field: FieldBatch) -> Result<Tensor, TensorError> {
    let kind = kind_of(&field.name, field.dtype)?;
    let element_bytes = field.dtype.size_bytes();
    let widened = matches!(field.dtype, DType::Uint16 | DType::Uint32);
    if widened || field.data.is_empty() || !(field.data.as_ptr() as usize).is_multiple_of(element_bytes) {
        return host_tensor(&field);
    }
    let shape = shape_of(&field);
    let expected = shape.iter().product::<i64>() as usize * element_bytes;
    if field.data.len() != expected {
        return Err(TensorError::Length { field: field.name, expected, got: field.data.len() });
    }
    let data = field.data.as_ptr().cast_mut().cast::<std::ffi::c_void>();
    let owner = Box::into_raw(Box::new(field.data)).cast::<std::ffi::c_void>();
    let mut error = [0u8; 512];
    // SAFETY: `data` points to `expected` initialised bytes owned by `owner` (a boxed `Bytes`,
    // whose heap buffer does not move when the box is made), aligned to the element size, in the
    // layout of a contiguous `shape` tensor of `kind`; libtorch calls `release_bytes(owner)`
    // exactly once, when the storage is freed, and only then are the bytes dropped. Writes
    // through the tensor are the caller's contract. `error` outlives the call.
    let tensor = unsafe {
        let ptr = conveyor_tensor_of_owned_blob(
            data,
            shape.as_ptr(),
            shape.len(),
            scalar_type(kind),
            owner,
            release_bytes,
            error.as_mut_ptr().cast(),
            error.len(),
        );
        if ptr.is_null() {
            drop(Box::from_raw(owner.cast::<bytes::Bytes>()));
            let message = std::ffi::CStr::from_bytes_until_nul(&error).map(|m| m.to_string_lossy().into_owned());
            return Err(TensorError::Torch {
                field: field.name,
                error: tch::TchError::Torch(message.unwrap_or_else(|_| "from_blob failed".into())),
            });
        }
        Tensor::from_ptr(ptr.cast())
    };
    Ok(tensor)
}

/// libtorch's `c10::ScalarType` number of the kinds batches arrive as.
fn scalar_type(kind: Kind) -> std::ffi::c_int {
    match kind {
        Kind::Uint8 => 0,
        Kind::Int8 => 1,
        Kind::Int16 => 2,
        Kind::Int => 3,
        Kind::Int64 => 4,
        Kind::Half => 5,
        Kind::Float => 6,
        Kind::Double => 7,
        Kind::Bool => 11,
        other => unreachable!("kind_of never gives {other:?}"),
    }
}

/// Drops the `Bytes` a shared tensor kept alive (libtorch's deleter; any thread).
extern "C" fn release_bytes(owner: *mut std::ffi::c_void) {
    // SAFETY: `owner` is the `Box<Bytes>` leaked in `shared_host_tensor`, released once.
    drop(unsafe { Box::from_raw(owner.cast::<bytes::Bytes>()) });
}

unsafe extern "C" {
    /// `csrc/owned_blob.cpp`.
    fn conveyor_tensor_of_owned_blob(
        data: *mut std::ffi::c_void,
        dims: *const i64,
        ndims: usize,
        scalar_type: std::ffi::c_int,
        owner: *mut std::ffi::c_void,
        release: extern "C" fn(*mut std::ffi::c_void),
        error: *mut std::ffi::c_char,
        error_len: usize,
    ) -> *mut std::ffi::c_void;
}

/// The field on `device`: copied once into a CPU tensor, then into page-locked memory, then to
/// the device asynchronously. The page-locked block comes from libtorch's caching host allocator, which
/// records the copy on the block and hands it out again only once the copy has finished, so the
/// host tensor can be dropped at once and no later batch overwrites bytes still in flight.
fn device_tensor(field: &FieldBatch, device: Device) -> Result<Tensor, TensorError> {
    to_device(host_tensor(field)?, &field.name, device)
}

/// `host` on `device`: copied into page-locked memory, then to the device asynchronously (see
/// [`device_tensor`]). `host` may be dropped at once, even when it shares a received batch.
fn to_device(host: Tensor, field: &str, device: Device) -> Result<Tensor, TensorError> {
    let kind = host.kind();
    // `_pin_memory`: `pin_memory` with a device argument logs a deprecation warning per call.
    host.f_internal_pin_memory(device)
        .and_then(|pinned| pinned.f_to_device_(device, kind, true, false))
        .map_err(|error| TensorError::Torch { field: field.to_owned(), error })
}

/// Parses `--device`: `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
///
/// # Errors
/// A message naming the accepted values.
pub fn parse_device(text: &str) -> Result<Device, String> {
    match text {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => text
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("--device '{text}' is not auto, cpu, cuda or cuda:N")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use conveyor_proto::ALL_DTYPES;

    fn field(dtype: DType, data: Vec<u8>, shape: Vec<u64>) -> FieldBatch {
        FieldBatch { name: dtype.name().into(), dtype, shape, data: Bytes::from(data), offsets: None }
    }

    /// Bytes of a tensor, read back through libtorch.
    fn tensor_bytes(tensor: &Tensor) -> Vec<u8> {
        let numel = tensor.numel();
        let mut out = vec![0u8; numel * tensor.kind().elt_size_in_bytes()];
        tensor.copy_data_u8(&mut out, numel);
        out
    }

    #[test]
    fn every_dtype_round_trips_bit_exactly_on_cpu() {
        for dtype in ALL_DTYPES {
            let size = dtype.size_bytes();
            // 2 samples of shape [3]: bytes 0..6*size, with values valid for every type.
            let data: Vec<u8> =
                (0..6 * size as u8).map(|b| if dtype == DType::Bool { b % 2 } else { b.wrapping_mul(37) }).collect();
            let batch = field(dtype, data.clone(), vec![2, 3]);
            match dtype {
                DType::Uint64 => {
                    let error = host_tensor(&batch).expect_err("uint64 has no libtorch type");
                    assert!(error.to_string().contains("'uint64'") && error.to_string().contains("int64"), "{error}");
                }
                DType::Uint16 | DType::Uint32 => {
                    let tensor = host_tensor(&batch).expect("widened");
                    assert_eq!(tensor.size(), vec![2, 3]);
                    let back: Vec<i64> =
                        Vec::<i64>::try_from(tensor.to_kind(Kind::Int64).flatten(0, -1)).expect("values");
                    let want: Vec<i64> = data
                        .chunks_exact(size)
                        .map(|c| {
                            if size == 2 {
                                i64::from(u16::from_le_bytes([c[0], c[1]]))
                            } else {
                                i64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            }
                        })
                        .collect();
                    assert_eq!(back, want, "{dtype:?}");
                }
                _ => {
                    let tensor = host_tensor(&batch).expect("converts");
                    assert_eq!((tensor.size(), tensor.kind()), (vec![2, 3], kind_of("x", dtype).expect("kind")));
                    assert_eq!(tensor_bytes(&tensor), data, "{dtype:?}");
                }
            }
        }
    }

    #[test]
    fn a_field_whose_bytes_do_not_fill_its_shape_is_refused_by_name() {
        let error = host_tensor(&field(DType::Int16, vec![0; 5], vec![2, 3])).expect_err("5 bytes are not 2x3 int16");
        assert!(
            error.to_string().contains("'int16' holds 5 bytes") && error.to_string().contains("need 12"),
            "{error}"
        );
    }

    /// Bytes that count how often they were dropped.
    struct Counted(Vec<u8>, std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl AsRef<[u8]> for Counted {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn batch_of(fields: Vec<FieldBatch>) -> Batch {
        Batch { index: 0, epoch: 0, indices: vec![0, 1], fields, decoded_bytes: 0 }
    }

    #[test]
    fn shared_tensors_use_the_received_bytes_and_release_them_with_the_last_view() {
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // 2 x 3 float32, from an 8-aligned heap buffer (Vec<u8> of 24 bytes: malloc aligns to 16).
        let values: Vec<u8> = [1.5f32, -2.0, 3.25, 0.0, 7.0, -0.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let data = Bytes::from_owner(Counted(values.clone(), dropped.clone()));
        let ptr = data.as_ptr() as usize;
        let batch = batch_of(vec![FieldBatch {
            name: "x".into(),
            dtype: DType::Float32,
            shape: vec![2, 3],
            data,
            offsets: None,
        }]);
        // SAFETY: the batch moves in and no clone of it exists.
        let tensors = unsafe { TensorConverter::new(Device::Cpu).convert_shared(batch) }.expect("converts");
        let tensor = tensors.get("x").expect("field x");
        assert_eq!(tensor.data_ptr() as usize, ptr, "the tensor is the received bytes, not a copy");
        assert_eq!(tensor_bytes(tensor), values);
        let view = tensor.slice(0, 1, 2, 1);
        drop(tensors);
        assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 0, "a view still holds the bytes");
        assert_eq!(Vec::<f32>::try_from(view.flatten(0, -1)).expect("values"), vec![0.0, 7.0, -0.5]);
        drop(view);
        assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 1, "released once, with the last view");
    }

    #[test]
    fn shared_conversion_copies_what_it_cannot_share_and_matches_the_copy_for_every_dtype() {
        for dtype in ALL_DTYPES.into_iter().filter(|&d| d != DType::Uint64) {
            let size = dtype.size_bytes();
            let data: Vec<u8> =
                (0..6 * size as u8).map(|b| if dtype == DType::Bool { b % 2 } else { b.wrapping_mul(37) }).collect();
            // One byte in, so multi-byte elements are misaligned and must be copied.
            let mut padded = vec![0u8];
            padded.extend_from_slice(&data);
            for bytes in [Bytes::from(data.clone()), Bytes::from(padded).slice(1..)] {
                let aligned = (bytes.as_ptr() as usize).is_multiple_of(size);
                let ptr = bytes.as_ptr() as usize;
                let field = FieldBatch { name: "f".into(), dtype, shape: vec![2, 3], data: bytes, offsets: None };
                let want = host_tensor(&field).expect("copies");
                // SAFETY: the batch moves in and no clone of it exists.
                let tensors = unsafe { TensorConverter::new(Device::Cpu).convert_shared(batch_of(vec![field])) }
                    .expect("converts");
                let got = tensors.get("f").expect("field f");
                assert_eq!((got.size(), got.kind()), (want.size(), want.kind()), "{dtype:?}");
                assert_eq!(tensor_bytes(got), tensor_bytes(&want), "{dtype:?}");
                let shared = aligned && !matches!(dtype, DType::Uint16 | DType::Uint32);
                assert_eq!(got.data_ptr() as usize == ptr, shared, "{dtype:?} aligned={aligned}");
            }
        }
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert_eq!(parse_device("cuda:1"), Ok(Device::Cuda(1)));
        assert!(parse_device("gpu").is_err());
    }
}
