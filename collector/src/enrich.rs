//! Adds what the server knows about an event: corrected time, client kind, coarse place.
//!
//! The user agent is parsed (woothee) into browser, OS and device type; bots are flagged
//! with a reason and stored, not dropped; the client IP is truncated before it goes
//! anywhere (IPv4 /24, IPv6 /48); country and city come from a MaxMind file when configured.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

/// Server-side facts stored with each event.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Enrichment {
    pub browser: Option<String>,
    pub browser_version: Option<String>,
    pub os: Option<String>,
    /// `desktop`, `mobile`, `tablet`, `bot` or `other`.
    pub device_type: Option<String>,
    pub is_bot: bool,
    /// Why the event is flagged as a bot, e.g. `ua:crawler`, `ua:headless`, `webdriver`.
    pub bot_reason: Option<String>,
    /// Truncated client IP (never the full address).
    pub ip: Option<String>,
    pub country: Option<String>,
    pub city: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("cannot open GeoIP database {path}: {source}")]
    GeoIp {
        path: String,
        #[source]
        source: maxminddb::MaxMindDbError,
    },
}

/// Distinct user agents whose parse is remembered (the cache is emptied when full).
const UA_CACHE_ENTRIES: usize = 4096;

/// Holds what enrichment needs that is loaded once (the GeoIP database), and the parses of
/// recently seen user agents (a handful of strings cover nearly all traffic).
pub struct Enricher {
    geo: Option<maxminddb::Reader<Vec<u8>>>,
    user_agents: Mutex<HashMap<Box<str>, Enrichment>>,
}

impl Enricher {
    pub fn new(geoip_db: Option<&Path>) -> Result<Enricher, EnrichError> {
        let geo = geoip_db
            .map(|path| {
                maxminddb::Reader::open_readfile(path).map_err(|source| EnrichError::GeoIp {
                    path: path.display().to_string(),
                    source,
                })
            })
            .transpose()?;
        Ok(Enricher {
            geo,
            user_agents: Mutex::new(HashMap::new()),
        })
    }

    /// What is common to every event of one request: user agent and (truncated) IP.
    pub fn for_request(
        &self,
        user_agent: Option<&str>,
        client_ip: Option<IpAddr>,
    ) -> Arc<Enrichment> {
        // Bounded: user agents longer than this are not real browsers anyway.
        let user_agent = user_agent.map(|ua| ua.get(..ua.len().min(1024)).unwrap_or(ua));
        let mut out = user_agent
            .map(|ua| self.parse_user_agent_cached(ua))
            .unwrap_or_default();
        if let Some(ip) = client_ip {
            if let Some((country, city)) = self.geo.as_ref().and_then(|db| lookup_geo(db, ip)) {
                out.country = country;
                out.city = city;
            }
            out.ip = Some(truncate_ip(ip).to_string());
        }
        Arc::new(out)
    }

    fn parse_user_agent_cached(&self, ua: &str) -> Enrichment {
        let Ok(mut cache) = self.user_agents.lock() else {
            return parse_user_agent(ua);
        };
        if let Some(known) = cache.get(ua) {
            return known.clone();
        }
        let parsed = parse_user_agent(ua);
        if cache.len() >= UA_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(ua.into(), parsed.clone());
        parsed
    }
}

/// The request's enrichment, plus what the event itself says (`context.webdriver` or
/// `context.navigator.webdriver`): shared unless the event changes it.
pub fn for_event(request: &Arc<Enrichment>, context: Option<&RawValue>) -> Arc<Enrichment> {
    if request.is_bot || !context.is_some_and(|c| c.get().contains("webdriver")) {
        return request.clone();
    }
    let webdriver = context
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c.get()).ok())
        .is_some_and(|c| {
            c.get("webdriver").and_then(|v| v.as_bool()) == Some(true)
                || c.get("navigator")
                    .and_then(|n| n.get("webdriver"))
                    .and_then(|v| v.as_bool())
                    == Some(true)
        });
    if !webdriver {
        return request.clone();
    }
    let mut out = Enrichment::clone(request);
    out.is_bot = true;
    out.bot_reason = Some("webdriver".to_owned());
    Arc::new(out)
}

fn parse_user_agent(ua: &str) -> Enrichment {
    let mut out = Enrichment::default();
    let parsed = woothee::parser::Parser::new().parse(ua);
    if let Some(p) = &parsed {
        let known =
            |s: &str| (s != woothee::woothee::VALUE_UNKNOWN && !s.is_empty()).then(|| s.to_owned());
        out.browser = known(p.name);
        out.browser_version = known(p.version);
        out.os = known(p.os);
        out.device_type = Some(
            match p.category {
                "pc" => "desktop",
                "smartphone" | "mobilephone" => "mobile",
                "crawler" => "bot",
                _ => "other",
            }
            .to_owned(),
        );
        if p.category == "crawler" {
            out.is_bot = true;
            out.bot_reason = Some("ua:crawler".to_owned());
        }
    }
    if ua.contains("iPad") || ua.contains("Tablet") {
        out.device_type = Some("tablet".to_owned());
    }
    let lower = ua.to_ascii_lowercase();
    if !out.is_bot {
        let reason = if lower.contains("headless") {
            Some("ua:headless")
        } else if [
            "bot",
            "crawler",
            "spider",
            "curl/",
            "wget/",
            "python-requests",
            "phantomjs",
        ]
        .iter()
        .any(|marker| lower.contains(marker))
        {
            Some("ua:automation")
        } else {
            None
        };
        if let Some(reason) = reason {
            out.is_bot = true;
            out.bot_reason = Some(reason.to_owned());
        }
    }
    out
}

fn lookup_geo(
    db: &maxminddb::Reader<Vec<u8>>,
    ip: IpAddr,
) -> Option<(Option<String>, Option<String>)> {
    #[derive(serde::Deserialize)]
    struct Names {
        names: Option<BTreeMap<String, String>>,
    }
    #[derive(serde::Deserialize)]
    struct Country {
        iso_code: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Record {
        country: Option<Country>,
        city: Option<Names>,
    }
    let record: Record = db.lookup(ip).ok()?.decode().ok()??;
    let city = record
        .city
        .and_then(|c| c.names)
        .and_then(|n| n.get("en").cloned());
    Some((record.country.and_then(|c| c.iso_code), city))
}

/// The client's address: the socket's peer, or, only when a trusted proxy sits in front,
/// the last `X-Forwarded-For` entry (the one that proxy appended).
pub fn client_ip(
    peer: Option<SocketAddr>,
    forwarded_for: Option<&str>,
    trust_forwarded_for: bool,
) -> Option<IpAddr> {
    if trust_forwarded_for {
        if let Some(ip) = forwarded_for
            .and_then(|v| v.rsplit(',').next())
            .and_then(|last| last.trim().parse::<IpAddr>().ok())
        {
            return Some(ip);
        }
    }
    peer.map(|p| p.ip())
}

/// IPv4 with the last octet zeroed; IPv6 cut to its /48 (IPv4-mapped IPv6 treated as IPv4).
pub fn truncate_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::V4(Ipv4Addr::new(a, b, c, 0))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => truncate_ip(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0))
            }
        },
    }
}

/// The event's time on the server clock: `received_at - (sent_at - ts)` (the client's clock
/// offset cancels out), never later than `received_at`.
pub fn skew_corrected(ts_ms: u64, sent_at_ms: u64, received_at: DateTime<Utc>) -> DateTime<Utc> {
    let age_ms = sent_at_ms as i128 - ts_ms as i128;
    if age_ms <= 0 {
        return received_at;
    }
    let corrected = received_at.timestamp_millis() as i128 - age_ms;
    let corrected = corrected.clamp(0, received_at.timestamp_millis() as i128) as i64;
    DateTime::from_timestamp_millis(corrected).unwrap_or(received_at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_loses_its_last_octet() {
        assert_eq!(
            truncate_ip("203.0.113.77".parse().unwrap()).to_string(),
            "203.0.113.0"
        );
    }

    #[test]
    fn ipv6_is_cut_to_48_bits() {
        assert_eq!(
            truncate_ip("2001:db8:abcd:1234:5678::1".parse().unwrap()).to_string(),
            "2001:db8:abcd::"
        );
        assert_eq!(
            truncate_ip("::ffff:198.51.100.9".parse().unwrap()).to_string(),
            "198.51.100.0"
        );
    }

    #[test]
    fn forwarded_for_only_when_trusted() {
        let peer = Some(SocketAddr::from(([10, 0, 0, 1], 5000)));
        let xff = Some("1.2.3.4, 198.51.100.7");
        assert_eq!(
            client_ip(peer, xff, false),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            client_ip(peer, xff, true),
            Some("198.51.100.7".parse().unwrap())
        );
        assert_eq!(
            client_ip(peer, Some("garbage"), true),
            Some("10.0.0.1".parse().unwrap())
        );
    }

    #[test]
    fn skew_correction_cancels_the_client_clock_offset() {
        let received = DateTime::from_timestamp_millis(1_000_000_000_000).unwrap();
        // Client clock one hour fast: event 5 s before sending.
        let hour = 3_600_000;
        let t = skew_corrected(
            1_000_000_000_000 + hour - 5000,
            1_000_000_000_000 + hour,
            received,
        );
        assert_eq!(t.timestamp_millis(), 1_000_000_000_000 - 5000);
        // ts after sent_at would put the event in the future: clamped to received_at.
        assert_eq!(skew_corrected(2000, 1000, received), received);
    }

    #[test]
    fn user_agents_are_classified_and_bots_flagged() {
        let chrome = parse_user_agent("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36");
        assert_eq!(chrome.browser.as_deref(), Some("Chrome"));
        assert_eq!(chrome.device_type.as_deref(), Some("desktop"));
        assert!(!chrome.is_bot);
        let google = parse_user_agent(
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        );
        assert!(google.is_bot);
        assert_eq!(google.bot_reason.as_deref(), Some("ua:crawler"));
        let headless = parse_user_agent("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36");
        assert_eq!(headless.bot_reason.as_deref(), Some("ua:headless"));
    }

    #[test]
    fn webdriver_context_flags_a_bot() {
        let none = Arc::new(Enrichment::default());
        for context in [
            r#"{"webdriver":true}"#,
            r#"{"navigator":{"webdriver":true}}"#,
        ] {
            let raw: Box<RawValue> = serde_json::from_str(context).unwrap();
            assert_eq!(
                for_event(&none, Some(&raw)).bot_reason.as_deref(),
                Some("webdriver")
            );
        }
        let raw: Box<RawValue> = serde_json::from_str(r#"{"webdriver":false}"#).unwrap();
        assert!(!for_event(&none, Some(&raw)).is_bot);
        assert!(!for_event(&none, None).is_bot);
    }
}
