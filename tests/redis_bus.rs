//! The Redis bus against real servers: standalone Redis and a 3-node Redis Cluster.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{PrivateCluster, PrivateRedis, redis_cluster_nodes, redis_url, unique};
use foldercast::bus::{
    Bus, Catchup, Delivery, Outgoing, Position, RedisBus, RedisOptions, RedisTarget, StreamId,
};
use redis::AsyncCommands;
use tokio::sync::mpsc;

fn msg(user: &Arc<str>, event: &str, body: &str) -> Outgoing {
    Outgoing::for_event(
        user.clone(),
        Bytes::from(format!(r#"{{"event_id":"{event}","body":"{body}"}}"#)),
        Some(Arc::from(event)),
    )
}

async fn recv(rx: &mut mpsc::Receiver<Delivery>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a delivery in time")
        .expect("open")
}

async fn nothing_more(rx: &mut mpsc::Receiver<Delivery>) {
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "no further delivery"
    );
}

/// The stream id of a position (`<epoch>:<ms>-<seq>`).
fn stream_id(position: &str) -> (u64, u64) {
    let (_, id) = position.split_once(':').expect("a position");
    let (ms, seq) = id.split_once('-').expect("a stream id");
    (ms.parse().unwrap(), seq.parse().unwrap())
}

/// A user's history as positions (the epoch from the meta key, the stream's ids) and messages.
async fn history(target: &RedisTarget, user: &str) -> Vec<(String, String)> {
    let key = foldercast::bus::redis::keys::stream(user);
    let meta = foldercast::bus::redis::keys::meta(user);
    let (reply, epoch): (redis::streams::StreamRangeReply, Option<String>) = match target {
        RedisTarget::Standalone(url) => {
            let mut c = redis::Client::open(url.as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            (
                c.xrange_all(&key).await.unwrap(),
                c.hget(&meta, "epoch").await.unwrap(),
            )
        }
        RedisTarget::Cluster(nodes) => {
            let mut c = redis::cluster::ClusterClient::new(nodes.clone())
                .unwrap()
                .get_async_connection()
                .await
                .unwrap();
            (
                c.xrange_all(&key).await.unwrap(),
                c.hget(&meta, "epoch").await.unwrap(),
            )
        }
    };
    let epoch = epoch.unwrap_or_default();
    reply
        .ids
        .into_iter()
        .map(|e| {
            let m: String = e.get("m").unwrap();
            (format!("{epoch}:{}", e.id), m)
        })
        .collect()
}

/// A bus delivering to the returned receiver, with two fresh users subscribed.
async fn two_subscribed(
    target: &RedisTarget,
) -> (Arc<RedisBus>, mpsc::Receiver<Delivery>, Arc<str>, Arc<str>) {
    let (tx, rx) = mpsc::channel(64);
    let bus = RedisBus::connect(target, RedisOptions::default(), Some(tx))
        .await
        .expect("connect");
    let alice: Arc<str> = Arc::from(unique("alice"));
    let bob: Arc<str> = Arc::from(unique("bob"));
    for u in [&alice, &bob] {
        bus.subscribe(u).await.expect("subscribe");
    }
    (bus, rx, alice, bob)
}

async fn publishes_in_order_with_history_and_once_per_user(target: RedisTarget) {
    let (bus, mut rx, alice, bob) = two_subscribed(&target).await;
    let carol: Arc<str> = Arc::from(unique("carol"));
    let batch = vec![
        msg(&alice, "e1", "a1"),
        msg(&bob, "e1", "b1"),
        msg(&carol, "e1", "c1"),
        msg(&alice, "e2", "a2"),
        msg(&bob, "e2", "b2"),
    ];
    bus.publish(&batch).await.expect("publish");
    let mut got: Vec<Delivery> = Vec::new();
    for _ in 0..4 {
        got.push(recv(&mut rx).await);
    }
    nothing_more(&mut rx).await;
    for user in [&alice, &bob] {
        let mine: Vec<&Delivery> = got.iter().filter(|d| d.user == *user).collect();
        assert_eq!(mine.len(), 2, "{user} gets its two messages");
        assert!(
            stream_id(&mine[0].id) < stream_id(&mine[1].id),
            "ids increase per user"
        );
        assert!(
            std::str::from_utf8(&mine[0].payload)
                .unwrap()
                .contains("\"e1\""),
            "in order"
        );
        // What was delivered is exactly what the user's stream holds.
        let log = history(&target, user).await;
        let delivered: Vec<(String, String)> = mine
            .iter()
            .map(|d| {
                (
                    d.id.to_string(),
                    String::from_utf8(d.payload.to_vec()).unwrap(),
                )
            })
            .collect();
        assert_eq!(log, delivered);
    }
    assert_eq!(
        history(&target, &carol).await.len(),
        1,
        "an unsubscribed user still gets history"
    );

    // The same event again (a replayed partition): nobody gets it twice; a new event goes through.
    bus.publish(&[msg(&alice, "e2", "again"), msg(&bob, "e3", "b3")])
        .await
        .expect("publish");
    let d = recv(&mut rx).await;
    assert_eq!(
        (
            &*d.user,
            std::str::from_utf8(&d.payload).unwrap().contains("e3")
        ),
        (&*bob, true)
    );
    nothing_more(&mut rx).await;
    assert_eq!(history(&target, &alice).await.len(), 2);

    // A whole event (every recipient's message in one batch) replayed: once per user too (on a
    // cluster through the per-user guard, on standalone through the event's).
    let e = unique("whole");
    for _ in 0..2 {
        bus.publish(&whole(&[&alice, &bob], &e, "w")).await.unwrap();
    }
    let mut users = vec![recv(&mut rx).await.user, recv(&mut rx).await.user];
    users.sort();
    let mut want = vec![alice.clone(), bob.clone()];
    want.sort();
    assert_eq!(users, want);
    nothing_more(&mut rx).await;

    // Unsubscribed users receive nothing more.
    bus.unsubscribe(&alice).await.expect("unsubscribe");
    bus.publish(&[msg(&alice, "e9", "late")])
        .await
        .expect("publish");
    nothing_more(&mut rx).await;
    assert!(bus.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_bus() {
    publishes_in_order_with_history_and_once_per_user(RedisTarget::Standalone(redis_url())).await;
}

/// All of an event's messages, marked as going out together (none held by the rate limit).
fn whole(users: &[&Arc<str>], event: &str, body: &str) -> Vec<Outgoing> {
    let mut msgs: Vec<Outgoing> = users.iter().map(|u| msg(u, event, body)).collect();
    Outgoing::mark_whole_event(&mut msgs);
    msgs
}

async fn deliveries(rx: &mut mpsc::Receiver<Delivery>, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let d = recv(rx).await;
        got.push((
            d.user.to_string(),
            String::from_utf8(d.payload.to_vec()).unwrap(),
        ));
    }
    nothing_more(rx).await;
    got.sort();
    got
}

/// On standalone Redis an event whose messages all go out in one call is guarded once
/// (`fc:event:<id>`), not per user; an event that went out in parts (a recipient's message held
/// by the rate limit) or in coalesced messages names the recipients who had it in
/// `<guard>:got`; and each way knows about the others. No per-user sets on standalone Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_event_is_guarded_once_and_an_event_in_parts_per_user() {
    let target = RedisTarget::Standalone(redis_url());
    let (bus, mut rx, alice, bob) = two_subscribed(&target).await;
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let guard = |e: &str| foldercast::bus::redis::keys::event(e);
    let seen_sets = |user: &str| format!("fc:{{{user}}}:seen:*");

    // Whole, first time: everyone gets it, one guard key, no per-user marks.
    // The call also carries a message with its own payload, after the shared one: each
    // message must get its own payload back (a call sends each distinct payload once).
    let e = unique("whole");
    let solo = unique("solo");
    let mut batch = whole(&[&alice, &bob], &e, "w");
    batch.push(msg(&bob, &solo, "s"));
    bus.publish(&batch).await.unwrap();
    let text = |m: &Outgoing| String::from_utf8(m.payload.to_vec()).unwrap();
    let mut want = vec![
        (alice.to_string(), text(&batch[0])),
        (bob.to_string(), text(&batch[1])),
        (bob.to_string(), text(&batch[2])),
    ];
    want.sort();
    assert_eq!(deliveries(&mut rx, 3).await, want);
    let state: Option<String> = c.get(guard(&e)).await.unwrap();
    assert_eq!(state.as_deref(), Some("all"));
    let ttl: i64 = c.pttl(guard(&e)).await.unwrap();
    assert!(ttl > 0, "the guard expires ({ttl} ms)");
    let marks: Vec<String> = c.keys(seen_sets(&alice)).await.unwrap();
    assert!(
        marks.is_empty(),
        "no per-user marks for a whole event: {marks:?}"
    );

    // Replayed whole, or replayed in parts (bob now rate-limited): nobody gets it again.
    bus.publish(&whole(&[&alice, &bob], &e, "again"))
        .await
        .unwrap();
    bus.publish(&[msg(&bob, &e, "held, later")]).await.unwrap();
    nothing_more(&mut rx).await;

    // Only coalesced first (both of alice's events held, then sent as one message; bob's lost in a
    // crash): replayed whole, only bob gets it; in parts, nobody; coalesced for bob with
    // another event, only that other event's part.
    let (h, other) = (unique("held"), unique("other"));
    bus.publish(&[coalesced(&alice, &[other.clone(), h.clone()])])
        .await
        .unwrap();
    assert_eq!(deliveries(&mut rx, 1).await.len(), 1);
    let state: Option<String> = c.get(guard(&h)).await.unwrap();
    assert_eq!(state.as_deref(), Some("some"));
    bus.publish(&whole(&[&alice, &bob], &h, "h")).await.unwrap();
    let who = |got: Vec<(String, String)>| got.into_iter().map(|(u, _)| u).collect::<Vec<_>>();
    assert_eq!(who(deliveries(&mut rx, 1).await), [bob.to_string()]);
    let state: Option<String> = c.get(guard(&h)).await.unwrap();
    assert_eq!(state.as_deref(), Some("some"));
    bus.publish(&[msg(&alice, &h, "a"), msg(&bob, &h, "b")])
        .await
        .unwrap();
    nothing_more(&mut rx).await;
    let late = unique("late");
    bus.publish(&[coalesced(&bob, &[h.clone(), late.clone()])])
        .await
        .unwrap();
    let single = String::from_utf8(msg(&bob, &late, "single").payload.to_vec()).unwrap();
    assert_eq!(deliveries(&mut rx, 1).await, [(bob.to_string(), single)]);

    // In parts first: alice's goes out now, bob's is held (and lost in a crash).
    let f = unique("parts");
    bus.publish(&[msg(&alice, &f, "a")]).await.unwrap();
    let a = String::from_utf8(msg(&alice, &f, "a").payload.to_vec()).unwrap();
    assert_eq!(deliveries(&mut rx, 1).await, [(alice.to_string(), a)]);
    let state: Option<String> = c.get(guard(&f)).await.unwrap();
    assert_eq!(state.as_deref(), Some("some"));
    // Replayed whole: only bob, who never had it, gets it; then nobody.
    bus.publish(&whole(&[&alice, &bob], &f, "b")).await.unwrap();
    assert_eq!(
        deliveries(&mut rx, 1)
            .await
            .iter()
            .map(|(u, _)| u.clone())
            .collect::<Vec<_>>(),
        [bob.to_string()]
    );
    bus.publish(&whole(&[&alice, &bob], &f, "c")).await.unwrap();
    nothing_more(&mut rx).await;
}

/// A replay after a crash: a call of whole events where a user's last message belongs to an
/// event that went out whole before. The fast path holds a user's messages until their last one
/// to publish them together; that last one is skipped, and the held ones must still go out
/// (CI once saw a client miss events this way, `exactly_once`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_held_for_a_skipped_repeat_still_go_out() {
    let target = RedisTarget::Standalone(redis_url());
    let (bus, mut rx, alice, bob) = two_subscribed(&target).await;
    let (old, new) = (unique("delivered"), unique("fresh"));
    bus.publish(&whole(&[&alice, &bob], &old, "o"))
        .await
        .unwrap();
    assert_eq!(deliveries(&mut rx, 2).await.len(), 2);

    let mut replay = whole(&[&alice, &bob], &new, "n");
    replay.extend(whole(&[&alice, &bob], &old, "o"));
    bus.publish(&replay).await.unwrap();
    let text = |m: &Outgoing| String::from_utf8(m.payload.to_vec()).unwrap();
    let mut want = vec![
        (alice.to_string(), text(&replay[0])),
        (bob.to_string(), text(&replay[1])),
    ];
    want.sort();
    assert_eq!(
        deliveries(&mut rx, 2).await,
        want,
        "the fresh event reaches both, the repeat nobody"
    );
    let log = history(&target, &alice).await;
    assert_eq!(
        log.len(),
        2,
        "alice's history holds each event once: {log:?}"
    );
}

/// Preferences are stored per user (in the user's slot) and read for many users at once: one
/// MGET on standalone Redis, one GET per user on a cluster (their keys are in different slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferences_are_stored_per_user_and_read_in_batches() {
    for target in [
        RedisTarget::Standalone(redis_url()),
        RedisTarget::Cluster(redis_cluster_nodes()),
    ] {
        let bus = RedisBus::connect(&target, RedisOptions::default(), None)
            .await
            .expect("connect");
        let users: Vec<Arc<str>> = (0..5)
            .map(|i| Arc::from(unique(&format!("p{i}"))))
            .collect();
        assert_eq!(bus.preferences(&users).await.unwrap(), vec![None; 5]);
        for (i, user) in users.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            let json = format!(r#"{{"muted_spaces":["s{i}"]}}"#);
            bus.set_preferences(user, Some(&json)).await.unwrap();
        }
        let read = bus.preferences(&users).await.unwrap();
        let expected: Vec<Option<String>> = (0..5)
            .map(|i| (i % 2 == 0).then(|| format!(r#"{{"muted_spaces":["s{i}"]}}"#)))
            .collect();
        assert_eq!(read, expected, "{target:?}");
        bus.set_preferences(&users[0], None).await.unwrap();
        assert_eq!(
            bus.preferences(&users[..1]).await.unwrap(),
            [None],
            "forgotten"
        );
        assert!(bus.preferences(&[]).await.unwrap().is_empty());
    }
}

/// The channel format other tools may read: a user's messages of one script call are one channel
/// message, each entry `<epoch>:<stream id> <payload bytes>\n<payload>`, in order, with the
/// stream's ids. Through the general script (events not marked whole) and the fast path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_burst_is_one_channel_message() {
    burst_is_one_channel_message(false).await;
    burst_is_one_channel_message(true).await;
}

async fn burst_is_one_channel_message(whole_events: bool) {
    use futures_util::StreamExt;
    let target = RedisTarget::Standalone(redis_url());
    let bus = RedisBus::connect(&target, RedisOptions::default(), None)
        .await
        .expect("connect");
    let alice: Arc<str> = Arc::from(unique("alice"));
    let bob: Arc<str> = Arc::from(unique("bob"));
    let mut watcher = redis::Client::open(redis_url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    watcher
        .subscribe(foldercast::bus::redis::keys::channel(&alice))
        .await
        .unwrap();
    let batch: Vec<Outgoing> = (0..3)
        .flat_map(|i| {
            let event = unique(&format!("e{i}"));
            let mut pair = vec![
                msg(&alice, &event, &format!("line one\\nline {i}")),
                msg(&bob, &event, "b"),
            ];
            if whole_events {
                Outgoing::mark_whole_event(&mut pair);
            }
            pair
        })
        .collect();
    bus.publish(&batch).await.expect("publish");
    let mut messages = watcher.on_message();
    let first = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("a channel message in time")
        .expect("open");
    let body: Vec<u8> = first.get_payload_bytes().to_vec();
    let log = history(&target, &alice).await;
    let expected: Vec<u8> = log
        .iter()
        .enumerate()
        .flat_map(|(i, (position, m))| {
            // A new stream's first entry names the epoch; the others only their stream id.
            let id = if i == 0 {
                position.as_str()
            } else {
                position.split_once(':').map_or("", |(_, id)| id)
            };
            format!("{id} {}\n{m}", m.len()).into_bytes()
        })
        .collect();
    assert_eq!(log.len(), 3);
    assert_eq!(
        String::from_utf8_lossy(&body),
        String::from_utf8_lossy(&expected),
        "all three of alice's messages, in order, in one channel message"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), messages.next())
            .await
            .is_err(),
        "and no second channel message"
    );
}

/// The fast path (calls of whole events on standalone Redis): one stream id per event for all
/// its recipients, a new history's epoch announced, TTLs kept without reading them, and a
/// stream whose top is already past the next id (written by the general script) still gets
/// its message, with an id above that top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_events_share_one_id_and_keep_their_streams_alive() {
    let url = redis_url();
    let target = RedisTarget::Standalone(url.clone());
    let options = RedisOptions {
        stream_max_age: Duration::from_secs(2),
        ..RedisOptions::default()
    };
    let (tx, mut rx) = mpsc::channel(64);
    let bus = RedisBus::connect(&target, options, Some(tx)).await.unwrap();
    let alice: Arc<str> = Arc::from(unique("alice"));
    let bob: Arc<str> = Arc::from(unique("bob"));
    for u in [&alice, &bob] {
        bus.subscribe(u).await.unwrap();
    }
    let mut c = node_conn(&url).await;
    let pttl = |user: &Arc<str>| foldercast::bus::redis::keys::stream(user);

    let events: Vec<String> = (0..3).map(|i| unique(&format!("w{i}"))).collect();
    let batch: Vec<Outgoing> = events
        .iter()
        .flat_map(|e| whole(&[&alice, &bob], e, "x"))
        .collect();
    bus.publish(&batch).await.unwrap();
    let got: Vec<Delivery> = {
        let mut got = Vec::new();
        for _ in 0..6 {
            got.push(recv(&mut rx).await);
        }
        got
    };
    nothing_more(&mut rx).await;
    let ids_of = |user: &Arc<str>| -> Vec<String> {
        got.iter()
            .filter(|d| d.user == *user)
            .map(|d| d.id.split_once(':').unwrap().1.to_owned())
            .collect()
    };
    let (a, b) = (ids_of(&alice), ids_of(&bob));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "each event has one id in every recipient's stream");
    assert!(
        a.windows(2)
            .all(|w| stream_id(&format!("e:{}", w[0])) < stream_id(&format!("e:{}", w[1]))),
        "ids increase: {a:?}"
    );
    // The history holds what was delivered, under the epoch the deliveries carry.
    let log = history(&target, &alice).await;
    assert_eq!(
        log.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        got.iter()
            .filter(|d| d.user == alice)
            .map(|d| d.id.to_string())
            .collect::<Vec<_>>()
    );
    // A new stream's TTL is set (twice the max age), the meta key's too.
    let ttl: i64 = c.pttl(pttl(&alice)).await.unwrap();
    assert!((3_000..=4_000).contains(&ttl), "stream TTL {ttl} ms");
    let meta: i64 = c
        .pttl(foldercast::bus::redis::keys::meta(&alice))
        .await
        .unwrap();
    assert!(meta >= 29 * 24 * 3600 * 1000, "meta TTL {meta} ms");

    // Within half the max age no refresh is due; after it, the next append refreshes.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let before: i64 = c.pttl(pttl(&alice)).await.unwrap();
    assert!(before < 3_000, "time passed: {before} ms");
    let e = unique("w3");
    bus.publish(&whole(&[&alice, &bob], &e, "x")).await.unwrap();
    let _ = (recv(&mut rx).await, recv(&mut rx).await);
    let after: i64 = c.pttl(pttl(&alice)).await.unwrap();
    assert!(after > 3_500, "refreshed to twice the max age: {after} ms");

    // Alice's stream top is ahead of the id the fast path hands out next.
    let top: String = redis::cmd("XADD")
        .arg(pttl(&alice))
        .arg("99999999999999-0")
        .arg("m")
        .arg("{}")
        .query_async(&mut c)
        .await
        .unwrap();
    let e = unique("w4");
    bus.publish(&whole(&[&alice, &bob], &e, "x")).await.unwrap();
    let two = [recv(&mut rx).await, recv(&mut rx).await];
    let id_of = |d: &Delivery| stream_id(&d.id);
    let alices = two.iter().find(|d| d.user == alice).unwrap();
    let bobs = two.iter().find(|d| d.user == bob).unwrap();
    assert!(id_of(alices) > stream_id(&format!("e:{top}")), "{alices:?}");
    assert!(
        id_of(bobs) < id_of(alices),
        "bob keeps the shared id: {bobs:?}"
    );
    assert!(
        std::str::from_utf8(&alices.payload).unwrap().contains(&e),
        "alice's message is the event's"
    );
    nothing_more(&mut rx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_bus_uses_sharded_pubsub() {
    let nodes = redis_cluster_nodes();
    publishes_in_order_with_history_and_once_per_user(RedisTarget::Cluster(nodes.clone())).await;

    // While a user is subscribed, its channel is a shard channel on exactly one node, and no
    // classic channel exists anywhere.
    let (tx, _rx) = mpsc::channel(8);
    let bus = RedisBus::connect(
        &RedisTarget::Cluster(nodes.clone()),
        RedisOptions::default(),
        Some(tx),
    )
    .await
    .unwrap();
    let user: Arc<str> = Arc::from(unique("dora"));
    bus.subscribe(&user).await.unwrap();
    let channel = foldercast::bus::redis::keys::channel(&user);
    let (mut shard_nodes, mut classic) = (0, 0);
    for node in &nodes {
        let mut c = redis::Client::open(node.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let shard = shard_channels(&mut c).await;
        let plain: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query_async(&mut c)
            .await
            .unwrap();
        shard_nodes += shard.iter().filter(|c| **c == channel).count();
        classic += plain.iter().filter(|c| c.starts_with("fc:")).count();
    }
    assert_eq!(shard_nodes, 1, "the channel lives on one shard");
    assert_eq!(classic, 0, "no classic pub/sub on a cluster");
}

/// A bus with a health loop, alice subscribed, and one message delivered to her.
async fn alice_subscribed(
    target: &RedisTarget,
) -> (Arc<RedisBus>, mpsc::Receiver<Delivery>, Arc<str>) {
    let (tx, mut rx) = mpsc::channel(64);
    let bus = RedisBus::connect(target, RedisOptions::default(), Some(tx))
        .await
        .unwrap();
    bus.spawn_health_check(Duration::from_millis(200));
    let alice: Arc<str> = Arc::from("alice");
    bus.subscribe(&alice).await.unwrap();
    bus.publish(&[msg(&alice, "before", "x")]).await.unwrap();
    recv(&mut rx).await;
    (bus, rx, alice)
}

/// Waits until the bus reports `connected` (the health loop's flag behind `/readyz`).
async fn wait_connected(bus: &RedisBus, connected: bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while bus.is_connected() != connected {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes to `user` until a delivery arrives: after an outage the script and the
/// subscription come back by themselves, in their own time.
async fn delivers_again(bus: &RedisBus, rx: &mut mpsc::Receiver<Delivery>, user: &Arc<str>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let _ = bus.publish(&[msg(user, &unique("after"), "y")]).await;
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            assert!(std::str::from_utf8(&d.payload).unwrap().contains("after"));
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery after the restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_after_a_redis_restart() {
    let mut server = PrivateRedis::start();
    let target = RedisTarget::Standalone(server.url());
    let (bus, mut rx, alice) = alice_subscribed(&target).await;

    server.stop();
    wait_connected(&bus, false, "the bus never noticed the outage").await;
    server.restart();
    wait_connected(&bus, true, "the bus never reconnected").await;
    // The restarted server forgot the script and the subscription: both come back by themselves.
    delivers_again(&bus, &mut rx, &alice).await;
}

/// A user subscribed while Redis is away: the call returns once the reconnected subscriber has
/// the channel confirmed, and the user's messages arrive from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_subscribed_during_an_outage_is_live_once_redis_is_back() {
    let mut server = PrivateRedis::start();
    let target = RedisTarget::Standalone(server.url());
    let (bus, mut rx, _alice) = alice_subscribed(&target).await;

    server.stop();
    wait_connected(&bus, false, "the bus never noticed the outage").await;
    let bob: Arc<str> = Arc::from(unique("bob"));
    let subscribing = {
        let (bus, bob) = (bus.clone(), bob.clone());
        tokio::spawn(async move { bus.subscribe(&bob).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !subscribing.is_finished(),
        "subscribed with no Redis to confirm it"
    );
    server.restart();
    subscribing
        .await
        .unwrap()
        .expect("the subscription went through once Redis was back");
    wait_connected(&bus, true, "the bus never reconnected").await;
    // Subscribed and confirmed: bob's first message after the call arrives, no retry needed.
    bus.publish(&[msg(&bob, "first", "z")]).await.unwrap();
    let d = recv(&mut rx).await;
    assert_eq!(&*d.user, &*bob);
}

/// A Redis that wants a password: the subscriber says it in its `HELLO`, and a wrong one is a
/// clear error at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriber_authenticates_with_the_urls_password() {
    let server = PrivateRedis::start_with(common::free_port(), &["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}", server.port);
    let (bus, mut rx, alice) = alice_subscribed(&RedisTarget::Standalone(url)).await;
    bus.publish(&[msg(&alice, "second", "x")]).await.unwrap();
    assert!(
        std::str::from_utf8(&recv(&mut rx).await.payload)
            .unwrap()
            .contains("x")
    );

    let (tx, _rx) = mpsc::channel(1);
    let wrong = RedisBus::connect(
        &RedisTarget::Standalone(format!("redis://:wrong@127.0.0.1:{}", server.port)),
        RedisOptions::default(),
        Some(tx),
    )
    .await;
    assert!(wrong.is_err(), "a wrong password was accepted");
}

/// A cluster node restarts while one of its slots holds a subscribed user: the subscription
/// comes back by itself and later messages arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_after_a_cluster_node_restart() {
    let mut cluster = PrivateCluster::start();
    let target = RedisTarget::Cluster(cluster.urls());
    let (bus, mut rx, alice) = alice_subscribed(&target).await;

    let node = cluster.node_of(&foldercast::bus::redis::keys::channel(&alice));
    cluster.nodes[node].stop();
    wait_connected(&bus, false, "the bus never noticed the node going away").await;
    cluster.nodes[node].restart();
    cluster.wait_until_ok();
    // The restarted node forgot the script, the keys and the shard subscription.
    delivers_again(&bus, &mut rx, &alice).await;
    wait_connected(&bus, true, "the bus never reported itself connected again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_is_a_clear_error_not_a_panic() {
    let port = common::free_port();
    let standalone = RedisBus::connect(
        &RedisTarget::Standalone(format!("redis://127.0.0.1:{port}")),
        RedisOptions::default(),
        None,
    )
    .await;
    let err = standalone.err().expect("no redis there").to_string();
    assert!(err.contains("cannot connect to redis"), "{err}");
    let cluster = RedisBus::connect(
        &RedisTarget::Cluster(vec![format!("redis://127.0.0.1:{port}")]),
        RedisOptions::default(),
        None,
    )
    .await;
    assert!(
        cluster
            .err()
            .expect("no cluster there")
            .to_string()
            .contains("cannot connect to redis cluster")
    );
    let bad = RedisBus::connect(
        &RedisTarget::Standalone("http://nope".into()),
        RedisOptions::default(),
        None,
    )
    .await;
    assert!(bad.err().unwrap().to_string().contains("invalid redis URL"));
}

/// The shard channels a node serves subscribers of.
async fn shard_channels(c: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    redis::cmd("PUBSUB")
        .arg("SHARDCHANNELS")
        .query_async(c)
        .await
        .unwrap()
}

/// A node-local connection to one cluster node.
async fn node_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `(node id, url)` of every master, read from `CLUSTER NODES`.
async fn cluster_masters(nodes: &[String]) -> Vec<(String, String)> {
    let mut c = node_conn(&nodes[0]).await;
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut c)
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.contains("master"))
        .map(|l| {
            let mut parts = l.split_whitespace();
            let id = parts.next().unwrap().to_owned();
            let addr = parts.next().unwrap().split('@').next().unwrap().to_owned();
            (id, format!("redis://{addr}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_after_its_slot_moves_to_another_node() {
    let nodes = redis_cluster_nodes();
    let (tx, mut rx) = mpsc::channel(64);
    let target = RedisTarget::Cluster(nodes.clone());
    let bus = RedisBus::connect(&target, RedisOptions::default(), Some(tx))
        .await
        .unwrap();
    let user: Arc<str> = Arc::from(unique("mover"));
    bus.subscribe(&user).await.unwrap();
    bus.publish(&[msg(&user, "before", "a")]).await.unwrap();
    assert!(!recv(&mut rx).await.id.is_empty());

    // Move the user's slot, with its keys, to another master: the real resharding steps.
    let channel = foldercast::bus::redis::keys::channel(&user);
    let mut any = node_conn(&nodes[0]).await;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&channel)
        .query_async(&mut any)
        .await
        .unwrap();
    let masters = cluster_masters(&nodes).await;
    let mut owner = None;
    for (id, url) in &masters {
        let mut c = node_conn(url).await;
        let n: i64 = redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query_async(&mut c)
            .await
            .unwrap();
        let shard = shard_channels(&mut c).await;
        if n > 0 || shard.contains(&channel) {
            owner = Some((id.clone(), url.clone()));
        }
    }
    let (src_id, src_url) = owner.expect("the slot's owner");
    let (dst_id, dst_url) = masters
        .iter()
        .find(|(id, _)| *id != src_id)
        .cloned()
        .unwrap();
    let mut src = node_conn(&src_url).await;
    let mut dst = node_conn(&dst_url).await;
    let setslot = |state: &str, node: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(node);
        cmd
    };
    let _: () = setslot("IMPORTING", &src_id)
        .query_async(&mut dst)
        .await
        .unwrap();
    let _: () = setslot("MIGRATING", &dst_id)
        .query_async(&mut src)
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(slot)
        .arg(1000)
        .query_async(&mut src)
        .await
        .unwrap();
    let dst_addr = dst_url.trim_start_matches("redis://");
    let (host, port) = dst_addr.rsplit_once(':').unwrap();
    if !keys.is_empty() {
        let _: redis::Value = redis::cmd("MIGRATE")
            .arg(host)
            .arg(port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut src)
            .await
            .unwrap();
    }
    for (_, url) in &masters {
        let mut c = node_conn(url).await;
        let _: () = setslot("NODE", &dst_id).query_async(&mut c).await.unwrap();
    }

    // The gateway side must follow: later messages arrive, from the new owner.
    let mut delivered = None;
    for attempt in 0..50 {
        if bus
            .publish(&[msg(&user, &format!("after-{attempt}"), "b")])
            .await
            .is_ok()
            && let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
        {
            delivered = Some(d);
            break;
        }
    }
    let d = delivered.expect("a delivery after the slot moved");
    assert!(String::from_utf8_lossy(&d.payload).contains("after-"));
    let mut c = node_conn(&dst_url).await;
    let shard = shard_channels(&mut c).await;
    assert!(shard.contains(&channel), "resubscribed on the new owner");
}

#[tokio::test]
async fn a_users_keys_expire_when_idle_and_live_while_used() {
    let url = redis_url();
    let options = RedisOptions {
        stream_max_age: Duration::from_secs(60),
        dedup_window: Duration::from_secs(30),
        ..RedisOptions::default()
    };
    let bus = RedisBus::connect(&RedisTarget::Standalone(url.clone()), options, None)
        .await
        .unwrap();
    let user: Arc<str> = Arc::from(unique("idle"));
    let mut c = node_conn(&url).await;
    let stream = foldercast::bus::redis::keys::stream(&user);
    let event = |n: u32| format!("{user}-e{n}");
    for n in 0..3 {
        bus.publish(&[msg(&user, &event(n), "x")]).await.unwrap();
        // The newest entry is kept at least the max age, and the key never outlives twice that.
        let ttl: i64 = c.pttl(&stream).await.unwrap();
        assert!((59_000..=120_000).contains(&ttl), "stream TTL {ttl} ms");
        // The epoch and top outlive the stream (at least 30 days), so an expired history is
        // told apart from a lost one.
        let meta: i64 = c
            .pttl(foldercast::bus::redis::keys::meta(&user))
            .await
            .unwrap();
        assert!(meta >= 29 * 24 * 3600 * 1000, "meta TTL {meta} ms");
        // A part of an event (its other recipients held): the event's guard and the set of
        // users who had it expire together, after two dedup windows.
        let guard = foldercast::bus::redis::keys::event(&event(n));
        for key in [guard.clone(), format!("{guard}:got")] {
            let ttl: i64 = c.pttl(&key).await.unwrap();
            assert!((1..=60_000).contains(&ttl), "{key} TTL {ttl} ms");
        }
    }
    // A coalesced message marks its user in each of its events' sets, with the same lifetime.
    bus.publish(&[coalesced(&user, &[event(3), event(4)])])
        .await
        .unwrap();
    for n in [3, 4] {
        let guard = foldercast::bus::redis::keys::event(&event(n));
        let state: Option<String> = c.get(&guard).await.unwrap();
        assert_eq!(state.as_deref(), Some("some"));
        let got: Vec<String> = c.smembers(format!("{guard}:got")).await.unwrap();
        assert_eq!(got, std::slice::from_ref(&stream));
        for key in [guard.clone(), format!("{guard}:got")] {
            let ttl: i64 = c.pttl(&key).await.unwrap();
            assert!((1..=60_000).contains(&ttl), "{key} TTL {ttl} ms");
        }
    }
    // Nothing per user on standalone Redis.
    let seen: Vec<String> = c.keys(format!("fc:{{{user}}}:seen:*")).await.unwrap();
    assert!(seen.is_empty(), "per-user seen sets: {seen:?}");
}

/// On a cluster an event is guarded per user: the seen set of the current dedup window names
/// it and expires after the next window ends, for single events and coalesced messages alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusters_seen_sets_expire() {
    let options = RedisOptions {
        dedup_window: Duration::from_secs(30),
        ..RedisOptions::default()
    };
    let bus = RedisBus::connect(&RedisTarget::Cluster(redis_cluster_nodes()), options, None)
        .await
        .unwrap();
    let user: Arc<str> = Arc::from(unique("seen"));
    let event = |n: u32| format!("{user}-e{n}");
    bus.publish(&[
        msg(&user, &event(0), "x"),
        coalesced(&user, &[event(1), event(2)]),
    ])
    .await
    .unwrap();
    let window = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        / 30_000;
    let mut c = redis::cluster::ClusterClient::new(redis_cluster_nodes())
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let mut found = Vec::new();
    for w in [window, window.saturating_sub(1)] {
        let key = foldercast::bus::redis::keys::seen(&user, w);
        let ttl: i64 = c.pttl(&key).await.unwrap();
        assert_ne!(ttl, -1, "a seen set without a TTL");
        if ttl > 0 {
            assert!(ttl <= 60_000, "seen-set TTL {ttl} ms");
            let mut ids: Vec<String> = c.smembers(&key).await.unwrap();
            ids.sort();
            found.extend(ids);
        }
    }
    assert_eq!(found, [event(0), event(1), event(2)]);
}

// --- history and resume -----------------------------------------------------------------------

fn lost(c: &Catchup) -> Option<&'static str> {
    match c {
        Catchup::Lost { reason, .. } => Some(reason.as_str()),
        Catchup::Recovered { .. } => None,
    }
}

fn replayed(c: &Catchup) -> Vec<String> {
    match c {
        Catchup::Recovered { entries, .. } => entries
            .iter()
            .map(|(_, p)| String::from_utf8(p.to_vec()).unwrap())
            .collect(),
        Catchup::Lost { reason, .. } => panic!("not recovered: {}", reason.as_str()),
    }
}

fn pos(p: &str) -> Position {
    Position::parse(p).unwrap_or_else(|| panic!("a position: {p}"))
}

async fn resume_reads_exactly_the_suffix(target: RedisTarget) {
    let bus = RedisBus::connect(&target, RedisOptions::default(), None)
        .await
        .expect("connect");
    let alice: Arc<str> = Arc::from(unique("alice"));
    let bob: Arc<str> = Arc::from(unique("bob"));
    // A user with no history yet is given an epoch and stands at 0.
    let start = bus.catch_up(&alice, None, 100).await.unwrap();
    let start = pos(start.top());
    assert_eq!(start.id, StreamId::ZERO);
    let batch: Vec<Outgoing> = (0..5)
        .flat_map(|i| {
            [
                msg(&alice, &format!("e{i}"), &format!("a{i}")),
                msg(&bob, &format!("e{i}"), "b"),
            ]
        })
        .collect();
    bus.publish(&batch).await.unwrap();
    let log = history(&target, &alice).await;
    assert_eq!(log.len(), 5);
    assert!(
        log[0].0.starts_with(&format!("{}:", start.epoch)),
        "the epoch given before the first message is kept"
    );
    let all = bus.catch_up(&alice, Some(&start), 100).await.unwrap();
    assert_eq!(replayed(&all).len(), 5, "from 0: everything");
    assert_eq!(all.top(), log[4].0, "the top is the last entry");
    if let Catchup::Recovered { entries, .. } = &all {
        let positions: Vec<&str> = entries.iter().map(|(p, _)| &**p).collect();
        let logged: Vec<&str> = log.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(positions, logged, "replayed positions are the stream's");
    }
    let after_second = bus
        .catch_up(&alice, Some(&pos(&log[1].0)), 100)
        .await
        .unwrap();
    assert_eq!(
        replayed(&after_second),
        log[2..].iter().map(|(_, m)| m.clone()).collect::<Vec<_>>()
    );
    assert!(
        replayed(
            &bus.catch_up(&alice, Some(&pos(&log[4].0)), 100)
                .await
                .unwrap()
        )
        .is_empty()
    );
    assert_eq!(
        lost(&bus.catch_up(&alice, Some(&start), 4).await.unwrap()),
        Some("over-limit")
    );
    assert_eq!(
        replayed(&bus.catch_up(&alice, Some(&start), 5).await.unwrap()).len(),
        5,
        "exactly the limit"
    );
    // From the future, another user's position, a lost epoch of alice's.
    let top = pos(&log[4].0);
    let future = Position {
        id: StreamId {
            ms: top.id.ms + 1,
            seq: 0,
        },
        ..top.clone()
    };
    assert_eq!(
        lost(&bus.catch_up(&alice, Some(&future), 100).await.unwrap()),
        Some("bad-position")
    );
    let bobs = pos(&history(&target, &bob).await[0].0);
    let from_bob = bus.catch_up(&alice, Some(&bobs), 100).await.unwrap();
    assert_eq!(
        lost(&from_bob),
        Some("bad-position"),
        "nothing of another user's stream"
    );
    let mut old_epoch = top.clone();
    old_epoch.epoch = format!("ffffffff{}", &top.epoch[8..]).into();
    assert_eq!(
        lost(&bus.catch_up(&alice, Some(&old_epoch), 100).await.unwrap()),
        Some("unknown-epoch")
    );
    // A lost answer still names the current top, where the client starts after refetching.
    assert_eq!(from_bob.top(), log[4].0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_resume_reads_exactly_the_suffix() {
    resume_reads_exactly_the_suffix(RedisTarget::Standalone(redis_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_resume_reads_exactly_the_suffix() {
    resume_reads_exactly_the_suffix(RedisTarget::Cluster(redis_cluster_nodes())).await;
}

/// Trimming by length: a position whose successors were trimmed away is too old; one inside
/// what is kept still recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_history_is_too_old_and_kept_history_recovers() {
    let options = RedisOptions {
        stream_max_len: 10,
        ..RedisOptions::default()
    };
    let target = RedisTarget::Standalone(redis_url());
    let bus = RedisBus::connect(&target, options, None).await.unwrap();
    let user: Arc<str> = Arc::from(unique("trimmed"));
    let start = pos(bus.catch_up(&user, None, 1000).await.unwrap().top());
    for chunk in 0..4 {
        let batch: Vec<Outgoing> = (0..100)
            .map(|i| msg(&user, &format!("e{chunk}-{i}"), "x"))
            .collect();
        bus.publish(&batch).await.unwrap();
    }
    let log = history(&target, &user).await;
    assert!(log.len() < 400, "trimmed ({} kept)", log.len());
    assert_eq!(
        lost(&bus.catch_up(&user, Some(&start), 1000).await.unwrap()),
        Some("too-old")
    );
    let first_kept = pos(&log[0].0);
    let tail = replayed(&bus.catch_up(&user, Some(&first_kept), 1000).await.unwrap());
    assert_eq!(tail.len(), log.len() - 1);
}

/// The stream expired while idle (deleted here) but the epoch lives on: positions from before
/// are too old (the entries are gone), the position handed out meanwhile recovers what comes
/// next, and later ids go on above everything before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_stream_keeps_its_epoch() {
    let url = redis_url();
    let target = RedisTarget::Standalone(url.clone());
    let bus = RedisBus::connect(&target, RedisOptions::default(), None)
        .await
        .unwrap();
    let user: Arc<str> = Arc::from(unique("expired"));
    bus.publish(&[msg(&user, "e1", "one"), msg(&user, "e2", "two")])
        .await
        .unwrap();
    let log = history(&target, &user).await;
    let mut c = node_conn(&url).await;
    let _: () = c
        .del(foldercast::bus::redis::keys::stream(&user))
        .await
        .unwrap();
    let old_top = pos(&log[1].0);
    assert_eq!(
        lost(&bus.catch_up(&user, Some(&old_top), 10).await.unwrap()),
        Some("too-old")
    );
    let meanwhile = bus.catch_up(&user, None, 10).await.unwrap();
    let meanwhile = pos(meanwhile.top());
    assert_eq!(meanwhile.epoch, old_top.epoch, "same epoch");
    assert!(meanwhile.id > old_top.id, "above every id given before");
    bus.publish(&[msg(&user, "e3", "three")]).await.unwrap();
    let again = history(&target, &user).await;
    assert_eq!(again.len(), 1);
    assert!(
        stream_id(&again[0].0) > stream_id(&log[1].0),
        "ids go on above the old top"
    );
    assert!(
        again[0].0.starts_with(&format!("{}:", old_top.epoch)),
        "same epoch"
    );
    assert_eq!(
        replayed(&bus.catch_up(&user, Some(&meanwhile), 10).await.unwrap()),
        ["{\"event_id\":\"e3\",\"body\":\"three\"}"]
    );
    assert_eq!(
        lost(&bus.catch_up(&user, Some(&old_top), 10).await.unwrap()),
        Some("too-old")
    );
    assert_eq!(
        lost(
            &bus.catch_up(&user, Some(&pos(&log[0].0)), 10)
                .await
                .unwrap()
        ),
        Some("too-old")
    );
}

/// Redis restarted without persistence: the history is gone, and a resuming client is told so
/// (`unknown-epoch`, with the new epoch's position), never served silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_without_persistence_is_a_new_epoch() {
    let mut redis = PrivateRedis::start();
    let target = RedisTarget::Standalone(redis.url());
    let bus = RedisBus::connect(&target, RedisOptions::default(), None)
        .await
        .unwrap();
    let user: Arc<str> = Arc::from(unique("restarted"));
    bus.publish(&[msg(&user, "e1", "one")]).await.unwrap();
    let before = pos(&history(&target, &user).await[0].0);
    redis.restart();
    let mut outcome = None;
    for _ in 0..100 {
        if let Ok(c) = bus.catch_up(&user, Some(&before), 10).await {
            outcome = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcome = outcome.expect("redis back");
    assert_eq!(lost(&outcome), Some("unknown-epoch"));
    let now = pos(outcome.top());
    assert_ne!(now.epoch, before.epoch, "a new epoch");
    assert_eq!(now.id, StreamId::ZERO);
    // Publishing goes on in the new epoch (the script is loaded again after the restart).
    bus.publish(&[msg(&user, "e2", "two")]).await.unwrap();
    let after = history(&target, &user).await;
    assert!(after[0].0.starts_with(&format!("{}:", now.epoch)));
}

/// Redis cuts the subscription connections (`CLIENT KILL TYPE pubsub`, as an operator or a
/// failover would): every subscription comes back and later messages arrive, for users on every
/// node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_after_its_subscription_connections_are_killed() {
    for target in [
        RedisTarget::Standalone(redis_url()),
        RedisTarget::Cluster(redis_cluster_nodes()),
    ] {
        let (tx, mut rx) = mpsc::channel(1024);
        let bus = RedisBus::connect(&target, RedisOptions::default(), Some(tx))
            .await
            .unwrap();
        bus.spawn_health_check(Duration::from_millis(200));
        let users: Vec<Arc<str>> = (0..60)
            .map(|i| Arc::from(unique(&format!("k{i}"))))
            .collect();
        for u in &users {
            bus.subscribe(u).await.unwrap();
        }
        let urls = match &target {
            RedisTarget::Standalone(url) => vec![url.clone()],
            RedisTarget::Cluster(nodes) => nodes.clone(),
        };
        common::kill_pubsub_clients(&urls).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut missing: std::collections::HashSet<Arc<str>> = users.iter().cloned().collect();
        while !missing.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{target:?}: {} of {} users never delivered again",
                missing.len(),
                users.len()
            );
            let batch: Vec<Outgoing> = missing
                .iter()
                .map(|u| msg(u, &unique("again"), "y"))
                .collect();
            let _ = bus.publish(&batch).await;
            while let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
            {
                missing.remove(&d.user);
            }
        }
    }
}

/// A coalesced message for `ids` (payload lists them) that rebuilds itself without the events
/// a user had, as the rate limiter's messages do: one event left is that event's own message.
fn coalesced(user: &Arc<str>, ids: &[String]) -> Outgoing {
    if let [only] = ids {
        return msg(user, only, "single");
    }
    let mut m = Outgoing::for_event(
        user.clone(),
        Bytes::from(format!(r#"{{"coalesced":{ids:?}}}"#)),
        ids.last().map(|id| Arc::from(id.as_str())),
    );
    let (user2, ids2) = (user.clone(), ids.to_vec());
    m.covers = Some(Arc::new(foldercast::bus::Covered {
        event_ids: ids.iter().map(|id| Arc::from(id.as_str())).collect(),
        without: Some(Box::new(move |had: &[&str]| {
            let rest: Vec<String> = ids2
                .iter()
                .filter(|id| !had.contains(&id.as_str()))
                .cloned()
                .collect();
            (!rest.is_empty()).then(|| coalesced(&user2, &rest))
        })),
    }));
    m
}

fn resync(user: &Arc<str>, ids: &[String]) -> Outgoing {
    let mut m = Outgoing::for_event(
        user.clone(),
        Bytes::from(format!(r#"{{"resync":{ids:?}}}"#)),
        ids.last().map(|id| Arc::from(id.as_str())),
    );
    m.covers = Some(Arc::new(foldercast::bus::Covered {
        event_ids: ids.iter().map(|id| Arc::from(id.as_str())).collect(),
        without: None,
    }));
    m
}

/// After a consumer crash the same events come back grouped differently: a coalesced message
/// whose user had some of its events is rebuilt without them (never sent as it is, which would
/// count a folder's change twice), one whose user had all is dropped, and the rest of the batch
/// waits for the rebuilt message (order per user is kept).
async fn coalesced_messages_deliver_each_event_once(target: RedisTarget) {
    let (bus, mut rx, alice, bob) = two_subscribed(&target).await;
    let carol: Arc<str> = Arc::from(unique("carol"));
    let run = unique("co");
    let e = |n: u32| format!("{run}-e{n}");
    let text = |m: &Outgoing| String::from_utf8(m.payload.to_vec()).unwrap();

    // e1 reached both whole; e2 reached alice alone.
    bus.publish(&whole(&[&alice, &bob], &e(1), "w"))
        .await
        .unwrap();
    bus.publish(&[msg(&alice, &e(2), "a")]).await.unwrap();
    deliveries(&mut rx, 3).await;

    // Replayed, grouped differently.
    bus.publish(&[
        coalesced(&alice, &[e(1), e(2), e(3), e(4)]),
        coalesced(&bob, &[e(1), e(2)]),
    ])
    .await
    .unwrap();
    let mut want = vec![
        (alice.to_string(), text(&coalesced(&alice, &[e(3), e(4)]))),
        (bob.to_string(), text(&msg(&bob, &e(2), "single"))),
    ];
    want.sort();
    assert_eq!(deliveries(&mut rx, 2).await, want);

    // All had: nothing. Once more in parts: nothing.
    bus.publish(&[
        coalesced(&alice, &[e(1), e(2), e(3), e(4)]),
        coalesced(&bob, &[e(1), e(2)]),
        msg(&alice, &e(4), "again"),
    ])
    .await
    .unwrap();
    nothing_more(&mut rx).await;

    // A conflict early in a batch of several calls: alice's later message waits for her
    // rebuilt one; carol's 300 (not subscribed) go into her history once.
    let mut batch = vec![coalesced(&alice, &[e(3), e(5)])];
    batch.extend((0..300).map(|i| msg(&carol, &format!("{run}-c{i}"), "c")));
    batch.push(msg(&alice, &e(6), "after"));
    bus.publish(&batch).await.unwrap();
    let first = recv(&mut rx).await;
    let second = recv(&mut rx).await;
    assert_eq!(text_of(&first), text(&msg(&alice, &e(5), "single")));
    assert_eq!(text_of(&second), text(&msg(&alice, &e(6), "after")));
    nothing_more(&mut rx).await;
    assert_eq!(history(&target, &carol).await.len(), 300);

    // A resync is sent while any of its events is new, and remembers them all.
    bus.publish(&[resync(&alice, &[e(6), e(7)])]).await.unwrap();
    assert_eq!(deliveries(&mut rx, 1).await.len(), 1);
    bus.publish(&[resync(&alice, &[e(6), e(7)]), msg(&alice, &e(7), "x")])
        .await
        .unwrap();
    nothing_more(&mut rx).await;
}

fn text_of(d: &Delivery) -> String {
    String::from_utf8(d.payload.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_messages_deliver_each_event_once_on_standalone_redis() {
    coalesced_messages_deliver_each_event_once(RedisTarget::Standalone(redis_url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_messages_deliver_each_event_once_on_a_cluster() {
    coalesced_messages_deliver_each_event_once(RedisTarget::Cluster(redis_cluster_nodes())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_of_one_payload_share_its_bytes() {
    let (tx, mut rx) = mpsc::channel(256);
    let bus = RedisBus::connect(
        &RedisTarget::Standalone(redis_url()),
        RedisOptions::default(),
        Some(tx),
    )
    .await
    .expect("connect");
    let users: Vec<Arc<str>> = (0..50)
        .map(|i| Arc::from(unique(&format!("sharer{i}"))))
        .collect();
    for u in &users {
        bus.subscribe(u).await.expect("subscribe");
    }
    let event = unique("shared-event");
    let payload = Bytes::from(format!(
        r#"{{"event_id":"{event}","pad":"{}"}}"#,
        "x".repeat(4000)
    ));
    let batch: Vec<Outgoing> = users
        .iter()
        .map(|u| Outgoing::for_event(u.clone(), payload.clone(), Some(Arc::from(event.as_str()))))
        .collect();
    bus.publish(&batch).await.expect("publish");
    let mut delivered = Vec::new();
    for _ in &users {
        delivered.push(recv(&mut rx).await);
    }
    // Fifty pushes, one per user's channel, and one buffer behind every delivery.
    assert!(delivered.iter().all(|d| d.payload == payload));
    let first = delivered[0].payload.as_ptr();
    assert!(
        delivered.iter().all(|d| d.payload.as_ptr() == first),
        "every recipient shares the first one's buffer"
    );
}

/// The position at the top of `user`'s history (a read without a position).
async fn top_of(bus: &RedisBus, user: &Arc<str>) -> String {
    bus.catch_up(user, None, 10).await.unwrap().top().to_owned()
}

/// The epoch a user's deliveries carry is the one their history holds, however it began: by a
/// publish to a new stream, by a read before any publish, or anew after the meta key was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_carry_the_epoch_the_history_holds() {
    let target = RedisTarget::Standalone(redis_url());
    let (tx, mut rx) = mpsc::channel(64);
    let bus = RedisBus::connect(&target, RedisOptions::default(), Some(tx))
        .await
        .expect("connect");
    let epoch_of = |position: &str| position.split_once(':').unwrap().0.to_owned();

    // Published to a new stream: the first entry announces the epoch.
    let newcomer: Arc<str> = Arc::from(unique("newcomer"));
    bus.subscribe(&newcomer).await.unwrap();
    bus.publish(&[
        msg(&newcomer, &unique("n1"), "a"),
        msg(&newcomer, &unique("n2"), "b"),
    ])
    .await
    .unwrap();
    let (d1, d2) = (recv(&mut rx).await, recv(&mut rx).await);
    let log = history(&target, &newcomer).await;
    assert_eq!([&*d1.id, &*d2.id], [log[0].0.as_str(), log[1].0.as_str()]);

    // Read before anything was published: the read starts the history and announces it.
    let reader: Arc<str> = Arc::from(unique("reader"));
    bus.subscribe(&reader).await.unwrap();
    let top = top_of(&bus, &reader).await;
    bus.publish(&[msg(&reader, &unique("r1"), "a")])
        .await
        .unwrap();
    let d = recv(&mut rx).await;
    assert_eq!(epoch_of(&d.id), epoch_of(&top));
    assert_eq!(&*d.id, history(&target, &reader).await[0].0.as_str());

    // The meta key is lost while the stream lives: the next read starts a new epoch, and the
    // deliveries after it carry that one, so positions handed out match the history again.
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = c
        .del(foldercast::bus::redis::keys::meta(&reader))
        .await
        .unwrap();
    let top = top_of(&bus, &reader).await;
    assert_ne!(epoch_of(&top), epoch_of(&d.id), "a new epoch");
    bus.publish(&[msg(&reader, &unique("r2"), "b")])
        .await
        .unwrap();
    let after = recv(&mut rx).await;
    assert_eq!(epoch_of(&after.id), epoch_of(&top));
    let log = history(&target, &reader).await;
    assert_eq!(&*after.id, log.last().unwrap().0.as_str());
    // A client resuming from it recovers (nothing missed since).
    let since = Position::parse(&after.id).unwrap();
    assert!(matches!(
        bus.catch_up(&reader, Some(&since), 10).await.unwrap(),
        Catchup::Recovered { .. }
    ));
    nothing_more(&mut rx).await;
}
