//! The demo page in headless Chromium (Debian's `chromium`): it signs in as a demo user, lists a
//! space and shows pushed updates live. Driven over the DevTools protocol; a screenshot is left
//! in `target/demo-page.png`.

mod common;

use std::time::Duration;

use base64::Engine;
use common::browser::Browser;
use common::{Server, root};
use serde_json::{Value, json};

// The probe may run before the page has a body (Chromium starts on the URL before loading it).
const PROBE: &str = r#"JSON.stringify({
  status: document.querySelector('#status')?.dataset.state,
  applied: Number(document.body?.dataset.applied ?? 0),
  log: document.querySelectorAll('#log li').length,
  rows: [...document.querySelectorAll('#listing tbody tr')].map(r => [r.dataset.path, Number(r.dataset.size)]),
})"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_shows_live_updates() {
    // The embedded default as a person starts it, but faster and on a free port.
    let args: Vec<String> = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        "demo-secret-of-at-least-thirty-two-bytes",
        "--demo",
        "--rate",
        "15",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::spawn(&args, false).await;
    let browser = Browser::launch(&server.url("/?user=alice&space=s-eng")).await;
    let mut page = browser.page().await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut first_rows: Option<Value> = None;
    let state = loop {
        let state: Value = serde_json::from_str(page.eval(PROBE).await.as_str().unwrap_or("{}"))
            .unwrap_or(json!({}));
        if state["status"] == "live" && first_rows.is_none() {
            first_rows = Some(state["rows"].clone());
        }
        let changed = first_rows.as_ref().is_some_and(|f| *f != state["rows"]);
        if state["status"] == "live"
            && state["applied"].as_u64().unwrap_or(0) >= 3
            && state["log"].as_u64().unwrap_or(0) >= 3
            && changed
        {
            break state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page never showed live updates: {state}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let rows = state["rows"].as_array().unwrap();
    assert!(
        rows.iter().any(|r| r[0] == "/projects" || r[0] == "/inbox"),
        "the space root lists its folders: {state}"
    );

    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    if let Some(data) = shot["data"].as_str() {
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        let _ = std::fs::write(root().join("target/demo-page.png"), png);
    }
    drop(page);
    drop(browser.child);
}

/// Waits until `expression` (JavaScript) is true in the page.
async fn until_true(page: &mut common::browser::Cdp, expression: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while page.eval(expression).await != Value::Bool(true) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {expression}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_acknowledges_notices_and_counts_down_to_a_downtime() {
    let args: Vec<String> = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        "demo-secret-of-at-least-thirty-two-bytes",
        "--demo",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::spawn(&args, false).await;
    let browser = Browser::launch(&server.url("/?user=alice&space=s-eng")).await;
    let mut page = browser.page().await;
    until_true(
        &mut page,
        "document.querySelector('#status')?.dataset.state === 'live'",
        "live",
    )
    .await;

    // A critical notice: shown with a button; acknowledged, it does not come back on a reload.
    page.eval("document.querySelector('#try-notice').click(); 'clicked'")
        .await;
    until_true(
        &mut page,
        "!!document.querySelector('#notes li.critical button')",
        "the notice",
    )
    .await;
    page.eval("document.querySelector('#notes li.critical button').click(); 'acked'")
        .await;
    until_true(
        &mut page,
        "document.querySelector('#notes li.critical')?.dataset.acked === 'true'",
        "acknowledged",
    )
    .await;
    page.eval("location.reload(); 'reloading'").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    until_true(
        &mut page,
        "document.querySelector('#status')?.dataset.state === 'live'",
        "live again",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        page.eval("document.querySelectorAll('#notes li.critical').length")
            .await,
        json!(0),
        "an acknowledged notice does not come back"
    );

    // A downtime in a minute: the banner counts down.
    page.eval("document.querySelector('#try-downtime').click(); 'clicked'")
        .await;
    until_true(
        &mut page,
        "document.querySelector('#downtime')?.dataset.active === 'true'",
        "the banner",
    )
    .await;
    let seconds = page
        .eval("Number(document.querySelector('#downtime').dataset.seconds)")
        .await;
    let seconds = seconds.as_f64().unwrap_or(0.0);
    assert!(
        (50.0..=60.0).contains(&seconds),
        "counts down from a minute: {seconds}"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let later = page
        .eval("Number(document.querySelector('#downtime').dataset.seconds)")
        .await;
    assert!(
        later.as_f64().unwrap_or(99.0) < seconds,
        "{later} after {seconds}"
    );
}

/// The page's preferences: muting every space the user sees stops the messages (the consumer
/// publishes nothing for them), unmuting one brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_mutes_spaces_through_preferences() {
    let args: Vec<String> = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        "demo-secret-of-at-least-thirty-two-bytes",
        "--demo",
        "--rate",
        "20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server::spawn(&args, false).await;
    let browser = Browser::launch(&server.url("/?user=alice&space=s-eng")).await;
    let mut page = browser.page().await;
    until_true(
        &mut page,
        "document.querySelector('#prefs')?.dataset.loaded === 'true' && Number(document.body.dataset.applied) > 0",
        "preferences shown and messages arriving",
    )
    .await;
    let boxes = page
        .eval("document.querySelectorAll('#prefs input[data-mute]').length")
        .await;
    assert_eq!(boxes, json!(2), "alice's two spaces");
    let types = page
        .eval("document.querySelectorAll('#prefs input[data-type]:checked').length")
        .await;
    assert_eq!(types, json!(9), "every type wanted by default");

    page.eval(
        "document.querySelectorAll('#prefs input[data-mute]').forEach(c => c.click()); 'muted'",
    )
    .await;
    until_true(
        &mut page,
        "document.querySelector('#prefs').dataset.saved === '2'",
        "both mutes saved",
    )
    .await;
    let said = page
        .eval("document.querySelector('#log li.prefs')?.textContent ?? ''")
        .await;
    assert!(
        said.as_str().is_some_and(|s| s.contains("2 muted")),
        "the server answered with both spaces muted: {said}"
    );
    // What was already on its way arrives; then nothing, while events go on at 20/s.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let applied = |v: Value| v.as_f64().unwrap_or(0.0) as u64;
    let before = applied(page.eval("Number(document.body.dataset.applied)").await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = applied(page.eval("Number(document.body.dataset.applied)").await);
    assert_eq!(before, after, "nothing from muted spaces");

    page.eval("document.querySelector('#prefs input[data-mute=\"s-eng\"]').click(); 'unmuted'")
        .await;
    until_true(
        &mut page,
        &format!("Number(document.body.dataset.applied) > {after}"),
        "messages again after unmuting",
    )
    .await;
    drop(page);
    drop(browser.child);
}
