//! CPU kernels of our own: AMX tiles and oneDNN's prepacked products.

pub mod amx;
pub mod onednn;
