//! The embedding client: Ollama's `/api/embed` or an OpenAI-compatible
//! `/v1/embeddings` (llama.cpp, TEI, vLLM, LocalAI, OpenAI).
//!
//! It learns the model's vector size and context length once, checks every
//! answer (one vector per input, all of that size), retries transient
//! failures a few times within the job, and sorts every failure into one of
//! four kinds: the server did not answer (down, overloaded: the queue waits
//! for it), worth retrying later, hopeless, or "this input is too long"
//! (which the pipeline answers by splitting the input, never by cutting it).
//! Requests are spread over the endpoints `embed.url` lists (`endpoints`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::endpoints::{Endpoints, Out};
use crate::config::{EmbedSettings, Provider};
use crate::observe::metrics;

/// What the pipeline needs to know about the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelInfo {
    pub dimension: usize,
    /// In tokens, when the server says.
    pub context_length: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedError {
    /// No answer in time, refused, 429 or 5xx: the server is down, slow or
    /// overloaded, for every job alike.
    Unavailable(String),
    /// A bad answer to this request (a crashed runner, a wrong number of
    /// vectors): try again later.
    Transient(String),
    /// Retrying cannot help: missing model, wrong dimension, bad request.
    Permanent(String),
    /// An input (or the request) is over what the model or server accepts.
    TooLong(String),
}

impl EmbedError {
    pub fn message(self) -> String {
        match self {
            EmbedError::Unavailable(m)
            | EmbedError::Transient(m)
            | EmbedError::Permanent(m)
            | EmbedError::TooLong(m) => m,
        }
    }
}

pub struct Embedder {
    client: Arc<Client>,
    /// Replaced whole by a reload that changes `embed.url`.
    endpoints: std::sync::RwLock<Arc<Endpoints>>,
    info: Mutex<Option<ModelInfo>>,
}

/// The HTTP side, shared with the probes that bring an endpoint back.
struct Client {
    http: reqwest::Client,
    settings: EmbedSettings,
}

/// A probe of an endpoint out of rotation waits this long at first, then
/// twice as long each time, up to [`PROBE_CAP`].
const PROBE_FIRST: Duration = Duration::from_secs(1);
const PROBE_CAP: Duration = Duration::from_secs(15);

impl Embedder {
    pub fn new(settings: &EmbedSettings) -> anyhow::Result<Embedder> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Embedder {
            client: Arc::new(Client {
                http,
                settings: settings.clone(),
            }),
            endpoints: std::sync::RwLock::new(Arc::new(Endpoints::new(settings.urls()))),
            info: Mutex::new(None),
        })
    }

    /// Whether each endpoint answers at all (any HTTP status will do): for
    /// readiness probes, which must not load a model. In `embed.url`'s
    /// order, with the endpoint's rotation state.
    pub async fn reachable(&self) -> Vec<EndpointHealth> {
        let states = self.endpoints().states();
        let answers = futures_util::future::join_all(states.iter().map(|(url, _)| async move {
            match self.client.http.get(url).send().await {
                Ok(_) => Ok(()),
                Err(e) => Err(self.client.unreachable(url, e).message()),
            }
        }))
        .await;
        states
            .into_iter()
            .zip(answers)
            .map(|((url, out), answer)| EndpointHealth { url, out, answer })
            .collect()
    }

    /// Whether the embedder embeds again after an outage: one short input,
    /// one try. A server that merely answers HTTP may still refuse every
    /// embedding (overloaded, model not loaded), so the probe is the real
    /// request.
    pub async fn probe(&self) -> Result<(), String> {
        self.model().await.map_err(EmbedError::message)?;
        self.on_an_endpoint(
            |url| async move { self.client.request(&url, &["docworker probe"]).await },
        )
        .await
        .map(drop)
        .map_err(EmbedError::message)
    }

    fn endpoints(&self) -> Arc<Endpoints> {
        Arc::clone(&self.endpoints.read().unwrap())
    }

    /// A reload's new `embed.url`: requests from now on go to these
    /// servers, all in rotation; requests under way finish where they are.
    pub fn set_urls(&self, urls: Vec<String>) {
        *self.endpoints.write().unwrap() = Arc::new(Endpoints::new(urls));
    }

    pub fn model_name(&self) -> &str {
        &self.client.settings.model
    }

    /// Identifies provider and model, for the settings fingerprint. Not the
    /// endpoints: they all serve the same model.
    pub fn describe(&self) -> String {
        let provider = match self.client.settings.provider {
            Provider::Ollama => "ollama",
            Provider::OpenAi => "openai",
        };
        format!("{provider}/{}", self.client.settings.model)
    }

    /// The model's vector size and context length, asked for once and then
    /// remembered. Not remembered when asking fails, so a server that was
    /// down at start is asked again by the next job.
    pub async fn model(&self) -> Result<ModelInfo, EmbedError> {
        let mut cached = self.info.lock().await;
        if let Some(info) = *cached {
            return Ok(info);
        }
        let settings = &self.client.settings;
        let info = match settings.provider {
            Provider::Ollama => {
                self.on_an_endpoint(|url| async move { self.client.show_ollama_model(&url).await })
                    .await?
            }
            Provider::OpenAi => ModelInfo {
                dimension: settings.dimension,
                context_length: (settings.context_length > 0).then_some(settings.context_length),
            },
        };
        // An OpenAI-compatible server says nothing about its models, and
        // Ollama may not: embed one input and see, before a collection is
        // made for a size the model does not produce.
        let info = if info.dimension == 0 || settings.provider == Provider::OpenAi {
            let probe = self
                .on_an_endpoint(|url| async move {
                    self.client.request(&url, &["dimension probe"]).await
                })
                .await?;
            let probed = probe.first().map_or(0, Vec::len);
            if info.dimension != 0 && probed != info.dimension {
                return Err(EmbedError::Permanent(format!(
                    "Embedding dimension mismatch: model {:?} returns {probed}-dimensional vectors, but embed.dimension is {}. Set embed.dimension to {probed} (or 0 to learn it).",
                    settings.model, info.dimension
                )));
            }
            ModelInfo {
                dimension: probed,
                ..info
            }
        } else {
            info
        };
        if info.dimension == 0 {
            return Err(EmbedError::Permanent(format!(
                "The embedding server at {} answered with empty vectors for model {:?}.",
                settings.url, settings.model
            )));
        }
        *cached = Some(info);
        Ok(info)
    }

    /// Embeds `inputs` in one request (the caller keeps batches within
    /// `embed.batch_size` and `embed.batch_bytes`), retrying transient
    /// failures up to `embed.tries` times in all. A failover to another
    /// endpoint is not a try.
    pub async fn embed(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let info = self.model().await?;
        let mut delay = Duration::from_millis(250);
        let mut tries = 0;
        loop {
            tries += 1;
            let answer = self
                .on_an_endpoint(|url| async move {
                    let vectors = self.client.request(&url, inputs).await?;
                    self.client
                        .check(&url, inputs.len(), info.dimension, vectors)
                })
                .await;
            match answer {
                Ok(vectors) => return Ok(vectors),
                Err(EmbedError::Transient(e) | EmbedError::Unavailable(e))
                    if tries < self.client.settings.tries =>
                {
                    tracing::warn!(error = %e, tries, "embedding request failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 4).min(Duration::from_secs(8));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `call` on the endpoint [`Endpoints::pick`] chooses. An endpoint
    /// that does not answer leaves the rotation (and is probed back) and
    /// the call moves to another, as long as one is in rotation; a success
    /// on an endpoint out of rotation puts it back.
    async fn on_an_endpoint<T, F, Fut>(&self, call: F) -> Result<T, EmbedError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, EmbedError>>,
    {
        let endpoints = self.endpoints();
        if endpoints.count() == 1 {
            // Nothing to rotate: the job's retries and the queue's outage
            // pause deal with the one server.
            return call(endpoints.url(0).to_string()).await;
        }
        let mut failovers = 0;
        loop {
            let (index, in_flight) = endpoints.pick();
            let url = endpoints.url(index);
            let answer = call(url.to_string()).await;
            drop(in_flight);
            match answer {
                Err(EmbedError::Unavailable(e)) => {
                    if endpoints.take_out(index, &e) {
                        tracing::warn!(endpoint = url, error = %e, "embedding endpoint out of rotation; probing it until it embeds again");
                        self.probe_back(&endpoints, index);
                    }
                    failovers += 1;
                    if endpoints.in_rotation() == 0 || failovers >= endpoints.count() {
                        return Err(EmbedError::Unavailable(e));
                    }
                }
                other => {
                    if other.is_ok() && endpoints.put_back(index) {
                        tracing::info!(endpoint = url, "embedding endpoint back in rotation");
                    }
                    return other;
                }
            }
        }
    }

    /// Probes an endpoint out of rotation with one short input, with
    /// capped backoff, until it embeds (and is put back) or a request has
    /// put it back meanwhile. Ends with the embedder.
    fn probe_back(&self, endpoints: &Arc<Endpoints>, index: usize) {
        let client = Arc::clone(&self.client);
        let endpoints = Arc::downgrade(endpoints);
        tokio::spawn(async move {
            let mut wait = PROBE_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(PROBE_CAP);
                let Some(endpoints) = endpoints.upgrade() else {
                    return;
                };
                if !endpoints.is_out(index) {
                    return;
                }
                let url = endpoints.url(index).to_string();
                if client.request(&url, &["docworker probe"]).await.is_ok()
                    && endpoints.put_back(index)
                {
                    tracing::info!(endpoint = %url, "embedding endpoint back in rotation");
                }
                if !endpoints.is_out(index) {
                    return;
                }
            }
        });
    }
}

/// One endpoint, for `/readyz`.
#[derive(Debug, Clone)]
pub struct EndpointHealth {
    pub url: String,
    /// Out of rotation: since when and why.
    pub out: Option<Out>,
    /// Whether it answers HTTP now.
    pub answer: Result<(), String>,
}

impl Client {
    fn check(
        &self,
        url: &str,
        inputs: usize,
        dimension: usize,
        vectors: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        if vectors.len() != inputs {
            return Err(EmbedError::Transient(format!(
                "The embedding server at {url} returned {} vectors for {} inputs.",
                vectors.len(),
                inputs
            )));
        }
        if let Some(v) = vectors.iter().find(|v| v.len() != dimension) {
            return Err(EmbedError::Permanent(format!(
                "Embedding dimension mismatch: model {:?} returned a {}-dimensional vector where {} was expected. Check embed.model and embed.dimension{}.",
                self.settings.model,
                v.len(),
                dimension,
                if self.settings.urls().len() > 1 {
                    format!(", and that every server in embed.url serves the same model (this one: {url})")
                } else {
                    String::new()
                }
            )));
        }
        if vectors.iter().flatten().any(|x| !x.is_finite()) {
            return Err(EmbedError::Transient(format!(
                "The embedding server at {url} returned a vector with NaN or infinite values."
            )));
        }
        Ok(vectors)
    }

    async fn show_ollama_model(&self, endpoint: &str) -> Result<ModelInfo, EmbedError> {
        #[derive(Deserialize)]
        struct Show {
            #[serde(default)]
            capabilities: Option<Vec<String>>,
            #[serde(default)]
            model_info: serde_json::Map<String, Value>,
        }
        let body = json!({ "model": self.settings.model });
        let show: Show = self.post(endpoint, "/api/show", &body).await?;
        if let Some(caps) = &show.capabilities {
            if !caps.iter().any(|c| c == "embedding") {
                return Err(EmbedError::Permanent(format!(
                    "Model {:?} on Ollama at {} is not an embedding model (it can do: {}). Set embed.model to an embedding model such as nomic-embed-text, and `ollama pull` it.",
                    self.settings.model,
                    endpoint,
                    caps.join(", ")
                )));
            }
        }
        let number = |suffix: &str| {
            show.model_info
                .iter()
                .find(|(k, _)| k.ends_with(suffix))
                .and_then(|(_, v)| v.as_u64())
                .map(|n| n as usize)
        };
        Ok(ModelInfo {
            dimension: number(".embedding_length").unwrap_or(0),
            context_length: number(".context_length"),
        })
    }

    async fn request(&self, endpoint: &str, inputs: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        match self.settings.provider {
            Provider::Ollama => {
                #[derive(Deserialize)]
                struct Answer {
                    embeddings: Vec<Vec<f32>>,
                }
                let body = json!({
                    "model": self.settings.model,
                    "input": inputs,
                    // Never let the server cut an input silently.
                    "truncate": false,
                    "keep_alive": format!("{}s", self.settings.keep_alive.as_secs()),
                });
                let answer: Answer = self.post(endpoint, "/api/embed", &body).await?;
                Ok(answer.embeddings)
            }
            Provider::OpenAi => {
                #[derive(Deserialize)]
                struct Item {
                    embedding: Vec<f32>,
                    index: usize,
                }
                #[derive(Deserialize)]
                struct Answer {
                    data: Vec<Item>,
                }
                let body = json!({ "model": self.settings.model, "input": inputs });
                let mut answer: Answer = self.post(endpoint, "/v1/embeddings", &body).await?;
                answer.data.sort_by_key(|i| i.index);
                Ok(answer.data.into_iter().map(|i| i.embedding).collect())
            }
        }
    }

    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: &str,
        path: &str,
        body: &Value,
    ) -> Result<T, EmbedError> {
        let mut request = self.http.post(format!("{endpoint}{path}")).json(body);
        if !self.settings.api_key.is_empty() {
            request = request.bearer_auth(&self.settings.api_key);
        }
        let op = if path == "/api/show" { "show" } else { "embed" };
        let started = Instant::now();
        let answer = async {
            let response = request.send().await?;
            let status = response.status();
            Ok::<_, reqwest::Error>((status, response.text().await?))
        }
        .await;
        metrics::request(
            "embedder",
            op,
            matches!(&answer, Ok((status, _)) if status.is_success()),
            started.elapsed(),
        );
        let (status, text) = answer.map_err(|e| self.unreachable(endpoint, e))?;
        if !status.is_success() {
            return Err(self.classify(endpoint, status.as_u16(), &error_message(&text)));
        }
        serde_json::from_str(&text).map_err(|e| {
            EmbedError::Transient(format!(
                "The embedding server at {endpoint} sent an answer docworker could not read ({e})."
            ))
        })
    }

    fn unreachable(&self, endpoint: &str, e: reqwest::Error) -> EmbedError {
        let what = if e.is_timeout() {
            format!(
                "did not answer within embed.timeout ({:?})",
                self.settings.timeout
            )
        } else if e.is_connect() {
            "could not be reached".to_string()
        } else {
            "failed mid-request".to_string()
        };
        EmbedError::Unavailable(format!(
            "The embedding server at {endpoint} {what}: {}",
            source_chain(&e)
        ))
    }

    /// Sorts a failed answer by what retrying can do about it. Ollama sends
    /// runner failures (out of memory, a crashed runner) as 400 too, so its
    /// 400s are read by message, not code.
    fn classify(&self, url: &str, status: u16, message: &str) -> EmbedError {
        let lower = message.to_lowercase();
        let model = &self.settings.model;
        let too_long = lower.contains("context length")
            || lower.contains("input length")
            || lower.contains("too long")
            || lower.contains("maximum context")
            || (lower.contains("must have less than") && lower.contains("tokens"));
        match status {
            413 => EmbedError::TooLong(message.to_string()),
            429 | 500..=599 => EmbedError::Unavailable(format!(
                "The embedding server at {url} is busy or failing (HTTP {status}: {message})."
            )),
            401 | 403 => EmbedError::Permanent(format!(
                "The embedding server at {url} refused the credentials (HTTP {status}: {message}). Check embed.api_key."
            )),
            404 if self.settings.provider == Provider::Ollama => EmbedError::Permanent(format!(
                "Embedding model {model:?} is not available at {url} ({message}). Pull it (`ollama pull {model}`) or set embed.model."
            )),
            404 => EmbedError::Permanent(format!(
                "The embedding server at {url} has no model {model:?} or no /v1/embeddings endpoint ({message}). Check embed.model and embed.url."
            )),
            _ if too_long => EmbedError::TooLong(message.to_string()),
            400 if lower.contains("does not support embeddings") => EmbedError::Permanent(format!(
                "Model {model:?} at {url} is not an embedding model ({message}). Set embed.model to an embedding model."
            )),
            400 if self.settings.provider == Provider::Ollama => EmbedError::Transient(format!(
                "Ollama at {url} failed to embed (HTTP 400: {message})."
            )),
            _ => EmbedError::Permanent(format!(
                "The embedding server at {url} rejected the request (HTTP {status}: {message})."
            )),
        }
    }
}

/// The human part of an error body: Ollama's {"error": "..."}, OpenAI's
/// {"error": {"message": ...}}, or the text itself.
fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let found = parsed.as_ref().and_then(|v| {
        let e = v.get("error")?;
        e.as_str()
            .map(str::to_string)
            .or_else(|| e.get("message")?.as_str().map(str::to_string))
    });
    let text = found.unwrap_or_else(|| body.trim().to_string());
    text.chars().take(300).collect()
}

/// reqwest's Display stops at the outermost error; the cause (connection
/// refused, ...) is what a person needs.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedder(provider: Provider) -> Embedder {
        let mut s = crate::config::Settings::load(None).unwrap().embed;
        s.provider = provider;
        Embedder::new(&s).unwrap()
    }

    impl Embedder {
        fn classify(&self, status: u16, message: &str) -> EmbedError {
            self.client.classify("http://x", status, message)
        }
    }

    #[test]
    fn ollama_errors_are_sorted_by_message() {
        let e = embedder(Provider::Ollama);
        assert!(matches!(
            e.classify(400, "the input length exceeds the context length"),
            EmbedError::TooLong(_)
        ));
        assert!(matches!(
            e.classify(400, "llama runner process has terminated: signal: killed"),
            EmbedError::Transient(_)
        ));
        assert!(matches!(
            e.classify(400, "\"llama3\" does not support embeddings"),
            EmbedError::Permanent(_)
        ));
        assert!(matches!(
            e.classify(404, "model \"x\" not found, try pulling it first"),
            EmbedError::Permanent(_)
        ));
        assert!(matches!(
            e.classify(503, "server busy"),
            EmbedError::Unavailable(_)
        ));
        assert!(matches!(
            e.classify(429, "slow down"),
            EmbedError::Unavailable(_)
        ));
    }

    #[test]
    fn openai_bad_requests_are_permanent() {
        let e = embedder(Provider::OpenAi);
        assert!(matches!(
            e.classify(400, "bad input"),
            EmbedError::Permanent(_)
        ));
        assert!(matches!(
            e.classify(401, "no key"),
            EmbedError::Permanent(_)
        ));
        assert!(matches!(
            e.classify(413, "batch too large"),
            EmbedError::TooLong(_)
        ));
        assert!(matches!(
            e.classify(
                422,
                "Input validation error: `inputs` must have less than 512 tokens"
            ),
            EmbedError::TooLong(_)
        ));
    }

    #[test]
    fn error_bodies_of_both_shapes_are_read() {
        assert_eq!(error_message(r#"{"error":"server busy"}"#), "server busy");
        assert_eq!(
            error_message(r#"{"error":{"message":"bad key","type":"x"}}"#),
            "bad key"
        );
        assert_eq!(error_message("plain"), "plain");
    }
}
