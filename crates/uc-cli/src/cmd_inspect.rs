//! `uc inspect PACK`: what is inside a pack.

use crate::output;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use uc_format::{Encoding, Pack};

/// Arguments of `uc inspect`.
#[derive(Args)]
#[command(after_help = "Example:\n  uc inspect packs/smollm2-q5 --json")]
pub struct InspectArgs {
    /// The pack directory.
    pack: PathBuf,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

/// Totals for one kind of tensor (q_proj, embed_tokens, ...).
#[derive(Serialize, Default)]
struct Kind {
    tensors: usize,
    elements: u64,
    stored_bytes: u64,
    bpw: f64,
    encodings: BTreeMap<String, usize>,
    max_rel_err: f64,
    worst: String,
}

/// `model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj.weight`; a MoE expert's
/// index is folded too (`mlp.experts.7.up_proj.weight` -> `mlp.experts.*.up_proj.weight`),
/// so a model with 128 experts lists one row per projection, not 384. Mamba's
/// `backbone.layers.N.` folds the same way.
fn kind_of(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        ["model" | "backbone", "layers", _, rest @ ..] => {
            let mut out: Vec<&str> = Vec::with_capacity(rest.len());
            for p in rest {
                let expert = out.last() == Some(&"experts") && p.parse::<usize>().is_ok();
                out.push(if expert { "*" } else { p });
            }
            out.join(".")
        }
        _ => name.to_string(),
    }
}

pub fn run(a: InspectArgs) -> Result<()> {
    let pack = Pack::open(&a.pack).with_context(|| format!("opening pack {}", a.pack.display()))?;
    let m = pack.manifest();
    let mut kinds: BTreeMap<String, Kind> = BTreeMap::new();
    for t in &m.tensors {
        let k = kinds.entry(kind_of(&t.name)).or_default();
        k.tensors += 1;
        k.elements += t.elements().unwrap_or(0);
        k.stored_bytes += t.stored_bytes;
        let enc = match &t.encoding {
            Encoding::Codec(c) => c.name.clone(),
            Encoding::Dense(d) => serde_json::to_value(d)?
                .as_str()
                .unwrap_or("dense")
                .to_string(),
        };
        *k.encodings.entry(enc).or_default() += 1;
        let err = t
            .stats
            .as_ref()
            .and_then(|s| s.get("rel_err"))
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0);
        if err > k.max_rel_err {
            k.max_rel_err = err;
            k.worst = t.name.clone();
        }
    }
    for k in kinds.values_mut() {
        k.bpw = if k.elements > 0 {
            k.stored_bytes as f64 * 8.0 / k.elements as f64
        } else {
            0.0
        };
    }
    let cfg = &m.source.config;
    let layers = cfg.get("num_hidden_layers").cloned().unwrap_or_default();
    if a.json {
        return output::json(&serde_json::json!({
            "pack": a.pack,
            "format_version": m.format_version,
            "tool": m.tool,
            "architecture": m.source.architecture,
            "layers": layers,
            "fingerprint": m.fingerprint,
            "bpw_body": m.bpw_body,
            "bpw_model": m.bpw_model,
            "kinds": kinds,
            "source_files": m.source.files,
            "calibration": m.calibration,
        }));
    }
    output::line(&format!(
        "{}: {} ({} layers), format v{}, written by {} {}",
        a.pack.display(),
        m.source.architecture,
        layers,
        m.format_version,
        m.tool.name,
        m.tool.version
    ))?;
    output::line(&format!(
        "bpw_body {:.4}  bpw_model {:.4}  fingerprint {}",
        m.bpw_body, m.bpw_model, m.fingerprint
    ))?;
    output::line(&format!(
        "{:<34} {:>7} {:>12} {:>8} {:>10}  encodings",
        "kind", "tensors", "elements", "bpw", "max relerr"
    ))?;
    for (name, k) in &kinds {
        let enc: Vec<String> = k
            .encodings
            .iter()
            .map(|(e, n)| format!("{e} x{n}"))
            .collect();
        output::line(&format!(
            "{:<34} {:>7} {:>12} {:>8.4} {:>10.5}  {}",
            name,
            k.tensors,
            k.elements,
            k.bpw,
            k.max_rel_err,
            enc.join(", ")
        ))?;
    }
    for f in &m.source.files {
        output::line(&format!(
            "source {} {} bytes sha256 {}",
            f.name, f.size, f.sha256
        ))?;
    }
    Ok(())
}
