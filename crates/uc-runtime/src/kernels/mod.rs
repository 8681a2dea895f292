//! Compute kernels. Every SIMD kernel has a portable scalar reference beside it with the
//! same signature; tests hold each variant to the reference within a named tolerance
//! (bit-identity where the format demands it: dequantization).
//!
//! - [`dense`]: f32 dot products and row-block mat-vec (`y = W x`), and the dense GEMM
//!   used by prefill (the `gemm` crate, AVX-512 microkernels).
//! - [`quant`]: the codec's fused kernels -- a mat-vec that reads codes, group scales and
//!   codebook directly (never materialising the f32 weight), and exact row
//!   dequantization for prefill tiles and embedding lookups.
//! - [`qint`]: the decode mat-vec on int16 lanes (AVX2, and AVX-512 with VBMI): codebook
//!   and activations rounded to 15 bits, byte-shuffle / byte-permute lookups, `vpmaddwd`.
//! - [`qgemm`]: the prefill GEMM on int16 lanes (AVX-512 VNNI `vpdpwssd`): weight tiles
//!   looked up to int16 once per call, activations rounded per token and group, packed
//!   16 tokens to a vector.
//! - [`math`]: exp / softmax / SiLU / RMSNorm / rotary.
//! - [`attention`]: causal attention of a query block, tiled with an online softmax
//!   (flash-style; no `(queries, keys)` score matrix).
//!
//! All the `unsafe` of this crate lives in these modules (SIMD intrinsics, raw GEMM
//! pointers), each block with a `# Safety` note.

pub mod attention;
pub mod dense;
pub mod math;
pub mod qgemm;
pub mod qint;
pub mod quant;

/// An instruction set a kernel is compiled for. Chosen once at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// Portable reference code (the specification of each kernel).
    Scalar,
    /// x86-64 AVX2 + FMA, 8 lanes.
    Avx2,
    /// x86-64 AVX-512 F + BW, 16 lanes.
    Avx512,
}

impl Isa {
    /// Every variant, reference first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// Whether this CPU can run kernels built for `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The best available ISA, or [`Isa::Scalar`] when `UC_FORCE_SCALAR=1` (the same
    /// switch uc-codec honours).
    pub fn detect() -> Isa {
        if std::env::var(uc_codec::FORCE_SCALAR_ENV).is_ok_and(|v| v == "1") {
            return Isa::Scalar;
        }
        Self::ALL
            .into_iter()
            .rev()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// `self` if available, else the scalar reference.
    pub fn or_scalar(self) -> Isa {
        if self.is_available() {
            self
        } else {
            Isa::Scalar
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}
