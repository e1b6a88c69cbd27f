//! Sparse × dense products for graph networks: a CSR matrix (the graph, a constant shared
//! through an `Arc`) and `spmm`, `A x`, with a rayon kernel over rows.

use crate::tape::{Tape, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// A sparse matrix in compressed sparse row form: the entries of row `r` are
/// `col[row_ptr[r]..row_ptr[r + 1]]` with values `val[..]` (duplicates within a row add up).
///
/// Build it with [`CsrMatrix::new`] (validated) or [`CsrMatrix::from_edges`]. The fields are
/// public for reading; a matrix used by [`Tape::spmm`] caches its transpose, so do not change
/// them afterwards — build a new matrix instead.
#[derive(Clone, Debug)]
pub struct CsrMatrix {
    pub n_rows: usize,
    pub n_cols: usize,
    pub row_ptr: Vec<usize>,
    pub col: Vec<u32>,
    pub val: Vec<f32>,
    /// Known at construction to equal its transpose (graphs from `from_edges`).
    symmetric: bool,
    /// The transpose, computed the first time backward needs it.
    transposed: OnceLock<Arc<CsrMatrix>>,
}

impl PartialEq for CsrMatrix {
    fn eq(&self, o: &Self) -> bool {
        self.n_rows == o.n_rows
            && self.n_cols == o.n_cols
            && self.row_ptr == o.row_ptr
            && self.col == o.col
            && self.val == o.val
    }
}

impl CsrMatrix {
    /// Validates and wraps CSR arrays: `row_ptr` has `n_rows + 1` entries, starts at 0, never
    /// decreases and ends at `col.len()`; every column is below `n_cols`;
    /// `val.len() == col.len()`.
    pub fn new(
        n_rows: usize,
        n_cols: usize,
        row_ptr: Vec<usize>,
        col: Vec<u32>,
        val: Vec<f32>,
    ) -> Result<Self> {
        if row_ptr.len() != n_rows + 1 {
            bail!(
                "CsrMatrix: row_ptr has {} entries, expected n_rows + 1 = {}",
                row_ptr.len(),
                n_rows + 1
            );
        }
        if row_ptr[0] != 0 {
            bail!(
                "CsrMatrix: row_ptr must start at 0, starts at {}",
                row_ptr[0]
            );
        }
        if let Some(r) = row_ptr.windows(2).position(|w| w[1] < w[0]) {
            bail!(
                "CsrMatrix: row_ptr decreases at row {r} ({} -> {})",
                row_ptr[r],
                row_ptr[r + 1]
            );
        }
        if row_ptr[n_rows] != col.len() {
            bail!(
                "CsrMatrix: row_ptr ends at {} but there are {} column indices",
                row_ptr[n_rows],
                col.len()
            );
        }
        if val.len() != col.len() {
            bail!(
                "CsrMatrix: {} values for {} column indices",
                val.len(),
                col.len()
            );
        }
        if let Some(p) = col.iter().position(|&c| c as usize >= n_cols) {
            let row = row_ptr.partition_point(|&s| s <= p) - 1;
            bail!(
                "CsrMatrix: column {} in row {row} is out of range for {n_rows}x{n_cols}",
                col[p]
            );
        }
        Ok(Self::from_parts(n_rows, n_cols, row_ptr, col, val, false))
    }

    fn from_parts(
        n_rows: usize,
        n_cols: usize,
        row_ptr: Vec<usize>,
        col: Vec<u32>,
        val: Vec<f32>,
        symmetric: bool,
    ) -> Self {
        Self {
            n_rows,
            n_cols,
            row_ptr,
            col,
            val,
            symmetric,
            transposed: OnceLock::new(),
        }
    }

    /// Undirected graph on `n` nodes from an edge list: both directions of every edge,
    /// duplicates removed, columns sorted within each row.
    ///
    /// `normalize = true`: the GCN propagation matrix `Â = D^-1/2 (A + I) D^-1/2` (self loops
    /// added where missing, weight 1 like any edge; `D` the degrees of `A + I`).
    /// `normalize = false`: the plain 0/1 adjacency `A` (self loops only where listed).
    /// Either is symmetric, so backward reuses it as its own transpose.
    pub fn from_edges(n: usize, edges: &[(u32, u32)], normalize: bool) -> Result<Self> {
        if n > u32::MAX as usize + 1 {
            bail!("CsrMatrix::from_edges: {n} nodes do not fit u32 column indices");
        }
        if let Some(&(u, v)) = edges
            .iter()
            .find(|&&(u, v)| u as usize >= n || v as usize >= n)
        {
            bail!("CsrMatrix::from_edges: edge ({u}, {v}) names a node outside 0..{n}");
        }
        let mut pairs: Vec<(u32, u32)> = Vec::with_capacity(2 * edges.len() + n);
        for &(u, v) in edges {
            pairs.push((u, v));
            pairs.push((v, u));
        }
        if normalize {
            pairs.extend((0..n as u32).map(|i| (i, i)));
        }
        pairs.sort_unstable();
        pairs.dedup();
        let mut row_ptr = vec![0usize; n + 1];
        for &(u, _) in &pairs {
            row_ptr[u as usize + 1] += 1;
        }
        for r in 0..n {
            row_ptr[r + 1] += row_ptr[r];
        }
        let col: Vec<u32> = pairs.iter().map(|&(_, v)| v).collect();
        let val: Vec<f32> = if normalize {
            let inv_sqrt: Vec<f64> = (0..n)
                .map(|r| 1.0 / ((row_ptr[r + 1] - row_ptr[r]) as f64).sqrt())
                .collect();
            pairs
                .iter()
                .map(|&(u, v)| (inv_sqrt[u as usize] * inv_sqrt[v as usize]) as f32)
                .collect()
        } else {
            vec![1.0; pairs.len()]
        };
        Ok(Self::from_parts(n, n, row_ptr, col, val, true))
    }

    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.col.len()
    }

    /// True when the matrix is known to equal its transpose (built by `from_edges`).
    pub fn is_symmetric(&self) -> bool {
        self.symmetric
    }

    /// `Aᵀ` in CSR form (a counting sort, O(nnz + n_cols)); columns come out sorted.
    pub fn transpose(&self) -> CsrMatrix {
        let mut row_ptr = vec![0usize; self.n_cols + 1];
        for &c in &self.col {
            row_ptr[c as usize + 1] += 1;
        }
        for r in 0..self.n_cols {
            row_ptr[r + 1] += row_ptr[r];
        }
        let mut next = row_ptr.clone();
        let mut col = vec![0u32; self.nnz()];
        let mut val = vec![0f32; self.nnz()];
        for r in 0..self.n_rows {
            for p in self.row_ptr[r]..self.row_ptr[r + 1] {
                let c = self.col[p] as usize;
                let dst = next[c];
                next[c] += 1;
                col[dst] = r as u32;
                val[dst] = self.val[p];
            }
        }
        Self::from_parts(self.n_cols, self.n_rows, row_ptr, col, val, self.symmetric)
    }

    /// The transpose as a shared matrix: `self` again when symmetric, otherwise computed on
    /// the first call and cached (a GCN multiplies by the same graph every step).
    pub fn transposed(a: &Arc<Self>) -> Arc<CsrMatrix> {
        if a.symmetric {
            return a.clone();
        }
        a.transposed.get_or_init(|| Arc::new(a.transpose())).clone()
    }

    /// The dense `[n_rows, n_cols]` f32 matrix (for tests and small graphs).
    pub fn to_dense(&self) -> Result<Tensor> {
        let mut d = vec![0f32; self.n_rows * self.n_cols];
        for r in 0..self.n_rows {
            for p in self.row_ptr[r]..self.row_ptr[r + 1] {
                d[r * self.n_cols + self.col[p] as usize] += self.val[p];
            }
        }
        Ok(Tensor::from_vec(
            d,
            (self.n_rows, self.n_cols),
            &Device::Cpu,
        )?)
    }

    /// `self @ x` for `x: [n_cols, F]` on any device/float dtype, without recording.
    /// f32 and f64 run natively on the CPU; other dtypes go through f32, other devices
    /// through a CPU copy (there is no sparse GPU kernel yet).
    pub fn matmul_dense(&self, x: &Tensor) -> Result<Tensor> {
        let (n, f) = x.dims2()?;
        if n != self.n_cols {
            bail!(
                "spmm: matrix {}x{} cannot multiply x {:?}",
                self.n_rows,
                self.n_cols,
                x.dims()
            );
        }
        let device = x.device().clone();
        let dtype = x.dtype();
        let xc = match (device.is_cpu(), dtype) {
            (true, DType::F32 | DType::F64) => x.contiguous()?,
            (_, DType::F32 | DType::F64) => x.to_device(&Device::Cpu)?.contiguous()?,
            _ => x
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .contiguous()?,
        };
        let y = match xc.dtype() {
            DType::F32 => self.spmm_cpu::<f32>(&xc, f)?,
            _ => self.spmm_cpu::<f64>(&xc, f)?,
        };
        Ok(y.to_dtype(dtype)?.to_device(&device)?)
    }

    fn spmm_cpu<T>(&self, x: &Tensor, f: usize) -> Result<Tensor>
    where
        T: candle_core::WithDType + From<f32>,
    {
        let mut out = vec![T::from_f64(0.0); self.n_rows * f];
        if f > 0 && self.n_rows > 0 {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                bail!("spmm: expected a CPU tensor");
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                bail!("spmm: expected a contiguous tensor");
            };
            let x = &cpu.as_slice::<T>()?[start..end];
            // A task covers whole rows and at least ~4096 output elements.
            let rows = (4096 / f).max(1);
            out.par_chunks_mut(rows * f)
                .enumerate()
                .for_each(|(c, out)| {
                    for (i, out) in out.chunks_mut(f).enumerate() {
                        let r = c * rows + i;
                        for p in self.row_ptr[r]..self.row_ptr[r + 1] {
                            let a = T::from(self.val[p]);
                            let xr = &x[self.col[p] as usize * f..][..f];
                            for (o, &xv) in out.iter_mut().zip(xr) {
                                *o += a * xv;
                            }
                        }
                    }
                });
        }
        Ok(Tensor::from_vec(out, (self.n_rows, f), &Device::Cpu)?)
    }
}

impl Tape {
    /// Sparse × dense product `A x`: `A [n_rows, n_cols]` (CSR, f32 values) times
    /// `x [n_cols, F]` → `[n_rows, F]`, computed by a rayon kernel over rows on contiguous
    /// f32/f64 data (values promoted to f64 for f64 inputs).
    ///
    /// Context: none but the shared matrix, a constant (logged as `"graph"` with its nnz, 0
    /// bytes: it belongs to the dataset, not to this step). Backward is `Aᵀ g`, with `Aᵀ`
    /// taken from [`CsrMatrix::transposed`]: the matrix itself when symmetric (every graph
    /// from `from_edges`), otherwise computed once per matrix on first use and cached in it,
    /// so the two spmm calls of a GCN step — and every later step — share one transpose.
    pub fn spmm(&mut self, a: &Arc<CsrMatrix>, x: &Value) -> Result<Value> {
        if x.rank() != 2 || x.dims()[0] != a.n_cols {
            bail!(
                "spmm: matrix {}x{} cannot multiply x {:?} (expected [{}, F])",
                a.n_rows,
                a.n_cols,
                x.dims(),
                a.n_cols
            );
        }
        let y = a.matmul_dense(x.tensor())?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let at = CsrMatrix::transposed(a);
        self.note_context("spmm", "graph", &[a.nnz()]);
        self.record("spmm", &[x], y, move |g, _| {
            Ok(vec![Some(at.matmul_dense(&g)?)])
        })
    }
}
