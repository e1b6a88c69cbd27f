//! Embedding lookup: rows of a `[V, D]` table selected by integer ids.

use crate::tape::{SaveAs, Tape, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

impl Tape {
    /// `table[ids]`: `U32` ids of any shape and a `[V, D]` table give `[..ids.shape, D]`.
    ///
    /// Context: the ids, as an exact integer tensor (never compressed; 4 bytes per id, tiny next
    /// to the `D` floats per id of the output). Backward scatter-adds the rows of `g` into a
    /// zero `[V, D]` gradient (repeated ids accumulate); the table itself is not saved.
    pub fn embedding(&mut self, ids: &Tensor, table: &Value) -> Result<Value> {
        if ids.dtype() != DType::U32 {
            bail!(
                "embedding: ids must be U32, got {:?} (shape {:?})",
                ids.dtype(),
                ids.dims()
            );
        }
        let (vocab, dim) = match table.dims() {
            &[v, d] => (v, d),
            other => bail!(
                "embedding: table must be [V, D], got {other:?} (ids {:?})",
                ids.dims()
            ),
        };
        let flat = ids.flatten_all()?;
        if flat.elem_count() > 0 {
            let max = flat.max(0)?.to_scalar::<u32>()?;
            if max as usize >= vocab {
                bail!(
                    "embedding: id {max} out of range for a table of {vocab} rows (table {:?}, ids {:?})",
                    table.dims(),
                    ids.dims()
                );
            }
        }
        let mut out_dims = ids.dims().to_vec();
        out_dims.push(dim);
        let y = table.tensor().index_select(&flat, 0)?.reshape(out_dims)?;
        if !self.needs_grad(&[table]) {
            return Ok(self.constant(y));
        }
        let cids = self.save_derived("embedding", &flat, SaveAs::Exact)?;
        let n = flat.elem_count();
        self.record("embedding", &[table], y, move |g, _| {
            let ids = cids.load()?;
            let g2 = g.reshape((n, dim))?.contiguous()?;
            let zeros = Tensor::zeros((vocab, dim), g.dtype(), g.device())?;
            Ok(vec![Some(zeros.index_add(&ids, &g2, 0)?)])
        })
    }
}
