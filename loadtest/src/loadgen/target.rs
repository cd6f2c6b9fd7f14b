//! Where load goes: a named base URL, checked to be on this machine.
//!
//! The load generator refuses any host that is not loopback (127.0.0.0/8,
//! ::1 or `localhost`), so a mistyped URL can never send load elsewhere.

use std::fmt;
use std::net::IpAddr;

use http::Uri;
use http::header::HeaderValue;

use super::LoadError;

/// One system under load, e.g. the mock directly or Warden in front of it.
#[derive(Clone, Debug)]
pub struct Target {
    /// Short label for reports: `direct` or `warden`.
    pub name: String,
    /// The OpenAI base URL as given, e.g. `http://127.0.0.1:9100/v1`.
    pub base_url: String,
    /// `scheme://authority/path` without a trailing slash.
    base: String,
    /// `Bearer <key>`, if the target needs a key.
    authorization: Option<HeaderValue>,
}

impl Target {
    /// Checks `base_url` (http, loopback host) and prepares the key header.
    pub fn new(name: &str, base_url: &str, key: Option<&str>) -> Result<Self, LoadError> {
        let uri: Uri = base_url.parse().map_err(|e| invalid(base_url, &e))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid(base_url, &"only http:// URLs are supported"));
        }
        let host = uri
            .host()
            .ok_or_else(|| invalid(base_url, &"the URL has no host"))?;
        if !is_loopback(host) {
            return Err(LoadError::NotLoopback {
                url: base_url.to_owned(),
                host: host.to_owned(),
            });
        }

        let authorization = key
            .map(|key| HeaderValue::try_from(format!("Bearer {key}")))
            .transpose()
            .map_err(|_| {
                LoadError::Settings(format!("the key for {name} is not a valid header value"))
            })?;
        let authority = uri.authority().map_or("", |a| a.as_str());
        let base = format!("http://{authority}{}", uri.path().trim_end_matches('/'));
        Ok(Self {
            name: name.to_owned(),
            base_url: base_url.to_owned(),
            base,
            authorization,
        })
    }

    /// The full URI of `path` (e.g. `/chat/completions`) under the base URL.
    pub(crate) fn uri(&self, path: &str) -> Result<Uri, LoadError> {
        let url = format!("{}{path}", self.base);
        url.parse().map_err(|e| invalid(&url, &e))
    }

    pub(crate) fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }
}

/// True for `localhost`, 127.0.0.0/8 and ::1 (with or without brackets).
pub fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn invalid(url: &str, why: &dyn fmt::Display) -> LoadError {
    LoadError::InvalidUrl {
        url: url.to_owned(),
        why: why.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_accepted() {
        for url in [
            "http://127.0.0.1:9100/v1",
            "http://127.9.8.7/v1/",
            "http://localhost:8484/v1",
            "http://[::1]:1/v1",
        ] {
            assert!(Target::new("t", url, None).is_ok(), "{url}");
        }
    }

    #[test]
    fn other_hosts_are_refused() {
        for url in [
            "http://10.0.0.1:9100/v1",
            "http://api.openai.com/v1",
            "http://[::2]/v1",
            "http://128.0.0.1/v1",
        ] {
            assert!(
                matches!(
                    Target::new("t", url, None),
                    Err(LoadError::NotLoopback { .. })
                ),
                "{url}"
            );
        }
        assert!(matches!(
            Target::new("t", "https://127.0.0.1/v1", None),
            Err(LoadError::InvalidUrl { .. })
        ));
        assert!(matches!(
            Target::new("t", "127.0.0.1:9100", None),
            Err(LoadError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn request_uris_join_the_base_path() {
        let target = Target::new("t", "http://127.0.0.1:9100/v1/", Some("k")).expect("valid");
        let uri = target.uri("/chat/completions").expect("uri");
        assert_eq!(uri.to_string(), "http://127.0.0.1:9100/v1/chat/completions");
        assert_eq!(
            target.authorization().map(|v| v.as_bytes()),
            Some(&b"Bearer k"[..])
        );
    }
}
