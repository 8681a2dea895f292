//! Printing: JSON or text to stdout, progress bars to stderr, atomic file output.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::Path;

/// Writes a line to stdout; a closed pipe surfaces as an error that `main` treats as success.
pub fn line(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")?;
    out.flush()?;
    Ok(())
}

/// Pretty JSON to stdout.
pub fn json<T: serde::Serialize>(v: &T) -> Result<()> {
    line(&serde_json::to_string_pretty(v)?)
}

/// Writes `v` as pretty JSON to `path` via a temporary file and a rename.
pub fn json_file<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Whether an error chain bottoms out in a broken pipe (e.g. `uc ... | head`).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Threads rayon (and so the engine and candle) will use.
pub fn threads() -> usize {
    rayon::current_num_threads()
}
