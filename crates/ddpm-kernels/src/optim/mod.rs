//! The optimizer's hand-written updates: on CUDA [`cuda`] (AdamW, the EMA and the gradient norm
//! of all variables in one launch each; kernels in `kernels.cu`), which ddpm-train's optimizer
//! and EMA call directly. On the CPU ddpm-train updates in place itself (`inplace.rs`), and
//! elsewhere composes candle's tensor ops.

#[cfg(feature = "cuda")]
pub mod cuda;
