//! `tracklet.init(options)`: the options object as the page passes it, and the settings
//! the tracker runs with. The defaults are written here and nowhere else.
//!
//! The page's object arrives through serde (serde-wasm-bindgen in the browser). Reading
//! is lenient: a field of the wrong type is as good as missing, so a typo in one option
//! never costs the page its tracker; `init()` must never throw.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use serde::de::{Deserialize, Deserializer, IgnoredAny};

use crate::Config;

/// The fields of `init(options)`, as given (see `npm/types/tracker.d.ts`).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Options {
    pub endpoint: Lenient<String>,
    pub api_key: Lenient<String>,
    pub max_batch_size: Lenient<f64>,
    pub max_wait_time: Lenient<f64>,
    pub max_queue_size: Lenient<f64>,
    pub autocapture: Lenient<AutocaptureOption>,
    pub sampling: Lenient<BTreeMap<String, Lenient<f64>>>,
    pub always_keep: Lenient<OneOrMany>,
    pub respect_privacy_signals: Lenient<bool>,
    pub debug: Lenient<bool>,
}

/// A value of the expected type, or `None` for anything else (or nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct Lenient<T>(pub Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Either<T> {
            Ok(T),
            Other(IgnoredAny),
        }
        Ok(Lenient(match Either::deserialize(d)? {
            Either::Ok(v) => Some(v),
            Either::Other(_) => None,
        }))
    }
}

/// `autocapture`: `true`/`false` for all or nothing, or `{pageView, click, scroll}`.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum AutocaptureOption {
    All(bool),
    Some {
        #[serde(default, rename = "pageView")]
        page_view: Lenient<bool>,
        #[serde(default)]
        click: Lenient<bool>,
        #[serde(default)]
        scroll: Lenient<bool>,
    },
}

/// `alwaysKeep`: a list of names, or one name.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<Lenient<String>>),
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
        let positive = |v: &Lenient<f64>, default: usize| match v.0 {
            Some(n) if n >= 1.0 => n.min(1e9) as usize,
            _ => default,
        };
        let defaults = Config::default();
        let mut config = Config {
            max_batch_size: positive(&self.max_batch_size, defaults.max_batch_size),
            max_wait_ms: match self.max_wait_time.0 {
                Some(n) if n >= 0.0 => n.min(1e12) as u64,
                _ => defaults.max_wait_ms,
            },
            max_queue_events: positive(&self.max_queue_size, defaults.max_queue_events),
            ..defaults
        };
        if let Some(rates) = &self.sampling.0 {
            for (name, rate) in rates {
                let rate = rate.0.filter(|r| !r.is_nan()).unwrap_or(0.0);
                config.sampling.push((name.clone(), rate.clamp(0.0, 1.0)));
            }
        }
        match &self.always_keep.0 {
            Some(OneOrMany::One(name)) => config.always_keep.push(name.clone()),
            Some(OneOrMany::Many(names)) => {
                config
                    .always_keep
                    .extend(names.iter().filter_map(|n| n.0.clone()));
            }
            None => {}
        }
        let autocapture = match &self.autocapture.0 {
            None => Autocapture {
                page_view: true,
                click: true,
                scroll: true,
            },
            Some(AutocaptureOption::All(on)) => Autocapture {
                page_view: *on,
                click: *on,
                scroll: *on,
            },
            Some(AutocaptureOption::Some {
                page_view,
                click,
                scroll,
            }) => Autocapture {
                page_view: page_view.0 != Some(false),
                click: click.0 != Some(false),
                scroll: scroll.0 != Some(false),
            },
        };
        Settings {
            endpoint: self
                .endpoint
                .0
                .as_deref()
                .unwrap_or_default()
                .trim_end_matches('/')
                .into(),
            api_key: self.api_key.0.clone().unwrap_or_default(),
            autocapture,
            respect_privacy_signals: self.respect_privacy_signals.0 != Some(false),
            debug: self.debug.0 == Some(true),
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
        let mut url = String::with_capacity(self.endpoint.len() + path.len() + 8 + self.api_key.len() * 3);
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
