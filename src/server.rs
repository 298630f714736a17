//! The HTTP server around the router: what a hostile or broken client can hold is bounded.
//!
//! - a request head must arrive within `header_read_timeout` of the connection waiting for
//!   it (hyper's timer: it also bounds how long a keep-alive connection waits for the next
//!   request);
//! - a connection on which no byte moves either way for `idle_timeout` is closed (a client
//!   that stops reading its response, or stops sending mid-request);
//! - a request body must be read within `body_read_timeout` of the request's start: past
//!   it the read fails and the request answers 408 in our error shape (`guard_body`,
//!   applied by the request-context middleware);
//! - request bodies being read share one budget of bytes ([`BodyBudget`]): past it a request
//!   is answered 503 `overloaded` at once instead of being buffered;
//! - at most `max_connections` connections are served at once. At the cap a new connection
//!   is still accepted, and the connection without a request in flight that has been quiet
//!   the longest (kept alive between requests, or still to send a whole head) is closed to
//!   make room: idle sockets cannot starve a caller with a request to make. Only when every
//!   connection has a request in flight does a new one wait for a slot;
//! - at most `max_connections_per_peer` connections per peer address (0: no cap); over it a
//!   new connection is closed at once.
//!
//! On shutdown the listener closes, every connection finishes its in-flight request and
//! closes, for at most the grace period.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tower_service::Service;

/// The bounds a connection is served under (`server.*` settings).
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// 0: no per-peer cap.
    pub max_connections_per_peer: usize,
}

/// The most a connection's read buffer grows to (hyper's default: 400 KiB). A body chunk
/// is a slice of it, so while a chunk is held the buffer cannot be reused and hyper takes a
/// new one: a connection reading a large body held up to two of these besides the body.
/// 64 KiB still reads a 1 MiB delivery in 16 reads, and bounds a request head (431 above).
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Serves `router` on `listener` until `shutdown` resolves, then drains connections for at
/// most `grace`. Returns whether every connection finished within the grace period.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> bool {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let registry = Arc::new(Registry::new(limits.max_connections_per_peer));
    let (stopping_tx, stopping_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(peer_slot) = registry.admit_peer(peer.ip()) else {
            tracing::debug!("closing a connection over server.max_connections_per_peer");
            continue;
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // At the cap: make room by closing the idlest connection, if any is idle;
                // otherwise wait for one to end.
                registry.evict_idlest();
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let tracked = registry.register();
        let router = router.clone();
        let stopping = stopping_rx.clone();
        tokio::spawn(async move {
            serve_connection(stream, router, limits, &tracked, stopping).await;
            drop(tracked);
            drop(peer_slot);
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stopping_tx.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_ok();
    drained
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: ServerLimits,
    tracked: &Tracked,
    mut stopping: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let activity = tracked.activity.clone();
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(READ_BUFFER_BYTES)
        .keep_alive(true);
    let in_flight = activity.clone();
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            // A request in flight until its response is produced: the connection is not idle
            // and is never closed to make room.
            let busy = Busy::enter(&in_flight);
            // Cloning the router clones an Arc; its readiness is always ready.
            let response = router.clone().call(request);
            async move {
                let response = response.await;
                drop(busy);
                response
            }
        });
    let connection = http.serve_connection(io, service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stopping.wait_for(|s| *s), if !closing => {
                // Finish the request in flight, then close.
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = activity.evicted.notified() => {
                tracing::debug!("closing an idle connection to make room at server.max_connections");
                return;
            }
            () = tokio::time::sleep(activity.quiet_left(limits.idle_timeout)) => {
                if activity.quiet_for() >= limits.idle_timeout {
                    tracing::debug!("closing a connection idle past server.idle_timeout_ms");
                    return;
                }
            }
        }
    }
}

/// The connections being served, to find the idlest one at the cap, and the count per peer.
struct Registry {
    epoch: Instant,
    next_id: AtomicU64,
    connections: Mutex<HashMap<u64, Arc<Activity>>>,
    max_per_peer: usize,
    peers: Arc<PeerCounts>,
}

/// Connections being served per peer address (only with a per-peer cap).
type PeerCounts = Mutex<HashMap<IpAddr, usize>>;

impl Registry {
    fn new(max_per_peer: usize) -> Self {
        Self {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            max_per_peer,
            peers: Arc::new(PeerCounts::default()),
        }
    }

    fn register(self: &Arc<Self>) -> Tracked {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(self.epoch));
        lock(&self.connections).insert(id, activity.clone());
        Tracked {
            id,
            activity,
            registry: self.clone(),
        }
    }

    /// Signals the connection without a request in flight that has been quiet the longest
    /// to close. A scan of at most `max_connections` entries, only at the cap.
    fn evict_idlest(&self) {
        let connections = lock(&self.connections);
        let idlest = connections
            .values()
            .filter(|a| a.busy.load(Ordering::Relaxed) == 0 && !a.evicting())
            .min_by_key(|a| a.last_micros.load(Ordering::Relaxed));
        if let Some(activity) = idlest {
            activity.evict();
        }
    }

    /// A place for one more connection from `peer`, or `None` over the per-peer cap.
    fn admit_peer(&self, peer: IpAddr) -> Option<PeerSlot> {
        if self.max_per_peer == 0 {
            return Some(PeerSlot(None));
        }
        let mut peers = lock(&self.peers);
        let count = peers.entry(peer).or_insert(0);
        if *count >= self.max_per_peer {
            return None;
        }
        *count += 1;
        Some(PeerSlot(Some((peer, self.peers.clone()))))
    }
}

/// A poisoned lock only means another connection's task panicked holding it; the maps stay
/// consistent (every change is one insert or remove).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A connection's entry in the registry, removed when the connection ends.
struct Tracked {
    id: u64,
    activity: Arc<Activity>,
    registry: Arc<Registry>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.registry.connections).remove(&self.id);
    }
}

/// One connection of a peer, given back when the connection ends.
struct PeerSlot(Option<(IpAddr, Arc<PeerCounts>)>);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Some((peer, peers)) = &self.0 {
            let mut peers = lock(peers);
            if let Some(count) = peers.get_mut(peer) {
                *count -= 1;
                if *count == 0 {
                    peers.remove(peer);
                }
            }
        }
    }
}

/// A request in flight on a connection, for as long as this lives.
struct Busy(Arc<Activity>);

impl Busy {
    fn enter(activity: &Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// When a byte last moved on a connection, whether a request is in flight on it, and the
/// signal that closes it to make room.
struct Activity {
    /// Shared by every connection of a listener, so that their quiet times compare.
    epoch: Instant,
    last_micros: AtomicU64,
    busy: AtomicU32,
    evicted: Notify,
    evicting: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        let activity = Self {
            epoch,
            last_micros: AtomicU64::new(0),
            busy: AtomicU32::new(0),
            evicted: Notify::new(),
            evicting: std::sync::atomic::AtomicBool::new(false),
        };
        activity.touch();
        activity
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_micros() as u64;
        self.last_micros.store(now, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_micros(self.last_micros.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    /// How long until the connection has been quiet for `limit`, at the earliest.
    fn quiet_left(&self, limit: Duration) -> Duration {
        limit
            .saturating_sub(self.quiet_for())
            .max(Duration::from_millis(10))
    }

    /// Signalled once: a connection already told to close is not chosen again.
    fn evict(&self) {
        self.evicting.store(true, Ordering::Relaxed);
        // Stores a permit when the connection's loop is not waiting right now.
        self.evicted.notify_one();
    }

    fn evicting(&self) -> bool {
        self.evicting.load(Ordering::Relaxed)
    }
}

/// A socket that records when bytes move.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The body-read deadline of a request passed: what reads the body answers 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body was not received within server.body_read_timeout_ms")]
pub struct BodyDeadlinePassed;

/// The body budget was spent while a body without a declared length arrived: what reads
/// the body answers 503 `overloaded`.
#[derive(Debug, thiserror::Error)]
#[error("the request bodies in flight reached server.inflight_body_bytes")]
pub struct BodyBudgetSpent;

/// The bytes that request bodies being read may hold at once (`server.inflight_body_bytes`).
///
/// A body with a declared `Content-Length` reserves all of it before the handler runs: the
/// sender has committed to that length, so the reservation is exact, and a request that
/// does not fit is refused before anything is read or looked up. A body whose declared
/// length is over the whole budget reserves nothing up front: every route's limit is within
/// the budget (validated), so the route refuses it 413 before reading. Chunked bodies (no
/// length known) reserve each chunk as it arrives, and their read fails, 503, when one does
/// not fit. A reservation is held until the response is produced, covering the handler's
/// copy of the body, then given back.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    pub fn new(total: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The bytes not reserved right now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Gives the request body its read deadline, counted from now (the request's start),
    /// and its share of the budget: `Err(BodyBudgetSpent)` when its declared length does
    /// not fit. Hold the returned [`Reservation`] until the response is produced. Most
    /// requests carry no body: no timer and no reservation for them.
    pub fn guard_body(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<(Request, Option<Reservation>), BodyBudgetSpent> {
        if request.body().is_end_stream() {
            return Ok((request, None));
        }
        let reservation = Reservation(Arc::new(Reserved {
            budget: self.bytes.clone(),
            bytes: AtomicU32::new(0),
        }));
        let declared = request.body().size_hint().exact();
        let prepaid = match declared {
            Some(length) if length <= self.total as u64 => {
                reservation.take(length)?;
                true
            }
            _ => false,
        };
        let (parts, body) = request.into_parts();
        let body = Body::new(GuardedBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            reservation: (!prepaid).then(|| reservation.clone()),
        });
        Ok((Request::from_parts(parts, body), Some(reservation)))
    }
}

/// Bytes of the budget held by one request, given back when the last holder drops it.
#[derive(Clone)]
pub struct Reservation(Arc<Reserved>);

struct Reserved {
    budget: Arc<Semaphore>,
    bytes: AtomicU32,
}

impl Reservation {
    fn take(&self, bytes: u64) -> Result<(), BodyBudgetSpent> {
        let bytes = u32::try_from(bytes).map_err(|_| BodyBudgetSpent)?;
        let permits = self
            .0
            .budget
            .try_acquire_many(bytes)
            .map_err(|_| BodyBudgetSpent)?;
        // Given back by hand in `drop`, all at once.
        permits.forget();
        self.0.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget.add_permits(*self.bytes.get_mut() as usize);
    }
}

struct GuardedBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Chunk by chunk, for a body whose length was not reserved up front.
    reservation: Option<Reservation>,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            if let (Some(Ok(frame)), Some(reservation)) = (&frame, &self.reservation) {
                let length = frame.data_ref().map_or(0, Bytes::len) as u64;
                if let Err(spent) = reservation.take(length) {
                    return Poll::Ready(Some(Err(Box::new(spent))));
                }
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyDeadlinePassed)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a body-read failure was the deadline passing (somewhere in its source chain).
pub fn is_body_deadline(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyDeadlinePassed>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// Whether a body-read failure was the body budget running out (somewhere in its chain).
pub fn is_budget_spent(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyBudgetSpent>() {
            return true;
        }
        current = e.source();
    }
    false
}
