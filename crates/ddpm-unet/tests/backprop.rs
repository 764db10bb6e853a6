//! The backward pass of the workspace's candle-core (patched: a node's first gradient
//! contribution is stored rather than added to zeros, see `crates/vendor/candle-core`) on graphs
//! where nodes get one, two and many contributions, some of them the very same tensor, some
//! strided views; against closed-form gradients.

use candle_core::{Device, Result, Tensor, Var};

fn close(got: &Tensor, want: &[f32]) -> Result<()> {
    let got = got.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "[{i}] {g} vs {w}");
    }
    Ok(())
}

#[test]
fn contributions_are_summed_exactly_once() -> Result<()> {
    let dev = Device::Cpu;
    let xs = [0.5f32, -1.0, 2.0, 3.0, -0.25, 1.5];
    let x = Var::new(&xs, &dev)?;
    let x = x.as_tensor();
    let y = Var::new(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &dev)?;
    let y = y.as_tensor();

    // x + x: both contributions are the same gradient tensor; d/dx = 2.
    // x * y: one contribution each; d/dx = y, d/dy = x.
    // x^2 summed: d/dx = 2x.
    // a strided view of x (every other element, through a reshape and transpose) times 3:
    //   d/dx = 3 on those elements.
    let view = x.reshape((3, 2))?.t()?.narrow(0, 0, 1)?; // x[0], x[2], x[4]
    let loss = ((x + x)?.sum_all()?
        + (x * y)?.sum_all()?
        + x.sqr()?.sum_all()?
        + (view * 3.0)?.sum_all()?
        + Tensor::cat(&[x, &x.narrow(0, 1, 2)?], 0)?.sum_all()?)?;
    let grads = loss.backward()?;
    let want_x: Vec<f32> = (0..6)
        .map(|i| {
            let view = if i % 2 == 0 { 3.0 } else { 0.0 };
            let cat = if i == 1 || i == 2 { 2.0 } else { 1.0 };
            2.0 + (i + 1) as f32 + 2.0 * xs[i] + view + cat
        })
        .collect();
    close(grads.get(x).expect("grad of x"), &want_x)?;
    close(grads.get(y).expect("grad of y"), &xs)?;
    Ok(())
}

#[test]
fn a_gradient_reused_downstream_is_not_changed_by_later_sums() -> Result<()> {
    // h = 2x feeds two branches; the first branch's gradient reaching h is stored as is, and the
    // second is added to it: that sum must not alter the tensor the first branch handed over
    // (x's gradient is 2 (1 + 5) = 12 per element, whatever the order).
    let dev = Device::Cpu;
    let x = Var::new(&[1.0f32, -2.0, 0.5], &dev)?;
    let h = (x.as_tensor() * 2.0)?;
    let loss = (h.sum_all()? + (&h * 5.0)?.sum_all()?)?;
    let grads = loss.backward()?;
    close(grads.get(x.as_tensor()).expect("grad"), &[12.0, 12.0, 12.0])?;
    Ok(())
}

/// The input gradient of a convolution as a forward convolution of the dilated gradient with the
/// flipped kernel (what the patched backward pass uses on CUDA, where it goes through cuDNN)
/// equals candle's transposed convolution, for every stride, padding and kernel of our models
/// and odd sizes where the last input rows are not covered by a stride-2 window.
#[test]
fn conv_input_gradient_as_a_forward_convolution_matches_conv_transpose() -> Result<()> {
    let dev = Device::Cpu;
    let cases = [
        // (b, c_in, c_out, h, w, k, padding, stride)
        (2, 3, 5, 7, 6, 3, 1, 1),
        (1, 4, 2, 8, 8, 3, 1, 2),
        (2, 3, 4, 9, 7, 3, 1, 2),
        (1, 2, 3, 6, 9, 3, 0, 2),
        (2, 5, 3, 5, 5, 1, 0, 1),
        (1, 2, 2, 10, 8, 3, 2, 1),
        (1, 3, 2, 11, 11, 3, 0, 3),
    ];
    for (b, ci, co, h, w, k, p, s) in cases {
        let x = Tensor::randn(0f32, 1.0, (b, ci, h, w), &dev)?;
        let kernel = Tensor::randn(0f32, 1.0, (co, ci, k, k), &dev)?;
        let y = x.conv2d(&kernel, p, s, 1, 1)?;
        let grad = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
        // The transposed convolution takes one output padding for both axes: pad both fully
        // and cut to the input's size (padding only appends rows and columns).
        let want = grad
            .conv_transpose2d(&kernel, p, s - 1, s, 1)?
            .narrow(2, 0, h)?
            .narrow(3, 0, w)?;
        let got = candle_core::backprop::conv2d_input_grad(&x, &grad, &kernel, p, s, 1)?
            .expect("applies to these shapes");
        assert_eq!(got.dims(), want.dims(), "{:?}", (b, ci, co, h, w, k, p, s));
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(
            err <= 1e-5 * scale,
            "{:?}: max error {err} of {scale}",
            (b, ci, co, h, w, k, p, s)
        );
    }
    // Dilation and non-square kernels are left to the transposed convolution.
    let x = Tensor::zeros((1, 1, 5, 5), candle_core::DType::F32, &dev)?;
    let kernel = Tensor::zeros((1, 1, 3, 3), candle_core::DType::F32, &dev)?;
    let grad = Tensor::zeros((1, 1, 1, 1), candle_core::DType::F32, &dev)?;
    assert!(candle_core::backprop::conv2d_input_grad(&x, &grad, &kernel, 0, 1, 2)?.is_none());
    Ok(())
}
