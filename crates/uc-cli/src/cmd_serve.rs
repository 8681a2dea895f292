//! `uc serve PACK`: the OpenAI-compatible HTTP server (crate uc-serve). Thin: options,
//! thread pool, one line saying where it listens.

use anyhow::{Context, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `uc serve`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  uc serve packs/smollm2-q5 --port 8080
  curl -s localhost:8080/v1/chat/completions -H 'content-type: application/json' \\
    -d '{\"model\":\"smollm2-q5\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"temperature\":0}'
  uc serve packs/smollm2-q5 --port 0 --json   # any free port; prints {\"listening\": ...}

The pack is fully verified before the server starts (every file hash and every tensor's
reconstruction digest); a pack that fails is refused. Routes: POST /v1/chat/completions,
POST /v1/completions (both with \"stream\": true for server-sent events), GET /v1/models,
GET /health. Every response carries the pack fingerprint in the x-uc-pack-fingerprint
header. The model id is the pack directory's name unless --model-id is given.

A request whose prompt starts like one a batch slot served before prefills only the rest
(the prompt cache), where the kernels make that bit-identical to a whole prefill (the
integer prefill on AVX-512 VNNI CPUs); /health counts the reused tokens.")]
pub struct ServeArgs {
    /// The pack directory.
    pack: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 = any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Worker threads of the model (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Requests generated at once; more wait in a queue (each slot holds a KV cache).
    #[arg(long, default_value_t = 4)]
    max_batch: usize,
    /// Positions per request, prompt + generated (default: the model's context, at most 4096).
    #[arg(long)]
    ctx_size: Option<usize>,
    /// The model id clients send (default: the pack directory's name).
    #[arg(long)]
    model_id: Option<String>,
    /// Print the listening line as JSON (address, model id, fingerprint, context).
    #[arg(long)]
    json: bool,
    /// Prefill every prompt whole (by default a request reuses the prompt prefix a slot
    /// already holds, where that gives the same bits as a whole prefill).
    #[arg(long)]
    no_prompt_cache: bool,
}

pub fn run(a: ServeArgs) -> Result<()> {
    crate::cmd_run::inference_allocator();
    crate::cmd_run::set_threads(a.threads)?;
    let server = uc_serve::Server::start(&uc_serve::ServeOptions {
        pack: a.pack.clone(),
        host: a.host,
        port: a.port,
        max_batch: a.max_batch,
        context: a.ctx_size,
        model_id: a.model_id,
        prompt_cache: !a.no_prompt_cache,
    })
    .with_context(|| format!("starting the server on {}", a.pack.display()))?;
    let addr = server.local_addr()?;
    let mut out = std::io::stdout().lock();
    if a.json {
        let line = serde_json::json!({
            "listening": format!("http://{addr}"),
            "model": server.model_id(),
            "fingerprint": server.fingerprint(),
            "context": server.context(),
            "verify": "PASS",
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(
            out,
            "VERIFY: PASS; serving model `{}` (pack fingerprint {}) on http://{addr}",
            server.model_id(),
            server.fingerprint()
        )?;
    }
    out.flush()?;
    drop(out);
    server.run()?;
    Ok(())
}
