//! What the training loop receives: the samples of one batch, one tensor per field.

use bytes::Bytes;
use conveyor_proto::{
    DType,
    v1::{BatchResponse, DatasetInfo},
};

use crate::error::ResponseError;

/// One field of a batch: `shape` is `[batch, ...sample shape]` and `data` holds its elements as
/// little-endian C-order bytes, a slice of the received message (no copy was made).
///
/// A ragged field (samples of different lengths) is its values and row offsets: `shape` is
/// `[total rows, ...row shape]`, and sample `i` is rows `offsets[i]..offsets[i+1]` (the layout
/// of Arrow lists and `torch.nested`'s jagged tensors).
#[derive(Debug, Clone)]
pub struct FieldBatch {
    /// Field name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// `[batch, ...sample shape]`, or `[total rows, ...row shape]` for a ragged field.
    pub shape: Vec<u64>,
    /// Element bytes.
    pub data: Bytes,
    /// A ragged field's batch + 1 row offsets (checked: from 0, never decreasing, ending at
    /// `shape[0]`); `None` for a fixed-shape field.
    pub offsets: Option<Vec<u64>>,
}

impl FieldBatch {
    /// Sample `i`'s bytes: its row of a fixed-shape field, its rows of a ragged one.
    ///
    /// # Panics
    /// When `i` is not a sample of the batch.
    pub fn sample(&self, i: usize) -> &[u8] {
        let row_bytes = self.shape[1..].iter().product::<u64>() as usize * self.dtype.size_bytes();
        match &self.offsets {
            Some(offsets) => &self.data[offsets[i] as usize * row_bytes..offsets[i + 1] as usize * row_bytes],
            None => &self.data[i * row_bytes..(i + 1) * row_bytes],
        }
    }
}

/// One batch, in the epoch's deterministic order.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Epoch it belongs to.
    pub epoch: u64,
    /// Its number within the epoch (0-based, for this rank).
    pub index: u64,
    /// Global sample indices, in order.
    pub indices: Vec<u64>,
    /// One entry per field, in the dataset's field order.
    pub fields: Vec<FieldBatch>,
    /// Bytes the loader decoded from storage for this batch (chunk cache misses).
    pub decoded_bytes: u64,
}

impl Batch {
    /// Total tensor bytes.
    pub fn num_bytes(&self) -> u64 {
        self.fields.iter().map(|f| f.data.len() as u64).sum()
    }

    /// The field called `name`.
    pub fn field(&self, name: &str) -> Option<&FieldBatch> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Checks a response against the request and the dataset description, and takes its
    /// tensors without copying.
    ///
    /// # Errors
    /// The first mismatch.
    pub fn from_response(
        response: BatchResponse,
        requested: &[u64],
        info: &DatasetInfo,
        epoch: u64,
        index: u64,
    ) -> Result<Batch, ResponseError> {
        if response.indices != requested {
            return Err(ResponseError::WrongIndices { batch: index });
        }
        if response.tensors.len() != info.fields.len() {
            return Err(ResponseError::TensorCount {
                batch: index,
                tensors: response.tensors.len(),
                fields: info.fields.len(),
            });
        }
        let rows = requested.len() as u64;
        let mut fields = Vec::with_capacity(info.fields.len());
        for (tensor, field) in response.tensors.into_iter().zip(&info.fields) {
            // A ragged field's leading dimension is its rows, which its offsets count.
            let offsets = match field.ragged {
                true => Some(row_offsets(&tensor.offsets, rows).map_err(|problem| ResponseError::BadOffsets {
                    batch: index,
                    field: field.name.clone(),
                    problem,
                })?),
                false => None,
            };
            let leading = offsets.as_ref().and_then(|o| o.last().copied()).unwrap_or(rows);
            let expected_shape: Vec<u64> = std::iter::once(leading).chain(field.sample_shape.iter().copied()).collect();
            if tensor.field != field.name || tensor.dtype != field.dtype || tensor.shape != expected_shape {
                return Err(ResponseError::TensorMismatch {
                    batch: index,
                    tensor: tensor.field,
                    dtype: tensor.dtype,
                    shape: tensor.shape,
                    field: field.name.clone(),
                    expected_shape,
                });
            }
            let dtype = DType::try_from(tensor.dtype).unwrap_or(DType::Unspecified);
            let row_bytes = match field.ragged {
                true => field.sample_shape.iter().product::<u64>() * dtype.size_bytes() as u64,
                false => field.bytes_per_sample,
            };
            if tensor.data.len() as u64 != leading * row_bytes {
                return Err(ResponseError::ByteCount {
                    batch: index,
                    field: field.name.clone(),
                    got: tensor.data.len() as u64,
                    expected: leading * row_bytes,
                });
            }
            fields.push(FieldBatch { name: tensor.field, dtype, shape: tensor.shape, data: tensor.data, offsets });
        }
        Ok(Batch { epoch, index, indices: response.indices, fields, decoded_bytes: response.decoded_bytes })
    }
}

/// A ragged field's row offsets for a batch of `rows` samples: `rows + 1` little-endian int64,
/// from 0, never decreasing (that they end at the rows sent is checked against the shape).
fn row_offsets(bytes: &[u8], rows: u64) -> Result<Vec<u64>, String> {
    if bytes.len() as u64 != (rows + 1) * 8 {
        return Err(format!("{} bytes of offsets for {rows} samples (expected {})", bytes.len(), (rows + 1) * 8));
    }
    let offsets: Vec<u64> =
        bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()) as u64).collect();
    if offsets[0] != 0 || offsets.windows(2).any(|w| w[1] < w[0]) {
        return Err("offsets do not run from 0 upwards".to_owned());
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(offsets: &[i64]) -> Vec<u8> {
        offsets.iter().flat_map(|o| o.to_le_bytes()).collect()
    }

    #[test]
    fn row_offsets_are_one_per_sample_plus_one_from_zero_and_never_decrease() {
        assert_eq!(row_offsets(&bytes(&[0, 2, 2, 5]), 3), Ok(vec![0, 2, 2, 5]));
        assert!(row_offsets(&bytes(&[0, 2, 5]), 3).is_err_and(|e| e.contains("for 3 samples")));
        assert!(row_offsets(&bytes(&[1, 2, 2, 5]), 3).is_err(), "from 0");
        assert!(row_offsets(&bytes(&[0, 3, 2, 5]), 3).is_err(), "never decreasing");
        assert!(row_offsets(&bytes(&[0, -1, 2, 5]), 3).is_err(), "negative as a huge row is a decrease after it");
    }
}
