//! The gateway's HTTP server: accepting connections at a bounded cost.
//!
//! `axum::serve` reads request headers without a deadline and has no connection cap, so a client
//! that sends headers one byte a second (or nothing) holds a descriptor forever, and a thousand
//! of them exhaust the process's descriptors (`/healthz` then times out). This loop adds what a
//! public listener needs:
//! - a **header timeout**: a request's head must arrive within `header_timeout`, which also
//!   bounds how long an idle keep-alive connection waits for its next request (hyper starts the
//!   same timer there);
//! - a **write stall timeout** on every socket ([`StallGuard`]): a write that cannot make
//!   progress for `write_timeout` fails the connection. This covers what handlers cannot see:
//!   an SSE body that hyper stops polling because the client stopped reading, plain responses,
//!   and WebSocket frames (which also have their own timeout);
//! - a **connection cap** below the descriptor limit: past it, a new connection is closed at
//!   once (counted and logged) instead of starving the process of descriptors;
//! - **accept errors** logged and retried with backoff (10 ms doubling to 1 s), not fatal.
//!
//! WebSocket upgrades keep the guarded socket, so the limits hold after the upgrade too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

/// Descriptors kept free for everything else the process opens (Redis, Kafka, oCIS, logs).
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// The server's limits.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// A request head (and an idle keep-alive connection's next one) must arrive within this.
    pub header_timeout: Duration,
    /// A write that makes no progress for this long fails its connection.
    pub write_timeout: Duration,
    /// Open connections at most; more are closed as they arrive.
    pub max_connections: usize,
}

impl ServerLimits {
    /// The default cap: the descriptor limit less [`RESERVED_DESCRIPTORS`] (at least 64).
    pub fn default_max_connections() -> usize {
        let soft = rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        soft.saturating_sub(RESERVED_DESCRIPTORS).max(64) as usize
    }
}

/// The `listen` backlog unless told otherwise: enough for 10,000 clients reconnecting at
/// once (`foldercast-bench storm`) once the kernel allows it; tokio's default of 1,024
/// dropped half of their handshakes there.
pub const DEFAULT_LISTEN_BACKLOG: u32 = 65_535;

/// A listener on `addr` whose kernel queue holds up to `backlog` completed handshakes (the
/// kernel caps it at `net.core.somaxconn`). The address is reusable at once, so a restarted
/// gateway binds its port while the old one's connections are in `TIME_WAIT`.
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// What the server refused or lost, for `/api/stats` and the logs.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections closed on arrival because the cap was reached.
    pub refused: AtomicU64,
    /// Failed `accept` calls (descriptor exhaustion, mostly).
    pub accept_errors: AtomicU64,
    /// Connections ended because a write stalled past the write timeout.
    pub write_stalls: AtomicU64,
}

/// Serves `app` on `listener` until `shutdown` fires, within `limits`. Open connections are
/// told to finish (graceful shutdown of HTTP/1); upgraded sockets are drained by the gateway.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::ZERO;
                accepted
            }
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                stats.accept_errors.fetch_add(1, Relaxed);
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                tracing::error!(error = %e, retry_in = ?backoff, "accept failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let refused = stats.refused.fetch_add(1, Relaxed) + 1;
            // Every 1,000th, so a flood does not flood the log as well.
            if refused % 1000 == 1 {
                tracing::warn!(%peer, max = limits.max_connections, refused, "connection cap reached; closing new connections");
            }
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(
            tcp,
            app.clone(),
            limits.clone(),
            stats.clone(),
            permit,
            shutdown.clone(),
        ));
    }
}

async fn connection(
    tcp: TcpStream,
    app: Router,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    _permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let io = TokioIo::new(StallGuard::new(tcp, limits.write_timeout, stats));
    // The router takes hyper's body as it is.
    let service = TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        () = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Errors of one connection that `accept` reports, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A socket whose writes fail once they make no progress for the write timeout.
///
/// The timer exists only while a write waits (most writes complete at once), so an idle
/// connection pays one `Option` for it.
pub struct StallGuard<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    stats: Arc<ServerStats>,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, limit: Duration, stats: Arc<ServerStats>) -> Self {
        StallGuard {
            inner,
            limit,
            stalled: None,
            stats,
        }
    }

    /// `poll` is a write (or flush) that returned `Pending`: arm the timer or see it fire.
    fn check_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| {
            tracing::trace!(?limit, "write waits; stall timer armed");
            Box::pin(tokio::time::sleep(limit))
        });
        ready!(timer.as_mut().poll(cx));
        self.stats.write_stalls.fetch_add(1, Relaxed);
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no write progress for {limit:?}: the client is not reading"),
        ))
    }

    fn guard<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(r) => {
                self.stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => match self.check_stall(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.guard(cx, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_stalled_write_fails_after_the_limit_and_progress_resets_it() {
        let (client, server) = tokio::io::duplex(64);
        let stats = Arc::new(ServerStats::default());
        let mut guarded = StallGuard::new(server, Duration::from_secs(2), stats.clone());
        // Fills the pipe; nobody reads.
        guarded.write_all(&[0u8; 64]).await.unwrap();
        let started = tokio::time::Instant::now();
        let err = guarded.write_all(&[1u8; 10]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(stats.write_stalls.load(Relaxed), 1);

        // A reader that keeps up: writes wait, but never for the limit, so none fails.
        let (mut client2, server2) = tokio::io::duplex(64);
        let mut guarded = StallGuard::new(server2, Duration::from_secs(2), stats.clone());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut total = 0;
            while total < 64 * 20 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                total += client2.read(&mut buf).await.unwrap();
            }
        });
        guarded.write_all(&[2u8; 64 * 20]).await.unwrap();
        reader.await.unwrap();
        drop(client);
    }
}
