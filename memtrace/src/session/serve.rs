//! `--listen ADDR`: an HTTP server on a thread of its own, serving what the
//! watch loop publishes each interval: `/metrics` (Prometheus text or
//! OpenMetrics, as the scraper asks) and `/debug/pprof/heap` (a pprof heap
//! profile of the outstanding blocks, the endpoint Parca scrapes).
//!
//! The server never touches the probes, the maps or the symbolizer: a scrape
//! reads the last published figures, and a profile is asked of the watch loop,
//! which builds it between intervals (see [`Published::want_profile`]). A
//! slow or stalled client cannot hold memtrace: each connection has a deadline
//! and their number is bounded.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::report::metrics::{Exposition, Metrics, SiteVerdicts};

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// The longest one connection may take, headers to last byte.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// How long a `/debug/pprof/heap` request waits for the watch loop's profile.
const PROFILE_WAIT: Duration = Duration::from_secs(15);

/// What the watch loop publishes and the server reads.
#[derive(Default)]
pub(super) struct Published {
    /// None until attached: a scrape then gets 503.
    metrics: Mutex<Option<Metrics>>,
    /// The newest snapshot's verdicts, served while newer than the live ones.
    verdicts: Mutex<Option<SiteVerdicts>>,
    /// The last profile built, and the number of profiles built so far.
    profile: Mutex<Option<Bytes>>,
    profiles_built: AtomicU64,
    want_profile: AtomicBool,
}

impl Published {
    pub(super) fn set_metrics(&self, mut m: Metrics) {
        let snapshot = self
            .verdicts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        m.verdicts = newer(m.verdicts.take(), snapshot);
        *self.metrics.lock().unwrap_or_else(|e| e.into_inner()) = Some(m);
    }

    /// A snapshot's verdicts, served from now on.
    pub(super) fn set_verdicts(&self, v: SiteVerdicts) {
        if let Some(m) = self
            .metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            m.verdicts = newer(m.verdicts.take(), Some(v.clone()));
        }
        *self.verdicts.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
    }

    /// Whether a client waits for a profile (and it should be built now).
    pub(super) fn want_profile(&self) -> bool {
        self.want_profile.swap(false, Ordering::AcqRel)
    }

    pub(super) fn set_profile(&self, pprof: Vec<u8>) {
        *self.profile.lock().unwrap_or_else(|e| e.into_inner()) = Some(Bytes::from(pprof));
        self.profiles_built.fetch_add(1, Ordering::AcqRel);
    }
}

/// Of two judgements of the heap sites, the later.
fn newer(a: Option<SiteVerdicts>, b: Option<SiteVerdicts>) -> Option<SiteVerdicts> {
    match (a, b) {
        (Some(a), Some(b)) if b.traced_seconds > a.traced_seconds => Some(b),
        (Some(a), _) => Some(a),
        (None, b) => b,
    }
}

/// The running server.
pub(super) struct Server {
    pub(super) published: Arc<Published>,
    pub(super) addr: SocketAddr,
}

/// Binds `addr` (before attaching, so that a taken port fails at once) and
/// serves it on its own thread until memtrace exits.
pub(super) fn start(addr: SocketAddr) -> Result<Server> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--listen {addr}: cannot listen there"))?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let published = Arc::new(Published::default());
    let shared = published.clone();
    std::thread::Builder::new()
        .name("memtrace-http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build();
            match rt {
                Ok(rt) => rt.block_on(serve(listener, shared)),
                Err(e) => log::warn!("--listen: cannot start the server: {e}"),
            }
        })
        .context("starting the --listen thread")?;
    Ok(Server { published, addr })
}

async fn serve(listener: std::net::TcpListener, shared: Arc<Published>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return log::warn!("--listen: {e}"),
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::debug!("--listen: accept: {e}");
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone()));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
            drop(permit);
        });
    }
}

fn response(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Published>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET {
        return Ok(response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n",
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = Exposition::negotiate(accept);
            let text = shared
                .metrics
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|m| m.render(format));
            match text {
                Some(t) => response(StatusCode::OK, format.content_type(), t),
                None => response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "memtrace: still attaching\n",
                ),
            }
        }
        "/debug/pprof/heap" => profile(&shared).await,
        "/" => response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "memtrace: /metrics (Prometheus, OpenMetrics), /debug/pprof/heap (pprof)\n",
        ),
        _ => response(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}

/// Asks the watch loop for a fresh profile and waits for it.
async fn profile(shared: &Published) -> Response<Full<Bytes>> {
    let before = shared.profiles_built.load(Ordering::Acquire);
    shared.want_profile.store(true, Ordering::Release);
    let deadline = tokio::time::Instant::now() + PROFILE_WAIT;
    while shared.profiles_built.load(Ordering::Acquire) == before {
        if tokio::time::Instant::now() >= deadline {
            return response(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "memtrace: the profile was not ready in time; try again\n",
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pprof = shared
        .profile
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match pprof {
        Some(b) => response(StatusCode::OK, "application/octet-stream", b),
        None => response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "no profile\n",
        ),
    }
}
