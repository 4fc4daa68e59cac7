//! Batches encoded straight from where their rows live.
//!
//! A loader's answer to `StreamBatches` is an [`OutgoingBatch`]: the same `conveyor.v1.BatchResponse`
//! on the wire, but each tensor's bytes are a list of [`Run`]s into shared buffers (a memory-mapped
//! shard, a decoded chunk, ranges fetched from object storage, a transform's output), copied in
//! one pass into the batch's gRPC message ([`OutgoingBatch::encode_message`], on the loader's
//! gather threads) or by [`GatherCodec`] into the buffer tonic hands to the socket. The rows are
//! copied once in user space, instead of gathered into a buffer and copied again by an encoder.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};
use tonic::{
    Status,
    codec::{BufferSettings, Codec, EncodeBuf, Encoder},
};

use crate::{DType, v1};

/// Bytes a tensor's runs are copied from, and whether its elements are big-endian (swapped to
/// little-endian as they are copied).
#[derive(Debug, Clone)]
pub struct Piece {
    /// The bytes; cloning shares them.
    pub bytes: Bytes,
    /// Element byte order of `bytes` is big-endian.
    pub big_endian: bool,
}

/// `len` bytes at `offset` of piece `piece`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Index into the tensor's pieces.
    pub piece: u32,
    /// Byte offset in that piece.
    pub offset: usize,
    /// Bytes.
    pub len: usize,
}

/// One field of an outgoing batch: `conveyor.v1.Tensor` whose data is gathered as it is encoded.
#[derive(Debug, Clone, Default)]
pub struct OutgoingTensor {
    /// Field name.
    pub field: String,
    /// Element type.
    pub dtype: DType,
    /// `[batch, ...sample_shape]`.
    pub shape: Vec<u64>,
    pieces: Vec<Piece>,
    runs: Vec<Run>,
    /// Sum of the runs' lengths.
    data_len: usize,
    /// Where the data was written in shared memory instead (then no runs are left).
    shared: Option<v1::SharedSlice>,
    /// A ragged field's row offsets (batch + 1 little-endian int64), sent inline always.
    pub offsets: Option<Bytes>,
}

impl OutgoingTensor {
    /// A tensor with no data yet.
    pub fn new(field: String, dtype: DType, shape: Vec<u64>) -> OutgoingTensor {
        OutgoingTensor { field, dtype, shape, ..OutgoingTensor::default() }
    }

    /// A tensor whose data is `data`, as it is.
    pub fn owned(field: String, dtype: DType, shape: Vec<u64>, data: Bytes) -> OutgoingTensor {
        let mut tensor = OutgoingTensor::new(field, dtype, shape);
        let piece = tensor.add_piece(Piece { bytes: data, big_endian: false });
        let len = tensor.pieces[piece as usize].bytes.len();
        tensor.push(piece, 0, len);
        tensor
    }

    /// Adds bytes runs may point into; returns the index [`OutgoingTensor::push`] takes.
    pub fn add_piece(&mut self, piece: Piece) -> u32 {
        self.pieces.push(piece);
        (self.pieces.len() - 1) as u32
    }

    /// Appends `len` bytes at `offset` of `piece` to the data, merged with the previous run when
    /// they are adjacent in the same piece (one copy for a block of consecutive rows).
    ///
    /// # Panics
    /// When the range is outside the piece: a bug of the caller, caught here rather than as a
    /// short message on the wire.
    pub fn push(&mut self, piece: u32, offset: usize, len: usize) {
        let bytes = &self.pieces[piece as usize].bytes;
        assert!(offset.checked_add(len).is_some_and(|end| end <= bytes.len()), "run outside its piece");
        self.data_len += len;
        if let Some(last) = self.runs.last_mut()
            && last.piece == piece
            && last.offset + last.len == offset
        {
            last.len += len;
            return;
        }
        self.runs.push(Run { piece, offset, len });
    }

    /// Bytes of data.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// Bytes the pieces hold (what this tensor keeps alive until it is encoded).
    pub fn pinned_bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.bytes.len()).sum()
    }

    /// Number of separate copies encoding makes.
    pub fn num_runs(&self) -> usize {
        self.runs.len()
    }

    /// Each run's piece and bytes, in order.
    fn run_parts(&self) -> impl Iterator<Item = (&Piece, &[u8])> {
        self.runs.iter().map(|run| {
            let piece = &self.pieces[run.piece as usize];
            (piece, &piece.bytes[run.offset..run.offset + run.len])
        })
    }

    /// Sends the data as `slice` of a shared-memory region instead of inline: the caller has
    /// written [`OutgoingTensor::write_data`] there. Drops the pieces; `data_len` stays the
    /// tensor's size.
    pub fn move_to_shared(&mut self, slice: v1::SharedSlice) {
        debug_assert_eq!(slice.length as usize, self.data_len, "a shared slice holds the whole tensor");
        self.pieces.clear();
        self.runs.clear();
        self.shared = Some(slice);
    }

    /// Where the data lies in shared memory, when it was moved there.
    pub fn shared(&self) -> Option<&v1::SharedSlice> {
        self.shared.as_ref()
    }

    /// Copies the data into `out` (converted to little-endian), as encoding does.
    pub fn write_data(&self, out: &mut impl BufMut) {
        let width = self.dtype.size_bytes();
        for (piece, bytes) in self.run_parts() {
            if piece.big_endian && width > 1 {
                put_swapped(bytes, width, out);
            } else {
                out.put_slice(bytes);
            }
        }
    }

    /// The data as one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data_len);
        self.write_data(&mut out);
        out
    }

    fn body_len(&self) -> usize {
        let field = if self.field.is_empty() { 0 } else { prost::encoding::string::encoded_len(1, &self.field) };
        let dtype = if self.dtype == DType::Unspecified {
            0
        } else {
            prost::encoding::int32::encoded_len(2, &(self.dtype as i32))
        };
        let shape = prost::encoding::uint64::encoded_len_packed(3, &self.shape);
        let data = match &self.shared {
            Some(slice) => prost::encoding::message::encoded_len(5, slice),
            None if self.data_len == 0 => 0,
            None => key_len(4) + encoded_len_varint(self.data_len as u64) + self.data_len,
        };
        let offsets = self.offsets.as_ref().map_or(0, |o| prost::encoding::bytes::encoded_len(6, o));
        field + dtype + shape + data + offsets
    }

    fn encode_body(&self, buf: &mut impl BufMut) {
        if !self.field.is_empty() {
            prost::encoding::string::encode(1, &self.field, buf);
        }
        if self.dtype != DType::Unspecified {
            prost::encoding::int32::encode(2, &(self.dtype as i32), buf);
        }
        prost::encoding::uint64::encode_packed(3, &self.shape, buf);
        if let Some(slice) = &self.shared {
            prost::encoding::message::encode(5, slice, buf);
        } else if self.data_len > 0 {
            encode_key(4, WireType::LengthDelimited, buf);
            encode_varint(self.data_len as u64, buf);
            self.write_data(buf);
        }
        if let Some(offsets) = &self.offsets {
            prost::encoding::bytes::encode(6, offsets, buf);
        }
    }
}

/// Copies `bytes` into `out` with every `width`-byte element reversed, through a small stack
/// buffer.
fn put_swapped(bytes: &[u8], width: usize, out: &mut impl BufMut) {
    let mut scratch = [0u8; 4096];
    let step = scratch.len() / width * width;
    for chunk in bytes.chunks(step) {
        let scratch = &mut scratch[..chunk.len()];
        scratch.copy_from_slice(chunk);
        for element in scratch.chunks_exact_mut(width) {
            element.reverse();
        }
        out.put_slice(scratch);
    }
}

/// A loader's answer to one `BatchRequest`: encodes exactly as `conveyor.v1.BatchResponse`
/// (clients decode it as that), with the tensors' rows copied from their pieces as it is encoded.
/// Encode-only: decoding one skips every field.
#[derive(Debug, Default)]
pub struct OutgoingBatch {
    /// Echo of the request's batch id.
    pub batch_id: u64,
    /// The indices this batch holds, in order.
    pub indices: Vec<u64>,
    /// One tensor per field; empty when `error` is set.
    pub tensors: Vec<OutgoingTensor>,
    /// Why this batch could not be served.
    pub error: Option<v1::BatchError>,
    /// Bytes decoded from storage for this batch.
    pub decoded_bytes: u64,
    /// Released when the batch is handed to the connection (or dropped unsent): for example the
    /// share of the loader's in-flight byte budget its pinned pieces or its message count against.
    pub hold: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// The whole gRPC message once [`OutgoingBatch::encode_message`] has built it (the tensors
    /// then keep their descriptions but no pieces).
    message: Option<Bytes>,
}

/// Bytes before a gRPC message on the wire: the compressed flag and the big-endian length.
pub const GRPC_PREFIX_BYTES: usize = 5;

/// `message` as it goes on the wire in a gRPC stream: the uncompressed flag, its big-endian
/// length, then its protobuf encoding, in one buffer of exactly that size.
///
/// # Panics
/// When the encoding is longer than 4 GiB - 1, which gRPC's length prefix cannot express.
pub fn grpc_message(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    #[allow(clippy::expect_used)]
    let prefix = u32::try_from(len).expect("a gRPC message is under 4 GiB");
    let mut buf = bytes::BytesMut::with_capacity(GRPC_PREFIX_BYTES + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    message.encode_raw(&mut buf);
    buf.freeze()
}

impl OutgoingBatch {
    /// The answer carrying `tensors` for batch `batch_id`.
    pub fn new(batch_id: u64, indices: Vec<u64>, tensors: Vec<OutgoingTensor>, decoded_bytes: u64) -> OutgoingBatch {
        OutgoingBatch { batch_id, indices, tensors, decoded_bytes, ..OutgoingBatch::default() }
    }

    /// The answer saying why batch `batch_id` could not be served.
    pub fn refused(batch_id: u64, indices: Vec<u64>, error: v1::BatchError) -> OutgoingBatch {
        OutgoingBatch { batch_id, indices, error: Some(error), ..OutgoingBatch::default() }
    }

    /// Bytes of tensor data.
    pub fn data_len(&self) -> usize {
        self.tensors.iter().map(OutgoingTensor::data_len).sum()
    }

    /// Builds the batch's gRPC message now (the prefix, then the `BatchResponse` encoding, the
    /// rows gathered from their pieces in one pass) and lets the pieces go: the loader calls it
    /// on the thread that gathered the batch, so the copy runs there and not on the connection's
    /// task, which then only hands the bytes to HTTP/2. Does nothing the second time.
    ///
    /// # Panics
    /// When the message is longer than 4 GiB - 1, which gRPC's length prefix cannot express
    /// (batches are bounded far below it by `--max-batch-bytes`).
    pub fn encode_message(&mut self) {
        if self.message.is_some() {
            return;
        }
        let message = grpc_message(self);
        for tensor in &mut self.tensors {
            tensor.pieces.clear();
            tensor.runs.clear();
        }
        self.message = Some(message);
    }

    /// The batch's gRPC message, length prefix included, built now unless
    /// [`OutgoingBatch::encode_message`] already did.
    pub fn into_message(mut self) -> Bytes {
        self.encode_message();
        self.message.take().unwrap_or_default()
    }

    /// The response as a client decodes it: encodes and decodes (for tests and handlers driven
    /// without a server).
    ///
    /// # Panics
    /// Never for a batch this module encoded: the bytes are a valid `BatchResponse`.
    pub fn to_response(&self) -> v1::BatchResponse {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode_raw(&mut buf);
        #[allow(clippy::expect_used)]
        v1::BatchResponse::decode(Bytes::from(buf)).expect("an encoded OutgoingBatch is a BatchResponse")
    }
}

impl From<v1::BatchResponse> for OutgoingBatch {
    fn from(response: v1::BatchResponse) -> OutgoingBatch {
        let tensors = response
            .tensors
            .into_iter()
            .map(|t| {
                let mut tensor =
                    OutgoingTensor::owned(t.field, DType::try_from(t.dtype).unwrap_or_default(), t.shape, t.data);
                tensor.offsets = (!t.offsets.is_empty()).then_some(t.offsets);
                tensor
            })
            .collect();
        OutgoingBatch {
            batch_id: response.batch_id,
            indices: response.indices,
            tensors,
            error: response.error,
            decoded_bytes: response.decoded_bytes,
            hold: None,
            message: None,
        }
    }
}

impl Message for OutgoingBatch {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(message) = &self.message {
            buf.put_slice(&message[GRPC_PREFIX_BYTES..]);
            return;
        }
        if self.batch_id != 0 {
            prost::encoding::uint64::encode(1, &self.batch_id, buf);
        }
        prost::encoding::uint64::encode_packed(2, &self.indices, buf);
        for tensor in &self.tensors {
            encode_key(3, WireType::LengthDelimited, buf);
            encode_varint(tensor.body_len() as u64, buf);
            tensor.encode_body(buf);
        }
        if let Some(error) = &self.error {
            prost::encoding::message::encode(4, error, buf);
        }
        if self.decoded_bytes != 0 {
            prost::encoding::uint64::encode(5, &self.decoded_bytes, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        if let Some(message) = &self.message {
            return message.len() - GRPC_PREFIX_BYTES;
        }
        let batch_id = if self.batch_id == 0 { 0 } else { prost::encoding::uint64::encoded_len(1, &self.batch_id) };
        let indices = prost::encoding::uint64::encoded_len_packed(2, &self.indices);
        let tensors: usize = self
            .tensors
            .iter()
            .map(|t| {
                let body = t.body_len();
                key_len(3) + encoded_len_varint(body as u64) + body
            })
            .sum();
        let error = self.error.as_ref().map_or(0, |e| prost::encoding::message::encoded_len(4, e));
        let decoded =
            if self.decoded_bytes == 0 { 0 } else { prost::encoding::uint64::encoded_len(5, &self.decoded_bytes) };
        batch_id + indices + tensors + error + decoded
    }

    fn clear(&mut self) {
        *self = OutgoingBatch::default();
    }
}

/// The loader's codec: prost for every message, but the encoder reserves a message's full length
/// before writing it, so a batch lands in the outgoing buffer in one pass instead of growing it
/// by doubling (and copying) along the way. A batch whose message was already built is written
/// as that message.
#[derive(Debug)]
pub struct GatherCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for GatherCodec<T, U> {
    fn default() -> Self {
        GatherCodec(PhantomData)
    }
}

impl<T, U> Codec for GatherCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = GatherEncoder<T>;
    type Decoder = <tonic_prost::ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        GatherEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}

/// [`GatherCodec`]'s encoder.
#[derive(Debug)]
pub struct GatherEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for GatherEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode_raw(buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn tensor_from(pieces: &[(Vec<u8>, bool)], runs: &[(usize, usize, usize)], dtype: DType) -> OutgoingTensor {
        let mut tensor = OutgoingTensor::new("f".into(), dtype, vec![runs.len() as u64]);
        for (bytes, big_endian) in pieces {
            tensor.add_piece(Piece { bytes: Bytes::from(bytes.clone()), big_endian: *big_endian });
        }
        for &(piece, offset, len) in runs {
            tensor.push(piece as u32, offset, len);
        }
        tensor
    }

    proptest! {
        /// Whatever the pieces and runs, the encoded batch decodes as the `BatchResponse` holding
        /// the runs' bytes in order (swapped where their piece is big-endian), and the codec
        /// reserved exactly the length it wrote.
        #[test]
        fn encodes_as_batch_response(
            piece_lens in proptest::collection::vec(0usize..300, 1..4),
            big_endian in proptest::collection::vec(any::<bool>(), 4),
            picks in proptest::collection::vec((0usize..4, 0usize..300, 0usize..40), 0..20),
            batch_id in any::<u64>(),
            indices in proptest::collection::vec(any::<u64>(), 0..10),
            decoded_bytes in any::<u64>(),
            wide in any::<bool>(),
        ) {
            let dtype = if wide { DType::Int32 } else { DType::Uint8 };
            let width = dtype.size_bytes();
            let pieces: Vec<(Vec<u8>, bool)> = piece_lens
                .iter()
                .enumerate()
                .map(|(i, &len)| ((0..len / width * width).map(|b| (b * 7 + i) as u8).collect(), big_endian[i]))
                .collect();
            let mut runs = Vec::new();
            let mut expected = Vec::new();
            for (piece, offset, len) in picks {
                let piece = piece % pieces.len();
                let bytes = &pieces[piece].0;
                let offset = (offset.min(bytes.len()) / width) * width;
                let len = (len.min(bytes.len() - offset) / width) * width;
                runs.push((piece, offset, len));
                let mut part = bytes[offset..offset + len].to_vec();
                if pieces[piece].1 && width > 1 {
                    part.chunks_exact_mut(width).for_each(<[u8]>::reverse);
                }
                expected.extend(part);
            }
            let tensor = tensor_from(&pieces, &runs, dtype);
            prop_assert_eq!(tensor.to_vec(), expected.clone());
            let batch = OutgoingBatch {
                batch_id,
                indices: indices.clone(),
                tensors: vec![tensor.clone(), OutgoingTensor::new(String::new(), DType::Unspecified, vec![])],
                error: None,
                decoded_bytes,
                ..OutgoingBatch::default()
            };
            let mut buf = Vec::new();
            batch.encode_raw(&mut buf);
            prop_assert_eq!(buf.len(), batch.encoded_len());
            // Built ahead as one gRPC message: the same bytes behind the prefix, no pieces kept,
            // and encoding it again (tonic's path) writes them unchanged.
            let mut prebuilt = OutgoingBatch { tensors: batch.tensors.clone(), indices: indices.clone(), batch_id, decoded_bytes, ..OutgoingBatch::default() };
            prebuilt.encode_message();
            prop_assert_eq!(prebuilt.data_len(), batch.data_len());
            prop_assert!(prebuilt.tensors.iter().all(|t| t.pinned_bytes() == 0));
            let mut again = Vec::new();
            prebuilt.encode_raw(&mut again);
            prop_assert_eq!(&again, &buf);
            prop_assert_eq!(prebuilt.encoded_len(), buf.len());
            let message = prebuilt.into_message();
            prop_assert_eq!(message[0], 0);
            prop_assert_eq!(u32::from_be_bytes([message[1], message[2], message[3], message[4]]) as usize, buf.len());
            prop_assert_eq!(&message[GRPC_PREFIX_BYTES..], &buf[..]);
            let decoded = v1::BatchResponse::decode(buf.as_slice()).expect("decodes as BatchResponse");
            prop_assert_eq!(decoded.batch_id, batch_id);
            prop_assert_eq!(decoded.indices, indices);
            prop_assert_eq!(decoded.decoded_bytes, decoded_bytes);
            prop_assert_eq!(decoded.tensors.len(), 2);
            prop_assert_eq!(&decoded.tensors[0].data[..], &expected[..]);
            prop_assert_eq!(decoded.tensors[0].dtype, dtype as i32);
            prop_assert_eq!(&decoded.tensors[0].shape, &tensor.shape);
            prop_assert!(decoded.tensors[1].data.is_empty());

        }
    }

    #[test]
    fn adjacent_runs_merge_into_one_copy() {
        let tensor = tensor_from(
            &[(vec![0; 100], false), (vec![1; 10], false)],
            &[(0, 0, 10), (0, 10, 10), (1, 0, 5), (0, 20, 5)],
            DType::Uint8,
        );
        assert_eq!(tensor.num_runs(), 3);
        assert_eq!(tensor.data_len(), 30);
    }

    #[test]
    fn a_tensor_moved_to_shared_memory_carries_its_slice_and_no_data() {
        let mut tensor =
            OutgoingTensor::owned("x".into(), DType::Uint8, vec![2, 3], Bytes::from_static(&[1, 2, 3, 4, 5, 6]));
        let slice = v1::SharedSlice { region: 9, entry: 4, offset: 16384, length: 6 };
        tensor.move_to_shared(slice);
        let batch =
            OutgoingBatch { batch_id: 1, indices: vec![0, 1], tensors: vec![tensor], ..OutgoingBatch::default() };
        assert_eq!(batch.encoded_len(), batch.to_response().encoded_len());
        let decoded = &batch.to_response().tensors[0];
        assert!(decoded.data.is_empty());
        assert_eq!(decoded.shared, Some(slice));
        assert_eq!(decoded.shape, vec![2, 3]);
        assert_eq!(batch.data_len(), 6, "counted as the tensor's bytes");
    }

    #[test]
    fn errors_and_owned_responses_round_trip() {
        let response = v1::BatchResponse {
            batch_id: 7,
            indices: vec![3, 1],
            tensors: vec![v1::Tensor {
                field: "x".into(),
                dtype: DType::Float32 as i32,
                shape: vec![2, 1],
                data: Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8]),
                shared: None,
                offsets: Bytes::new(),
            }],
            error: Some(v1::BatchError { kind: 4, message: "chunk 3 of field x could not be read".into() }),
            decoded_bytes: 12,
        };
        assert_eq!(OutgoingBatch::from(response.clone()).to_response(), response);
        // A ragged field: its offsets travel beside the data, inline.
        let offsets: Vec<u8> = [0i64, 1, 3].iter().flat_map(|o| o.to_le_bytes()).collect();
        let ragged = v1::BatchResponse {
            batch_id: 8,
            indices: vec![0, 5],
            tensors: vec![v1::Tensor {
                field: "tokens".into(),
                dtype: DType::Int16 as i32,
                shape: vec![3],
                data: Bytes::from_static(&[1, 0, 2, 0, 3, 0]),
                shared: None,
                offsets: Bytes::from(offsets),
            }],
            error: None,
            decoded_bytes: 0,
        };
        assert_eq!(OutgoingBatch::from(ragged.clone()).to_response(), ragged);
    }
}
