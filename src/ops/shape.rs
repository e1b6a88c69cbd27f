//! Shape ops: reshape, flatten, transpose/permute, concat, narrow/split. None saves a tensor;
//! their context is the input shape (or the split points).

use crate::tape::{Recompute, SaveAs, Tape, Value};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::rc::Rc;

impl Tape {
    /// Same elements, new shape.
    pub fn reshape(&mut self, x: &Value, dims: &[usize]) -> Result<Value> {
        let y = x.tensor().reshape(dims)?;
        let in_shape = x.shape().clone();
        let y = self.record_grad("reshape", &[x], y, move |g, _| {
            Ok(vec![Some(g.map_view(|g| Ok(g.reshape(&in_shape)?))?)])
        })?;
        // A rebuildable input stays rebuildable while the batch dim is left alone.
        if let Some(inner) = self.recompute_of(x) {
            if dims.first() == x.dims().first() {
                let tail = dims[1..].to_vec();
                self.offer_recompute(&y, Rc::new(Reshaped { inner, tail }));
            }
        }
        Ok(y)
    }

    /// Merges dims `start..` into one: `[N, C, H, W]` -> `[N, C*H*W]` for `start = 1`.
    pub fn flatten(&mut self, x: &Value, start: usize) -> Result<Value> {
        if start >= x.rank() {
            bail!(
                "flatten: start dim {start} out of range for shape {:?}",
                x.dims()
            );
        }
        let mut dims = x.dims()[..start].to_vec();
        dims.push(x.dims()[start..].iter().product());
        self.reshape(x, &dims)
    }

    /// Swaps two dims (the result is made contiguous so later ops see a plain layout).
    pub fn transpose(&mut self, x: &Value, d1: usize, d2: usize) -> Result<Value> {
        let y = x.tensor().transpose(d1, d2)?.contiguous()?;
        let y = self.record_grad("transpose", &[x], y, move |g, _| {
            Ok(vec![Some(
                g.map_view(|g| Ok(g.transpose(d1, d2)?.contiguous()?))?,
            )])
        })?;
        if let Some(inner) = self.recompute_of(x) {
            if d1 != 0 && d2 != 0 {
                self.offer_recompute(&y, Rc::new(Transposed { inner, d1, d2 }));
            }
        }
        Ok(y)
    }

    /// Reorders dims: output dim i is input dim `perm[i]`.
    pub fn permute(&mut self, x: &Value, perm: &[usize]) -> Result<Value> {
        let mut seen = vec![false; x.rank()];
        if perm.len() != x.rank()
            || perm
                .iter()
                .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
        {
            bail!(
                "permute: {perm:?} is not a permutation of the {} dims of {:?}",
                x.rank(),
                x.dims()
            );
        }
        let y = x.tensor().permute(perm.to_vec())?.contiguous()?;
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        self.record("permute", &[x], y, move |g, _| {
            Ok(vec![Some(g.permute(inverse)?.contiguous()?)])
        })
    }

    /// Joins values along `dim`.
    pub fn concat(&mut self, xs: &[&Value], dim: usize) -> Result<Value> {
        if xs.is_empty() {
            bail!("concat of no tensors");
        }
        let ts: Vec<_> = xs.iter().map(|v| v.tensor().clone()).collect();
        let y = candle_core::Tensor::cat(&ts, dim)?;
        let sizes: Vec<usize> = xs.iter().map(|v| v.dims()[dim]).collect();
        self.record("concat", xs, y, move |g, needs| {
            let mut start = 0;
            let mut grads = Vec::with_capacity(sizes.len());
            for (i, &len) in sizes.iter().enumerate() {
                grads.push(if needs[i] {
                    Some(g.narrow(dim, start, len)?.contiguous()?)
                } else {
                    None
                });
                start += len;
            }
            Ok(grads)
        })
    }

    /// Elements `start..start+len` along `dim`.
    pub fn narrow(&mut self, x: &Value, dim: usize, start: usize, len: usize) -> Result<Value> {
        let y = x.tensor().narrow(dim, start, len)?.contiguous()?;
        let full = x.dims()[dim];
        self.record("narrow", &[x], y, move |g, _| {
            let dev = g.device();
            let mut parts = Vec::with_capacity(3);
            let mut pad_dims = g.dims().to_vec();
            if start > 0 {
                pad_dims[dim] = start;
                parts.push(candle_core::Tensor::zeros(
                    pad_dims.clone(),
                    g.dtype(),
                    dev,
                )?);
            }
            parts.push(g.clone());
            if start + len < full {
                pad_dims[dim] = full - start - len;
                parts.push(candle_core::Tensor::zeros(pad_dims, g.dtype(), dev)?);
            }
            Ok(vec![Some(candle_core::Tensor::cat(&parts, dim)?)])
        })
    }

    /// Splits along `dim` into pieces of the given sizes (which must add up to the dim).
    pub fn split(&mut self, x: &Value, dim: usize, sizes: &[usize]) -> Result<Vec<Value>> {
        let total: usize = sizes.iter().sum();
        if dim >= x.rank() || total != x.dims()[dim] {
            bail!(
                "split: sizes {sizes:?} do not add up to dim {dim} of {:?}",
                x.dims()
            );
        }
        let mut start = 0;
        let mut out = Vec::with_capacity(sizes.len());
        for &len in sizes {
            out.push(self.narrow(x, dim, start, len)?);
            start += len;
        }
        Ok(out)
    }

    /// Rows `idx` (a `U32` tensor) of `x` along dim 0 — e.g. the training nodes of a graph.
    /// Context: the indices (integers, exact).
    pub fn select_rows(&mut self, x: &Value, idx: &Tensor) -> Result<Value> {
        let y = x.tensor().index_select(idx, 0)?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let saved = self.save_derived("select_rows", idx, SaveAs::Exact)?;
        let in_shape = x.shape().clone();
        self.record("select_rows", &[x], y, move |g, _| {
            let zeros = Tensor::zeros(&in_shape, g.dtype(), g.device())?;
            Ok(vec![Some(zeros.index_add(&saved.load()?, &g, 0)?)])
        })
    }
}

/// A rebuildable tensor reshaped with its batch dim kept: `tail` is the new shape after it.
struct Reshaped {
    inner: Rc<dyn Recompute>,
    tail: Vec<usize>,
}

impl Recompute for Reshaped {
    fn rows(&self, first: usize, count: usize) -> Result<Tensor> {
        let dims: Vec<usize> = [count]
            .into_iter()
            .chain(self.tail.iter().copied())
            .collect();
        Ok(self.inner.rows(first, count)?.reshape(dims)?)
    }
    fn label(&self) -> String {
        self.inner.label()
    }
}

/// A rebuildable tensor with two non-batch dims swapped (made contiguous, as the op does).
struct Transposed {
    inner: Rc<dyn Recompute>,
    d1: usize,
    d2: usize,
}

impl Recompute for Transposed {
    fn rows(&self, first: usize, count: usize) -> Result<Tensor> {
        let t = self.inner.rows(first, count)?;
        Ok(t.transpose(self.d1, self.d2)?.contiguous()?)
    }
    fn label(&self) -> String {
        self.inner.label()
    }
}
