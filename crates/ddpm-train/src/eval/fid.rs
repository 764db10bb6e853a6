//! The Fréchet distance between Gaussians fitted to two sets of features (the "FID" formula),
//! with the matrix square root taken by a symmetric eigendecomposition in `f64` (cyclic Jacobi),
//! and the Inception-Score-style score `exp E[KL(p(y | x) || p(y))]` of class probabilities.

use candle_core::{DType, Device, Tensor};

use crate::{Result, TrainError};

/// Mean and covariance of a set of feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianStats {
    /// Feature dimension `d`.
    pub dim: usize,
    /// Number of vectors the statistics were computed from.
    pub count: usize,
    /// The mean, `d` values.
    pub mean: Vec<f64>,
    /// The unbiased covariance (divided by `count - 1`), `d x d`, row-major.
    pub cov: Vec<f64>,
}

impl GaussianStats {
    /// Statistics of `count` vectors of `dim` values, concatenated row by row.
    pub fn from_rows(rows: &[f64], dim: usize) -> Result<Self> {
        if dim == 0 || !rows.len().is_multiple_of(dim) || rows.len() / dim < 2 {
            return Err(TrainError::Other(format!(
                "Gaussian statistics need at least 2 feature vectors of a positive dimension \
                 (got {} values for dimension {dim})",
                rows.len()
            )));
        }
        let count = rows.len() / dim;
        let mut mean = vec![0f64; dim];
        for row in rows.chunks_exact(dim) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        for m in &mut mean {
            *m /= count as f64;
        }
        let mut cov = vec![0f64; dim * dim];
        let mut centered = vec![0f64; dim];
        for row in rows.chunks_exact(dim) {
            for k in 0..dim {
                centered[k] = row[k] - mean[k];
            }
            for i in 0..dim {
                let ci = centered[i];
                for j in i..dim {
                    cov[i * dim + j] += ci * centered[j];
                }
            }
        }
        for i in 0..dim {
            for j in i..dim {
                let v = cov[i * dim + j] / (count - 1) as f64;
                cov[i * dim + j] = v;
                cov[j * dim + i] = v;
            }
        }
        Ok(Self {
            dim,
            count,
            mean,
            cov,
        })
    }

    /// Statistics of the rows of a `(n, d)` tensor.
    pub fn from_tensor(features: &Tensor) -> Result<Self> {
        let (_, d) = features.dims2()?;
        let rows = features
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        Self::from_rows(&rows, d)
    }
}

/// Eigenvalues and orthonormal eigenvectors of the symmetric `n x n` matrix `a` (row-major), by
/// the cyclic Jacobi method: rotations zero the off-diagonal entries until their norm is below
/// 1e-15 of the matrix's. Returns `(values, vectors)`; column `k` of `vectors` (row-major
/// `n x n`) is the eigenvector of `values[k]`. Errors unless `a` has `n * n` values.
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != n * n {
        return Err(TrainError::Other(format!(
            "symmetric_eigen: {} values are not a {n} x {n} matrix",
            a.len()
        )));
    }
    let mut a = a.to_vec();
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let norm2: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..64 {
        let off: f64 = (0..n)
            .flat_map(|p| ((p + 1)..n).map(move |q| (p, q)))
            .map(|(p, q)| 2.0 * a[p * n + q].powi(2))
            .sum();
        if off <= 1e-30 * norm2 || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in (p + 1)..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A <- A J (columns p, q), then A <- J^T A (rows p, q), V <- V J.
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    Ok(((0..n).map(|i| a[i * n + i]).collect(), v))
}

/// `a b` of `n x n` row-major matrices.
fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..n {
                out[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    out
}

/// The square root of a symmetric positive semi-definite matrix, `V sqrt(max(L, 0)) V^T`
/// (eigenvalues that rounding made slightly negative count as 0).
pub fn sqrt_psd(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let (values, v) = symmetric_eigen(a, n)?;
    let roots: Vec<f64> = values.iter().map(|&l| l.max(0.0).sqrt()).collect();
    let mut out = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = (0..n).map(|k| v[i * n + k] * roots[k] * v[j * n + k]).sum();
        }
    }
    Ok(out)
}

/// The Fréchet distance between `N(m1, S1)` and `N(m2, S2)`:
/// `|m1 - m2|^2 + tr S1 + tr S2 - 2 tr sqrt(sqrt(S1) S2 sqrt(S1))`. The last matrix is symmetric
/// positive semi-definite with the eigenvalues of `S1 S2`, so its trace root is the sum of the
/// square roots of its eigenvalues, computed by [`symmetric_eigen`] in `f64`. Rounding can make
/// the result a hair below 0; it is clamped to 0.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    if a.dim != b.dim {
        return Err(TrainError::Other(format!(
            "Fréchet distance between features of dimension {} and {}",
            a.dim, b.dim
        )));
    }
    let n = a.dim;
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let trace = |m: &[f64]| (0..n).map(|i| m[i * n + i]).sum::<f64>();
    let s1 = sqrt_psd(&a.cov, n)?;
    let mut m = matmul(&matmul(&s1, &b.cov, n), &s1, n);
    // Symmetrize away the rounding of the products.
    for i in 0..n {
        for j in (i + 1)..n {
            let v = 0.5 * (m[i * n + j] + m[j * n + i]);
            m[i * n + j] = v;
            m[j * n + i] = v;
        }
    }
    let (values, _) = symmetric_eigen(&m, n)?;
    let trace_sqrt: f64 = values.iter().map(|&l| l.max(0.0).sqrt()).sum();
    let d = mean_term + trace(&a.cov) + trace(&b.cov) - 2.0 * trace_sqrt;
    Ok(d.max(0.0))
}

/// `exp(mean_i KL(p_i || p_bar))` for class probabilities `probs` (`n` rows of `k` values), with
/// `p_bar` their mean: 1 when every sample gets the same distribution, `k` when each is sure of
/// its class and the classes are used equally.
pub fn inception_score(probs: &[f64], k: usize) -> Result<f64> {
    if k == 0 || probs.is_empty() || !probs.len().is_multiple_of(k) {
        return Err(TrainError::Other(format!(
            "inception score of {} probabilities in rows of {k}",
            probs.len()
        )));
    }
    let n = probs.len() / k;
    let mut marginal = vec![0f64; k];
    for row in probs.chunks_exact(k) {
        for (m, p) in marginal.iter_mut().zip(row) {
            *m += p / n as f64;
        }
    }
    let mut kl_sum = 0f64;
    for row in probs.chunks_exact(k) {
        for (p, m) in row.iter().zip(&marginal) {
            if *p > 0.0 {
                kl_sum += p * (p.ln() - m.ln());
            }
        }
    }
    Ok((kl_sum / n as f64).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_symmetric(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in i..n {
                let v: f64 = rng.random_range(-1.0..1.0);
                a[i * n + j] = v;
                a[j * n + i] = v;
            }
        }
        a
    }

    /// A random orthogonal matrix: the eigenvectors of a random symmetric one.
    fn random_orthogonal(n: usize, seed: u64) -> Vec<f64> {
        symmetric_eigen(&random_symmetric(n, seed), n)
            .expect("eigen")
            .1
    }

    /// `Q diag(d) Q^T`.
    fn conjugate(q: &[f64], d: &[f64], n: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                out[i * n + j] = (0..n).map(|k| q[i * n + k] * d[k] * q[j * n + k]).sum();
            }
        }
        out
    }

    #[test]
    fn jacobi_diagonalizes_symmetric_matrices() {
        for (n, seed) in [(1, 0), (2, 1), (7, 2), (40, 3)] {
            let a = random_symmetric(n, seed);
            let (values, v) = symmetric_eigen(&a, n).expect("eigen");
            // V is orthonormal and V diag(values) V^T rebuilds A, to rounding of O(n) products
            // of O(1) numbers.
            let vt_v = matmul(
                &(0..n * n)
                    .map(|k| v[(k % n) * n + k / n])
                    .collect::<Vec<_>>(),
                &v,
                n,
            );
            let rebuilt = conjugate(&v, &values, n);
            for i in 0..n {
                for j in 0..n {
                    let id = if i == j { 1.0 } else { 0.0 };
                    assert!((vt_v[i * n + j] - id).abs() < 1e-12, "n={n}: V^T V");
                    assert!(
                        (rebuilt[i * n + j] - a[i * n + j]).abs() < 1e-12,
                        "n={n}: A"
                    );
                }
            }
        }
    }

    #[test]
    fn frechet_distance_of_identical_gaussians_is_zero() {
        let n = 16;
        let q = random_orthogonal(n, 5);
        let d: Vec<f64> = (0..n).map(|i| 0.1 + i as f64).collect();
        let stats = GaussianStats {
            dim: n,
            count: 100,
            mean: (0..n).map(|i| i as f64 * 0.3).collect(),
            cov: conjugate(&q, &d, n),
        };
        // tr S1 + tr S2 = 2 * 128.6, cancelled by 2 tr S: f64 rounding of sums of that size.
        assert!(frechet_distance(&stats, &stats).expect("fid") < 1e-10);
    }

    #[test]
    fn frechet_distance_of_commuting_covariances_is_the_closed_form() {
        // S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute, and then
        // FID = |m1 - m2|^2 + sum_k (sqrt(a_k) - sqrt(b_k))^2 exactly.
        let n = 12;
        let q = random_orthogonal(n, 9);
        let a: Vec<f64> = (0..n).map(|i| 0.5 + 0.25 * i as f64).collect();
        let b: Vec<f64> = (0..n).map(|i| 3.0 / (1.0 + i as f64)).collect();
        let m1: Vec<f64> = (0..n).map(|i| i as f64 * 0.1).collect();
        let m2: Vec<f64> = (0..n).map(|i| 1.0 - i as f64 * 0.05).collect();
        let want: f64 = m1
            .iter()
            .zip(&m2)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            + a.iter()
                .zip(&b)
                .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        let s = |mean: Vec<f64>, d: &[f64]| GaussianStats {
            dim: n,
            count: 10,
            mean,
            cov: conjugate(&q, d, n),
        };
        let got = frechet_distance(&s(m1, &a), &s(m2, &b)).expect("fid");
        assert!(
            (got - want).abs() < 1e-10 * want.max(1.0),
            "{got} vs {want}"
        );
    }

    #[test]
    fn frechet_distance_of_non_commuting_2x2_covariances_is_the_closed_form() {
        // For 2 x 2 matrices, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) with M similar to S1 S2
        // (the square roots of its two eigenvalues l1, l2 sum to sqrt(l1 + l2 + 2 sqrt(l1 l2))).
        let s1 = vec![2.0, 0.7, 0.7, 1.0];
        let s2 = vec![0.5, -0.2, -0.2, 3.0];
        let prod = matmul(&s1, &s2, 2);
        let det = prod[0] * prod[3] - prod[1] * prod[2];
        let tr_sqrt = (prod[0] + prod[3] + 2.0 * det.sqrt()).sqrt();
        let want = 1.0 + 4.0 + (2.0 + 1.0) + (0.5 + 3.0) - 2.0 * tr_sqrt;
        let a = GaussianStats {
            dim: 2,
            count: 2,
            mean: vec![0.0, 0.0],
            cov: s1,
        };
        let b = GaussianStats {
            dim: 2,
            count: 2,
            mean: vec![1.0, -2.0],
            cov: s2,
        };
        let got = frechet_distance(&a, &b).expect("fid");
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn statistics_are_the_sample_mean_and_unbiased_covariance() {
        let rows = [1.0, 2.0, 3.0, 6.0, 5.0, 1.0];
        let s = GaussianStats::from_rows(&rows, 2).expect("stats");
        assert_eq!(s.count, 3);
        assert_eq!(s.mean, vec![3.0, 3.0]);
        // Deviations (-2, -1), (0, 3), (2, -2): sums of products / 2 = (8, -2, 14) / 2.
        assert_eq!(s.cov, vec![4.0, -1.0, -1.0, 7.0]);
        assert!(GaussianStats::from_rows(&[1.0, 2.0], 2).is_err());
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 6.0], [5.0, 1.0]], &Device::Cpu).expect("t");
        assert_eq!(GaussianStats::from_tensor(&t).expect("stats"), s);
    }

    #[test]
    fn inception_score_spans_one_to_the_number_of_classes() {
        // Every sample sure of its own class, classes used equally: IS = k.
        let k = 4;
        let sure: Vec<f64> = (0..8)
            .flat_map(|i| (0..k).map(move |c| f64::from(u8::from(c == i % k))))
            .collect();
        assert!((inception_score(&sure, k).expect("is") - 4.0).abs() < 1e-12);
        // The same distribution for every sample: IS = 1.
        let same: Vec<f64> = (0..8).flat_map(|_| [0.1, 0.2, 0.3, 0.4]).collect();
        assert!((inception_score(&same, k).expect("is") - 1.0).abs() < 1e-12);
        assert!(inception_score(&[0.5; 3], 2).is_err());
    }
}
