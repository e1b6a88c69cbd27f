//! The one error type of the `compress` module.
//!
//! Every variant carries what the caller needs to point at the culprit (an element index, the
//! offending parameter); the caller adds the op name.

use thiserror::Error;

/// Why a compression call refused its input.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum QuantError {
    /// NaN or +-Inf at flat element `index` (the first one in memory order).
    #[error("non-finite value {value} at element {index}")]
    NonFinite { index: usize, value: f32 },
    /// Quantizer bit width not in {1, 2, 4, 8}, or a packed-uint width not in 1..=8.
    #[error("unsupported bit width {0}")]
    BadBits(u8),
    /// Group size 0 or not a multiple of 8 (groups must start on byte boundaries).
    #[error("group size {0} must be a positive multiple of 8")]
    BadGroup(usize),
    /// `sample_len` is 0 or does not divide the tensor length.
    #[error("tensor of {len} elements cannot be split into samples of {sample_len}")]
    BadShape { len: usize, sample_len: usize },
    /// The group starting at element `index` spans a range that bf16 min/scale cannot
    /// represent (|values| near f32::MAX): its min rounds to -inf or its step overflows.
    #[error("value range of the group starting at element {index} overflows bf16 metadata")]
    RangeOverflow { index: usize },
    /// An output (or input) buffer has the wrong number of elements.
    #[error("buffer length mismatch: expected {expected}, got {got}")]
    LenMismatch { expected: usize, got: usize },
    /// A value handed to `PackedUints::pack` does not fit in the requested bit width.
    #[error("value {value} at index {index} does not fit in {bits} bits")]
    ValueTooLarge { index: usize, value: u8, bits: u8 },
}
