//! Test harness: the mock provider in-process and the real `warden` binary as a child
//! process, both on free loopback ports, wired together by a generated config.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use loadtest::mock::{MockConfig, MockProvider, Truth};
use rust_decimal::Decimal;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub const AGENT_KEY: &str = "e2e-agent-key-0001";
pub const AGENT_ID: &str = "spiffe://e2e.test/agent/qa/lead";
pub const LIMITED_KEY: &str = "e2e-agent-key-0002";
pub const LIMITED_ID: &str = "spiffe://e2e.test/agent/qa/limited";
pub const OPERATOR_KEY: &str = "e2e-operator-key";
/// The lead of the case-study fleet.
pub const CASE_LEAD_KEY: &str = "e2e-case-lead-key";
pub const CASE_LEAD_ID: &str = "spiffe://e2e.test/agent/fintech/lead-quarterly-orchestrator";
pub const MOCK_KEY: &str = "e2e-upstream-secret";
/// Daily limits of the two leads, in USD.
pub const AGENT_LIMIT: &str = "100.00";
pub const LIMITED_LIMIT: &str = "0.01";

/// Price of the mock models (USD per million tokens): input, cached input, output.
pub const SMALL_PRICE: (&str, &str, &str) = ("0.15", "0.075", "0.60");

/// Models the recorded fixtures ask for, routed to the mock so replays reach it.
const FIXTURE_MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "o3-mini",
    "o1-mini",
    "gpt-5.2",
    "gpt-5.2-proo",
    "gpt-5.6-sol",
    "openai/gpt-oss-120b",
    "text-embedding-3-small",
];

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/provider-streams")
}

/// A running mock provider and Warden in front of it.
pub struct Harness {
    pub mock: MockProvider,
    warden: Child,
    pub addr: String,
    dir: PathBuf,
    /// Extra environment of the Warden process.
    env: Vec<(String, String)>,
    http: reqwest::Client,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with("").await
    }

    /// Starts with `extra` appended to the generated `warden.toml` (e.g. `[[sinks]]`).
    pub async fn start_with(extra: &str) -> Harness {
        Harness::start_with_env(extra, &[]).await
    }

    /// Starts with `extra` in `warden.toml` and `env` in Warden's environment.
    pub async fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Harness {
        let mock_config = MockConfig {
            api_key: Some(MOCK_KEY.into()),
            fixtures: Some(fixtures_dir()),
            ..MockConfig::default()
        };
        let mock = MockProvider::start("127.0.0.1:0".parse().unwrap(), mock_config)
            .await
            .expect("mock provider starts");

        let dir = temp_dir();
        write_config(&dir, &mock.base_url());
        if !extra.is_empty() {
            let path = dir.join("warden.toml");
            let config = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, format!("{config}\n{extra}\n")).unwrap();
        }
        let env: Vec<_> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (warden, addr) = spawn_warden(&dir, &env);

        Harness {
            mock,
            warden,
            addr,
            dir,
            env,
            http: reqwest::Client::new(),
        }
    }

    /// The OpenAI base URL of this Warden.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// An async-openai client authenticated as `key`.
    pub fn client(&self, key: &str) -> Client<OpenAIConfig> {
        let config = OpenAIConfig::new()
            .with_api_base(self.base_url())
            .with_api_key(key);
        Client::with_config(config)
    }

    /// A raw POST of `body` to `path` with the agent's key.
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(AGENT_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("warden answers")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.post(path, serde_json::to_vec(body).unwrap()).await
    }

    /// `GET /v1/usage` as the operator, for every agent.
    pub async fn usage(&self) -> Value {
        let response = self
            .http
            .get(self.url("/v1/usage"))
            .bearer_auth(OPERATOR_KEY)
            .send()
            .await
            .expect("usage answers");
        assert_eq!(response.status(), 200);
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    }

    /// Waits (bounded) until `n` usage records exist: streams settle when they end,
    /// which may be just after the client saw the last byte.
    pub async fn usage_records(&self, n: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let usage = self.usage().await;
            if usage["data"].as_array().unwrap().len() >= n || Instant::now() > deadline {
                return usage;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn truth(&self) -> Truth {
        self.mock.truth_all()
    }

    /// The policy file Warden reads, for tests that change it.
    pub fn policy_path(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }

    /// Sends a signal (by name, e.g. `HUP`) to Warden.
    pub fn signal(&self, name: &str) {
        let pid = self.warden.id().to_string();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(&pid)
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Kills Warden with SIGKILL: no drain, no flush.
    pub fn crash(&mut self) {
        let pid = self.warden.id().to_string();
        let status = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        assert!(status.success());
        self.warden.wait().unwrap();
    }

    /// Starts Warden again on the same configuration and data (on a new port).
    pub fn restart(&mut self) {
        let (warden, addr) = spawn_warden(&self.dir, &self.env);
        self.warden = warden;
        self.addr = addr;
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = self.warden.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        self.warden.wait().unwrap().code()
    }

    pub fn database(&self) -> PathBuf {
        self.dir.join("data/warden.db")
    }

    /// The decision records of `kind` about `subject` (any subject when `None`).
    pub fn decisions(&self, kind: &str, subject: Option<&str>) -> Vec<Value> {
        let db = rusqlite::Connection::open(self.database()).unwrap();
        let mut stmt = db
            .prepare("SELECT entry FROM ledger WHERE kind = ?1 AND (?2 IS NULL OR subject = ?2) ORDER BY seq")
            .unwrap();
        stmt.query_map(rusqlite::params![kind, subject], |row| {
            row.get::<_, String>(0)
        })
        .unwrap()
        .map(|entry| serde_json::from_str::<Value>(&entry.unwrap()).unwrap()["details"].clone())
        .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.warden.kill();
        let _ = self.warden.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("warden-e2e-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn sha256(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn write_config(dir: &Path, mock_url: &str) {
    let mut mock_models = vec!["mock-small", "mock-large", "mock-embed"];
    mock_models.extend_from_slice(FIXTURE_MODELS);
    let quoted = |models: &[&str]| {
        models
            .iter()
            .map(|m| format!("\"{m}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };

    let config = format!(
        r#"
prices = "models.toml"
policy = "policy.toml"

[server]
listen = "127.0.0.1:0"
data_dir = "{data}"
max_body_bytes = 65536
drain_timeout = "5s"

[operator]
key_sha256 = "{operator}"

[[providers]]
name = "mock"
base_url = "{mock_url}"
api_key_env = "WARDEN_E2E_MOCK_KEY"
models = [{mock_models}]
# The mock runs inside the test process and shares two cores with the whole suite;
# a tight deadline here turns a busy machine into 504s the tests are not about.
first_byte_timeout = "30s"

[[providers]]
name = "slow"
base_url = "{mock_url}"
api_key_env = "WARDEN_E2E_MOCK_KEY"
models = ["mock-slow"]
first_byte_timeout = "300ms"

[[providers]]
name = "down"
base_url = "http://127.0.0.1:9/v1"
models = ["mock-down"]
connect_timeout = "1s"

[[providers]]
name = "keyless"
base_url = "{mock_url}"
api_key_env = "WARDEN_E2E_UNSET_KEY"
models = ["mock-keyless"]

"#,
        data = dir.join("data").display(),
        operator = sha256(OPERATOR_KEY),
        mock_models = quoted(&mock_models),
    );
    std::fs::write(dir.join("warden.toml"), config).unwrap();

    let policy = format!(
        r#"
trust_domain = "e2e.test"

[scopes."models.all"]
models = ["*"]
tools = ["*"]

[scopes."models.small"]
models = ["mock-small"]

[scopes."market_data.read"]
tools = ["get_quote"]

[scopes."portfolio.read"]
tools = ["get_positions"]

[scopes."compliance_docs.read"]
tools = ["search_compliance_docs"]

[scopes."reports.write"]
tools = ["write_report"]

[[leads]]
spiffe_id = "{CASE_LEAD_ID}"
key_sha256 = "{case}"
daily_limit = "2200.00"
scopes = ["models.small", "market_data.read", "portfolio.read", "compliance_docs.read", "reports.write"]

[leads.delegation]
max_children = 40
max_depth = 2
max_slice = "120.00"
allowed_scopes = ["models.small", "market_data.read", "compliance_docs.read", "reports.write"]
max_lifetime = "72h"

[[leads]]
spiffe_id = "{AGENT_ID}"
key_sha256 = "{agent}"
daily_limit = "{AGENT_LIMIT}"
scopes = ["models.all", "models.small"]

[leads.delegation]
max_children = 2
max_depth = 2
max_slice = "{AGENT_LIMIT}"
allowed_scopes = ["models.small"]
max_lifetime = "72h"

[[leads]]
spiffe_id = "{LIMITED_ID}"
key_sha256 = "{limited}"
daily_limit = "{LIMITED_LIMIT}"
scopes = ["models.small"]

[leads.delegation]
max_children = 0
max_depth = 0
max_slice = "0"
allowed_scopes = []
max_lifetime = "1h"
"#,
        agent = sha256(AGENT_KEY),
        limited = sha256(LIMITED_KEY),
        case = sha256(CASE_LEAD_KEY),
    );
    std::fs::write(dir.join("policy.toml"), policy).unwrap();

    let (input, cached, output) = SMALL_PRICE;
    let mut prices = String::new();
    let mut all: Vec<&str> = mock_models.clone();
    all.extend(["mock-slow", "mock-down", "mock-keyless"]);
    for model in all {
        prices.push_str(&format!(
            "[models.\"{model}\"]\ninput = \"{input}\"\ncached_input = \"{cached}\"\noutput = \"{output}\"\n\n"
        ));
    }
    std::fs::write(dir.join("models.toml"), prices).unwrap();
}

fn spawn_warden(dir: &Path, env: &[(String, String)]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_warden"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("warden.toml"))
        .env("WARDEN_E2E_MOCK_KEY", MOCK_KEY)
        .env_remove("WARDEN_E2E_UNSET_KEY")
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("warden binary starts");

    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("warden listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line from warden: {line:?}"))
        .to_owned();
    (child, addr)
}

/// An authenticated call as `key`, with an optional JSON body; returns the status and
/// the JSON answer (`null` when there is none).
pub async fn call(
    h: &Harness,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, h.url(path))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Exact cost of a mock-model request in USD, computed independently of Warden.
pub fn mock_cost(input_tokens: u64, output_tokens: u64) -> Decimal {
    let (input, _, output) = SMALL_PRICE;
    let input = Decimal::from_str(input).unwrap();
    let output = Decimal::from_str(output).unwrap();
    (Decimal::from(input_tokens) * input + Decimal::from(output_tokens) * output)
        / Decimal::from(1_000_000)
}

/// A usage record's cost as a Decimal.
pub fn record_cost(record: &Value) -> Decimal {
    Decimal::from_str(record["cost_usd"].as_str().unwrap()).unwrap()
}

/// Splits an SSE body into its events (without the blank-line terminators).
pub fn sse_events(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect()
}

/// The `data` payload of each event.
pub fn sse_data(body: &str) -> Vec<String> {
    sse_events(body)
        .into_iter()
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .map(str::to_owned)
        })
        .collect()
}

/// The one error object in an OpenAI-shaped error body.
pub fn error_of(body: &Value) -> (&str, &str) {
    let error = &body["error"];
    (
        error["type"].as_str().unwrap_or(""),
        error["code"].as_str().unwrap_or(""),
    )
}
