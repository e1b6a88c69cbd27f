//! Differentiable ops, one family per file. Each op computes its forward with candle, saves
//! only what its backward needs through [`Tape::save`](crate::tape::Tape::save), and records a
//! backward rule beside it. Ops are methods on [`Tape`](crate::tape::Tape):
//! `let y = tape.linear(&x, &w, Some(&b))?;`.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod linear;
pub mod loss;
pub mod mlp;
pub mod norm;
pub mod pool;
pub mod residual;
pub mod shape;
pub mod softmax;
pub mod sparse;

use anyhow::Result;
use candle_core::{Layout, Shape, Tensor};
use std::ops::Range;

/// Bytes of unpacked context a backward rule holds at once when it reads a saved tensor in
/// row chunks ([`Saved::load_rows`](crate::tape::Saved::load_rows)): small next to a layer's
/// activations, large enough that each chunk is a few big parallel loops.
pub const CONTEXT_CHUNK_BYTES: usize = 2 << 20;

thread_local! {
    static CHUNK_BYTES: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Tests only: replaces [`CONTEXT_CHUNK_BYTES`] on the calling thread (`None` restores it), so
/// that small tensors are read in several chunks and the chunked paths get checked.
#[doc(hidden)]
pub fn set_context_chunk_bytes(bytes: Option<usize>) {
    CHUNK_BYTES.with(|c| c.set(bytes));
}

/// Rows (of `row_bytes` each) per chunk so a chunk stays within [`CONTEXT_CHUNK_BYTES`]; at
/// least 1, at most `rows`.
pub(crate) fn chunk_rows_for(rows: usize, row_bytes: usize) -> usize {
    rows_within(context_chunk_bytes(), rows, row_bytes)
}

/// Rows of `row_bytes` that fit in `bytes`: at least 1, at most `rows`.
fn rows_within(bytes: usize, rows: usize, row_bytes: usize) -> usize {
    (bytes / row_bytes.max(1)).clamp(1, rows.max(1))
}

/// Bytes of per-chunk temporaries of the ops that run a whole block of layers a chunk of
/// samples at a time (the attention and the MLP): larger than [`CONTEXT_CHUNK_BYTES`]
/// because each chunk is a dozen ops, whose fixed costs showed with 2 MiB chunks
/// (gpt-char steps 15-25% slower); 8 MiB brings them back to the composed ops' speed.
pub const FUSED_CHUNK_BYTES: usize = 8 << 20;

/// Rows per chunk of a fused block op, within [`FUSED_CHUNK_BYTES`] (or the test override
/// of [`set_context_chunk_bytes`], so that small tests still run in several chunks).
pub(crate) fn fused_chunk_rows_for(rows: usize, row_bytes: usize) -> usize {
    let bytes = CHUNK_BYTES.with(|c| c.get()).unwrap_or(FUSED_CHUNK_BYTES);
    rows_within(bytes, rows, row_bytes)
}

/// Whether a fused op that keeps its input and output whole and runs the rest in chunks of
/// `chunk` of `rows` rows holds less than the composed ops, which free each tensor as they
/// go: true from `min_chunks` chunks on (the op's own break-even, from the sizes it holds).
pub(crate) fn worth_chunking(chunk: usize, rows: usize, min_chunks: usize) -> bool {
    chunk.saturating_mul(min_chunks) <= rows
}

/// Adds `part` into the running sum `acc` (weight gradients summed over batch chunks).
pub(crate) fn accumulate(acc: &mut Option<Tensor>, part: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        None => part,
        Some(a) => (a + part)?,
    });
    Ok(())
}

/// Puts a chunk's output `part` into rows `first..` of the fused op's output `y`: added in
/// place when `y` is the residual stream the op adds into, copied otherwise.
pub(crate) fn put_chunk(y: &Tensor, first: usize, part: &Tensor, add: bool) -> Result<()> {
    if !add {
        y.slice_set(part, 0, first)?;
    } else if !activation::add_in_place(&y.narrow(0, first, part.dims()[0])?, part)? {
        anyhow::bail!("the residual stream could not be added to in place");
    }
    Ok(())
}

/// `(first, len)` of consecutive chunks of at most `chunk` rows covering `0..rows`.
pub(crate) fn row_chunks(rows: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..rows)
        .step_by(chunk)
        .map(move |s| (s, chunk.min(rows - s)))
}

/// [`CONTEXT_CHUNK_BYTES`], or the calling thread's test override.
pub(crate) fn context_chunk_bytes() -> usize {
    CHUNK_BYTES.with(|c| c.get()).unwrap_or(CONTEXT_CHUNK_BYTES)
}

/// Sums a broadcast gradient back to `shape` (the inverse of broadcasting): leading extra dims
/// are summed away, and dims where `shape` has 1 are summed with keepdim.
pub fn sum_to_shape(g: &Tensor, shape: &Shape) -> Result<Tensor> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    let target = shape.dims();
    let extra = g.rank() - target.len();
    let mut g = g.clone();
    if extra > 0 {
        let lead: Vec<usize> = (0..extra).collect();
        g = g.sum(lead)?;
    }
    let keep: Vec<usize> = target
        .iter()
        .enumerate()
        .filter(|&(i, &d)| d == 1 && g.dim(i).map(|gd| gd != 1).unwrap_or(false))
        .map(|(i, _)| i)
        .collect();
    if !keep.is_empty() {
        g = g.sum_keepdim(keep)?;
    }
    Ok(g)
}

/// The element ranges `(dst, src)` of an in-place CPU op's two operands, which must both be
/// contiguous (an error naming `op` otherwise); with `same_len`, also of equal length.
pub(crate) fn inplace_ranges(
    op: &str,
    dl: &Layout,
    sl: &Layout,
    same_len: bool,
) -> candle_core::Result<(Range<usize>, Range<usize>)> {
    let (Some((d0, d1)), Some((s0, s1))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
    else {
        candle_core::bail!("{op}: both operands must be contiguous");
    };
    if same_len && d1 - d0 != s1 - s0 {
        candle_core::bail!("{op}: {} vs {} elements", d1 - d0, s1 - s0);
    }
    Ok((d0..d1, s0..s1))
}
