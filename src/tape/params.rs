//! Parameters and their gradients. The optimizer reads and updates them here; the tape only
//! hands out `Value`s that point back at a `ParamId` so backward knows where to accumulate.

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

/// One named tensor. `trainable == false` marks a buffer (batch-norm running statistics):
/// stored, checkpointed, never given a gradient.
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub grad: Option<Tensor>,
    pub trainable: bool,
}

#[derive(Default)]
pub struct ParamStore {
    params: Vec<Param>,
    by_name: HashMap<String, ParamId>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a trainable parameter; names must be unique (they key checkpoints).
    pub fn add(&mut self, name: impl Into<String>, value: Tensor) -> Result<ParamId> {
        self.insert(name.into(), value, true)
    }

    /// Adds a non-trainable buffer (e.g. running mean).
    pub fn add_buffer(&mut self, name: impl Into<String>, value: Tensor) -> Result<ParamId> {
        self.insert(name.into(), value, false)
    }

    fn insert(&mut self, name: String, value: Tensor, trainable: bool) -> Result<ParamId> {
        if self.by_name.contains_key(&name) {
            bail!("parameter `{name}` is defined twice");
        }
        let id = ParamId(self.params.len());
        self.by_name.insert(name.clone(), id);
        self.params.push(Param {
            name,
            value,
            grad: None,
            trainable,
        });
        Ok(id)
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Moves every value (and gradient) to `dev`; no copy for those already there.
    pub fn to_device(&mut self, dev: &candle_core::Device) -> Result<()> {
        for p in &mut self.params {
            if !p.value.device().same_device(dev) {
                p.value = p.value.to_device(dev)?;
            }
            if let Some(g) = &mut p.grad {
                if !g.device().same_device(dev) {
                    *g = g.to_device(dev)?;
                }
            }
        }
        Ok(())
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.by_name.get(name).copied()
    }
    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }
    pub fn value(&self, id: ParamId) -> &Tensor {
        &self.params[id.0].value
    }
    pub fn grad(&self, id: ParamId) -> Option<&Tensor> {
        self.params[id.0].grad.as_ref()
    }
    pub fn set_value(&mut self, id: ParamId, value: Tensor) {
        self.params[id.0].value = value;
    }
    pub fn take_grad(&mut self, id: ParamId) -> Option<Tensor> {
        self.params[id.0].grad.take()
    }
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &Param)> {
        self.params.iter().enumerate().map(|(i, p)| (ParamId(i), p))
    }
    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.params.len()).map(ParamId)
    }

    /// Adds `g` to the parameter's gradient (a parameter used twice gets the sum).
    pub fn accumulate_grad(&mut self, id: ParamId, g: Tensor) -> Result<()> {
        let p = &mut self.params[id.0];
        p.grad = Some(match p.grad.take() {
            None => g,
            Some(prev) => (prev + g)?,
        });
        Ok(())
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad = None;
        }
    }

    /// Bytes held by trainable parameters, buffers and gradients (for the memory report).
    pub fn bytes(&self) -> (usize, usize, usize) {
        let mut params = 0;
        let mut buffers = 0;
        let mut grads = 0;
        for p in &self.params {
            let b = p.value.elem_count() * p.value.dtype().size_in_bytes();
            if p.trainable {
                params += b;
            } else {
                buffers += b;
            }
            if let Some(g) = &p.grad {
                grads += g.elem_count() * g.dtype().size_in_bytes();
            }
        }
        (params, buffers, grads)
    }
}
