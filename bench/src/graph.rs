//! A LibreGraph-shaped server for the benchmarks, on a thread of its own so its work does not
//! compete with the measured runtime: project spaces named `…space-<s>` with `members` viewers
//! each (`user-<s>-<m>`, unified role ids), and items answered by id (a file whose size is
//! derived from its id), as `GET /graph/v1.0/drives/{drive}/items/{item}` does, and folders by
//! path, as `PROPFIND /remote.php/dav/spaces/{drive}/{path}` does (an overwrite of a file nobody
//! saw reads the folders above it). Every request is counted, by kind.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use axum::extract::{Path, State};
use axum::routing::get;

/// The unified role id of a space viewer.
const SPACE_VIEWER: &str = "a8d5fe5e-96e3-418d-825b-534dbdf22b99";

/// Requests served, by kind.
#[derive(Default)]
pub struct Calls {
    pub permissions: AtomicU64,
    pub items: AtomicU64,
    pub folders: AtomicU64,
}

impl Calls {
    /// Items, permissions and folders served so far.
    pub fn snapshot(&self) -> [u64; 3] {
        [
            self.items.load(Relaxed),
            self.permissions.load(Relaxed),
            self.folders.load(Relaxed),
        ]
    }

    /// Items, permissions and folders served since `before` (a [`Calls::snapshot`]).
    pub fn since(&self, before: [u64; 3]) -> (u64, u64, u64) {
        let now = self.snapshot();
        (now[0] - before[0], now[1] - before[1], now[2] - before[2])
    }
}

#[derive(Clone)]
struct Graph {
    members: usize,
    calls: Arc<Calls>,
}

/// Starts the server; its base URL.
pub fn start(members: usize, calls: Arc<Calls>) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}", listener.local_addr()?);
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => return eprintln!("bench graph server: {e}"),
        };
        runtime.block_on(async move {
            let app = axum::Router::new()
                .route(
                    "/graph/v1beta1/drives/{id}/root/permissions",
                    get(permissions),
                )
                .route("/graph/v1.0/drives/{drive}/items/{item}", get(item))
                .route("/remote.php/dav/spaces/{*rest}", axum::routing::any(folder))
                .with_state(Graph { members, calls });
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    let _ = axum::serve(l, app).await;
                }
                Err(e) => eprintln!("bench graph server: {e}"),
            }
        });
    });
    Ok(url)
}

/// The space number in a drive id: `space-7` or `storage$space-7`.
fn space_number(id: &str) -> &str {
    id.rsplit("space-").next().unwrap_or(id)
}

async fn permissions(
    State(graph): State<Graph>,
    Path(id): Path<String>,
) -> axum::Json<serde_json::Value> {
    graph.calls.permissions.fetch_add(1, Relaxed);
    let s = space_number(&id);
    let value: Vec<serde_json::Value> = (0..graph.members)
        .map(|m| {
            let user = format!("user-{s}-{m}");
            serde_json::json!({"id": format!("u:{user}"),
                "grantedToV2": {"user": {"id": user, "displayName": ""}}, "roles": [SPACE_VIEWER]})
        })
        .collect();
    axum::Json(serde_json::json!({ "value": value }))
}

/// A file `…!n<N>` of 1,000 + N % 9,000 bytes in its space's root. The body is formatted
/// directly rather than built as a JSON value: this server stands in for an oCIS on another
/// machine, so the less of the bench machine's two cores it takes, the less it weighs on the
/// NATS source's figures (its share of the machine during the NATS phase went from 7.3 % to
/// 6.9 % of `perf record -a` samples: a small share either way).
async fn item(
    State(graph): State<Graph>,
    Path((drive, item)): Path<(String, String)>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    graph.calls.items.fetch_add(1, Relaxed);
    let n: u64 = item
        .rsplit("!n")
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // Ids and drives here are the bench's own (`st$space-<s>!n<N>`): nothing to escape.
    let body = format!(
        r#"{{"id":"{item}","name":"file-{n}.bin","size":{size},"eTag":"\"{n}\"","lastModifiedDateTime":"2026-11-30T08:00:00Z","parentReference":{{"driveId":"{drive}","id":"{drive}!parent","path":"/"}},"file":{{"mimeType":"application/octet-stream"}}}}"#,
        size = 1000 + n % 9000
    );
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// A folder by path (`PROPFIND`, `Depth: 0`): 1 MB, whatever the path.
async fn folder(State(graph): State<Graph>, Path(rest): Path<String>) -> axum::response::Response {
    use axum::response::IntoResponse;
    graph.calls.folders.fetch_add(1, Relaxed);
    let body = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<d:multistatus xmlns:d="DAV:" xmlns:oc="http://owncloud.org/ns"><d:response><d:href>/remote.php/dav/spaces/{rest}</d:href>
<d:propstat><d:prop><oc:fileid>{rest}</oc:fileid><oc:size>1000000</oc:size><d:getetag>&quot;1&quot;</d:getetag><d:resourcetype><d:collection/></d:resourcetype></d:prop>
<d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response></d:multistatus>"#
    );
    (
        axum::http::StatusCode::MULTI_STATUS,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/xml; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
