//! Hostile input (SPEC §4.2): oversize, slow, deep and many-header requests are
//! refused by the handler or the server limits, nothing is stored, and the process
//! stays up with bounded memory.

use std::time::Duration;

use webhook_relay::app::Role;

use crate::common::raw_http::{Feed, exchange, post_head};
use crate::common::{Inspector, TestApp};

const DEADLINE: Duration = Duration::from_secs(20);

fn nested(levels: usize) -> String {
    format!("{}{}", "[".repeat(levels), "]".repeat(levels))
}

async fn assert_still_serving(app: &TestApp) {
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "process still answers");
    let r = app
        .post("/webhook/receive", r#"{"id":"still-ok"}"#, &[])
        .await;
    assert_eq!(r.status(), 202, "and still takes events");
}

#[tokio::test]
async fn a_declared_oversize_body_is_refused_before_it_is_sent() {
    // With a long request timeout, an answer can only come this fast if the body was
    // never waited for.
    let app = TestApp::spawn(
        Role::Receiver,
        &[
            ("INLINE_DELIVERY", "false"),
            ("REQUEST_TIMEOUT_MS", "120000"),
        ],
    )
    .await;
    let head = post_head("/webhook/receive", &[], Some(1 << 30));
    let x = exchange(app.addr, head, Feed::Nothing, DEADLINE).await;
    let r = x.response.expect("an answer");
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["status"], "error");
    let inspect = Inspector::connect().await;
    assert_eq!(inspect.total(app.topology()).await, 0);
    inspect.close().await;
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn a_streamed_oversize_body_is_cut_off_at_the_limit() {
    let app = TestApp::spawn(
        Role::Receiver,
        &[("INLINE_DELIVERY", "false"), ("MAX_BODY_BYTES", "65536")],
    )
    .await;
    // Chunked, no length: 64 MiB offered in 64 KiB chunks.
    let mut chunk = format!("{:x}\r\n", 65536).into_bytes();
    chunk.extend(std::iter::repeat_n(b' ', 65536));
    chunk.extend_from_slice(b"\r\n");
    let head = post_head(
        "/webhook/receive",
        &["transfer-encoding: chunked".into()],
        None,
    );
    let x = exchange(
        app.addr,
        head,
        Feed::Repeat { chunk, times: 1024 },
        DEADLINE,
    )
    .await;
    assert_eq!(x.response.expect("an answer").status, 413);
    println!(
        "streamed oversize: client had written {} KiB of 65536 KiB when refused",
        x.written >> 10
    );
    assert!(
        x.written < 32 << 20,
        "the relay kept reading past its limit: {} bytes taken",
        x.written
    );
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn a_slow_body_is_cut_off_with_408() {
    let app = TestApp::spawn(
        Role::Receiver,
        &[("INLINE_DELIVERY", "false"), ("REQUEST_TIMEOUT_MS", "500")],
    )
    .await;
    // 64 bytes, one every 100 ms: 6.4 s to send in full.
    let body = format!(r#"{{"id":"slow","pad":"{}"}}"#, "x".repeat(40)).into_bytes();
    let len = body.len();
    let head = post_head("/webhook/receive", &[], Some(len));
    let head_len = head.len();
    let x = exchange(
        app.addr,
        head,
        Feed::Trickle(body, Duration::from_millis(100)),
        DEADLINE,
    )
    .await;
    let r = x.response.expect("an answer");
    assert_eq!(r.status, 408);
    assert_eq!(r.json()["status"], "error");
    assert!(
        x.written - head_len < len,
        "cut off before the body was complete"
    );
    let inspect = Inspector::connect().await;
    assert_eq!(inspect.total(app.topology()).await, 0, "nothing stored");
    inspect.close().await;
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn slow_headers_are_disconnected() {
    let app = TestApp::spawn(
        Role::Receiver,
        &[("INLINE_DELIVERY", "false"), ("REQUEST_TIMEOUT_MS", "500")],
    )
    .await;
    // The request line at once, then the headers a byte every 100 ms (10 s in full).
    let head = b"POST /webhook/receive HTTP/1.1\r\n".to_vec();
    let rest = format!(
        "host: relay\r\nx-slow: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        "y".repeat(60)
    )
    .into_bytes();
    let total = head.len() + rest.len();
    let x = exchange(
        app.addr,
        head,
        Feed::Trickle(rest, Duration::from_millis(100)),
        DEADLINE,
    )
    .await;
    assert!(x.response.is_none() || x.response.as_ref().is_some_and(|r| r.status == 408));
    assert!(
        x.written < total,
        "disconnected before the headers were complete"
    );

    // A client that connects and says nothing is dropped too, and so is one that
    // stalls inside the HTTP/2 preface (the protocol is not even known yet).
    for opening in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
        let x = exchange(app.addr, opening.to_vec(), Feed::Nothing, DEADLINE).await;
        assert!(
            x.response.is_none(),
            "{opening:?} answered {:?}",
            x.response
        );
    }
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn many_or_huge_headers_are_refused_by_the_server() {
    let app = TestApp::spawn(Role::Receiver, &[("INLINE_DELIVERY", "false")]).await;
    let send = |headers: Vec<String>| {
        let head = post_head("/webhook/receive", &headers, Some(2));
        exchange(app.addr, head, Feed::All(b"{}".to_vec()), DEADLINE)
    };
    // 100 headers in all (host, content-type and content-length are the other three)
    // are taken; one more is refused, as is any number beyond.
    let extra = |n: usize| (0..n).map(|i| format!("x-h{i}: {i}")).collect::<Vec<_>>();
    assert_eq!(
        send(extra(97)).await.response.expect("an answer").status,
        202
    );
    assert_eq!(
        send(extra(98)).await.response.expect("an answer").status,
        431
    );
    assert_eq!(
        send(extra(150)).await.response.expect("an answer").status,
        431
    );
    let huge = vec![format!("x-big: {}", "b".repeat(20 * 1024))];
    assert_eq!(send(huge).await.response.expect("an answer").status, 431);

    let over = vec![format!("x-big: {}", "b".repeat(9 * 1024))];
    assert_eq!(send(over).await.response.expect("an answer").status, 431);

    // The limits leave room for real senders: 90 headers, a 6 KiB value (the head
    // limit is 8 KiB, the default of Tomcat and Jetty; a Genesys head is about 1 KiB).
    let fine: Vec<String> = (0..90).map(|i| format!("x-h{i}: {i}")).collect();
    assert_eq!(send(fine).await.response.expect("an answer").status, 202);
    let big_but_fine = vec![format!("x-big: {}", "b".repeat(6 * 1024))];
    assert_eq!(
        send(big_but_fine).await.response.expect("an answer").status,
        202
    );

    let inspect = Inspector::connect().await;
    assert_eq!(
        inspect.count(&app.topology().work).await,
        3,
        "only the three acceptable requests stored"
    );
    inspect.close().await;
    assert_still_serving(&app).await;
}

#[tokio::test]
async fn nesting_is_limited_to_64_levels() {
    let app = TestApp::spawn(Role::Receiver, &[("INLINE_DELIVERY", "false")]).await;
    let r = app.post("/webhook/receive", &nested(64), &[]).await;
    assert_eq!(r.status(), 202);
    let r = app.post("/webhook/receive", &nested(65), &[]).await;
    assert_eq!(r.status(), 400);
    let json: serde_json::Value = r.json().await.unwrap();
    assert!(
        json["error"].as_str().unwrap().contains("deeper than 64"),
        "{json}"
    );
    // A megabyte of openers: refused without recursing (the process would die otherwise).
    let r = app
        .post("/webhook/receive", &"[".repeat(1_000_000), &[])
        .await;
    assert_eq!(r.status(), 400);
    let inspect = Inspector::connect().await;
    assert_eq!(inspect.count(&app.topology().work).await, 1);
    inspect.close().await;
    assert_still_serving(&app).await;
}

/// The relay binary under mixed hostile traffic: it answers every request as it
/// should, keeps serving, its peak memory stays far below what was thrown at it, it
/// logs no credential, and it stops cleanly on SIGTERM.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn hostile_traffic_leaves_the_process_up_with_bounded_memory() {
    use std::process::Stdio;

    use crate::auth::hub_signature;
    use crate::common::{amqp_url, eventually, unique_prefix};

    const TOKEN: &str = "mem-token-51c9e2";
    const HMAC_KEY: &str = "mem-hmac-key-77d0";
    const WAVE: usize = 24;

    let prefix = unique_prefix("hostile");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log_path = std::env::temp_dir().join(format!("{prefix}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let ladder =
        webhook_relay::retry::Ladder::new(Duration::from_millis(20), Duration::from_millis(200));
    let topology = webhook_relay::broker::Topology::new(&prefix, &ladder);
    // The queues and the log go away however the test ends.
    let _cleanup = Cleanup {
        topology: topology.clone(),
        log: log_path.clone(),
    };
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_webhook-relay"))
        .arg("receiver")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AMQP_URL", amqp_url())
        .env("QUEUE_PREFIX", &prefix)
        .env("LISTEN_ADDR", addr.to_string())
        .env("INLINE_DELIVERY", "false")
        .env("BACKOFF_BASE_MS", "20")
        .env("BACKOFF_MAX_MS", "200")
        .env("REQUEST_TIMEOUT_MS", "5000")
        .env("INBOUND_TOKEN", TOKEN)
        .env("INBOUND_TOKEN_HEADER", "x-api-key")
        .env("INBOUND_HMAC_SECRET", HMAC_KEY)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("relay binary starts");
    let pid = child.id().expect("running");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(20), "relay ready", || async {
        http.get(format!("http://{addr}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let memory = |field: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    };
    let rss_before = memory("VmRSS:");

    let key = format!("x-api-key: {TOKEN}");
    let signed = |body: &[u8]| {
        vec![
            key.clone(),
            format!("x-hub-signature-256: {}", hub_signature(HMAC_KEY, body)),
        ]
    };
    let mut chunk = format!("{:x}\r\n", 65536).into_bytes();
    chunk.extend(std::iter::repeat_n(b' ', 65536));
    chunk.extend_from_slice(b"\r\n");
    let deep = "[".repeat(1_000_000).into_bytes();
    let mut wide = br#"{"eventId":"wide","data":["#.to_vec();
    while wide.len() < 1_000_000 {
        wide.extend_from_slice(b"0,");
    }
    wide.extend_from_slice(b"0]}");

    // (acceptable answers, none meaning a close; head; the rest)
    let mut attacks: Vec<(&[u16], Vec<u8>, Feed)> = Vec::new();
    for _ in 0..WAVE {
        // Declares a gigabyte, sends 16 MiB.
        attacks.push((
            &[413],
            post_head(
                "/webhook/receive",
                std::slice::from_ref(&key),
                Some(1 << 30),
            ),
            Feed::Repeat {
                chunk: vec![b' '; 65536],
                times: 256,
            },
        ));
        // Chunked, 16 MiB offered. Refused at the limit, or at the request timeout when
        // this busy machine cannot take the first megabyte in time: refused either way.
        attacks.push((
            &[413, 408],
            post_head(
                "/webhook/receive",
                &[key.clone(), "transfer-encoding: chunked".into()],
                None,
            ),
            Feed::Repeat {
                chunk: chunk.clone(),
                times: 256,
            },
        ));
        // Slowloris body.
        attacks.push((
            &[408],
            post_head("/webhook/receive", std::slice::from_ref(&key), Some(1000)),
            Feed::Trickle(vec![b' '; 1000], Duration::from_millis(100)),
        ));
        // Slowloris headers: answered by a close.
        attacks.push((
            &[],
            b"POST /webhook/receive HTTP/1.1\r\n".to_vec(),
            Feed::Trickle(vec![b'x'; 1000], Duration::from_millis(100)),
        ));
        // Connects and says nothing.
        attacks.push((&[], Vec::new(), Feed::Nothing));
        // Too many headers, too large a header.
        let many: Vec<String> = (0..300)
            .map(|i| format!("x-h{i}: {}", "v".repeat(100)))
            .collect();
        attacks.push((
            &[431],
            post_head("/webhook/receive", &many, Some(2)),
            Feed::All(b"{}".to_vec()),
        ));
        attacks.push((
            &[431],
            post_head(
                "/webhook/receive",
                &[format!("x-big: {}", "b".repeat(200_000))],
                Some(2),
            ),
            Feed::All(b"{}".to_vec()),
        ));
        // A megabyte of nesting, correctly signed.
        attacks.push((
            &[400, 408],
            post_head("/webhook/receive", &signed(&deep), Some(deep.len())),
            Feed::All(deep.clone()),
        ));
        // Wrong credentials.
        attacks.push((
            &[401],
            post_head("/webhook/receive", &["x-api-key: guessed".into()], Some(2)),
            Feed::All(b"{}".to_vec()),
        ));
    }
    for _ in 0..8 {
        // Valid, a megabyte wide, signed: stored.
        attacks.push((
            &[202],
            post_head("/webhook/receive", &signed(&wide), Some(wide.len())),
            Feed::All(wide.clone()),
        ));
    }
    let offered: usize = attacks
        .iter()
        .map(|(_, head, feed)| {
            head.len()
                + match feed {
                    Feed::Nothing => 0,
                    Feed::All(b) | Feed::Trickle(b, _) => b.len(),
                    Feed::Repeat { chunk, times } => chunk.len() * times,
                }
        })
        .sum();
    let outcomes =
        futures_util::future::join_all(attacks.into_iter().map(|(want, head, feed)| async move {
            let x = exchange(addr, head, feed, Duration::from_secs(30)).await;
            (want, x.response.map(|r| r.status), x.written)
        }))
        .await;
    let mut taken = 0;
    for (want, got, written) in &outcomes {
        taken += written;
        if want.is_empty() {
            assert!(
                got.is_none() || *got == Some(408),
                "slow headers answered {got:?}"
            );
        } else {
            assert!(
                got.is_some_and(|g| want.contains(&g)),
                "answered {got:?}, expected one of {want:?}"
            );
        }
    }

    assert!(
        child.try_wait().unwrap().is_none(),
        "the relay is still running"
    );
    let r = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rss_after = memory("VmRSS:");
    let peak = memory("VmHWM:");
    println!(
        "hostile traffic: {} requests, {} MiB offered, {} MiB written by clients; relay RSS {} MiB before, {} MiB after, peak {} MiB",
        outcomes.len(),
        offered >> 20,
        taken >> 20,
        rss_before >> 10,
        rss_after >> 10,
        peak >> 10
    );
    assert!(
        peak < 256 * 1024,
        "peak RSS {} MiB: memory grows with what clients send, not with the limits",
        peak >> 10
    );

    // SIGTERM: a graceful stop, exit 0.
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");

    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(logs.contains("webhook-relay started"), "logs were captured");
    for secret in [TOKEN, HMAC_KEY, "guessed"] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }

    let inspect = Inspector::connect().await;
    assert_eq!(
        inspect.count(&topology.work).await,
        8,
        "exactly the valid events stored"
    );
    inspect.close().await;
}

/// Deletes a subprocess relay's queues and its log file on drop.
#[cfg(target_os = "linux")]
struct Cleanup {
    topology: webhook_relay::broker::Topology,
    log: std::path::PathBuf,
}

#[cfg(target_os = "linux")]
impl Drop for Cleanup {
    fn drop(&mut self) {
        crate::common::delete_topology_blocking(self.topology.clone());
        let _ = std::fs::remove_file(&self.log);
    }
}
