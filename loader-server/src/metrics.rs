//! Prometheus metrics over plain HTTP (`--metrics-listen ADDR`, path `/metrics`): what an
//! operator asks first — batches and bytes served, errors by kind, in-flight bytes against the
//! limit, open streams.

use std::{
    collections::HashMap,
    fmt::Write as _,
    future::Future,
    net::IpAddr,
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{error::ERROR_KINDS, serve::state::LoaderState};

/// Renders the metrics in the Prometheus text exposition format.
pub fn render(state: &LoaderState) -> String {
    let stats = &state.stats;
    let config = state.config();
    let mut out = String::new();
    let error_samples: Vec<(String, u64)> = ERROR_KINDS
        .iter()
        .zip(&stats.errors)
        .map(|(row, count)| (format!("{{kind=\"{}\"}}", row.label), count.load(Relaxed)))
        .collect();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "conveyor_loader_batches_served_total",
        "counter",
        "Batches answered with data.",
        &[("", stats.batches_served.load(Relaxed))],
    );
    metric(
        "conveyor_loader_bytes_served_total",
        "counter",
        "Tensor bytes answered.",
        &[("", stats.bytes_served.load(Relaxed))],
    );
    metric(
        "conveyor_loader_request_errors_total",
        "counter",
        "Batch requests refused, by kind.",
        &error_samples.iter().map(|(labels, count)| (labels.as_str(), *count)).collect::<Vec<_>>(),
    );
    metric(
        "conveyor_loader_streams_refused_total",
        "counter",
        "Streams refused at --max-streams.",
        &[("", stats.streams_refused.load(Relaxed))],
    );
    metric(
        "conveyor_loader_shm_batches_total",
        "counter",
        "Batches sent through shared memory, and those sent inline because the region was full.",
        &[
            ("{path=\"shared\"}", stats.shm_batches.load(Relaxed)),
            ("{path=\"inline_full\"}", stats.shm_full.load(Relaxed)),
        ],
    );
    metric(
        "conveyor_loader_bad_samples_total",
        "counter",
        "Samples that could not be decoded (corrupt, truncated, above --max-image-pixels), by what --on-bad-sample did.",
        &[
            ("{action=\"substituted\"}", stats.bad_samples_substituted.load(Relaxed)),
            ("{action=\"failed\"}", stats.bad_samples_failed.load(Relaxed)),
        ],
    );
    metric(
        "conveyor_loader_shm_regions_total",
        "counter",
        "Unix-socket connections granted a shared-memory region.",
        &[("", stats.shm_regions.load(Relaxed))],
    );
    metric(
        "conveyor_loader_shm_regions_refused_total",
        "counter",
        "Unix-socket connections that asked for a shared-memory region and got none (--max-shm-bytes in use).",
        &[("", stats.shm_regions_refused.load(Relaxed))],
    );
    metric(
        "conveyor_loader_shm_bytes",
        "gauge",
        "Shared memory of the regions granted now (at most --max-shm-bytes).",
        &[("", stats.shm_bytes_in_use.load(Relaxed))],
    );
    metric(
        "conveyor_loader_unix_peers_refused_total",
        "counter",
        "Unix-socket connections closed at once because their user id is not in --unix-allow-uid.",
        &[("", stats.unix_peers_refused.load(Relaxed))],
    );
    metric(
        "conveyor_loader_allocator_bytes",
        "gauge",
        "The allocator's live bytes and the freed bytes it keeps for reuse (bounded by --allocator-retain-bytes).",
        &[
            ("{state=\"allocated\"}", stats.allocator.allocated_bytes.load(Relaxed)),
            ("{state=\"retained\"}", stats.allocator.retained_bytes.load(Relaxed)),
        ],
    );
    metric(
        "conveyor_loader_allocator_purges_total",
        "counter",
        "Times the retained bytes exceeded --allocator-retain-bytes and went back to the kernel.",
        &[("", stats.allocator.purges.load(Relaxed))],
    );
    metric(
        "conveyor_loader_connections_refused_total",
        "counter",
        "Connections closed at once at --max-connections.",
        &[("", stats.connections_refused.load(Relaxed))],
    );
    metric(
        "conveyor_loader_timeouts_total",
        "counter",
        "Connections and streams ended by a timeout, by kind.",
        &[
            ("{kind=\"connection\"}", stats.connections_timed_out.load(Relaxed)),
            ("{kind=\"stream\"}", stats.streams_timed_out.load(Relaxed)),
        ],
    );
    metric(
        "conveyor_loader_requests_malformed_total",
        "counter",
        "Request messages over the size limit or not decodable.",
        &[("", stats.requests_malformed.load(Relaxed))],
    );
    metric(
        "conveyor_loader_auth_refused_total",
        "counter",
        "Calls refused for a missing or wrong token.",
        &[("", stats.auth_refused.load(Relaxed))],
    );
    metric(
        "conveyor_loader_inflight_bytes",
        "gauge",
        "Batch bytes assembled or queued now.",
        &[("", state.inflight_bytes())],
    );
    metric(
        "conveyor_loader_inflight_bytes_limit",
        "gauge",
        "--max-inflight-bytes.",
        &[("", config.max_inflight_bytes)],
    );
    metric(
        "conveyor_loader_active_streams",
        "gauge",
        "Batch streams open now.",
        &[("", state.active_streams() as u64)],
    );
    metric("conveyor_loader_max_streams", "gauge", "--max-streams.", &[("", config.max_streams.get() as u64)]);
    let per_dataset = |pick: fn(&crate::serve::stats::DatasetCounters) -> u64| -> Vec<(String, u64)> {
        stats.datasets.iter().map(|(name, c)| (format!("{{dataset=\"{name}\"}}"), pick(c))).collect()
    };
    let delivered = per_dataset(|c| c.delivered_bytes.load(Relaxed));
    let decoded = per_dataset(|c| c.decoded_bytes.load(Relaxed));
    metric(
        "conveyor_loader_dataset_delivered_bytes_total",
        "counter",
        "Tensor bytes sent, per dataset.",
        &as_refs(&delivered),
    );
    metric(
        "conveyor_loader_dataset_decoded_bytes_total",
        "counter",
        "Bytes decoded from storage, per dataset.",
        &as_refs(&decoded),
    );
    // Datasets in object stores: what their reads cost the store.
    let (mut requests, mut fetched, mut cache_hits) = (Vec::new(), Vec::new(), Vec::new());
    let mut disk_cache = None;
    for served in state.datasets() {
        if let crate::serve::state::Served::Stored { dataset, .. } = served
            && let Some(storage) = &dataset.storage
        {
            disk_cache = disk_cache.or(storage.disk_cache_counters());
            let (num_requests, bytes) = storage.counters();
            requests.push((format!("{{dataset=\"{}\"}}", dataset.name), num_requests));
            fetched.push((format!("{{dataset=\"{}\"}}", dataset.name), bytes));
            cache_hits.push((format!("{{dataset=\"{}\"}}", dataset.name), storage.cache_hit_bytes()));
        }
    }
    metric(
        "conveyor_loader_object_requests_total",
        "counter",
        "GET requests to object stores (rows, headers, Zarr chunks and metadata), per remote dataset.",
        &as_refs(&requests),
    );
    metric(
        "conveyor_loader_object_fetched_bytes_total",
        "counter",
        "Bytes fetched from object stores, per remote dataset; against delivered bytes, the read amplification.",
        &as_refs(&fetched),
    );
    metric(
        "conveyor_loader_disk_cache_hit_bytes_total",
        "counter",
        "Bytes of remote datasets read from the --disk-cache directory instead of the store.",
        &as_refs(&cache_hits),
    );
    if let Some((refused, evicted)) = disk_cache {
        metric(
            "conveyor_loader_disk_cache_refused_total",
            "counter",
            "Disk cache entries that failed a check (truncated, damaged, another key's), deleted and fetched again.",
            &[("", refused)],
        );
        metric(
            "conveyor_loader_disk_cache_evicted_total",
            "counter",
            "Disk cache entries removed to stay within --disk-cache-bytes.",
            &[("", evicted)],
        );
    }
    // Derived datasets: their transform counters, and the worker pools of Python ones.
    let (mut batches, mut nanos, mut function_nanos, mut restarts, mut queued) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for derived in state.derived() {
        let labels = format!("{{dataset=\"{}\"}}", derived.name);
        if let Some(counters) = stats.datasets.get(&derived.name) {
            batches.push((labels.clone(), counters.transform_batches.load(Relaxed)));
            nanos.push((labels.clone(), counters.transform_nanos.load(Relaxed)));
        }
        if let crate::transform::Transform::Python(pool) = &derived.transform {
            for cause in crate::transform::python::RestartCause::ALL {
                let labels = format!("{{dataset=\"{}\",cause=\"{}\"}}", derived.name, cause.label());
                restarts.push((labels, pool.stats.restarts_for(cause)));
            }
            function_nanos.push((labels.clone(), pool.stats.function_nanos.load(Relaxed)));
            queued.push((labels, pool.stats.queued.load(Relaxed)));
        }
    }
    metric(
        "conveyor_loader_transform_batches_total",
        "counter",
        "Batches transformed, per derived dataset.",
        &as_refs(&batches),
    );
    metric(
        "conveyor_loader_transform_nanoseconds_total",
        "counter",
        "Time spent transforming batches, per derived dataset (Python: queue wait, copies and the function).",
        &as_refs(&nanos),
    );
    metric(
        "conveyor_loader_transform_function_nanoseconds_total",
        "counter",
        "Time spent inside the Python function, per derived dataset (as its workers measure it).",
        &as_refs(&function_nanos),
    );
    metric(
        "conveyor_loader_transform_worker_restarts_total",
        "counter",
        "Python transform workers replaced, by cause (memory, crashed, timeout, recycled).",
        &as_refs(&restarts),
    );
    metric(
        "conveyor_loader_transform_queue_depth",
        "gauge",
        "Batches waiting for a Python transform worker (bounded by --transform-queue).",
        &as_refs(&queued),
    );
    let cache = state.cache().stats();
    metric(
        "conveyor_loader_chunk_cache_hits_total",
        "counter",
        "Chunk lookups served from the cache.",
        &[("", cache.hits)],
    );
    metric("conveyor_loader_chunk_cache_misses_total", "counter", "Chunk lookups that decoded.", &[("", cache.misses)]);
    metric(
        "conveyor_loader_chunk_cache_bytes",
        "gauge",
        "Decoded bytes held by the chunk cache.",
        &[("", cache.bytes)],
    );
    metric(
        "conveyor_loader_chunk_cache_budget_bytes",
        "gauge",
        "--chunk-cache-bytes.",
        &[("", config.chunk_cache_bytes)],
    );
    out
}

fn as_refs(samples: &[(String, u64)]) -> Vec<(&str, u64)> {
    samples.iter().map(|(labels, value)| (labels.as_str(), *value)).collect()
}

/// Scrapes answered at once; more connections are closed unanswered.
pub const MAX_CONNECTIONS: usize = 16;
/// Connections one peer address may hold at once, so that idle connections from one host
/// cannot take every slot from the scrapers.
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// How long one scrape may take, reading the request and writing the answer.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` until `shutdown` resolves. At most [`MAX_CONNECTIONS`]
/// scrapes at once, each within [`SCRAPE_TIMEOUT`]; requests are read into a fixed 4 KiB buffer;
/// anything else gets 404. Accept errors (out of file descriptors) are logged and retried after a
/// pause rather than in a busy loop.
pub async fn serve_metrics(listener: TcpListener, state: Arc<LoaderState>, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let peers: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok((socket, remote)) => (socket, remote.ip()),
            Err(error) => {
                tracing::warn!(%error, "metrics endpoint cannot accept a connection; retrying in 100ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(per_peer) = PeerSlot::take(&peers, peer) else {
            tracing::debug!(%peer, "metrics endpoint: this peer holds its connections already; closing one");
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics endpoint busy; closing a connection");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slots = (slot, per_peer);
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT, answer(socket, &state)).await;
        });
    }
}

/// One of a peer's [`MAX_CONNECTIONS_PER_PEER`] connections, given back when dropped.
struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl PeerSlot {
    fn take(peers: &Arc<Mutex<HashMap<IpAddr, usize>>>, peer: IpAddr) -> Option<PeerSlot> {
        let mut held = peers.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(peer).or_insert(0);
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot { peers: peers.clone(), peer })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.peer);
            }
        }
    }
}

async fn answer(mut socket: TcpStream, state: &LoaderState) {
    let mut request = [0u8; 4096];
    let Ok(len) = socket.read(&mut request).await else { return };
    let head = String::from_utf8_lossy(&request[..len]);
    let response = if head.starts_with("GET /metrics") {
        let body = render(state);
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned()
    };
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}
