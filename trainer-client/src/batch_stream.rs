//! The `StreamBatches` call, with answers cut out of the received HTTP/2 frames instead of copied.
//!
//! tonic's `Streaming` copies every DATA frame into its own receive buffer before decoding, so a
//! 3 MiB batch was copied once more after the kernel had delivered it (and that buffer, still
//! shared with the previous batch's tensors, was a fresh allocation each time). Here the frames
//! are kept as they arrive and a message that lies within one frame is decoded from a slice of
//! it: the tensors handed to the training loop borrow the very bytes h2 read from the socket.
//! Only a message split across frames is copied, once, into a buffer of its own size. The wire
//! format is plain gRPC (length-prefixed messages, status in the trailers), so the loader sees
//! the same call as from any generated client.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use conveyor_proto::{
    v1::{BatchRequest, BatchResponse},
    wire::{GRPC_PREFIX_BYTES, grpc_message},
};
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use prost::Message;
use tonic::{Code, Status, client::GrpcService};

/// The method's path.
const PATH: &str = "/conveyor.v1.Loader/StreamBatches";

/// Opens the batch stream on `service` (a channel with the client's interceptors), sending
/// `requests` as they come; answers larger than `max_message_bytes` fail the stream.
///
/// # Errors
/// The call's status when the loader refuses it (an unknown token, a drain) or the connection
/// fails before it answers.
pub(crate) async fn open<S>(
    mut service: S,
    requests: impl Stream<Item = BatchRequest> + Send + 'static,
    max_message_bytes: usize,
) -> Result<impl Stream<Item = Result<BatchResponse, Status>> + Send + 'static, Status>
where
    S: GrpcService<tonic::body::Body>,
    S::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let frames = requests.map(|request| Ok::<_, Status>(http_body::Frame::data(grpc_message(&request))));
    let mut call = http::Request::new(tonic::body::Body::new(http_body_util::StreamBody::new(frames)));
    *call.method_mut() = http::Method::POST;
    *call.version_mut() = http::Version::HTTP_2;
    // The channel fills in the scheme and authority of the loader it is connected to.
    *call.uri_mut() = http::Uri::from_static(PATH);
    let headers = call.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    std::future::poll_fn(|cx| service.poll_ready(cx)).await.map_err(|e| Status::from_error(e.into()))?;
    let response = service.call(call).await.map_err(|e| Status::from_error(e.into()))?;
    // A call refused outright answers with its status in the headers and no body.
    if let Some(status) = Status::from_header_map(response.headers()) {
        return Err(if status.code() == Code::Ok {
            Status::internal("the loader ended the batch stream before it began")
        } else {
            status
        });
    }
    let http_status = response.status();
    let receiver = Receiver {
        body: Box::pin(response.into_body()),
        unread: Unread::default(),
        max_message_bytes,
        http_status,
        finished: false,
    };
    Ok(futures::stream::unfold(receiver, |mut receiver| async move {
        let answer = receiver.next().await?;
        Some((answer, receiver))
    }))
}

/// The response side of one call.
struct Receiver<B> {
    /// The response body: DATA frames, then the trailers.
    body: B,
    /// Frames received and not yet taken as messages.
    unread: Unread,
    /// Largest message accepted.
    max_message_bytes: usize,
    /// The HTTP status, for a stream that ends without a gRPC status.
    http_status: http::StatusCode,
    /// Set once the stream has ended or failed: nothing more is read.
    finished: bool,
}

impl<B> Receiver<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// The next answer; `None` once the loader ended the stream with an OK status.
    async fn next(&mut self) -> Option<Result<BatchResponse, Status>> {
        if self.finished {
            return None;
        }
        let answer = self.next_unfinished().await;
        if !matches!(answer, Some(Ok(_))) {
            self.finished = true;
        }
        answer
    }

    async fn next_unfinished(&mut self) -> Option<Result<BatchResponse, Status>> {
        loop {
            match self.unread.next_message(self.max_message_bytes) {
                Ok(Some(message)) => {
                    return Some(BatchResponse::decode(message).map_err(|e| {
                        Status::internal(format!("a batch from the loader does not decode as BatchResponse: {e}"))
                    }));
                }
                Ok(None) => {}
                Err(status) => return Some(Err(status)),
            }
            let frame = match self.body.frame().await {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Some(Err(Status::from_error(error.into()))),
                None => return self.ended(None),
            };
            match frame.into_data() {
                Ok(data) => self.unread.push(data),
                Err(frame) => return self.ended(frame.into_trailers().ok()),
            }
        }
    }

    /// The end of the body: OK ends the stream, anything else is the error it ends with.
    fn ended(&mut self, trailers: Option<http::HeaderMap>) -> Option<Result<BatchResponse, Status>> {
        let status = trailers.as_ref().and_then(Status::from_header_map);
        match status {
            Some(status) if status.code() != Code::Ok => Some(Err(status)),
            Some(_) if self.unread.len > 0 => Some(Err(Status::internal(format!(
                "the loader ended the batch stream {} bytes into a message",
                self.unread.len
            )))),
            Some(_) => None,
            None => Some(Err(Status::new(
                missing_status_code(self.http_status),
                format!("the batch stream ended without a gRPC status (HTTP {})", self.http_status),
            ))),
        }
    }
}

/// The gRPC code for a stream that ended without a status, from its HTTP status (as gRPC's
/// HTTP-to-gRPC status mapping gives it).
fn missing_status_code(http_status: http::StatusCode) -> Code {
    match http_status {
        http::StatusCode::BAD_REQUEST => Code::Internal,
        http::StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        http::StatusCode::FORBIDDEN => Code::PermissionDenied,
        http::StatusCode::NOT_FOUND => Code::Unimplemented,
        http::StatusCode::TOO_MANY_REQUESTS
        | http::StatusCode::BAD_GATEWAY
        | http::StatusCode::SERVICE_UNAVAILABLE
        | http::StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// Received bytes not yet taken as messages, kept as the frames they arrived in.
#[derive(Debug, Default)]
struct Unread {
    /// The frames, oldest first; the first may have been partly taken.
    frames: VecDeque<Bytes>,
    /// Their total length.
    len: usize,
}

impl Unread {
    fn push(&mut self, frame: Bytes) {
        if !frame.is_empty() {
            self.len += frame.len();
            self.frames.push_back(frame);
        }
    }

    /// The next whole message, or `None` until all of it has arrived.
    ///
    /// # Errors
    /// A message longer than `max_message_bytes`, or a compressed one (the client never asks
    /// for compression).
    fn next_message(&mut self, max_message_bytes: usize) -> Result<Option<Bytes>, Status> {
        if self.len < GRPC_PREFIX_BYTES {
            return Ok(None);
        }
        let mut prefix = [0u8; GRPC_PREFIX_BYTES];
        let mut filled = 0;
        for frame in &self.frames {
            let n = frame.len().min(GRPC_PREFIX_BYTES - filled);
            prefix[filled..filled + n].copy_from_slice(&frame[..n]);
            filled += n;
            if filled == GRPC_PREFIX_BYTES {
                break;
            }
        }
        if prefix[0] != 0 {
            return Err(Status::internal(format!(
                "the loader sent a message with compressed flag {} although the client asked for no compression",
                prefix[0]
            )));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > max_message_bytes {
            return Err(Status::out_of_range(format!(
                "the loader sent a {len}-byte batch, over the client's {max_message_bytes}-byte message limit; \
                 raise the limit (--max-message-bytes) or ask for smaller batches"
            )));
        }
        if self.len < GRPC_PREFIX_BYTES + len {
            return Ok(None);
        }
        self.take(GRPC_PREFIX_BYTES);
        Ok(Some(self.take(len)))
    }

    /// The next `n` bytes (all of them received): a slice of the first frame when it holds
    /// them, else one copy.
    fn take(&mut self, n: usize) -> Bytes {
        self.len -= n;
        let Some(first) = self.frames.front_mut() else { return Bytes::new() };
        if first.len() >= n {
            let taken = first.split_to(n);
            if first.is_empty() {
                self.frames.pop_front();
            }
            return taken;
        }
        let mut joined = BytesMut::with_capacity(n);
        while joined.len() < n {
            let Some(first) = self.frames.front_mut() else { break };
            let part = first.len().min(n - joined.len());
            joined.put_slice(&first[..part]);
            first.advance(part);
            if first.is_empty() {
                self.frames.pop_front();
            }
        }
        joined.freeze()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((message.len() as u32).to_be_bytes());
        out.extend(message);
        out
    }

    #[test]
    fn a_message_within_one_frame_is_a_slice_of_it() {
        let frame = Bytes::from([framed(b"first"), framed(&[7; 1000])].concat());
        let mut unread = Unread::default();
        unread.push(frame.clone());
        let first = unread.next_message(1 << 20).expect("fits").expect("whole");
        assert_eq!(&first[..], b"first");
        let second = unread.next_message(1 << 20).expect("fits").expect("whole");
        assert_eq!(second.len(), 1000);
        // Same memory as the frame: nothing was copied.
        assert_eq!(second.as_ptr(), frame[GRPC_PREFIX_BYTES * 2 + 5..].as_ptr());
        assert_eq!(unread.next_message(1 << 20).expect("empty"), None);
        assert_eq!(unread.len, 0);
    }

    #[test]
    fn oversized_and_compressed_messages_are_refused_by_size_and_flag() {
        let mut unread = Unread::default();
        unread.push(Bytes::from(framed(&[1; 64])));
        let error = unread.next_message(63).expect_err("over the limit");
        assert_eq!(error.code(), Code::OutOfRange);
        assert!(error.message().contains("64-byte batch") && error.message().contains("63-byte"), "{error}");
        let mut unread = Unread::default();
        let mut compressed = framed(b"x");
        compressed[0] = 1;
        unread.push(Bytes::from(compressed));
        let error = unread.next_message(1 << 20).expect_err("compressed");
        assert!(error.message().contains("compressed flag 1"), "{error}");
    }

    fn empty_body(http_status: http::StatusCode) -> Receiver<http_body_util::Empty<Bytes>> {
        let body = http_body_util::Empty::new();
        Receiver { body, unread: Unread::default(), max_message_bytes: 1 << 20, http_status, finished: false }
    }

    #[test]
    fn a_body_without_trailers_or_ending_mid_message_is_an_error() {
        let mut receiver = empty_body(http::StatusCode::SERVICE_UNAVAILABLE);
        let answer = futures::executor::block_on(receiver.next()).expect("an error").expect_err("no status");
        assert_eq!(answer.code(), Code::Unavailable);
        assert!(futures::executor::block_on(receiver.next()).is_none(), "nothing after the error");

        let mut ok = http::HeaderMap::new();
        ok.insert("grpc-status", http::HeaderValue::from_static("0"));
        let mut receiver = empty_body(http::StatusCode::OK);
        assert!(receiver.ended(Some(ok.clone())).is_none(), "an OK status ends the stream");
        receiver.unread.push(Bytes::from_static(&[0, 0, 0]));
        let error = receiver.ended(Some(ok)).expect("an error").expect_err("mid-message");
        assert!(error.message().contains("3 bytes into a message"), "{error}");
    }

    proptest! {
        /// However the loader's bytes are cut into frames, the same messages come out in order,
        /// and each one that lies within a single frame shares that frame's memory.
        #[test]
        fn any_framing_yields_the_messages_in_order(
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..12),
            cuts in proptest::collection::vec(0usize..4000, 0..20),
        ) {
            let wire: Vec<u8> = messages.iter().flat_map(|m| framed(m)).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.extend([0, wire.len()]);
            cuts.sort_unstable();
            cuts.dedup();
            let wire = Bytes::from(wire);
            let frames: Vec<Bytes> = cuts.windows(2).map(|w| wire.slice(w[0]..w[1])).collect();
            let mut unread = Unread::default();
            let mut out = Vec::new();
            for frame in frames {
                unread.push(frame);
                while let Some(message) = unread.next_message(1 << 20).expect("within limits") {
                    out.push(message);
                }
            }
            prop_assert_eq!(unread.len, 0);
            prop_assert_eq!(out.len(), messages.len());
            let mut offset = 0;
            for (got, want) in out.iter().zip(&messages) {
                prop_assert_eq!(&got[..], &want[..]);
                offset += GRPC_PREFIX_BYTES;
                let start = offset;
                offset += want.len();
                let in_one_frame = cuts.iter().all(|&c| c <= start || c >= offset);
                if in_one_frame && !want.is_empty() {
                    prop_assert_eq!(got.as_ptr(), wire[start..].as_ptr());
                }
            }
        }
    }
}
