//! Attention composed of candle's ops, on any device and dtype: what `ddpm_unet::ops` runs where
//! our kernels do not (linear attention on CUDA, another device or dtype, or a policy that says
//! so), and the reference the kernels are tested against.

use candle_core::{Result, Tensor};

use super::Kind;

/// Attention of `kind` over a packed `qkv` (b, 3 * heads * dim_head, h, w) into
/// (b, heads * dim_head, h, w), channels ordered `(head, feature)`: per head, softmax attention
/// `out = v softmax_j(scale * q^T k)^T`, or linear attention
/// `out = (softmax_n(k) v^T)^T (scale * softmax_d(q))`.
pub fn attention(
    kind: Kind,
    qkv: &Tensor,
    heads: usize,
    dim_head: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, c, h, w) = qkv.dims4()?;
    if c != 3 * heads * dim_head {
        candle_core::bail!(
            "attention: qkv has {c} channels, expected 3 * {heads} heads * {dim_head} features"
        );
    }
    let parts = qkv.chunk(3, 1)?;
    let r = |t: &Tensor| t.reshape((b, heads, dim_head, h * w));
    let (q, k, v) = (r(&parts[0])?, r(&parts[1])?, r(&parts[2])?);
    let out = match kind {
        Kind::Linear => {
            let q = (softmax(&q, 2)? * scale)?;
            let k = softmax(&k, 3)?;
            // context[d, e] = sum_n k[d, n] v[e, n];  out[e, n] = sum_d context[d, e] q[d, n]
            let context = matmul(&k, &v.transpose(2, 3)?)?;
            matmul(&context.transpose(2, 3)?, &q)?
        }
        Kind::Softmax => {
            // sim[i, j] = sum_d q[d, i] k[d, j]
            let sim = matmul(&(q * scale)?.transpose(2, 3)?, &k)?;
            let attn = softmax(&sim, 3)?;
            // out[d, i] = sum_j v[d, j] attn[i, j]
            matmul(&v, &attn.transpose(2, 3)?)?
        }
    };
    out.reshape((b, heads * dim_head, h, w))
}

/// Softmax along `dim`, as candle-nn's `ops::softmax` composes it (the maximum subtracted, the
/// exponentials divided by their sum).
fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let num = x.broadcast_sub(&x.max_keepdim(dim)?)?.exp()?;
    num.broadcast_div(&num.sum_keepdim(dim)?)
}

/// Batched matrix product over the last two dimensions, of contiguous copies.
fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.matmul(&b.contiguous()?)
}
