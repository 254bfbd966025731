//! Postgres goes away and comes back: the collector answers 503 meanwhile, then recovers by
//! itself. The outage is simulated with a TCP proxy in front of the shared server (which must
//! not be stopped: other people use it).

mod common;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tracklet_collector::config::ServeConfig;
use tracklet_collector::http::{router, AppState};
use tracklet_collector::store::postgres::PgStore;
use tracklet_collector::store::{EventStore, Project};

/// Forwards connections to Postgres while up; refuses them (and cuts open ones) while down.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (up2, open2) = (up.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: connection closed at once
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                open2.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { addr, up, open }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for conn in self.open.lock().unwrap().drain(..) {
                conn.abort();
            }
        }
    }
}

#[tokio::test]
async fn database_outage_is_503_then_recovers_by_itself() {
    let db = TestDb::create().await;
    let direct = PgStore::connect(&db.url, 2).await.unwrap();
    direct.migrate().await.unwrap();
    let project = Project::new("p", vec![ORIGIN.to_owned()], None);
    direct.add_project(&project).await.unwrap();

    let options = PgConnectOptions::from_str(&db.url).unwrap();
    let proxy = Proxy::start(format!("{}:{}", options.get_host(), options.get_port())).await;
    let proxied = options.host("127.0.0.1").port(proxy.addr.port());
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(proxied);
    let store: Arc<dyn EventStore> = Arc::new(PgStore::from_pool(pool));
    let (state, _task) = AppState::new(ServeConfig::default(), store).await.unwrap();
    let app = TestApp {
        router: router(state),
        store: Arc::new(direct),
        project,
        db: Some(db),
        sqlite_file: None,
    };

    let first = app.post(batch(1_763_800_005_000, vec![event(1)])).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);

    proxy.set_up(false);
    let during = app.post(batch(1_763_800_005_000, vec![event(2)])).await;
    assert_eq!(
        during.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        during.text
    );
    assert!(during.headers.get("retry-after").is_some());
    assert_eq!(
        app.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    proxy.set_up(true);
    let mut recovered = false;
    for _ in 0..50 {
        let after = app.post(batch(1_763_800_005_000, vec![event(2)])).await;
        if after.status == StatusCode::OK {
            assert_eq!(after.json["accepted"], 1);
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "the collector did not recover after the database came back"
    );
    assert_eq!(app.get("/readyz").await.status, StatusCode::OK);
    assert_eq!(app.stored().await, 2);
}
