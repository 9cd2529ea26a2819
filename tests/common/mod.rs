//! Shared helpers for the integration tests: the real binary, tokens, clients and schemas.
#![allow(dead_code)] // each test crate uses a different subset

pub mod browser;
pub mod libregraph;
pub mod nats;
pub mod oidc;
pub mod pipeline;
pub mod sse;
pub mod ws;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

pub const SECRET: &str = "test-secret-of-at-least-thirty-two-bytes";

/// Sends signal `name` (`TERM`, `KILL`, `STOP`, `CONT`, …) to `child`.
pub fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("running");
    let sent = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{name} {pid}");
}

/// Sends `name` to `child` and waits up to `within` for it to exit: its exit status.
pub async fn stop_with(
    child: &mut Child,
    name: &str,
    within: Duration,
) -> std::process::ExitStatus {
    signal(child, name);
    tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("no exit within {within:?} of SIG{name}"))
        .expect("wait")
}

/// The operator of test servers started by [`Server::start`] (`--admin-users`).
pub const ADMIN: &str = "ops";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_foldercast"))
}

pub fn demo_membership() -> PathBuf {
    root().join("fixtures/demo/membership.json")
}

pub fn token(user: &str) -> String {
    foldercast::gateway::auth::Authenticator::hs256(SECRET.as_bytes())
        .expect("secret")
        .mint(user, Duration::from_secs(3600))
        .expect("mint")
}

/// A single-use ticket for `user`, from `POST /api/tickets` with their token.
pub async fn ticket(server: &Server, user: &str) -> String {
    let body: Value = reqwest::Client::new()
        .post(server.url("/api/tickets"))
        .bearer_auth(token(user))
        .send()
        .await
        .expect("POST /api/tickets")
        .json()
        .await
        .expect("a JSON answer");
    body["ticket"].as_str().expect("a ticket").to_owned()
}

/// A running `foldercast run` whose events come from our stdin.
pub struct Server {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub addr: String,
}

impl Server {
    /// Starts `foldercast run --events - --listen 127.0.0.1:0 …` plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Server {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--events".into(),
            "-".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--jwt-secret".into(),
            SECRET.into(),
            "--rate".into(),
            "0".into(),
            "--membership".into(),
            demo_membership().display().to_string(),
            "--no-demo".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(&args, true).await
    }

    pub async fn spawn(args: &[String], piped_stdin: bool) -> Server {
        Self::spawn_with_env(args, &[], piped_stdin).await
    }

    pub async fn spawn_with_env(
        args: &[String],
        env: &[(&str, &str)],
        piped_stdin: bool,
    ) -> Server {
        let mut child = Command::new(bin())
            .args(args)
            // Every test server has the same operator, so `stats()` works on all of them.
            .env("FOLDERCAST_ADMIN_USERS", ADMIN)
            .envs(env.iter().copied())
            .current_dir(root())
            .env(
                "FOLDERCAST_LOG",
                std::env::var("FOLDERCAST_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(if piped_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start foldercast");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(rest) = line.strip_prefix("foldercast: serving on http://") {
                    return rest.trim_end_matches('/').to_owned();
                }
            }
            panic!("foldercast exited before serving");
        })
        .await
        .expect("foldercast did not start in time");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let stdin = child.stdin.take();
        Server { child, stdin, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Writes events (JSONL) to the server's event input.
    pub async fn send_events(&mut self, lines: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is piped");
        stdin
            .write_all(lines.as_bytes())
            .await
            .expect("write events");
        stdin.flush().await.expect("flush events");
    }

    pub async fn stats(&self) -> Value {
        reqwest::Client::new()
            .get(self.url("/api/stats"))
            .bearer_auth(token(ADMIN))
            .send()
            .await
            .expect("stats")
            .json()
            .await
            .expect("stats json")
    }
}

/// A message's folder changes as (folder, delta), one per folder: each `folders` entry is a
/// run covering its `path` and the `levels - 1` folders above it.
pub fn folder_changes(message: &Value) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for run in message["folders"].as_array().into_iter().flatten() {
        let delta = run["size_delta"].as_i64().expect("size_delta");
        let mut path = run["path"].as_str().expect("path").to_owned();
        for n in 0..run["levels"].as_u64().expect("levels") {
            out.push((path.clone(), delta));
            if path == "/" {
                assert_eq!(
                    n + 1,
                    run["levels"].as_u64().unwrap(),
                    "a run past the root"
                );
                break;
            }
            path = match path.rfind('/') {
                Some(0) => "/".to_owned(),
                Some(i) => path[..i].to_owned(),
                None => panic!("relative path in a run: {path}"),
            };
        }
    }
    out
}

/// Applies a message's `folders` to `sizes` the way a client does: in order, a run's
/// `size_delta` added to each folder it covers, an absolute `size` set.
pub fn apply_folders(sizes: &mut std::collections::BTreeMap<String, i64>, message: &Value) {
    for entry in message["folders"].as_array().into_iter().flatten() {
        let mut path = entry["path"].as_str().expect("path").to_owned();
        for _ in 0..entry["levels"].as_u64().expect("levels") {
            let slot = sizes.entry(path.clone()).or_default();
            match (entry["size"].as_i64(), entry["size_delta"].as_i64()) {
                (Some(size), None) => *slot = size,
                (None, Some(delta)) => *slot += delta,
                other => panic!("an entry with neither or both of size and size_delta: {other:?}"),
            }
            if path == "/" {
                break;
            }
            path = match path.rfind('/') {
                Some(0) => "/".to_owned(),
                Some(i) => path[..i].to_owned(),
                None => panic!("relative path in a run: {path}"),
            };
        }
    }
}

/// `replay --print` of a fixture: the expected deliveries, as (user, message) pairs.
pub fn replay_print(
    events: &Path,
    membership: &Path,
    extra: &[&str],
) -> (Vec<(String, Value)>, String, i32) {
    let out = std::process::Command::new(bin())
        .args(["replay", "--print", "--events"])
        .arg(events)
        .arg("--membership")
        .arg(membership)
        .args(extra)
        .env("FOLDERCAST_LOG", "warn")
        .output()
        .expect("run replay");
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let pairs = stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("replay line is JSON");
            (
                v["user"].as_str().expect("user").to_owned(),
                v["message"].clone(),
            )
        })
        .collect();
    (
        pairs,
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

/// Validators for the contracts in `schemas/`.
pub struct Schemas {
    pub event: jsonschema::Validator,
    pub message: jsonschema::Validator,
    pub protocol: jsonschema::Validator,
    pub server_frame: jsonschema::Validator,
    pub client_frame: jsonschema::Validator,
    pub membership: jsonschema::Validator,
    pub notification_request: jsonschema::Validator,
    pub notification_response: jsonschema::Validator,
    pub preferences: jsonschema::Validator,
}

fn load(name: &str) -> Value {
    let text = std::fs::read_to_string(root().join("schemas").join(name)).expect("read schema");
    serde_json::from_str(&text).expect("schema is JSON")
}

impl Schemas {
    pub fn load() -> Schemas {
        let names = [
            "storage-event",
            "user-message",
            "client-protocol",
            "membership",
            "notification-request",
            "preferences",
        ];
        let docs: Vec<(String, Value)> = names
            .iter()
            .map(|n| {
                let v = load(&format!("{n}.schema.json"));
                (v["$id"].as_str().expect("$id").to_owned(), v)
            })
            .collect();
        let build = |schema: &Value| {
            let mut opts = jsonschema::options();
            for (id, doc) in &docs {
                opts = opts
                    .with_resource(id.clone(), jsonschema::Resource::from_contents(doc.clone()));
            }
            opts.build(schema).expect("schema compiles")
        };
        let protocol_id = &docs[2].0;
        Schemas {
            event: build(&docs[0].1),
            message: build(&docs[1].1),
            protocol: build(&docs[2].1),
            server_frame: build(
                &serde_json::json!({"$ref": format!("{protocol_id}#/$defs/serverFrame")}),
            ),
            client_frame: build(
                &serde_json::json!({"$ref": format!("{protocol_id}#/$defs/clientFrame")}),
            ),
            membership: build(&docs[3].1),
            notification_request: build(&docs[4].1),
            notification_response: build(&serde_json::json!({
                "$ref": format!("{}#/$defs/response", docs[4].0)
            })),
            preferences: build(&docs[5].1),
        }
    }
}

pub fn assert_valid(v: &jsonschema::Validator, instance: &Value, what: &str) {
    let errors: Vec<String> = v
        .iter_errors(instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} violates its schema: {errors:?}\n{instance}"
    );
}

/// The address of a server that `scripts/test.sh` started. A missing one fails the test: the
/// suite never skips because a server is absent.
pub fn server_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the suite with scripts/test.sh, which starts Redis, Redis Cluster and Kafka")
    })
}

pub fn redis_url() -> String {
    server_env("FOLDERCAST_TEST_REDIS")
}

pub fn redis_cluster_nodes() -> Vec<String> {
    server_env("FOLDERCAST_TEST_REDIS_CLUSTER")
        .split(',')
        .map(str::to_owned)
        .collect()
}

pub fn kafka_brokers() -> String {
    server_env("FOLDERCAST_TEST_KAFKA")
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A unique name for this run (topics, groups, users), so tests sharing servers never collide.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private redis-server for tests that restart it; stopped on drop.
pub struct PrivateRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    extra: Vec<String>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        Self::start_with(free_port(), &[])
    }

    /// With extra `redis-server` arguments, on `port`.
    pub fn start_with(port: u16, extra: &[&str]) -> PrivateRedis {
        let mut r = PrivateRedis {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        let child = std::process::Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private redis-server did not start");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private 3-node Redis Cluster (no replicas) for tests that restart a node; its nodes keep
/// their `nodes.conf`, so a restarted node comes back with its id and slots.
pub struct PrivateCluster {
    pub nodes: Vec<PrivateRedis>,
}

impl PrivateCluster {
    pub fn start() -> PrivateCluster {
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            // The cluster bus listens on port + 10000: it must be a valid, free port too.
            let port = free_port();
            if port > 55_000 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            nodes.push(PrivateRedis::start_with(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            ));
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = std::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli (scripts/test.sh installs it)");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = PrivateCluster { nodes };
        cluster.wait_until_ok();
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub fn wait_until_ok(&self) {
        for _ in 0..300 {
            let ok = self.nodes.iter().all(|n| {
                std::process::Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the private cluster never reached cluster_state:ok");
    }

    /// The node (index into `nodes`) that serves `key`'s slot.
    pub fn node_of(&self, key: &str) -> usize {
        let cli = |args: &[&str]| {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &self.nodes[0].port.to_string()])
                .args(args)
                .output()
                .expect("redis-cli");
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        let slot: u16 = cli(&["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("a slot");
        // `cluster shards` would be tidier; `cluster nodes` works on every Redis 7.
        for line in cli(&["cluster", "nodes"]).lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(port) = fields
                .get(1)
                .and_then(|a| a.split('@').next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            let serves = fields.iter().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if lo <= slot && slot <= hi)
            });
            if serves && let Some(i) = self.nodes.iter().position(|n| n.port == port) {
                return i;
            }
        }
        panic!("no node serves slot {slot}");
    }
}

/// `CLIENT KILL TYPE pubsub` on each Redis at `urls`: cuts every subscription connection, as an
/// operator or a failover would.
pub async fn kill_pubsub_clients(urls: &[String]) {
    for url in urls {
        let mut c = redis::Client::open(url.as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        let _: redis::Value = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut c)
            .await
            .expect("CLIENT KILL");
    }
}
