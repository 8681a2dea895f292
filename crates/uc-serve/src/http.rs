//! The HTTP routes (axum): request bytes -> [`crate::api`] parsing -> chat template ->
//! tokens -> a [`Job`] for the [`Engine`] -> one JSON body or server-sent events.
//!
//! Every response carries the pack's fingerprint in the `x-uc-pack-fingerprint`
//! header (and in `system_fingerprint` of completion bodies), so a client can check
//! which verified weights answered.

use crate::api::{self, ApiError, FinishReason, Input, Request, Usage};
use crate::engine::{Engine, Event, Job};
use crate::template::ChatTemplate;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::unbounded_channel;
use uc_model::tokenizer::Tokenizer;
use uc_runtime::SamplingParams;

/// The response header naming the pack that answered.
pub const FINGERPRINT_HEADER: &str = "x-uc-pack-fingerprint";

/// What the routes share.
pub struct AppState {
    /// The model worker.
    pub engine: Engine,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template, if the model has one.
    pub template: Option<ChatTemplate>,
    /// The model id clients must name.
    pub model_id: String,
    /// The pack's fingerprint (SHA-256 hex).
    pub fingerprint: String,
    /// Positions per sequence (prompt + generated).
    pub context: usize,
    /// Unix seconds when the server started (`created` of /v1/models).
    pub created: u64,
    /// Request counter, for response ids.
    pub next_id: AtomicU64,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (status, Json(self.body())).into_response()
    }
}

/// The router over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let fp = HeaderValue::from_str(&state.fingerprint).ok();
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError {
                status: 404,
                kind: "invalid_request_error",
                message: "no such route".into(),
                param: None,
                code: Some("not_found"),
            }
        })
        .layer(axum::middleware::map_response(move |mut r: Response| {
            let fp = fp.clone();
            async move {
                if let Some(fp) = fp {
                    r.headers_mut().insert(FINGERPRINT_HEADER, fp);
                }
                r
            }
        }))
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    let load = s.engine.load();
    Json(json!({
        "status": "ok",
        "model": s.model_id,
        "fingerprint": s.fingerprint,
        "queued": load.queued.load(Ordering::SeqCst),
        "active": load.active.load(Ordering::SeqCst),
        "cancelled": load.cancelled.load(Ordering::SeqCst),
        "peak_batch": load.peak_batch.load(Ordering::SeqCst),
        "reused_prompt_tokens": load.reused_tokens.load(Ordering::SeqCst),
    }))
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_id,
            "object": "model",
            "created": s.created,
            "owned_by": "uc",
            "fingerprint": s.fingerprint,
            "context_length": s.context,
        }]
    }))
}

async fn chat(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match api::parse_chat(&body) {
        Ok(req) => generate(s, req, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match api::parse_completion(&body) {
        Ok(req) => generate(s, req, Kind::Text).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// Seeds of requests that name none: distinct per request (OpenAI's behaviour: without
/// a seed, no reproducibility is promised).
fn fresh_seed(counter: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Prompt tokens and the generation budget, or the 4xx that refuses the request.
fn plan(s: &AppState, req: &Request) -> Result<(Vec<u32>, usize), ApiError> {
    if req.params.model != s.model_id {
        return Err(ApiError::unknown_model(&req.params.model, &s.model_id));
    }
    let text =
        match &req.input {
            Input::Chat(msgs) => match &s.template {
                Some(t) => t.render(msgs)?,
                None => return Err(ApiError::bad(
                    Some("messages".into()),
                    "this model has no chat template (tokenizer_config.json); use /v1/completions",
                )),
            },
            Input::Text(t) => t.clone(),
        };
    let ids = s
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt: {e}")))?;
    if ids.is_empty() {
        return Err(ApiError::bad(Some("prompt".into()), "the prompt is empty"));
    }
    let room = s.context.saturating_sub(ids.len());
    if room == 0 {
        return Err(ApiError::bad(
            Some("messages".into()),
            format!(
                "This model's maximum context length is {} tokens; the prompt has {} tokens, leaving no room to generate",
                s.context,
                ids.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let max_tokens = match req.params.max_tokens {
        None => room,
        Some(m) if m <= room => m,
        Some(m) => {
            return Err(ApiError::bad(
                Some("max_tokens".into()),
                format!(
                    "This model's maximum context length is {} tokens; the prompt ({} tokens) + max_tokens ({m}) exceeds it",
                    s.context,
                    ids.len()
                ),
            )
            .with_code("context_length_exceeded"))
        }
    };
    Ok((ids, max_tokens))
}

async fn generate(s: Arc<AppState>, req: Request, kind: Kind) -> Response {
    let (prompt, max_tokens) = match plan(&s, &req) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let p = &req.params;
    let sampling = SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        seed: p.seed.unwrap_or_else(|| fresh_seed(n)),
    };
    if let Err(e) = sampling.validate() {
        return ApiError::bad(None, e.to_string()).into_response();
    }
    let (tx, mut rx) = unbounded_channel();
    let job = Job {
        prompt,
        max_tokens,
        sampling,
        top_k: p.top_k,
        stop: p.stop.clone(),
        events: tx,
    };
    if s.engine.submit(job).is_err() {
        return ApiError::unavailable("the model worker has stopped").into_response();
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let meta = Meta {
        id: match kind {
            Kind::Chat => format!("chatcmpl-uc{n}"),
            Kind::Text => format!("cmpl-uc{n}"),
        },
        created,
        model: s.model_id.clone(),
        fingerprint: s.fingerprint.clone(),
        kind,
    };
    if !p.stream {
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Text(t) => text.push_str(&t),
                Event::Done { finish, usage } => {
                    return Json(meta.whole(&text, finish, usage)).into_response()
                }
                Event::Error(e) => return ApiError::internal(e).into_response(),
            }
        }
        return ApiError::internal("the model worker dropped the request").into_response();
    }
    // Streaming. The first chunk of a chat stream carries the role, as OpenAI's does.
    let include_usage = p.include_usage;
    let head = (kind == Kind::Chat).then(|| meta.chunk(Some(""), None, true));
    let meta = Arc::new(meta);
    let events = futures_util::stream::unfold(Some(rx), move |rx| {
        let meta = meta.clone();
        async move {
            let mut rx = rx?;
            let out: Vec<Value> = match rx.recv().await {
                Some(Event::Text(t)) => vec![meta.chunk(Some(&t), None, false)],
                Some(Event::Done { finish, usage }) => {
                    let mut v = vec![meta.chunk(None, Some(finish), false)];
                    if include_usage {
                        v.push(meta.usage_chunk(usage));
                    }
                    return Some((v, None));
                }
                Some(Event::Error(e)) => return Some((vec![ApiError::internal(e).body()], None)),
                None => return None,
            };
            Some((out, Some(rx)))
        }
    })
    .flat_map(futures_util::stream::iter);
    let body = futures_util::stream::iter(head)
        .chain(events)
        .map(|v| SseEvent::default().data(v.to_string()))
        .chain(futures_util::stream::once(async {
            SseEvent::default().data("[DONE]")
        }))
        .map(Ok::<_, Infallible>);
    Sse::new(body).into_response()
}

/// Fields every body of one response shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    kind: Kind,
}

impl Meta {
    fn whole(&self, text: &str, finish: FinishReason, usage: Usage) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": null,
            }),
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "finish_reason": finish,
                "logprobs": null,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [choice],
            "usage": usage,
        })
    }

    fn chunk(&self, text: Option<&str>, finish: Option<FinishReason>, role: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            Kind::Text => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "finish_reason": finish,
                "logprobs": null,
            }),
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [choice],
        })
    }

    fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [],
            "usage": usage,
        })
    }
}
