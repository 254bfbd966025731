//! The real `tracklet-collector` binary: CLI output, and SIGTERM draining.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn projects_add_list_remove_print_json() {
    let path = std::env::temp_dir().join(format!(
        "tracklet-cli-{}.sqlite3",
        uuid::Uuid::new_v4().simple()
    ));
    let db = path.to_str().unwrap();
    let (ok, stdout, stderr) = run_cli(&[
        "projects",
        "add",
        "--sqlite-path",
        db,
        "--name",
        "site",
        "--origin",
        "https://a.example",
        "--origin",
        "https://b.example",
        "--rate-limit",
        "50",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.lines().count(),
        1,
        "exactly one line of JSON: {stdout}"
    );
    let p: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for key in [
        "id",
        "name",
        "write_key",
        "read_key",
        "origins",
        "rate_limit",
    ] {
        assert!(p.get(key).is_some(), "{key} missing in {stdout}");
    }
    assert_eq!(
        p["origins"],
        serde_json::json!(["https://a.example", "https://b.example"])
    );
    assert_eq!(p["rate_limit"], 50);
    let (ok, _, _) = run_cli(&[
        "projects",
        "add",
        "--sqlite-path",
        db,
        "--name",
        "site",
        "--origin",
        "x",
    ]);
    assert!(!ok, "a second project with the same name is refused");
    let (ok, stdout, _) = run_cli(&["--sqlite-path", db, "projects", "list"]);
    assert!(ok);
    let list: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(list, vec![p]);
    assert!(run_cli(&["projects", "remove", "--sqlite-path", db, "--name", "site"]).0);
    assert_eq!(
        run_cli(&["projects", "list", "--sqlite-path", db]).1.trim(),
        "[]"
    );
    assert!(!run_cli(&["projects", "remove", "--sqlite-path", db, "--name", "site"]).0);
    let (ok, help, _) = run_cli(&["serve", "--help"]);
    assert!(ok && help.contains("--static-dir") && help.contains("TRACKLET_LISTEN"));
    assert!(
        help.contains("--batch-receipt-ttl-days")
            && help.contains("TRACKLET_BATCH_RECEIPT_TTL_DAYS")
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{db}{suffix}"));
    }
}

/// `serve` on 127.0.0.1:`port` against `database_url`, with `env` set, quiet.
fn serve(database_url: &str, port: u16, env: &[(&str, &str)]) -> std::process::Child {
    serve_binary(database_url, port, &[], env)
}

fn sigterm(server: &std::process::Child) {
    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_deletes_receipts_older_than_the_ttl() {
    let (ok, _, stderr) = run_cli(&["serve", "--batch-receipt-ttl-days", "0"]);
    assert!(!ok && stderr.contains("batch-receipt-ttl-days"), "{stderr}");

    let db = TestDb::create().await;
    let (ok, _, stderr) = run_cli(&["migrate", "--database-url", &db.url]);
    assert!(ok, "{stderr}");
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(
        "INSERT INTO batch_receipts (project_id, batch_id, received_at) VALUES \
         (gen_random_uuid(), 'old', now() - interval '8 days'), \
         (gen_random_uuid(), 'young', now() - interval '6 days')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let port = free_port();
    let mut server = serve(&db.url, port, &[("TRACKLET_BATCH_RECEIPT_TTL_DAYS", "7")]);
    if let Err(why) = wait_until_serving(&mut server, port).await {
        panic!("{why}");
    }
    // The cleanup runs at start, then hourly.
    let mut left = Vec::new();
    for _ in 0..100 {
        left = sqlx::query_scalar::<_, String>("SELECT batch_id FROM batch_receipts")
            .fetch_all(&pool)
            .await
            .unwrap();
        if left.len() < 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left, ["young"]);
    sigterm(&server);
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "collector exit status {status:?}");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_keeps_every_acknowledged_event() {
    let db = TestDb::create().await;
    let (ok, stdout, stderr) = run_cli(&[
        "projects",
        "add",
        "--database-url",
        &db.url,
        "--name",
        "p",
        "--origin",
        ORIGIN,
    ]);
    assert!(ok, "{stderr}");
    let project: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let key = project["write_key"].as_str().unwrap().to_owned();

    let port = free_port();
    let mut server = serve(&db.url, port, &[]);
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/batch?key={key}");
    if let Err(why) = wait_until_serving(&mut server, port).await {
        panic!("{why}");
    }

    // Eight clients post batches of 20 until the server goes away.
    let mut clients = Vec::new();
    for c in 0..8u64 {
        let (client, url) = (client.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for b in 0..10_000u64 {
                let ids: Vec<u64> = (0..20).map(|i| c * 10_000_000 + b * 100 + i).collect();
                let body = gzip(&batch(
                    1_763_800_005_000,
                    ids.iter().map(|n| event(*n)).collect(),
                ));
                match client
                    .post(&url)
                    .header("content-type", "text/plain")
                    .body(body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => acked.extend(ids),
                    Ok(r) if r.status() == 503 => break,
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    sigterm(&server);
    let mut acked = Vec::new();
    for c in clients {
        acked.extend(c.await.unwrap());
    }
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "collector exit status {status:?}");
    assert!(
        !acked.is_empty(),
        "no batch was acknowledged before SIGTERM"
    );

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let stored: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM events")
        .fetch_all(&pool)
        .await
        .unwrap();
    let stored: std::collections::HashSet<String> = stored.iter().map(|u| u.to_string()).collect();
    for n in &acked {
        let id = format!("0190b6f0-0000-7000-8000-{n:012}");
        assert!(stored.contains(&id), "acknowledged event {id} was lost");
    }
    pool.close().await;
}
