//! A pack as a [`WeightSource`]: tensors are reconstructed (bit-exactly, as the pack's
//! format specifies) when the forward code asks for them.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::source::WeightSource;
use candle_core::{Device, Tensor};
use std::path::Path;
use uc_codec::Kernel;
use uc_format::Pack;

/// An opened pack.
pub struct PackSource {
    pack: Pack,
    config: ModelConfig,
    kernel: Kernel,
}

/// Whether `dir` looks like a pack (has a manifest) rather than a checkpoint.
pub fn is_pack(dir: &Path) -> bool {
    dir.join(uc_format::MANIFEST_FILE).is_file()
}

impl PackSource {
    /// Opens a pack directory: manifest parsed and checked, config.json read. File
    /// hashes are not checked here (that is `uc verify`'s job, or [`Self::pack`]'s
    /// caller's).
    pub fn open(dir: &Path) -> Result<Self> {
        let pack = Pack::open(dir).map_err(|e| ModelError::Source(e.to_string()))?;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        Ok(PackSource {
            pack,
            config,
            kernel: Kernel::select(false),
        })
    }

    /// The underlying pack.
    pub fn pack(&self) -> &Pack {
        &self.pack
    }
}

impl WeightSource for PackSource {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let rec = self
            .pack
            .tensor(name)
            .map_err(|e| ModelError::Source(e.to_string()))?;
        let shape: Vec<usize> = rec.shape.iter().map(|&d| d as usize).collect();
        let mut values = uc_codec::pack::reconstruct_tensor(&self.pack, name, self.kernel)
            .map_err(|e| ModelError::Source(e.to_string()))?;
        // A rotated codec stores `W R^T`: the model's weight is its reconstruction times R.
        if let uc_format::Encoding::Codec(c) = &rec.encoding {
            if let (true, &[_, cols]) = (c.rot > 0, shape.as_slice()) {
                let s = uc_codec::rotation::signs(cols);
                uc_codec::rotation::unrotate(&mut values, cols, c.rot as usize, &s);
            }
        }
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.pack.tensor(name).is_ok()
    }

    fn fingerprint(&self) -> Result<String> {
        Ok(self.pack.manifest().fingerprint.clone())
    }

    fn describe(&self) -> String {
        format!("pack {}", self.pack.dir().display())
    }
}

/// Opens `dir` as a pack if it has a manifest, else as a checkpoint.
pub fn open_source(dir: &Path) -> Result<Box<dyn WeightSource>> {
    if is_pack(dir) {
        Ok(Box::new(PackSource::open(dir)?))
    } else {
        Ok(Box::new(crate::checkpoint::Checkpoint::open(dir)?))
    }
}
