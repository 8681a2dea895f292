//! SHA-256 helpers. The `sha2` crate picks SHA-NI / ARMv8 SHA instructions at run time,
//! so hashing runs at several GB/s where the CPU has them.

use std::io::Read;
use std::path::Path;

use sha2::Digest;
pub use sha2::Sha256;

use crate::{FormatError, Result};

/// Reads in 4 MiB chunks: large enough that syscall overhead vanishes next to hashing,
/// small enough to stay cache-friendly.
const READ_CHUNK: usize = 4 << 20;

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Size in bytes and lower-case hex SHA-256 of the file at `path`.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut file = std::fs::File::open(path).map_err(FormatError::io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FormatError::io(path)(e)),
        };
        hasher.update(buf.get(..n).unwrap_or_default());
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}
