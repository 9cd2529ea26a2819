//! The subscriber on standalone Redis: one RESP3 connection of our own, reconnected and
//! resubscribed by us.
//!
//! Why not redis-rs's `ConnectionManager`: it parses each push with `combine` into a
//! `Vec<Value>` (about 1 µs per push) and forwards it through an unbounded channel to a task of
//! its own before our callback sees it; in `bench fanout` that was a tenth of the gateway's CPU,
//! the largest cost that neither the kernel nor the bare WebSocket loop has. Here the reading
//! task cuts each frame out of its buffer (`resp.rs`) and hands the message to the bus's push
//! handler itself. redis-rs still serves the publisher and the cluster's subscriber.
//!
//! What the task promises, the same as the bus did with redis-rs:
//! - `subscribe` returns once Redis confirmed the channel: a session attached after it misses
//!   nothing that is published later (the resume merge relies on it);
//! - a lost connection is a gap (`feed_gap(None)`): the task reconnects with backoff,
//!   subscribes every wanted channel again, waits for every confirmation, and only then says
//!   `feed_restored(None)`, so the sessions' catch-up reads history after the feed is live;
//! - a connection that stops answering is found by [`Subscriber::ping`] (the bus's health
//!   loop) and dropped.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis::{ConnectionAddr, IntoConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::PushToDeliveries;
use super::resp::{self, Reply};
use crate::bus::BusError;

/// Commands waiting for the connection task: subscriptions change one at a time, so a handful
/// is plenty; a full queue makes the caller wait.
const COMMANDS: usize = 256;
/// Channels per `SUBSCRIBE` when resubscribing (one command line stays well under Redis's
/// query buffer limit).
const RESUBSCRIBE_CHUNK: usize = 1000;
/// What a reply may take before the connection counts as stuck.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Reads take what the socket holds, up to this much at a time.
const READ_CHUNK: usize = 64 * 1024;

enum Command {
    Subscribe(Bytes, oneshot::Sender<Result<(), BusError>>),
    Unsubscribe(Bytes, oneshot::Sender<Result<(), BusError>>),
    Ping(oneshot::Sender<Result<(), BusError>>),
    /// The health loop found the connection dead: drop it and reconnect.
    Reset,
}

/// The handle the bus keeps; the connection lives in its task, which ends with the handle.
#[derive(Clone)]
pub(super) struct Subscriber {
    commands: mpsc::Sender<Command>,
}

/// Where and as whom to connect, from the Redis URL.
#[derive(Clone)]
struct Endpoint {
    addr: ConnectionAddr,
    username: Option<String>,
    password: Option<String>,
    /// For messages: the URL without its password.
    shown: String,
}

impl Subscriber {
    /// Whether this subscriber can serve `url` (plain TCP or a Unix socket); anything else
    /// stays with redis-rs.
    pub(super) fn serves(url: &str) -> bool {
        url.into_connection_info().is_ok_and(|info| {
            matches!(
                info.addr(),
                ConnectionAddr::Tcp(..) | ConnectionAddr::Unix(..)
            )
        })
    }

    /// Connects (an error if Redis cannot be reached now) and starts the connection task.
    pub(super) async fn connect(url: &str, pushes: PushToDeliveries) -> Result<Self, BusError> {
        let info = url
            .into_connection_info()
            .map_err(|e| BusError::Unavailable(format!("invalid redis URL: {e}")))?;
        let settings = info.redis_settings();
        let endpoint = Endpoint {
            addr: info.addr().clone(),
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            shown: info.addr().to_string(),
        };
        let link = Link::open(&endpoint).await.map_err(|e| {
            BusError::Unavailable(format!(
                "cannot connect to redis at {}: {e}",
                endpoint.shown
            ))
        })?;
        let (commands, rx) = mpsc::channel(COMMANDS);
        tokio::spawn(
            Task {
                endpoint,
                pushes,
                commands: rx,
                channels: HashSet::new(),
                awaiting: VecDeque::new(),
            }
            .run(link),
        );
        Ok(Subscriber { commands })
    }

    pub(super) async fn subscribe(&self, channel: &str) -> Result<(), BusError> {
        let channel = Bytes::copy_from_slice(channel.as_bytes());
        let result = self
            .ask(|done| Command::Subscribe(channel.clone(), done))
            .await;
        if result.is_err() {
            // The caller gives the channel up, so the connection does too: a subscription
            // confirmed after the deadline must not linger with nobody wanting it.
            let (done, _) = oneshot::channel();
            let _ = self.commands.try_send(Command::Unsubscribe(channel, done));
        }
        result
    }

    pub(super) async fn unsubscribe(&self, channel: &str) -> Result<(), BusError> {
        self.ask(|done| Command::Unsubscribe(Bytes::copy_from_slice(channel.as_bytes()), done))
            .await
    }

    /// A `PING` over the subscribed connection: proves it live end to end.
    pub(super) async fn ping(&self) -> Result<(), BusError> {
        self.ask(Command::Ping).await
    }

    /// Drops the connection (it stopped answering); the task reconnects.
    pub(super) fn reset(&self) {
        let _ = self.commands.try_send(Command::Reset);
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), BusError>>) -> Command,
    ) -> Result<(), BusError> {
        let (done, answer) = oneshot::channel();
        let gone = || BusError::Unavailable("the redis subscriber has stopped".into());
        self.commands
            .send(command(done))
            .await
            .map_err(|_| gone())?;
        match tokio::time::timeout(REPLY_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(BusError::Unavailable(
                "redis did not answer the subscriber in time".into(),
            )),
        }
    }
}

/// What a reply on the connection will answer, in the order the commands were sent.
enum Awaiting {
    /// A confirmation of `channel`; the caller waits for it unless the task sent it itself.
    Subscription(Bytes, Option<oneshot::Sender<Result<(), BusError>>>),
    Pong(oneshot::Sender<Result<(), BusError>>),
}

struct Task {
    endpoint: Endpoint,
    pushes: PushToDeliveries,
    commands: mpsc::Receiver<Command>,
    /// Every channel that should be subscribed (users' and operators'), kept across
    /// reconnections.
    channels: HashSet<Bytes>,
    awaiting: VecDeque<Awaiting>,
}

/// Why a connection ended.
enum Ended {
    /// The bus was dropped: the task ends.
    Closed,
    Lost(String),
}

impl Task {
    async fn run(mut self, first: Link) {
        let mut link = first;
        loop {
            let why = match self.serve(&mut link).await {
                Ended::Closed => return,
                Ended::Lost(why) => why,
            };
            tracing::warn!(redis = %self.endpoint.shown, reason = %why, "redis subscription connection lost; reconnecting");
            self.pushes.lost();
            // Callers waiting on the lost connection: their channels are resubscribed below,
            // and they are answered then; pings fail.
            let waiting: Vec<_> = self.awaiting.drain(..).collect();
            let mut after_resubscribe = Vec::new();
            for w in waiting {
                match w {
                    Awaiting::Subscription(_, Some(done)) => after_resubscribe.push(done),
                    Awaiting::Subscription(_, None) => {}
                    Awaiting::Pong(done) => {
                        let _ = done.send(Err(BusError::Unavailable(why.clone())));
                    }
                }
            }
            let mut delay = Duration::from_millis(50);
            link = loop {
                // Commands that come while disconnected change what the reconnection
                // subscribes; their callers are answered once it has.
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        command = self.commands.recv() => match command {
                            None => return,
                            Some(Command::Subscribe(channel, done)) => {
                                self.channels.insert(channel);
                                after_resubscribe.push(done);
                            }
                            Some(Command::Unsubscribe(channel, done)) => {
                                self.channels.remove(&channel);
                                after_resubscribe.push(done);
                            }
                            Some(Command::Ping(done)) => {
                                let _ = done.send(Err(BusError::Unavailable("reconnecting".into())));
                            }
                            Some(Command::Reset) => {}
                        },
                    }
                }
                match self.reconnect().await {
                    Ok(link) => break link,
                    Err(e) => {
                        tracing::warn!(redis = %self.endpoint.shown, error = %e, retry_in = ?delay, "redis subscriber cannot reconnect");
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            };
            for done in after_resubscribe {
                let _ = done.send(Ok(()));
            }
            tracing::info!(redis = %self.endpoint.shown, channels = self.channels.len(), "redis subscription restored; sessions catch up");
            self.pushes.restored();
        }
    }

    /// Opens a connection and subscribes every channel again, returning once every
    /// confirmation came (messages that arrive meanwhile are delivered).
    async fn reconnect(&mut self) -> Result<Link, String> {
        // What an earlier attempt that failed midway was still waiting for (no caller waits on
        // it: callers wait in `run`). Left here, it would wait for confirmations never coming.
        self.awaiting.clear();
        let mut link = Link::open(&self.endpoint).await?;
        let channels: Vec<Bytes> = self.channels.iter().cloned().collect();
        for chunk in channels.chunks(RESUBSCRIBE_CHUNK) {
            let mut out = Vec::new();
            let args: Vec<&[u8]> = std::iter::once(&b"SUBSCRIBE"[..])
                .chain(chunk.iter().map(|c| &c[..]))
                .collect();
            resp::command(&mut out, &args);
            link.write(&out).await?;
            self.awaiting.extend(
                chunk
                    .iter()
                    .map(|c| Awaiting::Subscription(c.clone(), None)),
            );
        }
        while !self.awaiting.is_empty() {
            let frame = tokio::time::timeout(REPLY_TIMEOUT, link.next_frame())
                .await
                .map_err(|_| "no confirmation of the resubscription".to_owned())??;
            // A refusal here fails the attempt (it is tried again) rather than dropping a
            // channel someone still wants, as a refused call of a caller's does.
            if let Ok(Reply::Error(message)) = Reply::of(&frame) {
                return Err(format!("resubscribing refused: {message}"));
            }
            self.handle(frame)?;
        }
        Ok(link)
    }

    /// Runs the connection until it fails or the bus is dropped.
    async fn serve(&mut self, link: &mut Link) -> Ended {
        loop {
            // Unbiased: under a steady stream of pushes the read is always ready, and a biased
            // select would leave subscriptions waiting behind it.
            tokio::select! {
                frame = link.next_frame() => match frame {
                    Ok(frame) => {
                        if let Err(why) = self.handle(frame) {
                            return Ended::Lost(why);
                        }
                    }
                    Err(why) => return Ended::Lost(why),
                },
                command = self.commands.recv() => {
                    let Some(command) = command else { return Ended::Closed };
                    if let Err(why) = self.send(link, command).await {
                        return Ended::Lost(why);
                    }
                }
            }
        }
    }

    async fn send(&mut self, link: &mut Link, command: Command) -> Result<(), String> {
        let mut out = Vec::new();
        match command {
            Command::Subscribe(channel, done) => {
                resp::command(&mut out, &[b"SUBSCRIBE", &channel]);
                self.channels.insert(channel.clone());
                self.awaiting
                    .push_back(Awaiting::Subscription(channel, Some(done)));
            }
            Command::Unsubscribe(channel, done) => {
                resp::command(&mut out, &[b"UNSUBSCRIBE", &channel]);
                self.channels.remove(&channel);
                self.awaiting
                    .push_back(Awaiting::Subscription(channel, Some(done)));
            }
            Command::Ping(done) => {
                resp::command(&mut out, &[b"PING"]);
                self.awaiting.push_back(Awaiting::Pong(done));
            }
            Command::Reset => return Err("it stopped answering pings".into()),
        }
        link.write(&out).await
    }

    /// Acts on one frame; an error means the connection is out of step and must be dropped.
    fn handle(&mut self, frame: Bytes) -> Result<(), String> {
        match Reply::of(&frame).map_err(|e| e.to_string())? {
            // A slice of the read buffer, not a copy: whoever keeps a short payload copies it
            // (`DeliverySink`), long ones get buffers of their own (`shared.rs`).
            Reply::Message { channel, payload } => {
                self.pushes.message(channel, frame.slice_ref(payload))
            }
            Reply::Subscription { kind, channel } => {
                let answers = matches!(
                    self.awaiting.front(),
                    Some(Awaiting::Subscription(c, _)) if c == channel
                );
                if answers {
                    if let Some(Awaiting::Subscription(_, Some(done))) = self.awaiting.pop_front() {
                        let _ = done.send(Ok(()));
                    }
                } else if kind == b"unsubscribe" && self.channels.contains(channel) {
                    // Not ours: Redis dropped a channel we still want.
                    return Err("redis dropped a subscribed channel".into());
                }
            }
            Reply::Pong => match self.awaiting.pop_front() {
                Some(Awaiting::Pong(done)) => {
                    let _ = done.send(Ok(()));
                }
                _ => return Err("a PONG nobody asked for".into()),
            },
            Reply::Error(message) => {
                // The answer to the command at the front (a refused SUBSCRIBE, an ACL error).
                let refused = BusError::Unavailable(format!("redis refused: {message}"));
                match self.awaiting.pop_front() {
                    Some(Awaiting::Subscription(channel, done)) => {
                        self.channels.remove(&channel);
                        if let Some(done) = done {
                            let _ = done.send(Err(refused));
                        }
                    }
                    Some(Awaiting::Pong(done)) => {
                        let _ = done.send(Err(refused));
                    }
                    None => return Err(format!("an error nobody asked for: {message}")),
                }
            }
            Reply::Other => {}
        }
        Ok(())
    }
}

/// One connection: a byte stream and what has been read from it but not yet cut into frames.
struct Link {
    reader: Box<dyn AsyncRead + Send + Unpin>,
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    buffer: BytesMut,
}

impl Link {
    /// Connects and says `HELLO 3` (with `AUTH` when the URL has credentials).
    async fn open(endpoint: &Endpoint) -> Result<Link, String> {
        let connect = async {
            Ok::<_, std::io::Error>(match &endpoint.addr {
                ConnectionAddr::Tcp(host, port) => {
                    let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    stream.set_nodelay(true)?;
                    let (r, w) = stream.into_split();
                    (
                        Box::new(r) as Box<dyn AsyncRead + Send + Unpin>,
                        Box::new(w) as Box<dyn AsyncWrite + Send + Unpin>,
                    )
                }
                ConnectionAddr::Unix(path) => {
                    let (r, w) = tokio::net::UnixStream::connect(path).await?.into_split();
                    (
                        Box::new(r) as Box<dyn AsyncRead + Send + Unpin>,
                        Box::new(w) as Box<dyn AsyncWrite + Send + Unpin>,
                    )
                }
                _ => {
                    return Err(std::io::Error::other(
                        "only plain TCP and Unix sockets are served here",
                    ));
                }
            })
        };
        let (reader, writer) = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| "connecting timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let mut link = Link {
            reader,
            writer,
            buffer: BytesMut::with_capacity(READ_CHUNK),
        };
        let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
        if let Some(password) = &endpoint.password {
            hello.push(b"AUTH");
            hello.push(endpoint.username.as_deref().unwrap_or("default").as_bytes());
            hello.push(password.as_bytes());
        }
        let mut out = Vec::new();
        resp::command(&mut out, &hello);
        link.write(&out).await?;
        let reply = tokio::time::timeout(REPLY_TIMEOUT, link.next_frame())
            .await
            .map_err(|_| "no answer to HELLO".to_owned())??;
        match Reply::of(&reply).map_err(|e| e.to_string())? {
            Reply::Error(message) => Err(format!("HELLO 3 refused: {message}")),
            _ => Ok(link),
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.writer
            .write_all(bytes)
            .await
            .map_err(|e| format!("writing: {e}"))
    }

    /// The next whole frame, reading as needed. Cancel-safe: a read in progress keeps what it
    /// read in the buffer.
    async fn next_frame(&mut self) -> Result<Bytes, String> {
        loop {
            if let Some(len) = resp::frame_len(&self.buffer).map_err(|e| e.to_string())? {
                return Ok(self.buffer.split_to(len).freeze());
            }
            if self.buffer.capacity() - self.buffer.len() < READ_CHUNK / 4 {
                self.buffer.reserve(READ_CHUNK);
            }
            match self.reader.read_buf(&mut self.buffer).await {
                Ok(0) => return Err("redis closed the connection".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;
    use crate::bus::{Delivery, DeliverySink, FeedEvents};

    /// Counts what the subscriber tells the hub.
    #[derive(Default)]
    struct Counting {
        delivered: AtomicUsize,
        gaps: AtomicUsize,
        restored: AtomicUsize,
    }

    impl FeedEvents for Counting {
        fn feed_gap(&self, _: Option<&str>) {
            self.gaps.fetch_add(1, Relaxed);
        }
        fn feed_restored(&self, _: Option<&str>) {
            self.restored.fetch_add(1, Relaxed);
        }
    }

    impl DeliverySink for Counting {
        fn deliver(&self, _: Delivery) -> bool {
            self.delivered.fetch_add(1, Relaxed);
            true
        }
    }

    /// Reads one RESP command (an array of bulk strings) and returns its first argument.
    async fn command_name(
        reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    ) -> Option<String> {
        let mut line = String::new();
        reader.read_line(&mut line).await.ok()?;
        let count: usize = line.trim().strip_prefix('*')?.parse().ok()?;
        let mut name = None;
        for _ in 0..count {
            line.clear();
            reader.read_line(&mut line).await.ok()?;
            line.clear();
            reader.read_line(&mut line).await.ok()?;
            name.get_or_insert_with(|| line.trim().to_owned());
        }
        name
    }

    /// A Redis that drops the first resubscription halfway (it closes the connection before
    /// confirming): the next attempt must start afresh, confirm, and declare the feed restored.
    #[tokio::test]
    async fn a_resubscription_cut_halfway_is_tried_again_from_scratch() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let channel = "fc:{alice}:live";
        let server = tokio::spawn(async move {
            for connection in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                while let Some(name) = command_name(&mut r).await {
                    match (name.as_str(), connection) {
                        ("HELLO", _) => w.write_all(b"%0\r\n").await.unwrap(),
                        // The first connection confirms, then goes away; the second goes away
                        // before confirming; the third confirms and stays.
                        ("SUBSCRIBE", 1) => break,
                        ("SUBSCRIBE", _) => {
                            let confirm = format!(
                                ">3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:1\r\n",
                                channel.len()
                            );
                            w.write_all(confirm.as_bytes()).await.unwrap();
                            if connection == 0 {
                                break;
                            }
                        }
                        ("PING", _) => w.write_all(b"+PONG\r\n").await.unwrap(),
                        _ => {}
                    }
                }
            }
        });
        let sink = Arc::new(Counting::default());
        let (relearn, _relearn_rx) = mpsc::channel(4);
        let pushes = PushToDeliveries {
            deliveries: sink.clone(),
            connected: Arc::new(AtomicBool::new(true)),
            subscriptions: Default::default(),
            cluster: false,
            shared: Default::default(),
            relearn,
        };
        let subscriber = Subscriber::connect(&url, pushes).await.unwrap();
        subscriber.subscribe(channel).await.unwrap();
        // The server went away after confirming; two attempts later the feed is back, well
        // within one reply timeout (the broken retry waited for a confirmation never coming).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while sink.restored.load(Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the feed was never restored"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(sink.gaps.load(Relaxed), 1, "one outage, one gap");
        subscriber
            .ping()
            .await
            .expect("the restored connection answers");
        server.abort();
    }

    #[test]
    fn plain_urls_are_served_and_others_are_left_to_redis_rs() {
        assert!(Subscriber::serves("redis://127.0.0.1:6379"));
        assert!(Subscriber::serves("redis://:secret@localhost:6379/2"));
        assert!(Subscriber::serves("redis+unix:///run/redis.sock"));
        assert!(!Subscriber::serves("not a url"));
    }
}
