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
pub mod norm;
pub mod pool;
pub mod shape;
pub mod softmax;
pub mod sparse;

use anyhow::Result;
use candle_core::{Shape, Tensor};

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
