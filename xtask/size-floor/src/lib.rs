//! The least a browser SDK on the chosen crates can be: an options object read with
//! serde-wasm-bindgen, a status object written with it, one batch compressed with
//! miniz_oxide, a localStorage write with web-sys and a gloo-timers timeout, with talc as
//! the allocator. No queue, no retries, no autocapture: whatever the SDK weighs beyond this
//! is its own logic. `cargo xtask bench size-floor` builds it with and without each part.

use wasm_bindgen::prelude::*;

#[cfg(target_arch = "wasm32")]
#[global_allocator]
// SAFETY: one thread (the page's), as TalckWasm requires.
static ALLOC: talc::TalckWasm = unsafe { talc::TalckWasm::new_global() };

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Options {
    endpoint: Option<String>,
    max_batch_size: Option<f64>,
    debug: Option<bool>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    pending: u32,
    last_error: Option<String>,
    online: bool,
}

#[wasm_bindgen]
pub fn start(options: JsValue) -> JsValue {
    #[cfg(feature = "de")]
    let options: Options = serde_wasm_bindgen::from_value(options).unwrap_or_default();
    #[cfg(not(feature = "de"))]
    let options = {
        drop(options);
        Options::default()
    };
    let body = options.endpoint.unwrap_or_default().into_bytes();
    #[cfg(feature = "deflate")]
    let body = miniz_oxide::deflate::compress_to_vec(&body, 3);
    let pending = body.len() as u32 + options.max_batch_size.unwrap_or(0.0) as u32;
    if let Some(s) = web_sys::window().and_then(|w| w.local_storage().ok().flatten()) {
        let _ = s.set_item("k", if options.debug == Some(true) { "a" } else { "b" });
    }
    gloo_timers::callback::Timeout::new(10, || {
        if let Some(s) = web_sys::window().and_then(|w| w.local_storage().ok().flatten()) {
            let _ = s.remove_item("k");
        }
    })
    .forget();
    let status = Status {
        pending,
        last_error: None,
        online: true,
    };
    #[cfg(feature = "ser")]
    return serde_wasm_bindgen::to_value(&status).unwrap_or(JsValue::NULL);
    #[cfg(not(feature = "ser"))]
    JsValue::from(status.pending + u32::from(status.online) + status.last_error.map_or(0, |_| 1))
}
