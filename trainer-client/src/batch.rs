//! What the training loop receives: the samples of one batch, one tensor per field.

use bytes::Bytes;
use conveyor_proto::{
    DType,
    v1::{BatchResponse, DatasetInfo},
};

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
    /// A description of the first mismatch.
    pub fn from_response(
        response: BatchResponse,
        requested: &[u64],
        info: &DatasetInfo,
        epoch: u64,
        index: u64,
    ) -> Result<Batch, String> {
        if response.indices != requested {
            return Err(format!("batch {index} came back with other sample indices than requested"));
        }
        if response.tensors.len() != info.fields.len() {
            return Err(format!(
                "batch {index} has {} tensors for {} fields",
                response.tensors.len(),
                info.fields.len()
            ));
        }
        let rows = requested.len() as u64;
        let mut fields = Vec::with_capacity(info.fields.len());
        for (tensor, field) in response.tensors.into_iter().zip(&info.fields) {
            let dtype = DType::try_from(tensor.dtype).unwrap_or(DType::Unspecified);
            let expected_shape: Vec<u64> = std::iter::once(rows).chain(field.sample_shape.iter().copied()).collect();
            if tensor.field != field.name || tensor.dtype != field.dtype || tensor.shape != expected_shape {
                return Err(format!(
                    "batch {index}: tensor '{}' {:?} {:?} does not match field '{}' {:?}",
                    tensor.field, dtype, tensor.shape, field.name, expected_shape
                ));
            }
            if tensor.data.len() as u64 != rows * field.bytes_per_sample {
                return Err(format!(
                    "batch {index}: field '{}' has {} bytes, expected {}",
                    field.name,
                    tensor.data.len(),
                    rows * field.bytes_per_sample
                ));
            }
            fields.push(FieldBatch { name: tensor.field, dtype, shape: tensor.shape, data: tensor.data });
        }
        Ok(Batch { epoch, index, indices: response.indices, fields, decoded_bytes: response.decoded_bytes })
    }
}
