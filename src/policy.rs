//! Policy: what the operator allows. The leads (agents the operator creates), the
//! scope catalogue (which models and tools each scope grants), and per lead what it
//! may delegate to the sub-agents it spawns.
//!
//! Policy lives in `policy.toml`, is read at startup and validated against the routes
//! (every model a scope grants must be served). Errors name the line of the value to
//! fix. A [`Manifest`] is a set of scopes resolved through the catalogue into the
//! models and tools they grant; a child's manifest is always built from a subset of
//! its parent's scopes, so it can only ever grant less.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use rust_decimal::Decimal;
use serde::Deserialize;
use toml::Spanned;

use crate::budget::Amount;
use crate::config::ConfigError;

/// The embedded default policy, used with the embedded default configuration.
pub const DEFAULT_POLICY: &str = include_str!("../config/policy.toml");

/// The operator's policy, validated.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The trust domain of every SPIFFE ID Warden issues.
    pub trust_domain: String,
    pub catalogue: Catalogue,
    pub leads: Vec<Lead>,
    /// The fewest output tokens worth forwarding a request for: below this, a request
    /// that does not fit the budget is refused rather than clamped.
    pub min_output_tokens: u64,
    /// What happens to a request's `tools` entry outside the agent's manifest.
    pub unlisted_tools: UnlistedTools,
}

/// What to do with a requested tool the agent's manifest does not grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnlistedTools {
    /// Refuse the request with 403 `permission_denied`.
    Refuse,
    /// Remove the entry and forward the rest of the request.
    Strip,
}

/// A lead agent, created by the operator.
#[derive(Debug, Clone)]
pub struct Lead {
    pub spiffe_id: String,
    pub key_sha256: String,
    pub daily_limit: Amount,
    pub scopes: BTreeSet<String>,
    pub delegation: Delegation,
}

/// What a lead (and its descendants) may hand down when spawning.
#[derive(Debug, Clone)]
pub struct Delegation {
    pub max_children: usize,
    pub max_depth: u32,
    pub max_slice: Amount,
    pub allowed_scopes: BTreeSet<String>,
    pub max_lifetime: Duration,
}

/// Scope name → what it grants.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    scopes: HashMap<String, Grant>,
}

#[derive(Debug, Clone, Default)]
struct Grant {
    models: Vec<String>,
    tools: Vec<String>,
}

/// An agent's granted scopes, and the models and tools they resolve to.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    pub scopes: BTreeSet<String>,
    /// Every model is allowed (a scope granted `"*"`).
    pub all_models: bool,
    pub models: HashSet<String>,
    /// Every tool is allowed (a scope granted `"*"`).
    pub all_tools: bool,
    pub tools: HashSet<String>,
}

impl Manifest {
    pub fn allows_model(&self, model: &str) -> bool {
        self.all_models || self.models.contains(model)
    }

    pub fn allows_tool(&self, tool: &str) -> bool {
        self.all_tools || self.tools.contains(tool)
    }
}

impl Catalogue {
    /// Resolves `scopes` (all known to the catalogue) into a manifest.
    pub fn manifest(&self, scopes: &BTreeSet<String>) -> Manifest {
        let mut manifest = Manifest {
            scopes: scopes.clone(),
            ..Manifest::default()
        };
        for grant in scopes.iter().filter_map(|s| self.scopes.get(s)) {
            for model in &grant.models {
                if model == "*" {
                    manifest.all_models = true;
                } else {
                    manifest.models.insert(model.clone());
                }
            }
            for tool in &grant.tools {
                if tool == "*" {
                    manifest.all_tools = true;
                } else {
                    manifest.tools.insert(tool.clone());
                }
            }
        }
        manifest
    }

    pub fn contains(&self, scope: &str) -> bool {
        self.scopes.contains_key(scope)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    trust_domain: String,
    #[serde(default = "default_min_output_tokens")]
    min_output_tokens: u64,
    #[serde(default = "default_unlisted_tools")]
    unlisted_tools: UnlistedTools,
    #[serde(default)]
    scopes: HashMap<String, ScopeFile>,
    #[serde(default)]
    leads: Vec<LeadFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeFile {
    #[serde(default)]
    models: Vec<Spanned<String>>,
    #[serde(default)]
    tools: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeadFile {
    spiffe_id: Spanned<String>,
    key_sha256: Spanned<String>,
    daily_limit: Spanned<String>,
    scopes: Vec<Spanned<String>>,
    delegation: DelegationFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelegationFile {
    max_children: usize,
    max_depth: u32,
    max_slice: Spanned<String>,
    allowed_scopes: Vec<Spanned<String>>,
    #[serde(with = "humantime_serde")]
    max_lifetime: Duration,
}

fn default_min_output_tokens() -> u64 {
    16
}

fn default_unlisted_tools() -> UnlistedTools {
    UnlistedTools::Refuse
}

impl Policy {
    /// Reads and validates a policy file; `served` says whether a model is routed.
    pub fn load(path: Option<&Path>, served: impl Fn(&str) -> bool) -> Result<Policy, ConfigError> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Policy::parse(&text, &path.display().to_string(), served)
            }
            None => Policy::parse(DEFAULT_POLICY, "embedded policy.toml", served),
        }
    }

    /// Parses and validates policy text; errors name `origin` and the line.
    pub fn parse(
        text: &str,
        origin: &str,
        served: impl Fn(&str) -> bool,
    ) -> Result<Policy, ConfigError> {
        let file: PolicyFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        let at = |span: std::ops::Range<usize>, message: String| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            ConfigError::Invalid(format!("{origin}, line {line}: {message}"))
        };

        let catalogue = catalogue(&file.scopes, &served, &at)?;
        let mut leads = Vec::with_capacity(file.leads.len());
        for (index, lead) in file.leads.iter().enumerate() {
            unique_lead(lead, &file.leads[..index], &at)?;
            leads.push(validate_lead(lead, &catalogue, &at)?);
        }
        Ok(Policy {
            trust_domain: file.trust_domain,
            catalogue,
            leads,
            min_output_tokens: file.min_output_tokens,
            unlisted_tools: file.unlisted_tools,
        })
    }
}

type At<'a> = dyn Fn(std::ops::Range<usize>, String) -> ConfigError + 'a;

impl Policy {
    /// The lead whose key has SHA-256 `key_sha256` (hex), if any.
    pub fn lead_with_key(&self, key_sha256: &str) -> Option<&Lead> {
        self.leads
            .iter()
            .find(|l| l.key_sha256.eq_ignore_ascii_case(key_sha256))
    }
}

/// A lead's SPIFFE ID and key are its own: no lead listed before it has either.
fn unique_lead(lead: &LeadFile, earlier: &[LeadFile], at: &At<'_>) -> Result<(), ConfigError> {
    let id = lead.spiffe_id.get_ref();
    if earlier.iter().any(|l| l.spiffe_id.get_ref() == id) {
        return Err(at(
            lead.spiffe_id.span(),
            format!("lead {id} is listed twice"),
        ));
    }
    let key = lead.key_sha256.get_ref();
    if earlier
        .iter()
        .any(|l| l.key_sha256.get_ref().eq_ignore_ascii_case(key))
    {
        return Err(at(
            lead.key_sha256.span(),
            format!("lead {id} has another lead's key_sha256; each lead needs its own key"),
        ));
    }
    Ok(())
}

fn catalogue(
    scopes: &HashMap<String, ScopeFile>,
    served: &dyn Fn(&str) -> bool,
    at: &At<'_>,
) -> Result<Catalogue, ConfigError> {
    let mut catalogue = Catalogue::default();
    for (name, scope) in scopes {
        for model in &scope.models {
            let m = model.get_ref();
            if m != "*" && !served(m) {
                return Err(at(
                    model.span(),
                    format!("scope {name} grants model {m}, which no provider serves"),
                ));
            }
        }
        let grant = Grant {
            models: scope.models.iter().map(|m| m.get_ref().clone()).collect(),
            tools: scope.tools.clone(),
        };
        catalogue.scopes.insert(name.clone(), grant);
    }
    Ok(catalogue)
}

fn validate_lead(lead: &LeadFile, catalogue: &Catalogue, at: &At<'_>) -> Result<Lead, ConfigError> {
    let id = lead.spiffe_id.get_ref();
    if !id.starts_with("spiffe://") {
        return Err(at(
            lead.spiffe_id.span(),
            format!("{id} is not a spiffe:// ID"),
        ));
    }
    let hash = lead.key_sha256.get_ref();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(at(
            lead.key_sha256.span(),
            "key_sha256 must be 64 hex digits (`printf %s KEY | sha256sum`)".into(),
        ));
    }

    let daily_limit = amount(&lead.daily_limit, "daily_limit", at)?;
    let scopes = known_scopes(&lead.scopes, catalogue, at)?;
    let delegation = &lead.delegation;
    let allowed_scopes = known_scopes(&delegation.allowed_scopes, catalogue, at)?;
    if let Some(extra) = delegation
        .allowed_scopes
        .iter()
        .find(|s| !scopes.contains(s.get_ref()))
    {
        return Err(at(
            extra.span(),
            format!(
                "allowed_scopes has {}, which lead {id} itself lacks",
                extra.get_ref()
            ),
        ));
    }
    let max_slice = amount(&delegation.max_slice, "max_slice", at)?;
    if max_slice > daily_limit {
        return Err(at(
            delegation.max_slice.span(),
            "max_slice is above the lead's daily_limit".into(),
        ));
    }

    Ok(Lead {
        spiffe_id: id.clone(),
        key_sha256: hash.clone(),
        daily_limit,
        scopes,
        delegation: Delegation {
            max_children: delegation.max_children,
            max_depth: delegation.max_depth,
            max_slice,
            allowed_scopes,
            max_lifetime: delegation.max_lifetime,
        },
    })
}

fn amount(value: &Spanned<String>, field: &str, at: &At<'_>) -> Result<Amount, ConfigError> {
    value
        .get_ref()
        .parse::<Decimal>()
        .ok()
        .and_then(Amount::from_usd)
        .ok_or_else(|| {
            at(
                value.span(),
                format!("{field} must be a decimal dollar amount between 0 and 1000000"),
            )
        })
}

fn known_scopes(
    scopes: &[Spanned<String>],
    catalogue: &Catalogue,
    at: &At<'_>,
) -> Result<BTreeSet<String>, ConfigError> {
    let mut known = BTreeSet::new();
    for scope in scopes {
        if !catalogue.contains(scope.get_ref()) {
            return Err(at(
                scope.span(),
                format!("unknown scope {}", scope.get_ref()),
            ));
        }
        known.insert(scope.get_ref().clone());
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Policy, ConfigError> {
        Policy::parse(text, "policy.toml", |m| m.starts_with("gpt-"))
    }

    const POLICY: &str = r#"
trust_domain = "acme.internal"

[scopes."market_data.read"]
models = ["gpt-4o-mini"]
tools = ["get_quote"]

[scopes."portfolio.read"]
models = ["gpt-4o"]
tools = ["get_positions"]

[[leads]]
spiffe_id = "spiffe://acme.internal/agent/fintech/lead"
key_sha256 = "af62e35551732cd542cdf33ed118ebe0411f25f2a3b1335ab0604e2b86fd38c8"
daily_limit = "500.00"
scopes = ["market_data.read", "portfolio.read"]

[leads.delegation]
max_children = 40
max_depth = 2
max_slice = "150.00"
allowed_scopes = ["market_data.read"]
max_lifetime = "72h"
"#;

    #[test]
    fn resolves_scopes_into_models_and_tools() {
        let policy = parse(POLICY).unwrap();
        let lead = &policy.leads[0];
        assert_eq!(lead.daily_limit.to_usd(), Decimal::from(500));
        let manifest = policy.catalogue.manifest(&lead.scopes);
        assert!(manifest.allows_model("gpt-4o") && manifest.allows_tool("get_positions"));
        assert!(!manifest.allows_model("gpt-5"));
    }

    /// The 1-based line of `needle` in `text`.
    fn line_of(text: &str, needle: &str) -> usize {
        text[..text.find(needle).unwrap()].matches('\n').count() + 1
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                r#"allowed_scopes = ["market_data.read"]"#,
                r#"allowed_scopes = ["market_data.write"]"#,
                "market_data.write",
            ),
            (
                r#"daily_limit = "500.00""#,
                r#"daily_limit = "lots""#,
                "daily_limit",
            ),
            (
                r#"models = ["gpt-4o"]"#,
                r#"models = ["claude-9"]"#,
                "claude-9",
            ),
        ];
        for (good, bad, named) in cases {
            let text = POLICY.replace(good, bad);
            let err = parse(&text).unwrap_err().to_string();
            let line = format!("line {}", line_of(&text, bad));
            assert!(err.contains(&line) && err.contains(named), "{err}");
        }
    }

    /// Two leads cannot share a SPIFFE ID or a key.
    #[test]
    fn leads_are_unique() {
        let second =
            POLICY[POLICY.find("[[leads]]").unwrap()..].replace("fintech/lead", "fintech/second");
        let err = parse(&format!("{POLICY}\n{second}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("another lead's key_sha256"), "{err}");
        let text = format!(
            "{POLICY}\n{}",
            POLICY[POLICY.find("[[leads]]").unwrap()..].replace("af62", "bf62")
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn delegation_cannot_exceed_the_lead() {
        let bad = POLICY.replace(r#"max_slice = "150.00""#, r#"max_slice = "600.00""#);
        assert!(parse(&bad).unwrap_err().to_string().contains("max_slice"));
        let bad = POLICY.replace(
            r#"scopes = ["market_data.read", "portfolio.read"]"#,
            r#"scopes = ["portfolio.read"]"#,
        );
        assert!(
            parse(&bad)
                .unwrap_err()
                .to_string()
                .contains("itself lacks")
        );
    }
}
