//! Autocapture: `page_view` on load, on SPA navigation (`pushState`, `replaceState`,
//! `popstate`; once per path) and on back-forward-cache restore; `click` with what the
//! element is (never the value of a form field, nothing inside `[data-tracklet-ignore]`);
//! `scroll` at 25/50/75/100 % depth, each once per page view.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use gloo_timers::callback::Timeout;
use js_sys::{Function, Reflect};
use tracklet_core::Autocapture;
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use web_sys::{Element, HtmlElement};

use crate::driver::Driver;
use crate::page::{self, push_field};

/// What a click on these is about (the element clicked may be inside one).
const CLICKABLE: &str =
    "a,button,input,select,textarea,label,summary,[role=button],[role=link],[onclick]";
const DEPTHS: [u8; 4] = [25, 50, 75, 100];

struct PageViews {
    last_path: RefCell<Option<String>>,
    /// The scroll depths already recorded in this page view, one bit each.
    depths: Cell<u8>,
    scroll_check: RefCell<Option<Timeout>>,
}

pub fn install(driver: &Rc<Driver>, on: Autocapture) {
    let Some(w) = page::window() else { return };
    let views = Rc::new(PageViews {
        last_path: RefCell::new(None),
        depths: Cell::new(0),
        scroll_check: RefCell::new(None),
    });
    if on.page_view {
        page_view(driver, &views);
        wrap_history(driver, &views);
        let v = views.clone();
        driver.on(&w, "popstate", move |d, _| page_view(d, &v));
        let v = views.clone();
        driver.on(&w, "pageshow", move |d, e| {
            if Reflect::get(&e, &"persisted".into()).is_ok_and(|p| p.is_truthy()) {
                *v.last_path.borrow_mut() = None;
                page_view(d, &v);
            }
        });
    }
    if on.click {
        if let Some(doc) = w.document() {
            // Capture phase: a page that stops propagation still has its clicks counted.
            driver.on_capture(&doc, "click", |d, e| {
                let target = e.target().and_then(|t| t.dyn_into::<Element>().ok());
                if let Some(props) = target.and_then(|t| describe_click(&t)) {
                    d.track_json("click", Some(&props), None);
                }
            });
        }
    }
    if on.scroll {
        let v = views.clone();
        driver.on(&w, "scroll", move |d, _| {
            if v.scroll_check.borrow().is_some() {
                return;
            }
            // At most one check per 200 ms of scrolling.
            let (me, v2) = (d.handle(), v.clone());
            *v.scroll_check.borrow_mut() = Some(Timeout::new(200, move || {
                *v2.scroll_check.borrow_mut() = None;
                if let Some(d) = me.upgrade() {
                    scroll_depth(&d, &v2);
                    d.drive();
                }
            }));
        });
    }
}

fn page_view(d: &Driver, views: &PageViews) {
    let Some(w) = page::window() else { return };
    let loc = w.location();
    let path = loc.pathname().unwrap_or_default();
    if views.last_path.borrow().as_deref() == Some(path.as_str()) {
        return;
    }
    *views.last_path.borrow_mut() = Some(path.clone());
    views.depths.set(0);
    let doc = w.document();
    let mut props = String::from("{");
    push_field(&mut props, "path", &path);
    push_field(&mut props, "url", &loc.href().unwrap_or_default());
    push_field(
        &mut props,
        "title",
        &doc.as_ref().map(|d| d.title()).unwrap_or_default(),
    );
    push_field(
        &mut props,
        "referrer",
        &doc.map(|d| d.referrer()).unwrap_or_default(),
    );
    props.push('}');
    d.set_context();
    d.track_json("page_view", Some(&props), None);
}

/// `history.pushState` and `replaceState` call through, then record a page view.
fn wrap_history(driver: &Rc<Driver>, views: &Rc<PageViews>) {
    let Some(history) = page::window().and_then(|w| w.history().ok()) else {
        return;
    };
    for name in ["pushState", "replaceState"] {
        let Ok(original) =
            Reflect::get(&history, &name.into()).and_then(|f| f.dyn_into::<Function>())
        else {
            continue;
        };
        let (me, v, h) = (driver.handle(), views.clone(), history.clone());
        let wrapper = Closure::<dyn Fn(JsValue, JsValue, JsValue) -> Result<JsValue, JsValue>>::new(
            move |state, title, url| {
                // The page's own call: its errors (a cross-origin URL) stay its own.
                let r = original.call3(&h, &state, &title, &url)?;
                if let Some(d) = me.upgrade() {
                    page_view(&d, &v);
                    d.drive();
                }
                Ok(r)
            },
        );
        let _ = Reflect::set(&history, &name.into(), wrapper.as_ref());
        wrapper.forget();
    }
}

fn scroll_depth(d: &Driver, views: &PageViews) {
    let Some(w) = page::window() else { return };
    let Some(doc) = w.document() else { return };
    let num = |v: Result<JsValue, JsValue>| v.ok().and_then(|v| v.as_f64()).unwrap_or(0.0);
    let inner = num(w.inner_height());
    let total = doc
        .document_element()
        .map_or(0, |e| e.scroll_height())
        .max(doc.body().map_or(0, |b| b.scroll_height())) as f64;
    let seen = if total <= inner {
        100.0
    } else {
        (w.scroll_y().unwrap_or(0.0) + inner) / total * 100.0
    };
    let path = w.location().pathname().unwrap_or_default();
    for (bit, depth) in DEPTHS.iter().enumerate() {
        let mask = 1u8 << bit;
        if seen >= *depth as f64 - 0.5 && views.depths.get() & mask == 0 {
            views.depths.set(views.depths.get() | mask);
            let mut props = String::from("{\"depth\":");
            tracklet_wire::json::push_u64(&mut props, *depth as u64);
            push_field(&mut props, "path", &path);
            props.push('}');
            d.track_json("scroll", Some(&props), None);
        }
    }
}

/// A short CSS path to `el`: up to five levels, stopping at an id.
fn css_path(el: &Element) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut node = Some(el.clone());
    while let Some(n) = node.filter(|_| parts.len() < 5) {
        let mut part = n.tag_name().to_ascii_lowercase();
        let id = n.id();
        if !id.is_empty() {
            parts.push([part.as_str(), "#", &id].concat());
            break;
        }
        let parent = n.parent_element();
        if let Some(p) = &parent {
            let siblings = p.children();
            let (mut same, mut index) = (0, 0);
            for i in 0..siblings.length() {
                if let Some(s) = siblings.item(i) {
                    if s.tag_name() == n.tag_name() {
                        same += 1;
                        if s == n {
                            index = same;
                        }
                    }
                }
            }
            if same > 1 {
                part.push_str(":nth-of-type(");
                tracklet_wire::json::push_u64(&mut part, index);
                part.push(')');
            }
        }
        parts.push(part);
        node = parent;
    }
    parts.reverse();
    parts.join(" > ")
}

/// Collapses runs of whitespace, trims, and keeps at most `max` characters.
fn squeeze(text: &str, max: usize) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(max)
        .collect()
}

/// The `click` event's props, or `None` inside `[data-tracklet-ignore]`.
fn describe_click(target: &Element) -> Option<String> {
    let el = target
        .closest(CLICKABLE)
        .ok()
        .flatten()
        .unwrap_or_else(|| target.clone());
    if el
        .closest("[data-tracklet-ignore]")
        .ok()
        .flatten()
        .is_some()
    {
        return None;
    }
    let tag = el.tag_name();
    let mut props = String::from("{");
    push_field(&mut props, "tag", &tag.to_ascii_lowercase());
    push_field(&mut props, "path", &css_path(&el));
    push_field(&mut props, "id", &el.id());
    let class_name = el.get_attribute("class").unwrap_or_default();
    let classes: Vec<&str> = class_name.split_whitespace().take(10).collect();
    if !classes.is_empty() {
        props.push_str(",\"classes\":[");
        for (i, c) in classes.iter().enumerate() {
            if i > 0 {
                props.push(',');
            }
            tracklet_wire::json::push_str_literal(&mut props, c);
        }
        props.push(']');
    }
    if let Some(href) = el.get_attribute("href") {
        push_field(
            &mut props,
            "href",
            &href.chars().take(500).collect::<String>(),
        );
    }
    // Never the value or typed text of form fields or editable regions.
    let form_field = matches!(tag.as_str(), "INPUT" | "SELECT" | "TEXTAREA" | "OPTION");
    let editable = el.closest("[contenteditable]").ok().flatten().is_some()
        || el
            .dyn_ref::<HtmlElement>()
            .is_some_and(|h| h.is_content_editable());
    if !form_field && !editable {
        let text = match el.dyn_ref::<HtmlElement>() {
            Some(h) => h.inner_text(),
            None => el.text_content().unwrap_or_default(),
        };
        push_field(&mut props, "text", &squeeze(&text, 100));
    }
    if tag == "INPUT" {
        let kind = el.dyn_ref::<web_sys::HtmlInputElement>().map(|i| i.type_());
        push_field(&mut props, "type", &kind.unwrap_or_default());
    }
    props.push('}');
    Some(props)
}
