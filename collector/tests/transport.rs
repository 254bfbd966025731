//! The real `tracklet-collector` binary under connection-level abuse: slowloris, idle
//! keep-alive connections, the connection cap, and made-up HTTP methods in the metrics.
//! Raw TCP to 127.0.0.1 only; every wait is bounded.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

const HEALTHZ_KEEP_ALIVE: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
const HEALTHZ_CLOSE: &[u8] =
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
const HEALTHY: &str = r#"{"status":"ok"}"#;

/// The binary serving on 127.0.0.1:`port`; killed when dropped.
struct Collector {
    child: Child,
    port: u16,
    _db: TestDb,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Collector {
    /// `serve` with `args` added, once it answers `/healthz` (on connections it closes, so
    /// none is left holding a slot).
    async fn start(args: &[&str]) -> Collector {
        let db = TestDb::create().await;
        let port = free_port();
        let child = serve_binary(&db.url, port, args, &[]);
        let server = Collector {
            child,
            port,
            _db: db,
        };
        for _ in 0..200 {
            if let Ok(mut stream) = server.connect().await {
                if let Ok(text) = send_and_read_to_end(&mut stream, HEALTHZ_CLOSE).await {
                    if text.contains(HEALTHY) {
                        return server;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("collector did not start");
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        TcpStream::connect(("127.0.0.1", self.port)).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

/// Sends `request` and reads until the server closes (5 s at most).
async fn send_and_read_to_end(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<String> {
    stream.write_all(request).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::other("no close within 5 s"))??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Reads until `needle` has arrived, within `limit`; what arrived (None on timeout/close).
async fn read_until(stream: &mut TcpStream, needle: &str, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if text.contains(needle) {
            return Some(text.into_owned());
        }
    }
}

/// A keep-alive connection that has been served one `/healthz`.
async fn served_keep_alive(server: &Collector) -> TcpStream {
    let mut stream = server.connect().await.unwrap();
    stream.write_all(HEALTHZ_KEEP_ALIVE).await.unwrap();
    let answer = read_until(&mut stream, HEALTHY, Duration::from_secs(5)).await;
    assert!(
        answer
            .as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 200")),
        "{answer:?}"
    );
    stream
}

/// How long after `since` the server closed `stream` (EOF or reset), reading (and
/// discarding) whatever it sends; None if still open after `limit`.
async fn closed_after(stream: &mut TcpStream, since: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::from_std(since + limit);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_at_the_header_read_timeout() {
    let server = Collector::start(&[
        "--header-read-timeout-secs",
        "2",
        "--idle-timeout-secs",
        "60",
    ])
    .await;

    // A request head that never ends: one more header line every 300 ms.
    let mut slow = server.connect().await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    // And a connection that says nothing at all.
    let mut silent = server.connect().await.unwrap();

    let mut closed = None;
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(8) {
        n += 1;
        // Writes may fail once the server has closed: that is the point.
        let _ = slow
            .write_all(format!("X-Slow-{n}: a\r\n").as_bytes())
            .await;
        if closed_after(&mut slow, Instant::now(), Duration::from_millis(300))
            .await
            .is_some()
        {
            closed = Some(started.elapsed());
            break;
        }
    }
    let closed = closed.expect("a slowloris connection was kept open for 8 s");
    assert!(
        closed >= Duration::from_millis(1500) && closed <= Duration::from_secs(6),
        "closed after {closed:?}; the header read timeout is 2 s"
    );
    let silent_closed = closed_after(&mut silent, started, Duration::from_secs(6)).await;
    assert!(
        silent_closed.is_some_and(|t| t >= Duration::from_millis(1500)),
        "silent connection: {silent_closed:?}"
    );

    // The server still answers.
    let mut fresh = server.connect().await.unwrap();
    let answer = send_and_read_to_end(&mut fresh, HEALTHZ_CLOSE)
        .await
        .unwrap();
    assert!(answer.contains(HEALTHY), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    // The header read timeout (30 s) is far away: only the idle timeout can close these.
    let server = Collector::start(&[
        "--header-read-timeout-secs",
        "30",
        "--idle-timeout-secs",
        "2",
    ])
    .await;
    let mut first = served_keep_alive(&server).await;
    let idle_from = Instant::now();
    // Still usable within the idle timeout, and a request restarts its clock.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    first.write_all(HEALTHZ_KEEP_ALIVE).await.unwrap();
    assert!(
        read_until(&mut first, HEALTHY, Duration::from_secs(3))
            .await
            .is_some(),
        "keep-alive connection closed after {:?}, before its idle timeout",
        idle_from.elapsed()
    );
    let idle_from = Instant::now();
    let closed = closed_after(&mut first, idle_from, Duration::from_secs(8)).await;
    assert!(
        closed.is_some_and(|t| t >= Duration::from_millis(1500) && t <= Duration::from_secs(5)),
        "idle keep-alive connection closed after {closed:?}; the idle timeout is 2 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_new_connections_wait_for_a_free_slot() {
    let server = Collector::start(&[
        "--max-connections",
        "4",
        "--header-read-timeout-secs",
        "30",
        "--idle-timeout-secs",
        "30",
    ])
    .await;
    // Four idle keep-alive connections hold every slot.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(served_keep_alive(&server).await);
    }
    // A fifth connects (the kernel's backlog) but is not served...
    let mut fifth = server.connect().await.unwrap();
    fifth.write_all(HEALTHZ_CLOSE).await.unwrap();
    let early = read_until(&mut fifth, HEALTHY, Duration::from_millis(1500)).await;
    assert!(early.is_none(), "served beyond the cap: {early:?}");
    // ...until one of the four goes away.
    drop(held.pop());
    let answer = read_until(&mut fifth, HEALTHY, Duration::from_secs(5)).await;
    assert!(
        answer
            .as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 200")),
        "not served once a slot freed: {answer:?}"
    );
    drop(fifth);
    drop(held);
    // With every slot free again, ordinary traffic is served: 8 requests at once on 8
    // connections the client closes after its answer (a pooling client would hold slots
    // with its idle connections); the last four wait for the first ones to close.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let answers = futures_util::future::join_all((0..8).map(|_| {
        let client = client.clone();
        let url = server.url("/healthz");
        async move {
            tokio::time::timeout(Duration::from_secs(5), async {
                let r = client.get(url).send().await.ok()?;
                Some(r.status().as_u16())
            })
            .await
            .ok()
            .flatten()
        }
    }))
    .await;
    assert!(answers.iter().all(|a| *a == Some(200)), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_do_not_create_metric_series() {
    let server = Collector::start(&[]).await;
    let client = reqwest::Client::new();
    for i in 0..50 {
        let name = format!("ZZMADEUP{i}");
        let method = reqwest::Method::from_bytes(name.as_bytes()).unwrap();
        let path = if i % 2 == 0 {
            "/healthz"
        } else {
            "/no/such/route"
        };
        let status = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(method, server.url(path)).send(),
        )
        .await
        .expect("answered in time")
        .expect("answered")
        .status();
        assert!(status.is_client_error(), "{name} {path}: {status}");
    }
    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("ZZMADEUP"),
        "made-up methods in the metrics:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tracklet_http_requests_total")
                && l.contains(r#"method="other""#)
                && l.contains(r#"route="/healthz""#)),
        "made-up methods not counted as method=\"other\":\n{metrics}"
    );
    assert!(
        !metrics.contains("/no/such/route"),
        "unmatched paths must be route=\"other\":\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_are_served_and_must_start_a_request_in_time() {
    let server = Collector::start(&[
        "--header-read-timeout-secs",
        "2",
        "--idle-timeout-secs",
        "60",
    ])
    .await;
    // The HTTP/2 preface and an empty SETTINGS frame, then nothing: no request ever starts.
    let mut h2 = server.connect().await.unwrap();
    let started = Instant::now();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // The server speaks HTTP/2 back: its first frame is SETTINGS (type 4).
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(2), h2.read_exact(&mut head))
        .await
        .expect("an answer to the preface")
        .expect("an answer to the preface");
    assert_eq!(head[3], 4, "first frame {head:?}");
    let closed = closed_after(&mut h2, started, Duration::from_secs(8)).await;
    assert!(
        closed.is_some_and(|t| t >= Duration::from_millis(1500) && t <= Duration::from_secs(6)),
        "an HTTP/2 connection without a request was closed after {closed:?}"
    );

    // A request over HTTP/2 (prior knowledge) is answered: GET /healthz on stream 1.
    let mut h2 = server.connect().await.unwrap();
    let mut request =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec();
    // HPACK: :method GET, :scheme http, :path "/healthz" (literal, name from the table).
    let block: Vec<u8> = [&[0x82, 0x86, 0x04, 8][..], b"/healthz"].concat();
    request.extend_from_slice(&[0, 0, block.len() as u8, 1, 0x05, 0, 0, 0, 1]);
    request.extend_from_slice(&block);
    h2.write_all(&request).await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut head = [0u8; 9];
            h2.read_exact(&mut head).await.ok()?;
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            h2.read_exact(&mut payload).await.ok()?;
            if head[3] == 1 && head[5..9] == [0, 0, 0, 1] {
                return payload.first().copied();
            }
        }
    })
    .await
    .ok()
    .flatten();
    // 0x88: the static table's `:status 200`.
    assert_eq!(status, Some(0x88), "HTTP/2 answer to GET /healthz");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_connections_at_once() {
    let mut server = Collector::start(&["--idle-timeout-secs", "60"]).await;
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(served_keep_alive(&server).await);
    }
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    for stream in &mut idle {
        let closed = closed_after(stream, started, Duration::from_secs(5)).await;
        assert!(
            closed.is_some(),
            "an idle connection kept open after SIGTERM"
        );
    }
    // It exits well before the 30 s shutdown timeout.
    let mut status = None;
    for _ in 0..100 {
        status = server.child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "collector still running or failed 5 s after SIGTERM: {status:?}"
    );
}

#[test]
fn serve_help_lists_the_connection_limits() {
    let (ok, help, stderr) = run_cli(&["serve", "--help"]);
    assert!(ok, "{stderr}");
    for flag in [
        "--max-connections",
        "TRACKLET_MAX_CONNECTIONS",
        "--header-read-timeout-secs",
        "TRACKLET_HEADER_READ_TIMEOUT_SECS",
        "--idle-timeout-secs",
        "TRACKLET_IDLE_TIMEOUT_SECS",
    ] {
        assert!(help.contains(flag), "{flag} missing in:\n{help}");
    }
}
