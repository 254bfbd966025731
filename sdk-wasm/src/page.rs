//! What the driver reads from the page: the clock, randomness, localStorage, privacy
//! signals and the context sent with every event.

use js_sys::Reflect;
use tracklet_wire::json::{push_str_literal, push_u64};
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{Storage, Window};

pub const SDK: &str = concat!("tracklet/", env!("CARGO_PKG_VERSION"));

pub fn window() -> Option<Window> {
    web_sys::window()
}

/// ms since the Unix epoch.
pub fn now() -> u64 {
    js_sys::Date::now() as u64
}

/// 64 random bits from `crypto.getRandomValues` (`Math.random` where it is missing).
pub fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    let crypto = window().and_then(|w| w.crypto().ok());
    match crypto.map(|c| c.get_random_values_with_u8_array(&mut bytes)) {
        Some(Ok(_)) => u64::from_le_bytes(bytes),
        _ => (js_sys::Math::random() * 9007199254740991.0) as u64 ^ now(),
    }
}

/// localStorage, if it can be written (it throws in sandboxed iframes and some private
/// modes; a probe write catches the rest).
pub fn storage() -> Option<Storage> {
    let s = window()?.local_storage().ok()??;
    s.set_item("tl1:probe", "1").ok()?;
    s.remove_item("tl1:probe").ok()?;
    Some(s)
}

/// Every `tl1:` key with its value.
pub fn snapshot(s: &Storage) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let n = s.length().unwrap_or(0);
    for i in 0..n {
        if let Ok(Some(k)) = s.key(i) {
            if k.starts_with(tracklet_core::storage::PREFIX) {
                if let Ok(Some(v)) = s.get_item(&k) {
                    out.push((k, v));
                }
            }
        }
    }
    out
}

pub fn pairs(snapshot: &[(String, String)]) -> impl Iterator<Item = (&str, &str)> + Clone {
    snapshot.iter().map(|(k, v)| (k.as_str(), v.as_str()))
}

fn get(target: &JsValue, key: &str) -> JsValue {
    Reflect::get(target, &JsValue::from_str(key)).unwrap_or(JsValue::UNDEFINED)
}

/// Do Not Track or Global Privacy Control is on.
pub fn privacy_signal() -> bool {
    let Some(w) = window() else { return false };
    let nav: JsValue = w.navigator().into();
    let one = JsValue::from_str("1");
    get(&nav, "doNotTrack") == one
        || get(&w, "doNotTrack") == one
        || get(&nav, "globalPrivacyControl") == JsValue::TRUE
}

/// `JSON.stringify(props)` as an object, or `None` (nothing, `null`, or not serialisable:
/// cycles, BigInt). A value that is not an object goes in as `{"value": ...}`. One call
/// into JavaScript: `track()` is the hot path, and each crossing of the boundary costs.
pub fn props_json(props: &JsValue) -> Option<String> {
    let json = js_sys::JSON::stringify(props).ok()?.as_string()?;
    if json.starts_with('{') {
        return Some(json);
    }
    if json == "null" {
        return None;
    }
    Some(["{\"value\":", &json, "}"].concat())
}

/// Appends `,"key":"value"` (or nothing for an empty value).
pub fn push_field(out: &mut String, key: &str, value: &str) {
    if value.is_empty() {
        return;
    }
    if out.len() > 1 {
        out.push(',');
    }
    push_str_literal(out, key);
    out.push(':');
    push_str_literal(out, value);
}

fn timezone() -> String {
    let format = js_sys::Intl::DateTimeFormat::new(&js_sys::Array::new(), &js_sys::Object::new());
    get(&format.resolved_options(), "timeZone")
        .as_string()
        .unwrap_or_default()
}

/// `<width>x<height>`.
fn size(w: f64, h: f64) -> String {
    let mut s = String::new();
    push_u64(&mut s, w as u64);
    s.push('x');
    push_u64(&mut s, h as u64);
    s
}

/// The page context sent with every event, as a JSON object.
pub fn context_json() -> Option<String> {
    let w = window()?;
    let doc = w.document()?;
    let loc = w.location();
    let nav = w.navigator();
    let mut out = String::from("{");
    push_field(&mut out, "url", &loc.href().unwrap_or_default());
    push_field(&mut out, "path", &loc.pathname().unwrap_or_default());
    push_field(&mut out, "referrer", &doc.referrer());
    push_field(&mut out, "title", &doc.title());
    if let Ok(screen) = w.screen() {
        let (sw, sh) = (screen.width().unwrap_or(0), screen.height().unwrap_or(0));
        push_field(&mut out, "screen", &size(sw as f64, sh as f64));
    }
    let number = |v: Result<JsValue, JsValue>| v.ok().and_then(|v| v.as_f64()).unwrap_or(0.0);
    let viewport = size(number(w.inner_width()), number(w.inner_height()));
    push_field(&mut out, "viewport", &viewport);
    push_field(&mut out, "language", &nav.language().unwrap_or_default());
    push_field(&mut out, "timezone", &timezone());
    if get(&nav, "webdriver") == JsValue::TRUE {
        out.push_str(",\"webdriver\":true");
    }
    push_field(&mut out, "sdk", SDK);
    out.push('}');
    Some(out)
}

/// An HTTP date as ms since the epoch, by `Date.parse`.
pub fn parse_http_date(value: &str) -> Option<u64> {
    let at = js_sys::Date::parse(value);
    (at.is_finite() && at >= 0.0).then_some(at as u64)
}

/// `console.warn('[tracklet]', ...)`.
pub fn warn(message: &str, detail: &JsValue) {
    let console = get(&js_sys::global(), "console");
    if let Ok(f) = get(&console, "warn").dyn_into::<js_sys::Function>() {
        let _ = f.call2(
            &console,
            &JsValue::from_str(&["[tracklet] ", message].concat()),
            detail,
        );
    }
}
