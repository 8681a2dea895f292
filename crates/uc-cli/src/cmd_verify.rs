//! `uc verify PACK`: every file hash, every tensor decoded and reconstructed.

use crate::output;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `uc verify`.
#[derive(Args)]
#[command(after_help = "\
Examples:
  uc verify packs/smollm2-q5
  uc verify packs/smollm2-q5 --json > receipt.json

Prints VERIFY: PASS with the pack fingerprint, or VERIFY: FAIL and every file or tensor
that drifted. Exit 0 on PASS, 1 on FAIL.")]
pub struct VerifyArgs {
    /// The pack directory.
    pack: PathBuf,
    /// Print the full receipt as JSON (what was checked, every digest, the host).
    #[arg(long)]
    json: bool,
    /// Threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub fn run(a: VerifyArgs) -> Result<bool> {
    let report = uc_codec::pack::verify_dir(&a.pack, a.threads);
    if a.json {
        output::json(&report)?;
    } else if report.pass {
        output::line(&format!(
            "VERIFY: PASS {} ({} files, {} tensors, {:.1} MB in {:.2}s)",
            report.fingerprint,
            report.files.len(),
            report.tensors.len(),
            report.bytes_hashed as f64 / 1e6,
            report.seconds
        ))?;
    } else {
        output::line(&format!("VERIFY: FAIL {}", a.pack.display()))?;
        for f in &report.failures {
            output::line(&format!("  {}: {}", f.subject, f.problem))?;
        }
    }
    Ok(report.pass)
}
