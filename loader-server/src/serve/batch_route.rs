//! `StreamBatches` answered without tonic's encoder.
//!
//! tonic encodes each response into its own buffer on the connection's task, so every batch's
//! rows were copied there, one connection's batches on one thread. Here the gather threads build
//! each batch's complete gRPC message ([`OutgoingBatch::encode_message`]) and this route hands
//! those bytes to HTTP/2 as they are: the connection's task only writes to the socket. Requests
//! are still decoded by tonic, the handler is the same [`LoaderService`], every other method goes
//! to the generated server, and the wire is the same `conveyor.v1` call (length-prefixed
//! messages, the status in the trailers).

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use conveyor_proto::{
    v1::BatchRequest,
    v1_gather::loader_server::{Loader, LoaderServer},
    wire::{GRPC_PREFIX_BYTES, GatherCodec, OutgoingBatch},
};
use futures::{FutureExt, StreamExt, future::BoxFuture};
use tonic::{Status, Streaming, body::Body, codec::Codec, server::NamedService};

use crate::serve::service::LoaderService;

/// The method this route answers itself.
const PATH: &str = "/conveyor.v1.Loader/StreamBatches";

/// The Loader service: `StreamBatches` here, the other methods through the generated server.
#[derive(Clone)]
pub struct BatchRoute {
    /// The generated server, for every other method.
    loader: LoaderServer<LoaderService>,
    /// The handler.
    service: LoaderService,
    /// Largest request message accepted.
    max_request_bytes: usize,
    /// Largest response message sent.
    max_message_bytes: usize,
}

impl BatchRoute {
    /// The route over `service`, with the message limits the generated server also applies.
    pub fn new(service: LoaderService, max_request_bytes: usize, max_message_bytes: usize) -> BatchRoute {
        let loader = LoaderServer::new(service.clone())
            .max_encoding_message_size(max_message_bytes)
            .max_decoding_message_size(max_request_bytes);
        BatchRoute { loader, service, max_request_bytes, max_message_bytes }
    }
}

impl NamedService for BatchRoute {
    const NAME: &'static str = <LoaderServer<LoaderService> as NamedService>::NAME;
}

impl tower::Service<http::Request<Body>> for BatchRoute {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != PATH {
            return self.loader.call(request).boxed();
        }
        let (service, max_request_bytes, max_message_bytes) =
            (self.service.clone(), self.max_request_bytes, self.max_message_bytes);
        async move { Ok(stream_batches(service, request, max_request_bytes, max_message_bytes).await) }.boxed()
    }
}

/// One `StreamBatches` call: the requests decoded by tonic, the answers' messages sent as built.
async fn stream_batches(
    service: LoaderService,
    request: http::Request<Body>,
    max_request_bytes: usize,
    max_message_bytes: usize,
) -> http::Response<Body> {
    if let Some(encoding) = request.headers().get("grpc-encoding").filter(|e| e.as_bytes() != b"identity") {
        let status = Status::unimplemented(format!(
            "requests compressed with {encoding:?} are not accepted; send them uncompressed"
        ));
        return status.into_http();
    }
    let decoder = GatherCodec::<OutgoingBatch, BatchRequest>::default().decoder();
    let request = tonic::Request::from_http(request)
        .map(|body| Streaming::new_request(decoder, body, None, Some(max_request_bytes)));
    match Loader::stream_batches(&service, request).await {
        Ok(response) => {
            let (metadata, batches, _) = response.into_parts();
            let mut http = http::Response::new(Body::new(BatchBody { batches, max_message_bytes, ended: false }));
            *http.headers_mut() = metadata.into_headers();
            http.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
            http
        }
        Err(status) => status.into_http(),
    }
}

/// The response body: each batch's message as one DATA chunk, then the status as trailers.
struct BatchBody {
    /// The handler's answers.
    batches: <LoaderService as Loader>::StreamBatchesStream,
    /// Largest message sent; a larger one ends the stream with `OUT_OF_RANGE`.
    max_message_bytes: usize,
    /// The trailers have been sent.
    ended: bool,
}

impl http_body::Body for BatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let status = match ready!(self.batches.poll_next_unpin(cx)) {
            Some(Ok(batch)) => {
                let message = batch.into_message();
                let len = message.len() - GRPC_PREFIX_BYTES;
                if len <= self.max_message_bytes {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(message))));
                }
                Status::out_of_range(format!(
                    "a {len}-byte batch is over the loader's {}-byte message limit; ask for smaller batches",
                    self.max_message_bytes
                ))
            }
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        if let Err(unsendable) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = Status::internal(format!("the stream's status could not be sent: {unsendable}"))
                .add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
mod tests {
    use conveyor_proto::{DType, wire::OutgoingTensor};
    use http_body_util::BodyExt;

    use super::*;

    fn body(answers: Vec<Result<OutgoingBatch, Status>>, max_message_bytes: usize) -> BatchBody {
        BatchBody { batches: Box::pin(futures::stream::iter(answers)), max_message_bytes, ended: false }
    }

    fn batch(rows: usize) -> OutgoingBatch {
        let tensor = OutgoingTensor::owned("x".into(), DType::Uint8, vec![rows as u64], Bytes::from(vec![7u8; rows]));
        OutgoingBatch::new(3, (0..rows as u64).collect(), vec![tensor], 0)
    }

    /// The frames of `body` as (data messages, trailers).
    async fn frames(body: BatchBody) -> (Vec<Bytes>, http::HeaderMap) {
        let mut body = std::pin::pin!(body);
        let (mut data, mut trailers) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame.expect("no body error").into_data() {
                Ok(message) => data.push(message),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        (data, trailers.expect("trailers end the body"))
    }

    #[tokio::test]
    async fn batches_go_out_as_built_and_the_status_ends_the_body() {
        let mut built = batch(100);
        built.encode_message();
        let expected = batch(100).into_message();
        let (data, trailers) = frames(body(vec![Ok(built), Ok(batch(5))], 1 << 20)).await;
        assert_eq!(data.len(), 2);
        assert_eq!(data[0], expected, "the prebuilt message, prefix included");
        assert_eq!(Status::from_header_map(&trailers).expect("a status").code(), tonic::Code::Ok);

        let refused = Status::unavailable("loader is draining");
        let (data, trailers) = frames(body(vec![Ok(batch(5)), Err(refused), Ok(batch(5))], 1 << 20)).await;
        assert_eq!(data.len(), 1, "nothing after the error");
        let status = Status::from_header_map(&trailers).expect("a status");
        assert_eq!((status.code(), status.message()), (tonic::Code::Unavailable, "loader is draining"));
    }

    #[tokio::test]
    async fn a_message_over_the_limit_ends_the_stream_naming_both_sizes() {
        let (data, trailers) = frames(body(vec![Ok(batch(10)), Ok(batch(1000))], 500)).await;
        assert_eq!(data.len(), 1);
        let status = Status::from_header_map(&trailers).expect("a status");
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        assert!(status.message().contains("500-byte message limit"), "{}", status.message());
    }
}
