//! Graceful shutdown as a small type: triggered once (SIGTERM, SIGINT, or by hand in tests),
//! observed by anyone holding a clone.
//!
//! `serve` stops accepting when it fires, finishes in-flight requests, then drains the commit
//! queue before exiting 0 (see `cli::serve`).

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    fired: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            fired: watch::Sender::new(false),
        }
    }

    /// Starts shutting down (idempotent).
    pub fn trigger(&self) {
        self.fired.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.fired.borrow()
    }

    /// Resolves once shutdown has been triggered.
    pub async fn wait(&self) {
        let mut rx = self.fired.subscribe();
        // Err means the sender is gone, which cannot happen while `self` holds it.
        let _ = rx.wait_for(|fired| *fired).await;
    }

    /// Triggers on SIGTERM or SIGINT (Ctrl-C).
    pub fn on_os_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = ctrl_c => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                        let _ = ctrl_c.await;
                    }
                }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
            tracing::info!(
                "shutdown signal received: finishing requests and draining the commit queue"
            );
            this.trigger();
        });
    }
}
