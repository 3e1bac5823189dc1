//! Device event history end to end, on the real embedded broker with real sled: a revert's
//! evidence stays visible (API, `ringcast devices show`) after later events and a controller
//! restart; the halt it causes names the failing check, an example device and its output;
//! and the dashboard shows what devices send as text, never as markup (ACCEPTANCE.md 30).

mod common;

use common::*;
use ringcast_controller::model::EventEntry;
use ringcast_proto::report::ErrorInfo;
use ringcast_proto::{Event, EventKind, Phase};
use std::sync::atomic::Ordering;

fn event(device: &str, n: u32, rollout: &str, kind: EventKind) -> Event {
    Event {
        id: format!("{device}-1-{n}"),
        device: device.into(),
        at: ringcast_proto::testkit::now(),
        rollout_id: Some(rollout.into()),
        release: None,
        kind,
    }
}

fn reverted(device: &str, n: u32, rollout: &str, check: &str, output: &str) -> Event {
    event(
        device,
        n,
        rollout,
        EventKind::Reverted {
            reason: "health_check_failed".into(),
            check: Some(check.into()),
            output: Some(output.into()),
        },
    )
}

/// The kept events of `device` as the API shows them (newest first).
async fn api_events(h: &ringcast_controller::ControllerHandle, device: &str) -> Vec<EventEntry> {
    api(h, VIEWER)
        .device(device)
        .await
        .unwrap_or_else(|e| panic!("GET device {device}: {e}"))
        .events
        .expect("GET /api/v1/devices/{id} carries the history")
}

fn kinds(es: &[EventEntry]) -> Vec<&str> {
    es.iter().map(|e| e.event.kind.name()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_evidence_outlives_later_events_and_a_restart_and_the_halt_names_the_check() {
    let w = World::new();
    let cfg = w.config(vec![
        // 1 of 2 failed (0.5) is not above 0.5, and one commit would still meet a gate of
        // one: the halt waits for both reverts, so its reason counts both whatever order the
        // engine sees the two reports in.
        ring("canary", &[100.0], "10m", 1, 0.5),
        ring("broad", &[100.0], "10m", 2, 0.2),
    ]);
    let h = w.start(cfg.clone()).await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report_all("canary", 2, Some(&ro.id), Phase::Probation, 2)
        .await;

    // Both canary devices revert on the same check. The agent sends the event, then the
    // report; wait for the events to be stored so the halt certainly sees them.
    let boom = "exit 1\nboom\n";
    for d in ["canary-0", "canary-1"] {
        fleet
            .event(d, &event(d, 1, &ro.id, EventKind::Installed))
            .await;
        fleet
            .event(d, &reverted(d, 2, &ro.id, "self-test", boom))
            .await;
    }
    wait_for(10, "both reverts stored", || {
        let s = &h.shared().store;
        ["canary-0", "canary-1"]
            .iter()
            .all(|d| {
                s.device_events(d, 1)
                    .is_ok_and(|e| e.len() == 1 && e[0].seq == 1)
            })
            .then_some(())
    })
    .await;
    for d in ["canary-0", "canary-1"] {
        fleet
            .report_with_error(
                d,
                "canary",
                Some(&ro.id),
                Phase::Reverted,
                2,
                Some(ErrorInfo {
                    reason: "health_check_failed".into(),
                    detail: boom.into(),
                }),
            )
            .await;
    }
    wait_for(10, "halted", || {
        (phase(&h, &ro.id) == "halted").then_some(())
    })
    .await;
    let want = "gate crossed in ring canary: 2 of 2 failed (rate 1.00 > 0.50); most common \
                failure: check \"self-test\" on 2 devices, e.g. canary-0: \"exit 1: boom\"";
    let view = api(&h, VIEWER).rollout(&ro.id).await.unwrap();
    assert_eq!(view.detail.as_deref(), Some(want), "API rollout detail");
    let blocked = h.shared().state.read().unwrap().releases["app-2"]
        .blocked
        .clone();
    assert_eq!(
        blocked.as_deref(),
        Some(want),
        "the release's blocked field"
    );
    let audit = ringcast_controller::audit::verify(&h.shared().audit.export().unwrap()).unwrap();
    assert!(
        audit.iter().any(|e| e.action == "halt" && e.detail == want),
        "the audit log's halt entry carries the reason"
    );

    // The device goes on talking: the hold, then a few more. Without a history these
    // replaced the revert within milliseconds.
    fleet
        .event("canary-0", &event("canary-0", 3, &ro.id, EventKind::Held))
        .await;
    for n in 4..7 {
        fleet
            .event(
                "canary-0",
                &event("canary-0", n, &ro.id, EventKind::Accepted),
            )
            .await;
    }
    wait_for(10, "later events stored", || {
        h.shared().devices.read().unwrap()["canary-0"]
            .last_event
            .as_ref()
            .filter(|e| e.id == "canary-0-1-6")
            .map(|_| ())
    })
    .await;
    let check_history = |es: &[EventEntry]| {
        assert_eq!(
            kinds(es),
            [
                "accepted",
                "accepted",
                "accepted",
                "held",
                "reverted",
                "installed"
            ],
            "newest first"
        );
        let EventKind::Reverted {
            reason,
            check,
            output,
        } = &es[4].event.kind
        else {
            panic!("not a revert: {:?}", es[4]);
        };
        assert_eq!(reason, "health_check_failed");
        assert_eq!(check.as_deref(), Some("self-test"));
        assert_eq!(output.as_deref(), Some(boom));
    };
    check_history(&api_events(&h, "canary-0").await);
    h.shutdown().await;

    // Restart on the same database and broker: events are not retained by the broker, so
    // only the controller's own history can still show the revert.
    let h = w.start(cfg).await;
    wait_for(10, "canary-0's retained report re-read", || {
        h.shared()
            .devices
            .read()
            .unwrap()
            .get("canary-0")
            .and_then(|d| d.report.as_ref())
            .filter(|r| r.phase == Phase::Reverted)
            .map(|_| ())
    })
    .await;
    // Subscribed (the re-read at connect is over), so the events below reach the controller.
    wait_for(10, "re-read after the restart", || {
        (h.shared().counters.rereads.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    let after = api_events(&h, "canary-0").await;
    check_history(&after);
    assert_eq!(
        after.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [5, 4, 3, 2, 1, 0],
        "arrival numbers survive the restart"
    );
    // A redelivery of the revert after the restart is recognised by its id, not recorded.
    let fleet = Fleet::connect(&w).await;
    fleet
        .event(
            "canary-0",
            &reverted("canary-0", 2, &ro.id, "self-test", boom),
        )
        .await;
    fleet
        .event("canary-0", &event("canary-0", 7, &ro.id, EventKind::Held))
        .await;
    wait_for(10, "duplicate recognised and the next event stored", || {
        (h.shared().counters.duplicate_events.load(Ordering::Relaxed) == 1
            && h.shared().counters.events.load(Ordering::Relaxed) == 1)
            .then_some(())
    })
    .await;
    let after = api_events(&h, "canary-0").await;
    assert_eq!(after.len(), 7);
    assert_eq!((after[0].seq, after[0].event.kind.name()), (6, "held"));

    // The command line: a readable history with the revert's evidence; --json the structure.
    let text = cli(&h, &["devices", "show", "canary-0"]).await;
    assert!(text.contains("events    7 kept, newest first"), "{text}");
    let revert_line = text
        .lines()
        .position(|l| l.contains("#1 ") && l.contains("reverted"))
        .unwrap_or_else(|| panic!("no revert line in:\n{text}"));
    let evidence: Vec<&str> = text.lines().skip(revert_line + 1).take(4).collect();
    assert_eq!(
        evidence,
        [
            "      reason  health_check_failed",
            "      check   self-test",
            "      output  exit 1",
            "              boom",
        ],
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&cli(&h, &["--json", "devices", "show", "canary-0"]).await).unwrap();
    let revert = json["events"]
        .as_array()
        .expect("events array")
        .iter()
        .find(|e| e["event"] == "reverted")
        .expect("the revert is in --json");
    assert_eq!(revert["check"], "self-test");
    assert_eq!(revert["output"], boom);
    assert_eq!(revert["seq"], 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_without_revert_events_falls_back_to_the_reports_last_error() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.0)]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    fleet
        .report_with_error(
            "canary-0",
            "canary",
            Some(&ro.id),
            Phase::Failed,
            2,
            Some(ErrorInfo {
                reason: "pre_activate_failed".into(),
                detail: "hook exited 3".into(),
            }),
        )
        .await;
    wait_for(10, "halted", || {
        (phase(&h, &ro.id) == "halted").then_some(())
    })
    .await;
    let detail = api(&h, VIEWER).rollout(&ro.id).await.unwrap().detail;
    assert_eq!(
        detail.as_deref(),
        Some(
            "gate crossed in ring canary: 1 of 1 failed (rate 1.00 > 0.00); most common \
             failure: reason \"pre_activate_failed\" on 1 device, e.g. canary-0: \"hook exited 3\""
        )
    );
    h.shutdown().await;
}

/// What a device can put in front of an operator, with markup in every field that reaches
/// the dashboard.
const MARKUP: &str =
    "<img src=x onerror=\"window.pwned='output'\"><script>window.pwned='script'</script>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_inserts_no_data_as_html_and_forbids_inline_script() {
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.0)]))
        .await;
    let resp = reqwest::get(format!("{}/", h.http_url())).await.unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp
        .headers()
        .get("content-security-policy")
        .expect("the dashboard has a CSP")
        .to_str()
        .unwrap()
        .to_owned();
    let page = resp.text().await.unwrap();
    // No sink that parses data as HTML or runs strings as code.
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "srcdoc",
        "eval(",
        "new Function",
        "javascript:",
    ] {
        assert!(!page.contains(sink), "the dashboard uses {sink}");
    }
    // No inline event-handler attributes either (the CSP would refuse them anyway).
    let lower = page.to_ascii_lowercase();
    for attr in [
        " onclick=",
        " onload=",
        " onerror=",
        " onkeydown=",
        " onchange=",
    ] {
        assert!(!lower.contains(attr), "inline handler {attr}");
    }
    // Only the page's own script and style run: a nonce, no 'unsafe-inline', and the same
    // nonce on the tags.
    let nonce = csp
        .split("script-src 'nonce-")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .expect("script-src names a nonce");
    assert!(nonce.len() >= 32, "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(page.contains(&format!("<script nonce=\"{nonce}\">")));
    assert_eq!(
        page.matches("<script").count(),
        1,
        "one script, the nonce'd one"
    );
    let again = reqwest::get(format!("{}/", h.http_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!again.contains(nonce), "a fresh nonce per answer");
    h.shutdown().await;
}

/// The same in a real browser, when Debian's `chromium` is installed: a device whose check
/// name, output and error detail hold markup; the dashboard shows them as text and no script
/// runs. Without chromium the test says so and passes (set RINGCAST_REQUIRE_CHROMIUM=1 to
/// make that a failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_markup_from_devices_is_shown_as_text_and_runs_nothing() {
    let Some(chromium) = cdp::find_chromium() else {
        assert!(
            std::env::var_os("RINGCAST_REQUIRE_CHROMIUM").is_none(),
            "RINGCAST_REQUIRE_CHROMIUM is set but chromium is not installed"
        );
        eprintln!("skipped: chromium is not installed (apt-get install chromium)");
        return;
    };
    let w = World::new();
    let h = w
        .start(w.config(vec![ring("canary", &[100.0], "10m", 1, 0.0)]))
        .await;
    let watch = Watcher::start(&w).await;
    let fleet = Fleet::connect(&w).await;
    let (_, ro) = w.submit_now(&h, 2).await;
    wait_for(10, "canary directive", || watch.get("canary")).await;
    let revert = Event {
        kind: EventKind::Reverted {
            reason: "health_check_failed".into(),
            check: Some(format!("check {MARKUP}")),
            output: Some(format!("exit 1\n{MARKUP}")),
        },
        ..event("canary-0", 1, &ro.id, EventKind::Held)
    };
    fleet.event("canary-0", &revert).await;
    wait_for(10, "revert stored", || {
        h.shared()
            .store
            .device_events("canary-0", 1)
            .is_ok_and(|e| e.len() == 1)
            .then_some(())
    })
    .await;
    fleet
        .report_with_error(
            "canary-0",
            "canary",
            Some(&ro.id),
            Phase::Reverted,
            2,
            Some(ErrorInfo {
                reason: "health_check_failed".into(),
                detail: format!("detail {MARKUP}"),
            }),
        )
        .await;
    wait_for(10, "halted", || {
        (phase(&h, &ro.id) == "halted").then_some(())
    })
    .await;

    let browser = cdp::Browser::launch(&chromium).await;
    let mut page = browser.page().await;
    page.navigate(&format!("{}/", h.http_url())).await;
    page.wait_true("document.readyState === 'complete' && !!document.getElementById('look')")
        .await;
    // Catch what the CSP refuses, before anything is shown.
    page.eval(
        "window.violations = []; document.addEventListener('securitypolicyviolation', \
         e => window.violations.push(e.effectiveDirective)); true",
    )
    .await;
    page.eval(&format!(
        "document.getElementById('t').value = {tok}; document.getElementById('use').click(); \
         document.getElementById('dev').value = 'canary-0'; \
         document.getElementById('look').click(); true",
        tok = serde_json::to_string(VIEWER).unwrap()
    ))
    .await;
    // Both views rendered: the device's evidence and the halted rollout's reason.
    page.wait_true(
        "!!document.querySelector('#device pre') && \
         document.getElementById('out').textContent.includes('most common failure')",
    )
    .await;
    let seen = page
        .eval(
            "JSON.stringify({pwned: window.pwned === undefined ? null : window.pwned, \
             imgs: document.images.length, scripts: document.scripts.length, \
             device: document.getElementById('device').textContent, \
             out: document.getElementById('out').textContent, \
             pre: document.querySelector('#device pre').textContent, \
             stored: localStorage.getItem('rc'), violations: window.violations})",
        )
        .await;
    let seen: serde_json::Value = serde_json::from_str(seen.as_str().unwrap()).unwrap();
    assert_eq!(seen["pwned"], serde_json::Value::Null, "script ran: {seen}");
    assert_eq!(seen["imgs"], 0, "markup became elements: {seen}");
    assert_eq!(seen["scripts"], 1, "only the page's own script: {seen}");
    assert_eq!(
        seen["pre"],
        format!("exit 1\n{MARKUP}"),
        "output shown as text"
    );
    let device = seen["device"].as_str().unwrap();
    assert!(
        device.contains(&format!("check: check {MARKUP}")),
        "{device}"
    );
    assert!(device.contains(&format!("detail {MARKUP}")), "{device}");
    let out = seen["out"].as_str().unwrap();
    assert!(
        out.contains("<img src=x onerror="),
        "halt reason as text: {out}"
    );
    assert_eq!(
        seen["stored"],
        serde_json::Value::Null,
        "no token in localStorage"
    );
    assert_eq!(
        seen["violations"],
        serde_json::json!([]),
        "the page itself works within its CSP"
    );

    // Defence in depth: markup forced in through innerHTML (as the old dashboard did) runs
    // nothing either, because the CSP refuses inline handlers and images.
    page.eval(
        "const d = document.createElement('div'); d.id = 'forced'; \
         d.innerHTML = '<img src=x onerror=\"window.pwned=1\">'; document.body.append(d); true",
    )
    .await;
    // The refused handler is the proof: the error event came and its handler did not run.
    page.wait_true("window.violations.includes('script-src-attr')")
        .await;
    let after = page
        .eval("JSON.stringify({pwned: window.pwned === undefined ? null : window.pwned, v: window.violations})")
        .await;
    let after: serde_json::Value = serde_json::from_str(after.as_str().unwrap()).unwrap();
    assert_eq!(after["pwned"], serde_json::Value::Null, "{after}");
    drop(page);
    browser.close().await;
    h.shutdown().await;
}

/// Just enough of the Chrome DevTools Protocol (over a hand-rolled WebSocket: no new
/// dependency) to load a page, run expressions in it and read their values.
mod cdp {
    use serde_json::{json, Value};
    use std::path::PathBuf;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    /// Every step is bounded; a browser that does not answer fails the test loudly.
    const STEP: Duration = Duration::from_secs(20);

    pub fn find_chromium() -> Option<PathBuf> {
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    }

    pub struct Browser {
        child: tokio::process::Child,
        http: String,
        _profile: tempfile::TempDir,
    }

    impl Browser {
        pub async fn launch(bin: &std::path::Path) -> Browser {
            let profile = tempfile::tempdir().unwrap();
            let mut child = tokio::process::Command::new(bin)
                .args([
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--remote-debugging-port=0",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg("about:blank")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("start chromium");
            let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
            let ws = tokio::time::timeout(STEP, async {
                while let Some(l) = lines.next_line().await.unwrap() {
                    if let Some(u) = l.strip_prefix("DevTools listening on ") {
                        return u.trim().to_owned();
                    }
                }
                panic!("chromium exited without a DevTools address");
            })
            .await
            .expect("chromium prints its DevTools address");
            // Keep draining stderr so chromium never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            let host = ws
                .strip_prefix("ws://")
                .and_then(|r| r.split('/').next())
                .expect("ws:// address")
                .to_owned();
            Browser {
                child,
                http: format!("http://{host}"),
                _profile: profile,
            }
        }

        /// The page chromium opened.
        pub async fn page(&self) -> Page {
            let list: Vec<Value> = tokio::time::timeout(STEP, async {
                reqwest::get(format!("{}/json/list", self.http))
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap()
            })
            .await
            .expect("DevTools answers /json/list");
            let url = list
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .expect("a page target")
                .to_owned();
            Page {
                ws: Ws::connect(&url).await,
                next: 0,
            }
        }

        pub async fn close(mut self) {
            let _ = self.child.start_kill();
            let _ = tokio::time::timeout(STEP, self.child.wait()).await;
        }
    }

    pub struct Page {
        ws: Ws,
        next: u64,
    }

    impl Page {
        async fn call(&mut self, method: &str, params: Value) -> Value {
            self.next += 1;
            let id = self.next;
            self.ws
                .send(&json!({"id": id, "method": method, "params": params}).to_string())
                .await;
            tokio::time::timeout(STEP, async {
                loop {
                    let m: Value = serde_json::from_str(&self.ws.recv().await).unwrap();
                    if m["id"] == id {
                        if let Some(e) = m.get("error") {
                            panic!("{method}: {e}");
                        }
                        return m["result"].clone();
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no answer to {method} within {STEP:?}"))
        }

        pub async fn navigate(&mut self, url: &str) {
            self.call("Page.navigate", json!({ "url": url })).await;
        }

        /// The value of `expr` in the page.
        pub async fn eval(&mut self, expr: &str) -> Value {
            let r = self
                .call(
                    "Runtime.evaluate",
                    json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
                )
                .await;
            if let Some(e) = r.get("exceptionDetails") {
                panic!("{expr}: {e}");
            }
            r["result"]["value"].clone()
        }

        /// Poll `expr` until it is true; fail after [`STEP`].
        pub async fn wait_true(&mut self, expr: &str) {
            let deadline = tokio::time::Instant::now() + STEP;
            loop {
                let v = self
                    .call(
                        "Runtime.evaluate",
                        json!({"expression": expr, "returnByValue": true}),
                    )
                    .await;
                if v["result"]["value"] == true {
                    return;
                }
                if tokio::time::Instant::now() > deadline {
                    panic!("timed out after {STEP:?} waiting for {expr}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// A WebSocket client for one local connection: text frames, masked as clients must.
    struct Ws {
        s: TcpStream,
        buf: Vec<u8>,
    }

    impl Ws {
        async fn connect(url: &str) -> Ws {
            let rest = url.strip_prefix("ws://").expect("ws:// url");
            let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let mut s = tokio::time::timeout(STEP, TcpStream::connect(host))
                .await
                .expect("connect DevTools in time")
                .expect("connect DevTools");
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            let end = tokio::time::timeout(STEP, async {
                loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        return i + 4;
                    }
                    let mut chunk = vec![0u8; 1024];
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "DevTools closed during the handshake");
                    buf.extend_from_slice(&chunk[..n]);
                }
            })
            .await
            .expect("WebSocket handshake in time");
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            assert!(
                head.starts_with("HTTP/1.1 101"),
                "handshake refused: {head}"
            );
            buf.drain(..end);
            Ws { s, buf }
        }

        async fn send(&mut self, text: &str) {
            let p = text.as_bytes();
            let mut f = vec![0x81u8];
            match p.len() {
                n if n < 126 => f.push(0x80 | n as u8),
                n if n <= 0xffff => {
                    f.push(0x80 | 126);
                    f.extend_from_slice(&(n as u16).to_be_bytes());
                }
                n => {
                    f.push(0x80 | 127);
                    f.extend_from_slice(&(n as u64).to_be_bytes());
                }
            }
            let mask = [0x37u8, 0xfa, 0x21, 0x3d];
            f.extend_from_slice(&mask);
            f.extend(p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            self.s.write_all(&f).await.unwrap();
        }

        async fn need(&mut self, n: usize) {
            while self.buf.len() < n {
                // On the heap: a 64 KiB array would live in every future that awaits this.
                let mut chunk = vec![0u8; 64 * 1024];
                let got = self.s.read(&mut chunk).await.unwrap();
                assert!(got > 0, "DevTools closed the connection");
                self.buf.extend_from_slice(&chunk[..got]);
            }
        }

        /// The next whole text message (continuation frames joined; pings ignored).
        async fn recv(&mut self) -> String {
            let mut msg = Vec::new();
            loop {
                self.need(2).await;
                let (b0, b1) = (self.buf[0], self.buf[1]);
                let (mut at, mut len) = (2usize, (b1 & 0x7f) as usize);
                if len == 126 {
                    self.need(4).await;
                    len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
                    at = 4;
                } else if len == 127 {
                    self.need(10).await;
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.buf[2..10]);
                    len = u64::from_be_bytes(b) as usize;
                    at = 10;
                }
                assert_eq!(b1 & 0x80, 0, "servers do not mask frames");
                self.need(at + len).await;
                let payload: Vec<u8> = self.buf.drain(..at + len).skip(at).collect();
                match b0 & 0x0f {
                    0x0 | 0x1 => msg.extend_from_slice(&payload),
                    0x8 => panic!("DevTools closed the WebSocket"),
                    _ => continue,
                }
                if b0 & 0x80 != 0 {
                    return String::from_utf8(msg).expect("text frame");
                }
            }
        }
    }
}
