//! Configuration: the operator's `warden.toml` and the price table `models.toml`.
//!
//! Both files are plain TOML read once at startup into typed structs, validated, and
//! then turned into the runtime tables the request path uses (`proxy::Routes`,
//! `identity::Identities`). Warden also carries an embedded copy of the files under
//! `config/`, so `warden serve` with no arguments runs without any file on disk.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::Deserialize;

use crate::policy::Policy;
use crate::sinks::SinkConfig;

/// The embedded default configuration, used when no `--config` is given.
pub const DEFAULT_CONFIG: &str = include_str!("../config/warden.toml");

/// The embedded default price table, used when the configuration names none.
pub const DEFAULT_PRICES: &str = include_str!("../config/models.toml");

/// Why a configuration was refused. Messages name the file and the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Everything `warden serve` needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub operator: OperatorConfig,
    pub providers: Vec<ProviderConfig>,
    /// Price per model id, in USD per million tokens.
    pub prices: HashMap<String, Price>,
    /// Leads, scopes and delegation rules.
    pub policy: Policy,
    /// The policy file, for reloads; `None` for the embedded default.
    pub policy_path: Option<PathBuf>,
    /// Where ledger entries are delivered.
    pub sinks: Vec<SinkConfig>,
}

/// The `[server]` table: the listener, state directory and request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Directory of the SQLite file; relative paths are taken from the working directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Worker threads, each with its own event loop, listener and upstream connection
    /// pools; 0 means one per CPU core.
    #[serde(default)]
    pub workers: usize,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Largest non-streamed upstream body Warden reads before giving up with 502.
    #[serde(default = "default_max_upstream_body_bytes")]
    pub max_upstream_body_bytes: usize,
    /// How long a SIGTERM waits for open streams before cutting them.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Most usage records committed to SQLite in one transaction.
    #[serde(default = "default_usage_batch")]
    pub usage_batch: usize,
    /// How often queued usage records are committed. A crash (not a clean shutdown)
    /// can lose the records of this last interval.
    #[serde(default = "default_usage_flush_interval", with = "humantime_serde")]
    pub usage_flush_interval: Duration,
}

/// The `[operator]` table: the key that may read usage and manage every agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Hex SHA-256 of the operator's bearer key.
    pub key_sha256: String,
}

/// One upstream provider: where it lives, how to authenticate, which models it serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    /// Base URL including the API version path, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Environment variable holding the provider's API key. Unset means requests to
    /// this provider are refused with 502 `provider_not_configured`.
    pub api_key_env: Option<String>,
    pub models: Vec<String>,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed from sending the request to the response headers.
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
}

/// Prices in USD per million tokens. Cached input defaults to the input price.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    #[serde(with = "rust_decimal::serde::str")]
    pub input: Decimal,
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub cached_input: Option<Decimal>,
    #[serde(with = "rust_decimal::serde::str")]
    pub output: Decimal,
    /// The most output tokens the model produces for one request; a request that sets
    /// no limit of its own is reserved (and capped) at this.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u64,
}

impl Price {
    /// Input and output prices per token in picodollars. Exact: prices have at most
    /// six decimals per million tokens (checked when the table is read).
    pub fn per_token(&self) -> (u64, u64) {
        let picos = |usd_per_million: Decimal| {
            (usd_per_million * Decimal::from(1_000_000))
                .to_u64()
                .unwrap_or(u64::MAX)
        };
        (picos(self.input), picos(self.output))
    }
}

fn default_max_output_tokens() -> u64 {
    16_384
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    server: ServerConfig,
    operator: OperatorConfig,
    /// Price table path, relative to the configuration file. Absent means the embedded one.
    prices: Option<PathBuf>,
    /// Policy path, relative to the configuration file. Absent means the embedded one.
    policy: Option<PathBuf>,
    #[serde(default)]
    providers: Vec<ProviderConfig>,
    #[serde(default)]
    sinks: Vec<SinkConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    models: HashMap<String, Price>,
}

impl Config {
    /// Loads `path`, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Config::parse(DEFAULT_CONFIG, "embedded warden.toml", None);
        };

        let text = read(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, &path.display().to_string(), Some(dir))
    }

    /// Parses a configuration text read from a file in `dir`, which resolves a relative
    /// price table path. `dir` is `None` for the embedded default, whose price table is
    /// the embedded one too.
    pub fn parse(text: &str, origin: &str, dir: Option<&Path>) -> Result<Config, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;

        let prices = match (dir, &file.prices) {
            (Some(dir), Some(rel)) => {
                let path = dir.join(rel);
                parse_prices(&read(&path)?, &path.display().to_string())?
            }
            _ => parse_prices(DEFAULT_PRICES, "embedded models.toml")?,
        };

        let served = |model: &str| {
            file.providers
                .iter()
                .any(|p| p.models.iter().any(|m| m == model))
        };
        let policy_path = dir
            .zip(file.policy.as_ref())
            .map(|(dir, rel)| dir.join(rel));
        let policy = Policy::load(policy_path.as_deref(), served)?;

        let config = Config {
            server: file.server,
            operator: file.operator,
            providers: file.providers,
            prices,
            policy,
            policy_path,
            sinks: file.sinks,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));

        let operator = &self.operator.key_sha256;
        if let Some(lead) = self.policy.lead_with_key(operator) {
            return invalid(format!(
                "the operator's key_sha256 is also lead {}'s; the operator needs its own key",
                lead.spiffe_id
            ));
        }

        let mut served_by: HashMap<&str, &str> = HashMap::new();
        for provider in &self.providers {
            if !provider.base_url.starts_with("http://")
                && !provider.base_url.starts_with("https://")
            {
                return invalid(format!(
                    "providers.{}.base_url must start with http:// or https://",
                    provider.name
                ));
            }
            for model in &provider.models {
                if let Some(other) = served_by.insert(model, &provider.name) {
                    return invalid(format!(
                        "model {model} is listed by providers {other} and {}: a model is served by one provider",
                        provider.name
                    ));
                }
                if !self.prices.contains_key(model) {
                    return invalid(format!(
                        "model {model} (provider {}) has no price: add [models.\"{model}\"] to the price table",
                        provider.name
                    ));
                }
            }
        }

        check_hash("operator.key_sha256", &self.operator.key_sha256)
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_prices(text: &str, origin: &str) -> Result<HashMap<String, Price>, ConfigError> {
    let file: PriceFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
        origin: origin.to_owned(),
        source,
    })?;

    for (model, price) in &file.models {
        let negative = price.input.is_sign_negative()
            || price.output.is_sign_negative()
            || price.cached_input.is_some_and(|p| p.is_sign_negative());
        if negative {
            return Err(ConfigError::Invalid(format!(
                "{origin}: price of {model} is negative"
            )));
        }
    }
    Ok(file.models)
}

fn check_hash(what: &str, hex_digest: &str) -> Result<(), ConfigError> {
    let ok = hex_digest.len() == 64 && hex_digest.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "{what} must be 64 hex digits (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)"
    )))
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8484))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

fn default_max_body_bytes() -> usize {
    4 << 20
}

fn default_max_upstream_body_bytes() -> usize {
    64 << 20
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_usage_batch() -> usize {
    512
}

fn default_usage_flush_interval() -> Duration {
    Duration::from_millis(100)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(120)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let config = Config::load(None).expect("embedded default must validate");
        assert_eq!(config.server.listen, default_listen());
        assert!(config.prices.contains_key("gpt-4o-mini"));
    }

    #[test]
    fn refuses_model_without_price() {
        let text =
            DEFAULT_CONFIG.replace("\"gpt-4o-mini\",", "\"gpt-4o-mini\", \"no-such-model\",");
        let err = Config::parse(&text, "test", None).unwrap_err().to_string();
        assert!(err.contains("no-such-model"), "{err}");
    }

    /// A misspelt key in a sink is refused, named, with the keys that sink knows.
    #[test]
    fn refuses_unknown_sink_keys() {
        let sink = |extra: &str| {
            format!(
                "{DEFAULT_CONFIG}\n[[sinks]]\nname = \"siem\"\nkind = \"webhook\"\n\
                 url = \"http://127.0.0.1:9/\"\n{extra}\n"
            )
        };
        let config = Config::parse(&sink("token_env = \"T\"\nbatch = 5"), "test", None).unwrap();
        assert_eq!(config.sinks[0].batch, 5);

        let err = Config::parse(&sink("token_evn = \"T\""), "test", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown key `token_evn` for a `webhook` sink"),
            "{err}"
        );
        assert!(err.contains("token_env"), "{err}");

        let text = sink("").replace("kind = \"webhook\"", "kind = \"webhok\"");
        let err = Config::parse(&text, "test", None).unwrap_err().to_string();
        assert!(
            err.contains("webhok") && err.contains("webhook"),
            "names the kinds: {err}"
        );
    }

    /// The operator's key cannot also be a lead's.
    #[test]
    fn refuses_an_operator_key_a_lead_has() {
        let lead = "af62e35551732cd542cdf33ed118ebe0411f25f2a3b1335ab0604e2b86fd38c8";
        let operator = Config::load(None).unwrap().operator.key_sha256;
        let text = DEFAULT_CONFIG.replacen(&operator, lead, 1);
        let err = Config::parse(&text, "test", None).unwrap_err().to_string();
        assert!(err.contains("operator needs its own key"), "{err}");
    }

    #[test]
    fn refuses_short_key_hash() {
        let text = format!(
            "{}\n",
            DEFAULT_CONFIG.replacen("key_sha256 = \"", "key_sha256 = \"abc", 1)
        );
        let err = Config::parse(&text, "test", None).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
    }
}
