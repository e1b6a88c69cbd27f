//! Activation compression on the CPU: what `Tape::save` turns a saved tensor into.
//!
//! Public API (pure Rust over slices; the caller flattens tensors):
//!
//! * [`quantize`]`(x, sample_len, &QuantParams) -> Result<QuantizedTensor, QuantError>` —
//!   per-group (G elements inside one sample) stochastic rounding to 1/2/4/8 bits with bf16
//!   min and scale per group, unbiased: `E[dequantize(quantize(x))] = x`.
//! * [`dequantize`]`(&q, &mut out) -> Result<(), QuantError>`, [`dequantize_to_vec`]`(&q)`.
//! * [`QuantizedTensor`]: `stored_bytes()`, `len()`, `bits()`, `mins()`, `scales()`, ...
//! * [`BitMask`] (1 bit per element: ReLU / LeakyReLU) and [`PackedUints`] (k-bit codes:
//!   max-pool argmax), each with `stored_bytes()`.
//! * [`uniform`]`(seed, stream, index)` / [`fill_uniform`]: the counter-based RNG behind the
//!   rounding noise, specified bit-exactly in [`rng`] for the CUDA kernels.
//!
//! Large inputs (> 64K elements) are processed on the rayon pool; results do not depend on
//! the thread count or the CPU's vector width.

pub mod bitpack;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
mod cuda_context;
pub mod error;
pub mod policy;
pub mod quantize;
pub mod rng;

pub use bitpack::{BitMask, PackedUints};
pub use error::QuantError;
#[doc(hidden)]
pub use quantize::quantize_with_noise;
pub use quantize::{
    dequantize, dequantize_samples, dequantize_to_vec, quantize, quantize_samples_into,
    QuantParams, QuantizedTensor, DEFAULT_GROUP, MAX_GROUP,
};
pub use rng::{fill_uniform, uniform};
