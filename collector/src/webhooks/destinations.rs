//! What a destination URL may be: `http` or `https`, and, unless the collector runs with
//! `--allow-private-destinations`, never an address on the collector's own host or network
//! (loopback, private, link-local, ...), so a project's webhooks cannot reach internal
//! services. Checked at `destinations add` and again at every delivery: by
//! [`refused_literal`] for IP literals and by [`GuardedResolver`] for names (the addresses
//! checked are the ones connected to, so a name cannot change between check and use).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("not a URL: {0}")]
    BadUrl(String),
    #[error("a destination URL is http:// or https://")]
    Scheme,
    #[error("{0} resolves to {1}, a loopback, private or link-local address (allowed only with --allow-private-destinations)")]
    Private(String, IpAddr),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
}

/// Whether connecting to `ip` would reach the collector's host or a private network.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_private_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private_v4(v4);
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link-local fe80::/10
                || v6 == Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0) // NAT64 prefix itself
        }
    }
}

fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
}

/// Parses a destination URL: http or https, with a host.
pub fn parse_url(url: &str) -> Result<Url, DestinationError> {
    let parsed = Url::parse(url).map_err(|e| DestinationError::BadUrl(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(DestinationError::Scheme);
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(DestinationError::BadUrl("no host".into()));
    }
    Ok(parsed)
}

/// The refusal for a URL whose host is a private IP literal (names are checked when they
/// are resolved, by [`GuardedResolver`]).
pub fn refused_literal(url: &Url) -> Option<DestinationError> {
    let ip = match url.host()? {
        url::Host::Ipv4(ip) => IpAddr::V4(ip),
        url::Host::Ipv6(ip) => IpAddr::V6(ip),
        url::Host::Domain(_) => return None,
    };
    is_private(ip).then(|| DestinationError::Private(ip.to_string(), ip))
}

/// `destinations add`: the URL parses, and (unless `allow_private`) neither it nor any
/// address its host resolves to now is private.
pub async fn check_url(url: &str, allow_private: bool) -> Result<Url, DestinationError> {
    let parsed = parse_url(url)?;
    if allow_private {
        return Ok(parsed);
    }
    if let Some(refusal) = refused_literal(&parsed) {
        return Err(refusal);
    }
    if let Some(url::Host::Domain(host)) = parsed.host() {
        let port = parsed.port_or_known_default().unwrap_or(443);
        let addrs = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| DestinationError::Resolve(host.to_owned(), e.to_string()))?;
        for addr in addrs {
            if is_private(addr.ip()) {
                return Err(DestinationError::Private(host.to_owned(), addr.ip()));
            }
        }
    }
    Ok(parsed)
}

/// reqwest's resolver at delivery time: the system's answer, refused when any address is
/// private (so a name cannot be pointed at an internal address after `add`).
#[derive(Debug, Default)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| is_private(a.ip())) {
                let refusal = DestinationError::Private(host, bad.ip());
                return Err(Box::new(refusal) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn urls_are_checked() {
        assert!(matches!(
            check_url("ftp://example.com/", false).await,
            Err(DestinationError::Scheme)
        ));
        assert!(matches!(
            check_url("http://127.0.0.1:9/hook", false).await,
            Err(DestinationError::Private(..))
        ));
        assert!(matches!(
            check_url("http://[::1]/hook", false).await,
            Err(DestinationError::Private(..))
        ));
        assert!(matches!(
            check_url("http://localhost/hook", false).await,
            Err(DestinationError::Private(..))
        ));
        assert!(check_url("http://127.0.0.1:9/hook", true).await.is_ok());
        assert!(check_url("not a url", true).await.is_err());
    }
}
