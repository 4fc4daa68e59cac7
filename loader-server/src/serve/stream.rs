//! One batch stream's loop: reads the client's requests, answers each exactly once at most
//! `--stream-parallelism` at a time, and ends the stream (with a status saying why) when the
//! client stops reading (`--write-timeout`), sends nothing (`--stream-idle-timeout`), sends what
//! cannot be decoded, leaves, or the loader drains. The loop is generic over where requests come
//! from, so its tests drive it on tokio's paused clock without a connection.

use std::{
    pin::Pin,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    task::{Context, Poll},
};

use conveyor_proto::{v1::BatchRequest, wire::OutgoingBatch};
use futures::{Stream, StreamExt, stream::FuturesUnordered};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::{connection::CallGuard, shm::SharedRegion, state::LoaderState, stream_slots::Slot};
use crate::config::Config;

type Outgoing = OutgoingBatch;

/// The responses of one stream, as tonic sends them.
pub type BatchStream = Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send>>;

/// Starts serving the requests of `inbound` (a stream's request messages) on a task of its own,
/// within `span`, and returns its responses.
pub(super) fn open<S>(
    state: Arc<LoaderState>,
    inbound: S,
    draining_rx: watch::Receiver<bool>,
    conn: StreamConn,
    span: tracing::Span,
) -> BatchStream
where
    S: Stream<Item = Result<BatchRequest, Status>> + Send + Unpin + 'static,
{
    let (out_tx, out_rx) = mpsc::channel(state.config().stream_parallelism.get());
    let outbox = Arc::new(Outbox::new(out_rx));
    let task = serve_stream(state, inbound, outbox.clone(), out_tx, draining_rx, conn);
    tokio::spawn(tracing::Instrument::instrument(task, span));
    Box::pin(OutboxStream(outbox))
}

/// What a stream holds of its loader and connection while it runs.
pub(super) struct StreamConn {
    /// Its place under `--max-streams` (notified when another connection's stream takes it).
    pub(super) slot: Slot,
    /// Numbers the stream for the budget's accounting.
    pub(super) stream_id: u64,
    /// Marks a call in progress on the connection (against `--idle-timeout`).
    pub(super) _call: Option<CallGuard>,
    /// The connection's shared-memory region, where its batches are written when one is granted.
    pub(super) region: Option<Arc<SharedRegion>>,
}

/// Reads requests of one stream and answers each exactly once, at most
/// `--stream-parallelism` at a time; on drain, finishes what it has read and ends the stream.
/// Ends the stream with a status when its client stops reading (`--write-timeout`), sends no
/// request for `--stream-idle-timeout`, or sends a request that cannot be decoded.
async fn serve_stream<S>(
    state: Arc<LoaderState>,
    mut inbound: S,
    outbox: Arc<Outbox>,
    out_tx: mpsc::Sender<Result<Outgoing, Status>>,
    mut draining_rx: watch::Receiver<bool>,
    conn: StreamConn,
) where
    S: Stream<Item = Result<BatchRequest, Status>> + Unpin,
{
    let region = conn.region.clone();
    let config = state.config();
    let parallelism = config.stream_parallelism.get();
    let stream_id = conn.stream_id;
    let evict = conn.slot.evict.clone();
    let mut assembling = FuturesUnordered::new();
    let mut reading = true;
    let mut drained = *draining_rx.borrow();
    let mut last_request = tokio::time::Instant::now();
    let mut failure: Option<Status> = None;
    let (mut num_batches, mut num_bytes, mut num_refused) = (0u64, 0u64, 0u64);
    tracing::info!(shared_memory = region.is_some(), "stream opened");
    let ended = loop {
        let idle_deadline = last_request + config.stream_idle_timeout;
        // Busy while it assembles (a response already built stays queued for its client).
        conn.slot.set_busy(!assembling.is_empty());
        tokio::select! {
            message = inbound.next(), if reading && !drained && assembling.len() < parallelism => match message {
                Some(Ok(request)) => {
                    last_request = tokio::time::Instant::now();
                    assembling.push(state.clone().assemble(stream_id, request, region.clone()));
                }
                None => reading = false,
                Some(Err(status)) if is_decode_error(&status) => {
                    state.stats.requests_malformed.fetch_add(1, Relaxed);
                    tracing::warn!(%status, "refusing a request message that cannot be decoded; ending the stream after the batches it has read");
                    failure = Some(undecodable_request(&status, config));
                    reading = false;
                }
                // The client reset its side or the connection broke: nobody is left to answer.
                Some(Err(status)) => {
                    tracing::debug!(%status, "client stream ended with an error");
                    reading = false;
                }
            },
            Some(outgoing) = assembling.next(), if !assembling.is_empty() => {
                match &outgoing.error {
                    None => {
                        num_batches += 1;
                        num_bytes += outgoing.data_len() as u64;
                    }
                    Some(_) => num_refused += 1,
                }
                outbox.note_queued();
                match tokio::time::timeout(config.write_timeout, out_tx.send(Ok(outgoing))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        outbox.abort(Status::cancelled("the client left"));
                        break "the client left";
                    }
                    Err(_) => {
                        state.stats.streams_timed_out.fetch_add(1, Relaxed);
                        outbox.abort(write_timeout_status(config));
                        break "the client stopped reading (--write-timeout)";
                    }
                }
            },
            // Responses are queued and the client has taken none for --write-timeout.
            () = tokio::time::sleep_until(outbox.stall_deadline(config.write_timeout)),
                if outbox.has_queued() && (reading || !assembling.is_empty()) => {
                if outbox.stalled(config.write_timeout) {
                    state.stats.streams_timed_out.fetch_add(1, Relaxed);
                    outbox.abort(write_timeout_status(config));
                    break "the client stopped reading (--write-timeout)";
                }
            },
            () = tokio::time::sleep_until(idle_deadline), if reading && !drained && assembling.is_empty() => {
                state.stats.streams_timed_out.fetch_add(1, Relaxed);
                outbox.abort(Status::deadline_exceeded(format!(
                    "no batch request for {:?} (--stream-idle-timeout on the loader); open a new stream when you need batches",
                    config.stream_idle_timeout
                )));
                break "no request for --stream-idle-timeout";
            },
            // Its slot went to a stream of a connection holding fewer (it was idle): make way.
            // Only while reading and not draining, as below: a draining stream ends by itself.
            () = evict.notified(), if reading && !drained => {
                outbox.abort(Status::unavailable(
                    "this stream was idle and its slot went to another client's stream (--max-streams are shared \
                     fairly between connections); open a new stream when you need batches",
                ));
                break "its slot went to another connection's stream";
            },
            // The response stream is gone (the call ended): nobody is left to answer. Only while
            // there is still work, so that `else` can end the loop.
            () = out_tx.closed(), if (reading && !drained) || !assembling.is_empty() => {
                outbox.abort(Status::cancelled("the client left"));
                break "the client left";
            },
            // Only while reading: once the client closed its side, `else` must be able to end the loop.
            changed = draining_rx.changed(), if reading && !drained => {
                drained = changed.is_err() || *draining_rx.borrow();
            },
            else => break if failure.is_some() {
                "a request could not be decoded"
            } else if drained {
                "the loader is draining"
            } else {
                "the client closed it"
            },
        }
    };
    let last = match failure {
        Some(status) => Some(status),
        None if drained => {
            Some(Status::unavailable("loader is draining; send the remaining batches to another replica"))
        }
        None => None,
    };
    if let Some(status) = last {
        let _ = tokio::time::timeout(config.write_timeout, out_tx.send(Err(status))).await;
    }
    // What is queued still holds budget: a client that closed its side but reads nothing loses
    // it after the write timeout too.
    loop {
        let emptied = outbox.emptied.notified();
        tokio::pin!(emptied);
        emptied.as_mut().enable();
        if !outbox.has_queued() {
            break;
        }
        tokio::select! {
            () = emptied => {}
            () = tokio::time::sleep_until(outbox.stall_deadline(config.write_timeout)) => {
                if outbox.stalled(config.write_timeout) {
                    state.stats.streams_timed_out.fetch_add(1, Relaxed);
                    outbox.abort(write_timeout_status(config));
                    break;
                }
            }
        }
    }
    tracing::info!(batches = num_batches, bytes = num_bytes, refused = num_refused, "stream ended: {ended}");
    state.stats.log_read_amplification();
}

fn write_timeout_status(config: &Config) -> Status {
    Status::deadline_exceeded(format!(
        "the client read no response for {:?} (--write-timeout on the loader); \
         the stream ended and its share of --max-inflight-bytes went to other clients",
        config.write_timeout
    ))
}

/// Whether tonic failed to decode a request message (over the size limit, or not protobuf of the
/// request's type), as opposed to the stream breaking.
fn is_decode_error(status: &Status) -> bool {
    status.code() == tonic::Code::OutOfRange || status.message().starts_with("failed to decode Protobuf message")
}

/// The status that ends a stream whose request message could not be decoded (over the size
/// limit, or not a `BatchRequest`).
fn undecodable_request(status: &Status, config: &Config) -> Status {
    let limit = request_limit_bytes(config);
    if status.code() == tonic::Code::OutOfRange {
        Status::out_of_range(format!(
            "a batch request message is over this loader's {limit}-byte request limit ({}); \
             send at most --max-batch-samples ({}) indices per request",
            status.message(),
            config.max_batch_samples
        ))
    } else {
        Status::invalid_argument(format!(
            "a batch request message could not be decoded ({}); send conveyor.v1.BatchRequest messages of at most {limit} bytes",
            status.message()
        ))
    }
}

/// One stream's responses on their way to tonic. The stream task can empty it and end the call
/// with a status, which releases the budget held by responses the client never read.
#[derive(Debug)]
struct Outbox {
    state: Mutex<OutboxState>,
    /// Woken when tonic takes the last queued response.
    emptied: tokio::sync::Notify,
}

#[derive(Debug)]
struct OutboxState {
    responses_rx: mpsc::Receiver<Result<Outgoing, Status>>,
    /// Sent after the queue is emptied by [`Outbox::abort`].
    ending: Option<Status>,
    /// Responses queued and not yet taken by tonic.
    queued: usize,
    /// When tonic last took a response, or the queue last became non-empty.
    progress_at: tokio::time::Instant,
}

impl Outbox {
    fn new(responses_rx: mpsc::Receiver<Result<Outgoing, Status>>) -> Outbox {
        let state = OutboxState { responses_rx, ending: None, queued: 0, progress_at: tokio::time::Instant::now() };
        Outbox { state: Mutex::new(state), emptied: tokio::sync::Notify::new() }
    }

    /// Counts a response about to be queued.
    fn note_queued(&self) {
        let mut state = self.lock();
        if state.queued == 0 {
            state.progress_at = tokio::time::Instant::now();
        }
        state.queued += 1;
    }

    fn has_queued(&self) -> bool {
        self.lock().queued > 0
    }

    /// When the queue counts as stalled if tonic takes nothing before.
    fn stall_deadline(&self, write_timeout: std::time::Duration) -> tokio::time::Instant {
        self.lock().progress_at + write_timeout
    }

    /// Whether responses have waited `write_timeout` with none taken.
    fn stalled(&self, write_timeout: std::time::Duration) -> bool {
        let state = self.lock();
        state.queued > 0 && state.progress_at.elapsed() >= write_timeout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Drops every queued response (releasing its budget) and ends the call with `status`.
    fn abort(&self, status: Status) {
        let mut state = self.lock();
        state.responses_rx.close();
        while state.responses_rx.try_recv().is_ok() {}
        state.queued = 0;
        state.ending = Some(status);
    }
}

/// The response stream tonic polls; the budget of a response is released once tonic has encoded
/// it (copied its rows into the outgoing buffer).
struct OutboxStream(Arc<Outbox>);

impl Drop for OutboxStream {
    /// The call is over (the client left or reset it): queued responses release their budget
    /// now, and the stream task's next send fails, which ends it.
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.responses_rx.close();
        while state.responses_rx.try_recv().is_ok() {}
        state.queued = 0;
        drop(state);
        self.0.emptied.notify_waiters();
    }
}

impl Stream for OutboxStream {
    type Item = Result<Outgoing, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self.0.lock();
        match state.responses_rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => {
                if item.is_ok() {
                    state.queued = state.queued.saturating_sub(1);
                    state.progress_at = tokio::time::Instant::now();
                    if state.queued == 0 {
                        self.0.emptied.notify_waiters();
                    }
                }
                Poll::Ready(Some(item))
            }
            Poll::Ready(None) => Poll::Ready(state.ending.take().map(Err)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Largest request message a loader decodes: the indices of the largest batch as varints plus
/// room for the dataset name and the other fields.
pub fn request_limit_bytes(config: &Config) -> usize {
    (config.max_batch_samples as usize).saturating_mul(10).saturating_add(64 << 10)
}

#[cfg(test)]
mod tests {
    //! The stream loop driven directly, on tokio's paused clock: every timeout below is virtual
    //! time, so each test takes milliseconds; gathers run on real blocking threads, during which
    //! the clock does not advance by itself.

    use std::{path::Path, time::Duration};

    use conveyor_proto::DType;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;
    use crate::{
        dataset::{Dataset, chunk_cache::ChunkCache, zarr::MissingChunks},
        storage::Location,
    };

    /// Bytes per row of the test dataset, and its rows.
    const ROW_BYTES: u64 = 1024;
    const ROWS: u64 = 64;
    /// Rows per test batch, and what one holds of the in-flight budget.
    const BATCH: u64 = 8;
    const BATCH_BYTES: u64 = BATCH * ROW_BYTES;

    /// A loader's state over one `.npy` field of `ROWS` rows, with `tune` applied to its flags.
    fn state(dir: &Path, tune: impl FnOnce(&mut Config)) -> Arc<LoaderState> {
        let mut bytes = conveyor_proto::npy_header(DType::Uint8, &[ROWS, ROW_BYTES]);
        bytes.extend((0..ROWS * ROW_BYTES).map(|i| (i % 251) as u8));
        std::fs::write(dir.join("x.npy"), bytes).expect("write the field");
        let dataset = Dataset::open("d", &Location::Local(dir.to_owned()), MissingChunks::Fill, None).expect("opens");
        let mut config = Config::for_datasets([format!("d={}", dir.display())]);
        tune(&mut config);
        Arc::new(LoaderState::new(vec![Arc::new(dataset)], Vec::new(), ChunkCache::new(0, 1), None, config))
    }

    /// One client's stream: its request sender, its responses and the loader's drain switch.
    struct Client {
        requests_tx: mpsc::Sender<Result<BatchRequest, Status>>,
        responses: BatchStream,
        draining_tx: watch::Sender<bool>,
    }

    fn connect(state: &Arc<LoaderState>) -> Client {
        let (requests_tx, requests_rx) = mpsc::channel(16);
        let (draining_tx, draining_rx) = watch::channel(false);
        let (stream_id, slot) = state.admit_stream(0).expect("a stream slot");
        let conn = StreamConn { slot, stream_id, _call: None, region: None };
        let responses = open(state.clone(), ReceiverStream::new(requests_rx), draining_rx, conn, tracing::Span::none());
        Client { requests_tx, responses, draining_tx }
    }

    impl Client {
        /// The next response or final status, failing (not hanging) when the loop answers
        /// nothing within a virtual quarter of an hour.
        async fn next(&mut self) -> Option<Result<Outgoing, Status>> {
            tokio::time::timeout(Duration::from_secs(900), self.responses.next()).await.expect("the stream answers")
        }

        async fn ask(&self, batch_id: u64) {
            let start = batch_id * BATCH % ROWS;
            let request = BatchRequest {
                batch_id,
                dataset: "d".into(),
                indices: (start..start + BATCH).collect(),
                seed: 0,
                epoch: 0,
                accepts_ragged: true,
            };
            self.requests_tx.send(Ok(request)).await.expect("the loop reads requests");
        }
    }

    /// Waits (in virtual time, at most `limit`) until `done` holds; false if it never did.
    async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !done() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    #[tokio::test(start_paused = true)]
    async fn responses_left_untaken_end_the_stream_at_the_write_timeout_and_release_their_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path(), |c| c.write_timeout = Duration::from_secs(5));
        let mut client = connect(&state);
        for id in 0..3 {
            client.ask(id).await;
        }
        assert!(until(Duration::from_secs(1), || state.inflight_bytes() == 3 * BATCH_BYTES).await, "3 batches held");
        // Nobody reads: before the write timeout the budget stays held, after it is released.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(state.inflight_bytes(), 3 * BATCH_BYTES);
        assert!(until(Duration::from_secs(2), || state.inflight_bytes() == 0).await, "budget released");
        let ended = client.next().await.expect("a final status").expect_err("an error status");
        assert_eq!(ended.code(), tonic::Code::DeadlineExceeded);
        assert!(ended.message().contains("--write-timeout"), "{}", ended.message());
        assert!(client.next().await.is_none(), "nothing after the status");
        assert_eq!(state.stats.streams_timed_out.load(Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_without_requests_ends_at_the_idle_timeout_and_each_request_restarts_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path(), |c| c.stream_idle_timeout = Duration::from_secs(30));
        let mut client = connect(&state);
        tokio::time::sleep(Duration::from_secs(20)).await;
        client.ask(7).await;
        let answered = client.next().await.expect("an answer").expect("a batch");
        assert_eq!(answered.batch_id, 7);
        // 20 s after the request (40 s after the stream opened) it still lives.
        let started = tokio::time::Instant::now();
        let ended = client.next().await.expect("a final status").expect_err("an error status");
        let idle = started.elapsed();
        assert!(idle >= Duration::from_secs(29) && idle <= Duration::from_secs(31), "ended after {idle:?}");
        assert_eq!(ended.code(), tonic::Code::DeadlineExceeded);
        assert!(ended.message().contains("--stream-idle-timeout"), "{}", ended.message());
        assert!(client.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_finishes_the_batches_read_then_says_so_and_ends_the_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path(), |_| {});
        let mut client = connect(&state);
        client.ask(1).await;
        client.ask(2).await;
        assert!(until(Duration::from_secs(1), || state.inflight_bytes() == 2 * BATCH_BYTES).await, "both read");
        client.draining_tx.send(true).expect("the loop watches the drain");
        let mut answered = Vec::new();
        let ended = loop {
            match client.next().await.expect("answers, then a status") {
                Ok(batch) => answered.push(batch.batch_id),
                Err(status) => break status,
            }
        };
        answered.sort_unstable();
        assert_eq!(answered, [1, 2], "the batches read before the drain");
        assert_eq!(ended.code(), tonic::Code::Unavailable);
        assert!(ended.message().contains("draining"), "{}", ended.message());
        assert!(client.next().await.is_none());
        assert_eq!(state.inflight_bytes(), 0);
        // The loop is gone: it reads no more requests.
        assert!(until(Duration::from_secs(1), || client.requests_tx.is_closed()).await, "requests still read");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_goes_away_releases_its_budget_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path(), |c| c.write_timeout = Duration::from_secs(60));
        let client = connect(&state);
        for id in 0..3 {
            client.ask(id).await;
        }
        assert!(until(Duration::from_secs(1), || state.inflight_bytes() == 3 * BATCH_BYTES).await, "3 batches held");
        drop(client.responses);
        // Well before the write timeout: nothing waits for a reader that is gone.
        assert!(until(Duration::from_secs(1), || state.inflight_bytes() == 0).await, "budget released at once");
        assert!(
            until(Duration::from_secs(1), || state.active_streams() == 0).await,
            "its stream slot is freed at once"
        );
        assert_eq!(state.stats.streams_timed_out.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_undecodable_request_ends_the_stream_with_a_status_and_nothing_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path(), |_| {});
        let mut client = connect(&state);
        client.ask(1).await;
        let too_big = Status::out_of_range("decoded message length too large: found 9000000 bytes");
        client.requests_tx.send(Err(too_big)).await.expect("sent");
        client.ask(2).await;
        let first = client.next().await.expect("an answer").expect("the batch read before it");
        assert_eq!((first.batch_id, first.error.is_none()), (1, true));
        drop(first);
        let ended = client.next().await.expect("a final status").expect_err("an error status");
        assert_eq!(ended.code(), tonic::Code::OutOfRange);
        assert!(
            ended.message().contains("request limit") && ended.message().contains("--max-batch-samples"),
            "{}",
            ended.message()
        );
        assert!(client.next().await.is_none(), "batch 2 (after the bad message) is never answered");
        assert_eq!(state.stats.requests_malformed.load(Relaxed), 1);
        assert_eq!(state.inflight_bytes(), 0);
    }
}
