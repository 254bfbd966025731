//! The collector's own accept loop: the router served over HTTP/1.1 and HTTP/2 (prior
//! knowledge, h2c) with connection-level limits that `axum::serve` does not have.
//!
//! - **Connection cap** (`--max-connections`): a semaphore permit is taken *before* `accept`.
//!   When every permit is in use the loop stops accepting: new clients wait in the kernel's
//!   listen backlog (their connect succeeds, their request is answered once a slot frees) or
//!   are refused by the kernel once the backlog is full. Nothing is accepted only to be
//!   closed, so a flood costs no file descriptors or task beyond the cap.
//! - **Header-read timeout** (`--header-read-timeout-secs`): a connection must deliver its
//!   first request's head within this time of being accepted (silent connections, slow
//!   prefaces, slowloris). On HTTP/1.1, hyper also applies it to every later request head,
//!   counted from when it starts waiting for that head.
//! - **Idle timeout** (`--idle-timeout-secs`): a connection with no request in progress (no
//!   handler running, no response body still being produced) for this long is closed
//!   (gracefully: an HTTP/2 client gets GOAWAY), whether or not bytes trickle in. A client
//!   that stops reading a response the server has finished producing counts as idle too.
//! - **Graceful shutdown**: once [`Shutdown`] fires the listener is closed, every connection
//!   is asked to finish its in-flight requests and close; [`serve`] resolves once all have.
//!   The caller bounds the wait (dropping the future aborts the remaining connections).
//! - Errors from `accept` (EMFILE, ENFILE, ECONNABORTED...) are logged and retried after a
//!   short pause; they never stop the loop.
//!
//! Handlers find the peer address as `ConnectInfo<SocketAddr>` in the request extensions,
//! as with `into_make_service_with_connect_info`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::shutdown::Shutdown;

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// After an idle connection was asked to close: how long it may stay without a request in
/// progress before it is dropped (a client that stopped reading our last bytes).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// HTTP/2: ping the client this often when it is silent, and close when the ping is not
/// answered within [`H2_KEEP_ALIVE_TIMEOUT`].
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// HTTP/2: streams one connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// The connection limits (built from [`crate::config::ServeConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; at the cap the loop stops accepting.
    pub max_connections: usize,
    /// Time allowed for a request head (from accept for the first request).
    pub header_read_timeout: Duration,
    /// A connection without a request in progress for this long is closed.
    pub idle_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` fires and every connection has finished.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, shutdown: Shutdown) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = JoinSet::new();

    loop {
        // A free slot first: at the cap, clients wait in the listen backlog.
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // never closed
            },
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                        _ = shutdown.wait() => break,
                    }
                }
            },
            _ = shutdown.wait() => break,
        };
        // Reap finished connections so the set holds only live ones.
        while connections.try_join_next().is_some() {}
        let (builder, router, shutdown) = (builder.clone(), router.clone(), shutdown.clone());
        connections.spawn(async move {
            serve_connection(&builder, stream, peer, router, limits, shutdown).await;
            drop(permit);
        });
    }
    // Stop accepting: clients still in the backlog are refused by the kernel.
    drop(listener);
    tracing::debug!(
        connections = connections.len(),
        "listener closed; waiting for connections to finish"
    );
    while connections.join_next().await.is_some() {}
}

/// One connection, until the client closes it, it idles out, or shutdown finishes it.
async fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    shutdown: Shutdown,
) {
    // Small JSON answers: send them at once.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let busy = Busy::start(&activity);
            let router = router.clone();
            request.extensions_mut().insert(ConnectInfo(peer));
            async move {
                let response = match router.oneshot(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                // The request counts as in progress until its response body is dropped.
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &busy;
                        frame
                    }))
                }))
            }
        })
    };
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);

    let idle = tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = activity.idle(limits.header_read_timeout, limits.idle_timeout) => true,
        _ = shutdown.wait() => false,
    };
    connection.as_mut().graceful_shutdown();
    if idle {
        tracing::debug!(%peer, "closing idle connection");
        // A request that raced the close is finished; a client not reading is not waited for.
        tokio::select! {
            _ = connection.as_mut() => {}
            _ = activity.idle(IDLE_CLOSE_GRACE, IDLE_CLOSE_GRACE) => {}
        }
    } else {
        // In-flight requests finish; the caller bounds the wait.
        let _ = connection.as_mut().await;
    }
}

/// Requests in progress on one connection, and since when it has had none.
struct Activity {
    state: Mutex<ActivityState>,
    changed: Notify,
}

struct ActivityState {
    /// Requests whose handler runs or whose response body is still being produced.
    busy: usize,
    /// When `busy` last dropped to 0 (or the connection was accepted).
    idle_since: Instant,
    /// Whether a request has started (its head was read) on this connection.
    served: bool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new(ActivityState {
                busy: 0,
                idle_since: Instant::now(),
                served: false,
            }),
            changed: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut ActivityState)) {
        if let Ok(mut state) = self.state.lock() {
            f(&mut state);
        }
        self.changed.notify_waiters();
    }

    /// Resolves once the connection has had no request in progress for `before_first`
    /// (no request started yet) or `after_first` (after one).
    async fn idle(&self, before_first: Duration, after_first: Duration) {
        loop {
            // Created before reading the state, so no change is missed.
            let changed = self.changed.notified();
            let wait = match self.state.lock() {
                Ok(state) if state.busy == 0 => {
                    let limit = if state.served {
                        after_first
                    } else {
                        before_first
                    };
                    match limit.checked_sub(state.idle_since.elapsed()) {
                        None => return,
                        Some(left) if left.is_zero() => return,
                        Some(left) => Some(left),
                    }
                }
                Ok(_) => None,
                // A handler panicked while holding the lock: treat as idle.
                Err(_) => return,
            };
            match wait {
                Some(left) => tokio::select! {
                    _ = tokio::time::sleep(left) => {}
                    _ = changed => {}
                },
                None => changed.await,
            }
        }
    }
}

/// One request in progress; dropping it marks the end.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Busy {
        activity.update(|s| {
            s.busy += 1;
            s.served = true;
        });
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.update(|s| {
            s.busy = s.busy.saturating_sub(1);
            if s.busy == 0 {
                s.idle_since = Instant::now();
            }
        });
    }
}
