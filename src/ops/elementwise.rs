//! Elementwise arithmetic with broadcasting, scalar ops, and sum/mean reductions.

use super::sum_to_shape;
use crate::tape::{Grad, SaveAs, Tape, Value};
use anyhow::Result;
use candle_core::Tensor;

#[derive(Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
}

impl Tape {
    /// `a + b` with broadcasting. Context: shapes only.
    pub fn add(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.arith(Arith::Add, a, b)
    }
    /// `a - b` with broadcasting. Context: shapes only.
    pub fn sub(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.arith(Arith::Sub, a, b)
    }
    /// `a * b` with broadcasting. Context: each input, saved only if the *other* one needs a
    /// gradient.
    pub fn mul(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.arith(Arith::Mul, a, b)
    }
    /// `a / b` with broadcasting. Context: `b`, and `a` if `b` needs a gradient.
    pub fn div(&mut self, a: &Value, b: &Value) -> Result<Value> {
        self.arith(Arith::Div, a, b)
    }

    /// [`Tape::add`] of an `a` handed over by the caller, which keeps no other handle or view
    /// of it: where no context holds `a` as it is (see [`Tape::may_overwrite`]) and `b` has
    /// its shape, `b` is added into `a`'s own buffer (a residual block's sum costs no third
    /// tensor).
    pub fn add_owned(&mut self, a: Value, b: &Value) -> Result<Value> {
        let in_place = a.id() != b.id()
            && a.shape() == b.shape()
            && self.may_overwrite(&a, None)
            && crate::ops::activation::add_in_place(a.tensor(), b.tensor())?;
        if in_place {
            let y = a.tensor().clone();
            return self.arith_into(Arith::Add, &a, b, Some(y));
        }
        self.add(&a, b)
    }

    fn arith(&mut self, kind: Arith, a: &Value, b: &Value) -> Result<Value> {
        self.arith_into(kind, a, b, None)
    }

    /// `kind(a, b)`, or the already computed result `y` (an in-place sum).
    fn arith_into(
        &mut self,
        kind: Arith,
        a: &Value,
        b: &Value,
        y: Option<Tensor>,
    ) -> Result<Value> {
        let (ta, tb) = (a.tensor(), b.tensor());
        let op = match kind {
            Arith::Add => "add",
            Arith::Sub => "sub",
            Arith::Mul => "mul",
            Arith::Div => "div",
        };
        let y = match (y, kind) {
            (Some(y), _) => y,
            (None, Arith::Add) => ta.broadcast_add(tb)?,
            (None, Arith::Sub) => ta.broadcast_sub(tb)?,
            (None, Arith::Mul) => ta.broadcast_mul(tb)?,
            (None, Arith::Div) => ta.broadcast_div(tb)?,
        };
        if !self.needs_grad(&[a, b]) {
            return Ok(self.constant(y));
        }
        let (sa, sb) = (ta.shape().clone(), tb.shape().clone());
        let (na, nb) = (a.is_tracked(), b.is_tracked());
        let save_a = matches!(kind, Arith::Mul | Arith::Div) && nb;
        let save_b = match kind {
            Arith::Mul => na,
            Arith::Div => true,
            _ => false,
        };
        let ca = if save_a {
            Some(self.save(op, a, SaveAs::Activation)?)
        } else {
            None
        };
        let cb = if save_b {
            Some(self.save(op, b, SaveAs::Activation)?)
        } else {
            None
        };
        if matches!(kind, Arith::Add | Arith::Sub) {
            // Only shapes: the output gradient goes through, negated for `b` of a sub.
            return self.record_grad(op, &[a, b], y, move |g, needs| {
                // A gradient summed down to a broadcast input's shape, or negated, is a new
                // tensor (owned); one that is `g` itself aliases whatever else holds `g`.
                let gb = if !needs[1] {
                    None
                } else if matches!(kind, Arith::Sub) {
                    Some(Grad::owned(sum_to_shape(&g.tensor().neg()?, &sb)?))
                } else if g.tensor().shape() != &sb {
                    Some(Grad::owned(sum_to_shape(g.tensor(), &sb)?))
                } else if needs[0] {
                    Some(Grad::shared(g.tensor().clone()))
                } else {
                    // The one gradient wanted, unchanged: it keeps its ownership.
                    return Ok(vec![None, Some(g)]);
                };
                let ga = if !needs[0] {
                    None
                } else if g.tensor().shape() != &sa {
                    Some(Grad::owned(sum_to_shape(g.tensor(), &sa)?))
                } else if gb.as_ref().is_some_and(|gb| !gb.is_owned()) {
                    // `b` reads the same tensor: neither may be written in place.
                    Some(Grad::shared(g.into_tensor()))
                } else {
                    Some(g)
                };
                Ok(vec![ga, gb])
            });
        }
        self.record(op, &[a, b], y, move |g, needs| {
            // Mul or Div (add and sub were recorded above).
            let (ga, gb) = if matches!(kind, Arith::Mul) {
                let ga = match (&cb, needs[0]) {
                    (Some(cb), true) => Some(g.broadcast_mul(&cb.load()?)?),
                    _ => None,
                };
                let gb = match (&ca, needs[1]) {
                    (Some(ca), true) => Some(g.broadcast_mul(&ca.load()?)?),
                    _ => None,
                };
                (ga, gb)
            } else {
                let b = cb.as_ref().expect("div always saves b").load()?;
                let ga = if needs[0] {
                    Some(g.broadcast_div(&b)?)
                } else {
                    None
                };
                let gb = match (&ca, needs[1]) {
                    (Some(ca), true) => {
                        let a = ca.load()?;
                        Some(g.broadcast_mul(&a)?.broadcast_div(&b.sqr()?)?.neg()?)
                    }
                    _ => None,
                };
                (ga, gb)
            };
            let ga = match ga {
                Some(g) if needs[0] => Some(sum_to_shape(&g, &sa)?),
                _ => None,
            };
            let gb = match gb {
                Some(g) if needs[1] => Some(sum_to_shape(&g, &sb)?),
                _ => None,
            };
            Ok(vec![ga, gb])
        })
    }

    /// `x * mul + add` for scalars. Context: none.
    pub fn affine(&mut self, x: &Value, mul: f64, add: f64) -> Result<Value> {
        let y = x.tensor().affine(mul, add)?;
        self.record("affine", &[x], y, move |g, _| {
            Ok(vec![Some(g.affine(mul, 0.0)?)])
        })
    }

    /// `x * s`. Context: none.
    pub fn scale(&mut self, x: &Value, s: f64) -> Result<Value> {
        self.affine(x, s, 0.0)
    }

    /// `-x`. Context: none.
    pub fn neg(&mut self, x: &Value) -> Result<Value> {
        self.affine(x, -1.0, 0.0)
    }

    /// `x ^ p` for a scalar exponent. Context: `x`.
    pub fn powf(&mut self, x: &Value, p: f64) -> Result<Value> {
        let y = x.tensor().powf(p)?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let cx = self.save("powf", x, SaveAs::Activation)?;
        self.record("powf", &[x], y, move |g, _| {
            let x = cx.load()?;
            Ok(vec![Some(g.mul(&x.powf(p - 1.0)?.affine(p, 0.0)?)?)])
        })
    }

    /// `exp(x)`. Context: the output (its own derivative).
    pub fn exp(&mut self, x: &Value) -> Result<Value> {
        let y = x.tensor().exp()?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let out = self.output(y);
        let cy = self.save("exp", &out, SaveAs::Activation)?;
        self.record_output("exp", &[x], out, move |g, _| {
            Ok(vec![Some(g.mul(&cy.load()?)?)])
        })
    }

    /// `ln(x)`. Context: `x`.
    pub fn log(&mut self, x: &Value) -> Result<Value> {
        let y = x.tensor().log()?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let cx = self.save("log", x, SaveAs::Activation)?;
        self.record("log", &[x], y, move |g, _| {
            Ok(vec![Some(g.div(&cx.load()?)?)])
        })
    }

    /// Sum over `dims`. Context: the input shape.
    pub fn sum(&mut self, x: &Value, dims: &[usize], keepdim: bool) -> Result<Value> {
        self.reduce("sum", x, dims, keepdim, 1.0)
    }

    /// Mean over `dims`. Context: the input shape.
    pub fn mean(&mut self, x: &Value, dims: &[usize], keepdim: bool) -> Result<Value> {
        let n: usize = dims.iter().map(|&d| x.dims()[d]).product();
        self.reduce("mean", x, dims, keepdim, 1.0 / n.max(1) as f64)
    }

    /// Sum of every element (a scalar).
    pub fn sum_all(&mut self, x: &Value) -> Result<Value> {
        let dims: Vec<usize> = (0..x.rank()).collect();
        self.reduce("sum", x, &dims, false, 1.0)
    }

    /// Mean of every element (a scalar).
    pub fn mean_all(&mut self, x: &Value) -> Result<Value> {
        let dims: Vec<usize> = (0..x.rank()).collect();
        self.mean(x, &dims, false)
    }

    fn reduce(
        &mut self,
        op: &'static str,
        x: &Value,
        dims: &[usize],
        keepdim: bool,
        factor: f64,
    ) -> Result<Value> {
        for &d in dims {
            if d >= x.rank() {
                anyhow::bail!("{op}: dim {d} out of range for shape {:?}", x.dims());
            }
        }
        let mut y = x.tensor().sum_keepdim(dims.to_vec())?;
        if factor != 1.0 {
            y = y.affine(factor, 0.0)?;
        }
        let kept_shape = y.shape().clone();
        if !keepdim {
            let squeezed: Vec<usize> = x
                .dims()
                .iter()
                .enumerate()
                .filter(|(i, _)| !dims.contains(i))
                .map(|(_, &d)| d)
                .collect();
            y = y.reshape(squeezed)?;
        }
        let in_shape = x.shape().clone();
        if self.needs_grad(&[x]) {
            self.note_context(op, "shape", &[]);
        }
        self.record(op, &[x], y, move |g, _| {
            let g = g.reshape(kept_shape)?.broadcast_as(&in_shape)?;
            let g = if factor != 1.0 {
                g.affine(factor, 0.0)?
            } else {
                g.contiguous()?
            };
            Ok(vec![Some(g)])
        })
    }
}
