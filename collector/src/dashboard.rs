//! `GET /dashboard`: the dashboard page (one HTML file, one script, one stylesheet, and the
//! vendored uPlot chart library's script, stylesheet and licence, all embedded in the binary
//! with `include_str!`; nothing is loaded from anywhere else). The page reads
//! the stats API of [`crate::analytics`] with a read key the user pastes (kept in the tab's
//! `sessionStorage`). See `docs/dashboard.md`.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../dashboard/index.html");
const APP_JS: &str = include_str!("../dashboard/app.js");
const APP_CSS: &str = include_str!("../dashboard/app.css");
/// uPlot, byte for byte as in the npm package of the version pinned in the root
/// `package.json` (`tests/e2e/dashboard.test.mjs` checks it; `npm run vendor-uplot` copies).
const UPLOT_JS: &str = include_str!("../dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../dashboard/vendor/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("../dashboard/vendor/uPlot.LICENSE");

/// The page's Content-Security-Policy: only its own origin; no inline script or style, no
/// framing, no plugins.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
form-action 'self'; frame-ancestors 'none'";

/// The dashboard's routes (stateless; merged into the collector's router).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/dashboard", get(index))
        .route("/dashboard/", get(index))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(stylesheet))
        .route(
            "/dashboard/vendor/uPlot.iife.min.js",
            get(|| async { answer("text/javascript; charset=utf-8", UPLOT_JS) }),
        )
        .route(
            "/dashboard/vendor/uPlot.min.css",
            get(|| async { answer("text/css; charset=utf-8", UPLOT_CSS) }),
        )
        .route(
            "/dashboard/vendor/uPlot.LICENSE",
            get(|| async { answer("text/plain; charset=utf-8", UPLOT_LICENSE) }),
        )
}

fn answer(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn index() -> Response {
    answer("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    answer("text/javascript; charset=utf-8", APP_JS)
}

async fn stylesheet() -> Response {
    answer("text/css; charset=utf-8", APP_CSS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    async fn get_path(path: &str) -> Response {
        routes::<()>()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn serves_the_three_files_with_their_types_and_the_csp() {
        for (path, ty) in [
            ("/dashboard", "text/html; charset=utf-8"),
            ("/dashboard/", "text/html; charset=utf-8"),
            ("/dashboard/app.js", "text/javascript; charset=utf-8"),
            ("/dashboard/app.css", "text/css; charset=utf-8"),
            (
                "/dashboard/vendor/uPlot.iife.min.js",
                "text/javascript; charset=utf-8",
            ),
            ("/dashboard/vendor/uPlot.min.css", "text/css; charset=utf-8"),
            (
                "/dashboard/vendor/uPlot.LICENSE",
                "text/plain; charset=utf-8",
            ),
        ] {
            let r = get_path(path).await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], ty, "{path}");
            assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
            assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_and_loads_nothing_from_elsewhere() {
        assert!(INDEX_HTML.contains(r#"<script type="module" src="/dashboard/app.js"></script>"#));
        assert!(
            INDEX_HTML.contains(r#"<script src="/dashboard/vendor/uPlot.iife.min.js"></script>"#)
        );
        assert_eq!(INDEX_HTML.matches("<script").count(), 2);
        assert!(!INDEX_HTML.contains("style="));
        for handler in [
            "onclick=",
            "onsubmit=",
            "onload=",
            "onchange=",
            "javascript:",
        ] {
            assert!(
                !INDEX_HTML.contains(handler),
                "no inline event handler {handler}"
            );
        }
        // uPlot's only URL is in its banner comment.
        let uplot_banner = UPLOT_JS.lines().next().unwrap_or_default();
        assert!(uplot_banner.starts_with("/*! https://github.com/leeoniya/uPlot (v"));
        let uplot_rest = &UPLOT_JS[uplot_banner.len()..];
        assert!(UPLOT_LICENSE.contains("MIT License"));
        for text in [INDEX_HTML, APP_JS, APP_CSS, uplot_rest, UPLOT_CSS] {
            // The SVG namespace is a name, not something loaded.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "no external URL"
            );
            assert!(!text.contains("//cdn") && !text.contains("@import"));
        }
        assert!(
            !APP_JS.contains("innerHTML"),
            "the script builds the DOM with nodes"
        );
        assert!(
            !UPLOT_JS.contains("eval(") && !UPLOT_JS.contains("new Function"),
            "uPlot runs under the CSP (no eval)"
        );
    }
}
