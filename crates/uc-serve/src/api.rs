//! The OpenAI wire format: request bodies parsed and validated into a [`Job`]-ready
//! [`Request`], response bodies, and the error JSON.
//!
//! Request bodies are untrusted: [`parse_chat`] and [`parse_completion`] take raw bytes
//! and return either a validated request or an [`ApiError`] that carries its 4xx status
//! and renders as OpenAI's `{"error": {"message", "type", "param", "code"}}`. Nothing
//! here panics on any input (property-tested below and in `tests/parse.rs`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Longest stop sequence, in bytes (a bound on the text held back while streaming).
pub const MAX_STOP_BYTES: usize = 256;
/// Default `max_tokens` of `/v1/completions` (OpenAI's default).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// A request rejected before it reached the model.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status (4xx for the client's fault, 5xx for ours).
    pub status: u16,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`.
    pub kind: &'static str,
    /// Human-readable reason.
    pub message: String,
    /// The offending request field, if one.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error` about `param`.
    pub fn bad(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.into(),
            code: None,
        }
    }

    /// With a machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        ApiError {
            status: 404,
            kind: "invalid_request_error",
            message: format!("The model `{asked}` does not exist; this server serves `{served}`"),
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// 500: something failed on the server's side.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 503: the server is shutting down or its model worker stopped.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: 503,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// The JSON body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// One chat message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct RawMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of /v1/completions: a string or a list holding one string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by both endpoints, as sent (unvalidated). Unknown fields are ignored,
/// as OpenAI-compatible servers do, so clients sending e.g. `user` still work.
#[derive(Deserialize)]
struct RawCommon {
    model: Option<Value>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<i64>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    echo: Option<bool>,
}

#[derive(Deserialize)]
struct RawChat {
    #[serde(flatten)]
    common: RawCommon,
    messages: Option<Vec<RawMessage>>,
}

#[derive(Deserialize)]
struct RawCompletion {
    #[serde(flatten)]
    common: RawCommon,
    prompt: Option<Prompt>,
}

/// A chat message after validation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Validated sampling and stopping parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// The model name the client asked for.
    pub model: String,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1].
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Most tokens to generate; `None` = up to the context.
    pub max_tokens: Option<usize>,
    /// Text sequences that end generation (not included in the output).
    pub stop: Vec<String>,
    /// PRNG seed; `None` = a fresh one per request.
    pub seed: Option<u64>,
    /// Server-sent events instead of one JSON body.
    pub stream: bool,
    /// Streaming: send a last chunk with usage counts.
    pub include_usage: bool,
}

/// What the client wants generated.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// `/v1/chat/completions`: rendered by the chat template.
    Chat(Vec<Message>),
    /// `/v1/completions`: raw text.
    Text(String),
}

/// A parsed, validated request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Prompt source.
    pub input: Input,
    /// Parameters.
    pub params: Params,
}

fn json_error(e: serde_json::Error) -> ApiError {
    ApiError::bad(
        None,
        format!("Could not parse the request body as JSON: {e}"),
    )
}

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8]) -> Result<Request, ApiError> {
    let raw: RawChat = serde_json::from_slice(body).map_err(json_error)?;
    let params = validate(raw.common, None)?;
    let raw_msgs = raw
        .messages
        .ok_or_else(|| ApiError::bad(Some("messages".into()), "`messages` is required"))?;
    if raw_msgs.is_empty() {
        return Err(ApiError::bad(
            Some("messages".into()),
            "`messages` must hold at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(raw_msgs.len());
    for (i, m) in raw_msgs.into_iter().enumerate() {
        let param = || Some(format!("messages[{i}]"));
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "tool" | "developer"
        ) {
            return Err(ApiError::bad(param(), format!("unknown role `{}`", m.role)));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => s.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad(
                                param(),
                                format!(
                                    "content part of type `{kind}` is not supported (text only)"
                                ),
                            ))
                        }
                    }
                }
                s
            }
        };
        messages.push(Message {
            role: m.role,
            content,
        });
    }
    Ok(Request {
        input: Input::Chat(messages),
        params,
    })
}

/// Parses a `/v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<Request, ApiError> {
    let raw: RawCompletion = serde_json::from_slice(body).map_err(json_error)?;
    if raw.common.echo == Some(true) {
        return Err(ApiError::bad(
            Some("echo".into()),
            "`echo` is not supported",
        ));
    }
    let params = validate(raw.common, Some(DEFAULT_COMPLETION_MAX_TOKENS))?;
    let prompt = match raw.prompt {
        None => return Err(ApiError::bad(Some("prompt".into()), "`prompt` is required")),
        Some(Prompt::One(s)) => s,
        Some(Prompt::Many(mut v)) if v.len() == 1 => v.pop().unwrap_or_default(),
        Some(Prompt::Many(_)) => {
            return Err(ApiError::bad(
                Some("prompt".into()),
                "a list of prompts is not supported; send one string",
            ))
        }
    };
    Ok(Request {
        input: Input::Text(prompt),
        params,
    })
}

fn validate(c: RawCommon, default_max: Option<usize>) -> Result<Params, ApiError> {
    let p = |s: &str| Some(s.to_string());
    let model = match c.model {
        Some(Value::String(s)) => s,
        Some(_) => return Err(ApiError::bad(p("model"), "`model` must be a string")),
        None => return Err(ApiError::bad(p("model"), "`model` is required")),
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad(
            p("temperature"),
            format!("temperature {temperature} must be between 0 and 2"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    // Checked after the cast too: 1e-50 is > 0 in f64 but 0 in the sampler's f32.
    if !(top_p > 0.0 && top_p <= 1.0 && (top_p as f32) > 0.0) {
        return Err(ApiError::bad(
            p("top_p"),
            format!("top_p {top_p} must be in (0, 1]"),
        ));
    }
    let top_k = match c.top_k {
        None => 0,
        Some(k) => usize::try_from(k)
            .map_err(|_| ApiError::bad(p("top_k"), format!("top_k {k} must be >= 0 (0 = off)")))?,
    };
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        None => default_max,
        Some(m) if m >= 1 => Some(usize::try_from(m).unwrap_or(usize::MAX)),
        Some(m) => {
            return Err(ApiError::bad(
                p("max_tokens"),
                format!("max_tokens {m} must be at least 1"),
            ))
        }
    };
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::bad(
            p("stop"),
            format!("at most {MAX_STOP} stop sequences"),
        ));
    }
    if let Some(s) = stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::bad(
            p("stop"),
            format!(
                "stop sequence of {} bytes: must be 1 to {MAX_STOP_BYTES}",
                s.len()
            ),
        ));
    }
    // OpenAI takes any 64-bit integer; a negative seed is reinterpreted, not rejected.
    let seed = c.seed.map(|s| s as u64);
    if let Some(n) = c.n {
        if n != 1 {
            return Err(ApiError::bad(p("n"), "only n = 1 is supported"));
        }
    }
    if matches!(c.logprobs, Some(ref v) if !v.is_null() && v != &Value::Bool(false)) {
        return Err(ApiError::bad(p("logprobs"), "logprobs are not supported"));
    }
    let stream = c.stream.unwrap_or(false);
    Ok(Params {
        model,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        max_tokens,
        stop,
        seed,
        stream,
        include_usage: stream && c.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the (templated) prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (an end-of-sequence token is not counted).
    pub completion_tokens: usize,
    /// The sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Counts with their total.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// Why generation ended, as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_a_full_chat_request() {
        let r = parse_chat(
            br#"{"model":"m","messages":[{"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi"}]}],
                "temperature":0.5,"top_p":0.9,"top_k":40,"max_tokens":7,"stop":"\n",
                "seed":-1,"stream":true,"stream_options":{"include_usage":true},"user":"x"}"#,
        )
        .unwrap();
        assert_eq!(
            r.input,
            Input::Chat(vec![
                Message {
                    role: "system".into(),
                    content: "be brief".into()
                },
                Message {
                    role: "user".into(),
                    content: "hi".into()
                }
            ])
        );
        let p = r.params;
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.5, 0.9, 40));
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert_eq!(p.seed, Some(u64::MAX));
        assert!(p.stream && p.include_usage);
    }

    #[test]
    fn completion_defaults_to_sixteen_tokens_and_temperature_one() {
        let r = parse_completion(br#"{"model":"m","prompt":["abc"]}"#).unwrap();
        assert_eq!(r.input, Input::Text("abc".into()));
        assert_eq!(r.params.max_tokens, Some(16));
        assert_eq!(r.params.temperature, 1.0);
        assert!(!r.params.stream);
    }

    fn status_and_param(body: &str, chat: bool) -> (u16, Option<String>) {
        let e = if chat {
            parse_chat(body.as_bytes()).unwrap_err()
        } else {
            parse_completion(body.as_bytes()).unwrap_err()
        };
        (e.status, e.param)
    }

    #[test]
    fn rejects_each_bad_parameter_with_400_naming_it() {
        let cases = [
            (r#"{"model":"m","messages":[]}"#, "messages"),
            (r#"{"model":"m"}"#, "messages"),
            (r#"{"messages":[{"role":"user","content":"x"}]}"#, "model"),
            (
                r#"{"model":1,"messages":[{"role":"user","content":"x"}]}"#,
                "model",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":-1}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                "top_p",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_k":-2}"#,
                "top_k",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                "stop",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":""}"#,
                "stop",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#,
                "n",
            ),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#,
                "messages[0]",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "messages[0]",
            ),
        ];
        for (body, param) in cases {
            assert_eq!(
                status_and_param(body, true),
                (400, Some(param.to_string())),
                "{body}"
            );
        }
        assert_eq!(
            status_and_param(r#"{"model":"m","prompt":["a","b"]}"#, false),
            (400, Some("prompt".into()))
        );
        assert_eq!(
            status_and_param(r#"{"model":"m"}"#, false),
            (400, Some("prompt".into()))
        );
    }

    #[test]
    fn malformed_json_is_a_400_with_openai_error_shape() {
        for body in [
            "",
            "{",
            "[1,2]",
            "null",
            "{\"model\": \"m\", \"messages\": 5}",
        ] {
            let e = parse_chat(body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            let b = e.body();
            assert_eq!(b["error"]["type"], "invalid_request_error");
            assert!(b["error"]["message"].as_str().unwrap().len() > 5);
        }
    }

    /// A JSON value of bounded depth with the field names the parser looks at, so
    /// generated bodies reach the validation code, not only the JSON parser.
    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::String),
        ];
        let keys = prop_oneof![
            Just("model".to_string()),
            Just("messages".to_string()),
            Just("role".to_string()),
            Just("content".to_string()),
            Just("prompt".to_string()),
            Just("temperature".to_string()),
            Just("top_p".to_string()),
            Just("top_k".to_string()),
            Just("max_tokens".to_string()),
            Just("stop".to_string()),
            Just("seed".to_string()),
            Just("stream".to_string()),
            Just("stream_options".to_string()),
            Just("include_usage".to_string()),
            Just("type".to_string()),
            Just("text".to_string()),
            Just("n".to_string()),
            "[a-z_]{1,8}",
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((keys.clone(), inner), 0..8)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parsing_arbitrary_bytes_never_panics(body in prop::collection::vec(any::<u8>(), 0..256)) {
            for r in [parse_chat(&body), parse_completion(&body)] {
                if let Err(e) = r {
                    prop_assert_eq!(e.status, 400);
                }
            }
        }

        #[test]
        fn parsing_arbitrary_json_never_panics_and_errors_are_4xx(v in arb_json()) {
            let body = serde_json::to_vec(&v).unwrap();
            for r in [parse_chat(&body), parse_completion(&body)] {
                match r {
                    Err(e) => prop_assert!((400..500).contains(&e.status)),
                    Ok(req) => {
                        let p = req.params;
                        prop_assert!(p.temperature >= 0.0 && p.temperature <= 2.0);
                        prop_assert!(p.top_p > 0.0 && p.top_p <= 1.0);
                        prop_assert!(p.max_tokens != Some(0));
                        prop_assert!(p.stop.len() <= MAX_STOP);
                    }
                }
            }
        }
    }
}
