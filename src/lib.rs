//! actrain: activation-compressed training on candle.
//!
//! Data flow: `model` builds a graph of `ops` calls on a `tape::Tape`; every tensor an op
//! needs for backward goes through `Tape::save`, where the `compress` policy decides how it is
//! stored; `Tape::backward` walks the nodes in reverse, unpacking one context at a time.
//! `memory` counts bytes, `data` feeds batches, `train` runs the loop.
pub mod allocate;
pub mod cli;
pub mod compress;
pub mod data;
pub mod device;
pub mod memory;
pub mod model;
pub mod ops;
pub mod search;
pub mod tape;
pub mod train;
