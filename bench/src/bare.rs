//! The baseline the gateway benchmarks compare with: a bare axum WebSocket loop.
//!
//! This is the floor measured in `shared/reference/perf-facts.md`: one task per connection
//! selecting over a bounded channel and `recv`, 1 KiB buffers, and no auth, Redis, hub or
//! protocol. Each wake-up drains its queue and flushes once, as the gateway's sessions do, so
//! bursts cost what perf-facts' "several queued messages, one flush" column says.
//!
//! `bench idle` measures its memory per idle connection. `bench fanout` drives it with
//! `POST /drive?count=N&size=B&rate=R&burst=K`. That sends N messages of B bytes, K in a row to
//! one connection, then on to the next (round-robin). They go out in 10 ms ticks at R messages/s,
//! the same pacing the fan-out bench uses when it publishes to Redis; R = 0 means as fast as the
//! queues take them.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::routing::{get, post};
use futures_util::SinkExt;
use tokio::sync::mpsc;

/// A connection's queue, as deep as the gateway's default session queue.
const QUEUE: usize = 32;

#[derive(Clone, Default)]
struct Registry {
    senders: Arc<Mutex<Vec<mpsc::Sender<Message>>>>,
    write_buffer: usize,
}

#[derive(serde::Deserialize)]
struct Drive {
    count: usize,
    size: usize,
    #[serde(default)]
    rate: u64,
    #[serde(default = "one")]
    burst: usize,
}

fn one() -> usize {
    1
}

pub fn serve(listen: std::net::SocketAddr, write_buffer: usize) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = axum::Router::new()
            .route("/ws", get(upgrade))
            .route("/drive", post(drive))
            .with_state(Registry {
                write_buffer,
                ..Registry::default()
            });
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("foldercast: serving on http://{}/", listener.local_addr()?);
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn upgrade(
    ws: WebSocketUpgrade,
    State(registry): State<Registry>,
) -> axum::response::Response {
    ws.read_buffer_size(1024)
        .write_buffer_size(registry.write_buffer)
        .max_write_buffer_size(64 * 1024)
        .on_upgrade(move |socket| {
            let (tx, rx) = mpsc::channel::<Message>(QUEUE);
            if let Ok(mut all) = registry.senders.lock() {
                all.push(tx);
            }
            session(socket, rx)
        })
}

async fn drive(State(registry): State<Registry>, Query(d): Query<Drive>) -> &'static str {
    let senders = registry
        .senders
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    let text = Utf8Bytes::from("x".repeat(d.size));
    let burst = d.burst.max(1);
    tokio::spawn(async move {
        if senders.is_empty() {
            return;
        }
        let per_tick = if d.rate == 0 {
            d.count
        } else {
            (d.rate / 100).max(1) as usize
        };
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut sent = 0;
        while sent < d.count {
            if d.rate > 0 {
                tick.tick().await;
            }
            let end = (sent + per_tick).min(d.count);
            for i in sent..end {
                let to = &senders[(i / burst) % senders.len()];
                let _ = to.send(Message::Text(text.clone())).await;
            }
            sent = end;
        }
    });
    "driving"
}

async fn session(mut socket: WebSocket, mut rx: mpsc::Receiver<Message>) {
    loop {
        tokio::select! {
            msg = socket.recv() => if !matches!(msg, Some(Ok(_))) { break },
            out = rx.recv() => {
                let Some(first) = out else { break };
                if socket.feed(first).await.is_err() {
                    break;
                }
                while let Ok(more) = rx.try_recv() {
                    if socket.feed(more).await.is_err() {
                        return;
                    }
                }
                if socket.flush().await.is_err() {
                    break;
                }
            }
        }
    }
}
