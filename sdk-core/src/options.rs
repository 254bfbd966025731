//! `tracklet.init(options)`: the options object as the page passes it, and the settings
//! the tracker runs with. The defaults are written here and nowhere else.
//!
//! The page's object arrives through serde (serde-wasm-bindgen in the browser). Reading
//! is lenient: a field of the wrong type is as good as missing, so a typo in one option
//! never costs the page its tracker; `init()` must never throw. Each field is read as a
//! [`Loose`] value (one small visitor for every field, rather than an untagged enum per
//! field type: serde's buffering for those cost several KB of wasm) and interpreted here.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::Config;

/// The fields of `init(options)`, as given (see `npm/types/tracker.d.ts`).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Options {
    pub endpoint: Loose,
    pub api_key: Loose,
    pub max_batch_size: Loose,
    pub max_wait_time: Loose,
    pub max_queue_size: Loose,
    /// `true`/`false` for all or nothing, or `{pageView, click, scroll}`.
    pub autocapture: Loose,
    /// `{eventName: rate}`.
    pub sampling: Loose,
    /// A list of names, or one name.
    pub always_keep: Loose,
    pub respect_privacy_signals: Loose,
    pub debug: Loose,
}

/// Any value, read without failing: what an option field holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Loose {
    #[default]
    Missing,
    Bool(bool),
    Number(f64),
    Text(String),
    List(Vec<Loose>),
    Object(Vec<(String, Loose)>),
    /// Anything else (bytes, a nested object beyond what options use).
    Other,
}

impl Loose {
    fn number(&self) -> Option<f64> {
        match self {
            Loose::Number(n) if !n.is_nan() => Some(*n),
            _ => None,
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            Loose::Text(s) => Some(s),
            _ => None,
        }
    }

    fn flag(&self) -> Option<bool> {
        match self {
            Loose::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn field(&self, name: &str) -> &Loose {
        match self {
            Loose::Object(fields) => fields
                .iter()
                .find(|(k, _)| k == name)
                .map_or(&Loose::Missing, |(_, v)| v),
            _ => &Loose::Missing,
        }
    }
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Loose, E> {
        Ok(Loose::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Loose, E> {
        Ok(Loose::Number(v as f64))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Loose, E> {
        Ok(Loose::Number(v as f64))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Loose, E> {
        Ok(Loose::Number(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Loose, E> {
        Ok(Loose::Text(v.into()))
    }
    fn visit_string<E>(self, v: String) -> Result<Loose, E> {
        Ok(Loose::Text(v))
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Loose, E> {
        Ok(Loose::Other)
    }
    fn visit_unit<E>(self) -> Result<Loose, E> {
        Ok(Loose::Missing)
    }
    fn visit_none<E>(self) -> Result<Loose, E> {
        Ok(Loose::Missing)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Loose, D::Error> {
        Loose::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Loose::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
        let mut fields = Vec::new();
        while let Some(k) = map.next_key::<Loose>()? {
            match k {
                Loose::Text(k) => fields.push((k, map.next_value()?)),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Loose::Object(fields))
    }
}

/// What autocapture records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Autocapture {
    pub page_view: bool,
    pub click: bool,
    pub scroll: bool,
}

/// The settings a tracker runs with: the options with their defaults applied.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The collector's base URL, without a trailing `/`. Empty: the tracker is inert.
    pub endpoint: String,
    pub api_key: String,
    pub autocapture: Autocapture,
    pub respect_privacy_signals: bool,
    pub debug: bool,
    pub config: Config,
}

impl Options {
    pub fn settings(&self) -> Settings {
        let positive = |v: &Loose, default: usize| match v.number() {
            Some(n) if n >= 1.0 => n.min(1e9) as usize,
            _ => default,
        };
        let defaults = Config::default();
        let mut config = Config {
            max_batch_size: positive(&self.max_batch_size, defaults.max_batch_size),
            max_wait_ms: match self.max_wait_time.number() {
                Some(n) if n >= 0.0 => n.min(1e12) as u64,
                _ => defaults.max_wait_ms,
            },
            max_queue_events: positive(&self.max_queue_size, defaults.max_queue_events),
            ..defaults
        };
        if let Loose::Object(rates) = &self.sampling {
            for (name, rate) in rates {
                let rate = rate.number().unwrap_or(0.0);
                config.sampling.push((name.clone(), rate.clamp(0.0, 1.0)));
            }
        }
        match &self.always_keep {
            Loose::Text(name) => config.always_keep.push(name.clone()),
            Loose::List(names) => {
                for name in names.iter().filter_map(Loose::text) {
                    config.always_keep.push(name.into());
                }
            }
            _ => {}
        }
        let all = self.autocapture.flag() != Some(false);
        let on = |name| all && self.autocapture.field(name).flag() != Some(false);
        let autocapture = Autocapture {
            page_view: on("pageView"),
            click: on("click"),
            scroll: on("scroll"),
        };
        Settings {
            endpoint: self
                .endpoint
                .text()
                .unwrap_or_default()
                .trim_end_matches('/')
                .into(),
            api_key: self.api_key.text().unwrap_or_default().into(),
            autocapture,
            respect_privacy_signals: self.respect_privacy_signals.flag() != Some(false),
            debug: self.debug.flag() == Some(true),
            config,
        }
    }
}

impl Settings {
    /// Whether the tracker can send at all (both `endpoint` and `apiKey` given).
    pub fn usable(&self) -> bool {
        !self.endpoint.is_empty() && !self.api_key.is_empty()
    }

    /// `<endpoint>/v1/batch?key=<apiKey>`.
    pub fn batch_url(&self) -> String {
        self.url(tracklet_wire::BATCH_PATH)
    }

    /// `<endpoint>/v1/batch/status?key=<apiKey>`.
    pub fn batch_status_url(&self) -> String {
        self.url(tracklet_wire::BATCH_STATUS_PATH)
    }

    fn url(&self, path: &str) -> String {
        let mut url =
            String::with_capacity(self.endpoint.len() + path.len() + 8 + self.api_key.len() * 3);
        url.push_str(&self.endpoint);
        url.push_str(path);
        url.push('?');
        url.push_str(tracklet_wire::KEY_PARAM);
        url.push('=');
        // The key percent-encoded as `encodeURIComponent` does.
        for b in self.api_key.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
                url.push(b as char);
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                url.push('%');
                url.push(HEX[(b >> 4) as usize] as char);
                url.push(HEX[(b & 15) as usize] as char);
            }
        }
        url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> Settings {
        serde_json::from_str::<Options>(json).unwrap().settings()
    }

    #[test]
    fn defaults_apply_to_what_is_missing_or_unreadable() {
        let s = settings(r#"{"endpoint":"https://c.example/","apiKey":"k"}"#);
        assert!(s.usable());
        assert_eq!(s.endpoint, "https://c.example");
        assert_eq!(s.config.max_batch_size, 50);
        assert_eq!(s.config.max_wait_ms, 5000);
        assert_eq!(s.config.max_queue_events, 1000);
        assert_eq!(
            s.autocapture,
            Autocapture {
                page_view: true,
                click: true,
                scroll: true
            }
        );
        assert!(s.respect_privacy_signals);
        assert!(!s.debug);
        // Wrong types and out-of-range numbers are as good as missing.
        let s = settings(
            r#"{"endpoint":5,"maxBatchSize":"10","maxWaitTime":-1,"maxQueueSize":0,
                "autocapture":"no","sampling":[1],"alwaysKeep":7,"debug":"yes"}"#,
        );
        assert!(!s.usable());
        assert_eq!(s.config.max_batch_size, 50);
        assert_eq!(s.config.max_wait_ms, 5000);
        assert_eq!(s.config.max_queue_events, 1000);
        assert!(s.autocapture.click);
        assert!(s.config.sampling.is_empty() && s.config.always_keep.is_empty());
        assert!(!s.debug);
    }

    #[test]
    fn options_as_given() {
        let s = settings(
            r#"{"endpoint":"e","apiKey":"a b/é","maxBatchSize":3.7,"maxWaitTime":0,
                "autocapture":{"click":false},"sampling":{"Noisy":0,"Half":0.5,"Bad":"x","Big":4},
                "alwaysKeep":"ok","respectPrivacySignals":false,"debug":true}"#,
        );
        assert_eq!(s.config.max_batch_size, 3);
        assert_eq!(s.config.max_wait_ms, 0);
        assert_eq!(
            s.autocapture,
            Autocapture {
                page_view: true,
                click: false,
                scroll: true
            }
        );
        let mut rates = s.config.sampling.clone();
        rates.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            rates,
            [
                ("Bad".into(), 0.0),
                ("Big".into(), 1.0),
                ("Half".into(), 0.5),
                ("Noisy".into(), 0.0)
            ]
        );
        assert_eq!(s.config.always_keep, ["ok"]);
        assert!(!s.respect_privacy_signals && s.debug);
        assert_eq!(s.batch_url(), "e/v1/batch?key=a%20b%2F%C3%A9");
        assert_eq!(s.batch_status_url(), "e/v1/batch/status?key=a%20b%2F%C3%A9");
        let s = settings(r#"{"autocapture":false,"alwaysKeep":["a",1,"b"]}"#);
        assert!(!s.autocapture.page_view && !s.autocapture.click && !s.autocapture.scroll);
        assert_eq!(s.config.always_keep, ["a", "b"]);
    }
}
