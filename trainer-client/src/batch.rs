//! What the training loop receives: the samples of one batch, one tensor per field.

use bytes::Bytes;
use conveyor_proto::{
    DType,
    v1::{BatchResponse, DatasetInfo},
};

use crate::error::ResponseError;

/// One field of a batch: `shape` is `[batch, ...sample shape]` and `data` holds its elements as
/// little-endian C-order bytes, a slice of the received message (no copy was made).
#[derive(Debug, Clone)]
pub struct FieldBatch {
    /// Field name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// `[batch, ...sample shape]`.
    pub shape: Vec<u64>,
    /// Element bytes.
    pub data: Bytes,
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
            let expected_shape: Vec<u64> = std::iter::once(rows).chain(field.sample_shape.iter().copied()).collect();
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
            if tensor.data.len() as u64 != rows * field.bytes_per_sample {
                return Err(ResponseError::ByteCount {
                    batch: index,
                    field: field.name.clone(),
                    got: tensor.data.len() as u64,
                    expected: rows * field.bytes_per_sample,
                });
            }
            let dtype = DType::try_from(tensor.dtype).unwrap_or(DType::Unspecified);
            fields.push(FieldBatch { name: tensor.field, dtype, shape: tensor.shape, data: tensor.data });
        }
        Ok(Batch { epoch, index, indices: response.indices, fields, decoded_bytes: response.decoded_bytes })
    }
}
