//! Events out and back in, with the real binary: `export` (NDJSON, CSV, gzip, ranges),
//! `import` (dedupe, a bad line), `GET /v1/export`, scheduled backups with rotation, and an
//! export's memory staying flat however many rows it writes. On Postgres, and on SQLite for
//! the round trip.

#[macro_use]
mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sqlx::Connection;

const T0: u64 = 1_763_800_000_000;

/// 50 events for `project` posted through `/v1/batch` in two batches, out of `ts` order.
async fn post_events(server: &Server, write_key: &str, first: u64, count: u64) {
    let client = reqwest::Client::new();
    let mut ids: Vec<u64> = (first..first + count).collect();
    // Out of order: odd ones first.
    ids.sort_by_key(|n| (n % 2 == 0, *n));
    for chunk in ids.chunks(25) {
        let events = chunk
            .iter()
            .map(|&n| {
                let mut e = event(n);
                e["name"] = serde_json::json!(if n % 5 == 0 {
                    "Song Played"
                } else {
                    "page_view"
                });
                e["props"] = serde_json::json!({"title": format!("song, \"{n}\""), "n": n});
                e
            })
            .collect();
        let answer = client
            .post(server.url(&format!("/v1/batch?key={write_key}")))
            .body(batch(T0 + 10_000, events))
            .send()
            .await
            .expect("post");
        assert_eq!(answer.status(), 200);
    }
}

fn cli(db: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = args.to_vec();
    all.extend(["--database-url", db]);
    run_cli(&all)
}

/// Runs SQL on the test's own database (either backend).
async fn execute(db: &str, sql: &str) {
    if db.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(db).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    } else {
        let mut conn = sqlx::PgConnection::connect(db).await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
}

fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect()
}

fn gunzip(bytes: &[u8]) -> String {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_string(&mut text)
        .expect("gzip");
    text
}

async fn round_trip(db: &str) {
    let shop = add_project_cli(db, "shop");
    let other = add_project_cli(db, "other");
    let server = Server::start(db, &[]).await;
    post_events(&server, shop["write_key"].as_str().unwrap(), 0, 50).await;
    post_events(&server, other["write_key"].as_str().unwrap(), 100, 5).await;
    drop(server);

    // NDJSON: every event once, in ts order, as stored.
    let (ok, ndjson, err) = cli(db, &["export", "--project", "shop"]);
    assert!(ok, "export: {err}");
    let rows = lines(&ndjson);
    assert_eq!(rows.len(), 50);
    let ts: Vec<&str> = rows.iter().map(|r| r["ts"].as_str().unwrap()).collect();
    let mut sorted = ts.clone();
    sorted.sort();
    assert_eq!(ts, sorted, "in ts order");
    assert_eq!(rows[0]["id"], event(0)["id"]);
    assert_eq!(rows[0]["name"], "Song Played");
    assert_eq!(
        rows[1]["props"],
        serde_json::json!({"title": "song, \"1\"", "n": 1})
    );
    assert_eq!(rows[1]["context"], serde_json::json!({"ua_hint": "x"}));
    assert!(rows[1]["enrichment"]["is_bot"].is_boolean());
    assert!(rows[1]["received_at"].is_string() && rows[1]["time"].is_string());

    // A range: ts from T0+10 (included) to T0+20 (excluded).
    let (from, to) = ((T0 + 10).to_string(), (T0 + 20).to_string());
    let (ok, part, _) = cli(
        db,
        &["export", "--project", "shop", "--from", &from, "--to", &to],
    );
    assert!(ok);
    let part = lines(&part);
    assert_eq!(part.len(), 10);
    assert_eq!(part[0]["id"], event(10)["id"]);

    // CSV: a header and a row per event; commas and quotes in props survive.
    let (ok, csv_text, _) = cli(db, &["export", "--project", "shop", "--format", "csv"]);
    assert!(ok);
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    assert_eq!(&reader.headers().unwrap()[9], "props");
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 50);
    let props: serde_json::Value = serde_json::from_str(&records[1][9]).unwrap();
    assert_eq!(props["title"], "song, \"1\"");

    // Gzipped into a file: the same bytes once inflated; no partial file left.
    let dir = tempdir();
    let file = dir.join("shop.ndjson.gz");
    let file_arg = file.to_str().unwrap();
    let (ok, _, err) = cli(
        db,
        &["export", "--project", "shop", "--gzip", "--out", file_arg],
    );
    assert!(ok, "{err}");
    assert_eq!(gunzip(&std::fs::read(&file).unwrap()), ndjson);
    assert!(!dir.join("shop.ndjson.gz.partial").exists());

    // Wipe the project's events, import the file: the same rows; again: all duplicates.
    let shop_id = shop["id"].as_str().unwrap();
    execute(
        db,
        &format!("DELETE FROM events WHERE project_id = '{shop_id}'"),
    )
    .await;
    let (ok, report, err) = cli(db, &["import", "--project", "shop", file_arg]);
    assert!(ok, "import: {err}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        report,
        serde_json::json!({"read": 50, "stored": 50, "duplicates": 0})
    );
    let (_, again, _) = cli(db, &["export", "--project", "shop"]);
    assert_eq!(again, ndjson, "export, wipe, import: the same rows");
    let (ok, report, _) = cli(db, &["import", "--project", "shop", file_arg]);
    assert!(ok);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        report,
        serde_json::json!({"read": 50, "stored": 0, "duplicates": 50})
    );
    let (_, others, _) = cli(db, &["export", "--project", "other"]);
    assert_eq!(lines(&others).len(), 5, "the other project untouched");

    // A bad line: the lines before it are stored, the error names the line.
    execute(
        db,
        &format!("DELETE FROM events WHERE project_id = '{shop_id}'"),
    )
    .await;
    let mut text: Vec<&str> = ndjson.lines().take(2).collect();
    text.push("{\"id\": 42}");
    text.extend(ndjson.lines().skip(2));
    let bad = dir.join("bad.ndjson");
    std::fs::write(&bad, text.join("\n")).unwrap();
    let (ok, report, err) = cli(db, &["import", "--project", "shop", bad.to_str().unwrap()]);
    assert!(!ok, "a bad line fails the import");
    assert!(err.contains("line 3"), "{err}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["stored"], 2);
    let (_, kept, _) = cli(db, &["export", "--project", "shop"]);
    assert_eq!(lines(&kept).len(), 2);

    // Unknown project: a clear error.
    let (ok, _, err) = cli(db, &["export", "--project", "nope"]);
    assert!(!ok && err.contains("no project named \"nope\""), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tracklet-export-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn export_and_import_round_trip_on_postgres() {
    let db = TestDb::create().await;
    round_trip(&db.url).await;
}

#[tokio::test]
async fn export_and_import_round_trip_on_sqlite() {
    let dir = tempdir();
    let url = format!("sqlite:{}", dir.join("events.sqlite3").display());
    round_trip(&url).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn http_export_streams_with_the_read_key() {
    let db = TestDb::create().await;
    let shop = add_project_cli(&db.url, "shop");
    let server = Server::start(&db.url, &[]).await;
    post_events(&server, shop["write_key"].as_str().unwrap(), 0, 50).await;
    let (_, cli_export, _) = cli(&db.url, &["export", "--project", "shop"]);
    let read_key = shop["read_key"].as_str().unwrap();
    let client = reqwest::Client::new();

    let answer = client
        .get(server.url("/v1/export"))
        .bearer_auth(read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "application/x-ndjson");
    assert_eq!(answer.text().await.unwrap(), cli_export);

    // gzip when asked (this client does not inflate by itself).
    let answer = client
        .get(server.url("/v1/export"))
        .bearer_auth(read_key)
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.headers()["content-encoding"], "gzip");
    assert_eq!(gunzip(&answer.bytes().await.unwrap()), cli_export);

    let answer = client
        .get(server.url(&format!(
            "/v1/export?key={read_key}&format=csv&from={}",
            T0 + 40
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    assert_eq!(answer.text().await.unwrap().lines().count(), 1 + 10);

    let write_key = shop["write_key"].as_str().unwrap();
    for (uri, status) in [
        (format!("/v1/export?key={write_key}"), 401),
        ("/v1/export".to_owned(), 401),
        (format!("/v1/export?key={read_key}&format=xml"), 400),
        (format!("/v1/export?key={read_key}&from=yesterday"), 400),
    ] {
        let answer = client.get(server.url(&uri)).send().await.unwrap();
        assert_eq!(answer.status(), status, "{uri}");
    }
}

#[tokio::test]
async fn scheduled_backups_are_complete_and_rotated() {
    let db = TestDb::create().await;
    let shop = add_project_cli(&db.url, "shop");
    add_project_cli(&db.url, "empty one");
    let dir = tempdir();
    // A leftover of an interrupted run is cleaned up.
    std::fs::write(
        dir.join("tracklet-shop-20200101T000000Z.ndjson.gz.partial"),
        "x",
    )
    .unwrap();
    let server = Server::start(&db.url, &[]).await;
    post_events(&server, shop["write_key"].as_str().unwrap(), 0, 50).await;
    drop(server);
    let dir_arg = dir.to_str().unwrap().to_owned();
    let server = Server::start(
        &db.url,
        &[
            "--backup-dir",
            &dir_arg,
            "--backup-every",
            "1s",
            "--backup-keep",
            "2",
        ],
    )
    .await;
    // The first run is at once (no backup yet), then one a second: four or five runs.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    drop(server);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let shop_files: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("tracklet-shop-"))
        .collect();
    let empty_files: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("tracklet-empty_one-"))
        .collect();
    assert_eq!(shop_files.len(), 2, "kept two: {names:?}");
    assert_eq!(empty_files.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n.ends_with(".ndjson.gz")), "{names:?}");
    for file in shop_files {
        let text = gunzip(&std::fs::read(dir.join(file)).unwrap());
        assert_eq!(lines(&text).len(), 50, "{file} holds every event");
    }
    // A backup restores with `import` (into a fresh project).
    add_project_cli(&db.url, "restored");
    let newest = dir.join(
        names
            .iter()
            .rfind(|n| n.starts_with("tracklet-shop-"))
            .unwrap(),
    );
    let (ok, report, err) = cli(
        &db.url,
        &["import", "--project", "restored", newest.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(report.contains("\"stored\":50"), "{report}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Peak resident memory (VmHWM) of a running process, in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    Some(
        kb.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?
            * 1024,
    )
}

#[tokio::test]
async fn an_export_larger_than_memory_streams() {
    let db = TestDb::create().await;
    let shop = add_project_cli(&db.url, "shop");
    let id = shop["id"].as_str().unwrap();
    // 200,000 events with 600 B of props each: about 190 MB of NDJSON.
    execute(
        &db.url,
        &format!(
            "INSERT INTO events (project_id, id, ts, name, anonymous_id, session_id, props, \
                 sent_at, received_at, time) \
             SELECT '{id}', gen_random_uuid(), t, 'page_view', 'anon-' || (n % 1000), \
                 'sess-' || (n % 5000), jsonb_build_object('pad', repeat('x', 600), 'n', n), \
                 t, t, t \
             FROM generate_series(1, 200000) AS n, \
                  LATERAL (SELECT timestamptz '2026-11-01' + n * interval '1 second' AS t) AS s"
        ),
    )
    .await;
    let mut child = Command::new(BIN)
        .args(["export", "--project", "shop", "--database-url", &db.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    // Count what comes out while watching the process's peak memory.
    let reader = std::thread::spawn(move || {
        let (mut bytes, mut newlines, mut buf) = (0u64, 0u64, vec![0u8; 1 << 16]);
        loop {
            let n = stdout.read(&mut buf).unwrap();
            if n == 0 {
                return (bytes, newlines);
            }
            bytes += n as u64;
            newlines += buf[..n].iter().filter(|b| **b == b'\n').count() as u64;
        }
    });
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(peak_rss(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (bytes, rows) = reader.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(rows, 200_000);
    assert!(
        bytes > 150_000_000,
        "the export is larger than the memory bound: {bytes} B"
    );
    assert!(peak > 0, "the process was observed");
    eprintln!(
        "export of {rows} rows, {bytes} B: peak RSS {} MiB",
        peak >> 20
    );
    assert!(
        peak < 100 * 1024 * 1024,
        "peak RSS {peak} B for a {bytes} B export"
    );
}
