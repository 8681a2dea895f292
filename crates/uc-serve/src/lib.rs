//! uc-serve: an OpenAI-compatible HTTP server over a verified pack.
//!
//! Data flow, in order:
//! - [`Server::start`]: the pack is opened and fully verified (every file hash and every
//!   tensor's reconstruction digest; a pack that fails is refused), the tokenizer and
//!   the chat template ([`template`]) are loaded, and the model worker ([`engine`]) is
//!   started with `max_batch` decoders.
//! - [`http`]: axum routes `POST /v1/chat/completions`, `POST /v1/completions`,
//!   `GET /v1/models`, `GET /health`. A body is parsed and validated by [`api`] (typed
//!   4xx errors in OpenAI's JSON shape), rendered by the template, tokenized and
//!   checked against the context, then queued as an [`engine::Job`].
//! - [`engine`]: one thread owns the model; jobs are admitted in arrival order into
//!   free slots, each prompt is prefilled alone, and all generating jobs advance one
//!   token per round in one batched decode step (continuous batching); text comes back as
//!   [`engine::Event`]s, cut at stop sequences by [`stop`], and leaves as one JSON body
//!   or as server-sent events ending in `data: [DONE]`.
#![deny(missing_docs)]

pub mod api;
pub mod engine;
pub mod http;
pub mod stop;
pub mod template;

use axum::serve::ListenerExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use uc_model::tokenizer::Tokenizer;
use uc_runtime::generate::eos_ids;
use uc_runtime::{weights, Verify};

/// Everything that can stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The model directory is not a pack (serve runs verified packs only).
    #[error("{0}: not a pack (no manifest.json); `uc serve` runs verified packs only")]
    NotAPack(PathBuf),
    /// Opening or verifying the pack, or building the decoders, failed.
    #[error(transparent)]
    Runtime(#[from] uc_runtime::RuntimeError),
    /// The tokenizer could not be loaded.
    #[error(transparent)]
    Model(#[from] uc_model::ModelError),
    /// The chat template could not be loaded.
    #[error(transparent)]
    Template(#[from] template::TemplateError),
    /// The model worker could not start.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// An option is out of range.
    #[error("invalid option: {0}")]
    Option(String),
    /// Binding or serving the socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The pack directory.
    pub pack: PathBuf,
    /// Address to listen on.
    pub host: String,
    /// Port (0 = any free port; the chosen one is reported by [`Server::local_addr`]).
    pub port: u16,
    /// Sequences generated at once (each has its own KV cache).
    pub max_batch: usize,
    /// Positions per sequence; `None` = the model's `max_position_embeddings`, capped
    /// at [`DEFAULT_MAX_CONTEXT`].
    pub context: Option<usize>,
    /// The model id clients name; `None` = the pack directory's name.
    pub model_id: Option<String>,
    /// Reuse the prompt prefix a slot's KV cache holds, where that gives the bits of a
    /// full prefill (see [`engine`]).
    pub prompt_cache: bool,
}

/// Default cap on the context per sequence: a KV cache of SmolLM2-135M at 4096
/// positions is 189 MB, and there is one per batch slot.
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// A started server: the pack verified, the model loaded, the socket bound.
pub struct Server {
    state: Arc<http::AppState>,
    listener: std::net::TcpListener,
}

impl Server {
    /// Verifies and loads the pack, starts the model worker and binds the socket.
    pub fn start(o: &ServeOptions) -> Result<Server, ServeError> {
        if !uc_model::pack_source::is_pack(&o.pack) {
            return Err(ServeError::NotAPack(o.pack.clone()));
        }
        if o.max_batch == 0 {
            return Err(ServeError::Option("--max-batch must be at least 1".into()));
        }
        // Full verification: a pack that does not reproduce its digests never serves.
        let loader = weights::open(&o.pack, Verify::Full)?;
        let fingerprint = loader.fingerprint()?;
        let model_ctx = loader.config().max_position_embeddings;
        let context = match o.context {
            Some(0) => return Err(ServeError::Option("--ctx-size must be at least 1".into())),
            Some(c) => c.min(model_ctx),
            None => model_ctx.min(DEFAULT_MAX_CONTEXT),
        };
        let tokenizer = Arc::new(Tokenizer::from_dir(&o.pack)?);
        let template = template::ChatTemplate::from_dir(&o.pack)?;
        let eos = eos_ids(&o.pack, &tokenizer);
        let engine = engine::Engine::start(
            loader,
            tokenizer.clone(),
            eos,
            context,
            o.max_batch,
            o.prompt_cache,
        )?;
        let model_id = o.model_id.clone().unwrap_or_else(|| {
            o.pack
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "uc".into())
        });
        let addr = format!("{}:{}", o.host, o.port);
        let listener = std::net::TcpListener::bind(&addr).map_err(|e| ServeError::Io {
            what: format!("binding {addr}"),
            source: e,
        })?;
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(Server {
            state: Arc::new(http::AppState {
                engine,
                tokenizer,
                template,
                model_id,
                fingerprint,
                context,
                created,
                next_id: Default::default(),
            }),
            listener,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(|e| ServeError::Io {
            what: "reading the bound address".into(),
            source: e,
        })
    }

    /// The model id clients must name.
    pub fn model_id(&self) -> &str {
        &self.state.model_id
    }

    /// The pack's fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.state.fingerprint
    }

    /// Positions per sequence.
    pub fn context(&self) -> usize {
        self.state.context
    }

    /// Serves until Ctrl-C (then finishes open responses and returns). The HTTP side
    /// runs on one tokio thread: it only parses and forwards; the model has its own.
    pub fn run(self) -> Result<(), ServeError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| ServeError::Io { what, source }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("starting the async runtime"))?;
        rt.block_on(async move {
            self.listener
                .set_nonblocking(true)
                .map_err(io("configuring the socket"))?;
            // No Nagle delay: a stream's small chunks (the first token above all) go out
            // when written, not after the client acknowledges the headers.
            let listener = tokio::net::TcpListener::from_std(self.listener)
                .map_err(io("listening"))?
                .tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
            axum::serve(listener, http::router(self.state))
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
                .map_err(io("serving"))
        })
    }
}
