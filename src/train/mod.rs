//! Training: the optimizers and gradient utilities (`optim`), learning-rate schedules
//! (`schedule`), atomic checkpoints for exact resumption (`checkpoint`) and the loop that ties
//! them to the model and the data (`trainer`).

pub mod checkpoint;
pub mod optim;
pub mod schedule;
pub mod trainer;
