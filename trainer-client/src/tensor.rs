//! Batches as named libtorch tensors on the training device (cargo feature `torch`).
//!
//! Element types map to libtorch kinds one to one, except the unsigned types libtorch lacks:
//! `uint16` widens to `int32` and `uint32` to `int64` (every value is kept exactly);
//! `uint64` has no wider signed type and is refused with an error naming the field — store such
//! fields as `int64`.
//!
//! Copies: on CPU, one copy from the received message into the tensor. With CUDA, that tensor
//! is copied into page-locked memory from libtorch's caching host allocator and from there to
//! the device asynchronously; the allocator reuses a block only once its copy has finished, so
//! page-locked memory stays bounded by the batches whose copies are in flight.

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
    /// `(field name, tensor of shape [batch, ...sample shape])`.
    pub fields: Vec<(String, Tensor)>,
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
        Ok(TensorBatch { indices: batch.indices.clone(), fields })
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
    #[allow(unsafe_code)]
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), tensor.data_ptr().cast::<u8>(), bytes.len());
    }
    Ok(tensor)
}

/// The field on `device`: copied into page-locked memory, then copied to the device
/// asynchronously. The page-locked block comes from libtorch's caching host allocator, which
/// records the copy on the block and hands it out again only once the copy has finished, so the
/// host tensor can be dropped at once and no later batch overwrites bytes still in flight.
fn device_tensor(field: &FieldBatch, device: Device) -> Result<Tensor, TensorError> {
    let kind = kind_of(&field.name, field.dtype)?;
    // `_pin_memory`: `pin_memory` with a device argument logs a deprecation warning per call.
    host_tensor(field)?
        .f_internal_pin_memory(device)
        .and_then(|pinned| pinned.f_to_device_(device, kind, true, false))
        .map_err(|error| TensorError::Torch { field: field.name.clone(), error })
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
        FieldBatch { name: dtype.name().into(), dtype, shape, data: Bytes::from(data) }
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

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert_eq!(parse_device("cuda:1"), Ok(Device::Cuda(1)));
        assert!(parse_device("gpu").is_err());
    }
}
