//! The Fréchet distance between Gaussians fitted to two sets of features (the "FID" formula),
//! with the trace root taken by symmetric eigendecompositions in `f64` (`nalgebra`'s
//! `SymmetricEigen`, `O(n^3)`: about 6 s at the 2048 dimensions of Inception features),
//! and the Inception-Score-style score `exp E[KL(p(y | x) || p(y))]` of class probabilities.

use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, SymmetricEigen};

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
        // The centered rows, a block at a time, as the columns of `x` (`dim x rows`, column-major
        // storage is the rows one after the other): cov = sum over blocks of x x^T / (count - 1).
        const BLOCK: usize = 1024;
        let mut acc = DMatrix::<f64>::zeros(dim, dim);
        for block in rows.chunks(BLOCK * dim) {
            let mut centered = block.to_vec();
            for row in centered.chunks_exact_mut(dim) {
                for (v, m) in row.iter_mut().zip(&mean) {
                    *v -= m;
                }
            }
            let x = DMatrix::from_vec(dim, block.len() / dim, centered);
            acc.gemm(1.0, &x, &x.transpose(), 1.0);
        }
        let scale = 1.0 / (count - 1) as f64;
        let mut cov = vec![0f64; dim * dim];
        for i in 0..dim {
            for j in i..dim {
                // Exactly symmetric: the upper triangle mirrored.
                let v = acc[(i, j)] * scale;
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

/// Row-major `n x n` values as an `nalgebra` matrix (which is column-major).
fn to_matrix(a: &[f64], n: usize) -> DMatrix<f64> {
    DMatrix::from_row_slice(n, n, a)
}

/// Errors unless `a` has `n * n` values.
fn check_square(a: &[f64], n: usize, what: &str) -> Result<()> {
    if a.len() != n * n {
        return Err(TrainError::Other(format!(
            "{what}: {} values are not a {n} x {n} matrix",
            a.len()
        )));
    }
    Ok(())
}

/// Errors unless every eigenvalue is finite (a covariance with NaN or infinite entries, or an
/// eigensolver that broke down).
fn check_finite(values: &[f64], what: &str) -> Result<()> {
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(TrainError::Other(format!(
            "Fréchet distance: the eigenvalues of {what} are not all finite (are the features \
             finite?)"
        )))
    }
}

/// Eigenvalues and orthonormal eigenvectors of the symmetric `n x n` matrix `a` (row-major), by
/// `nalgebra`'s `SymmetricEigen` (Householder tridiagonalisation, then implicit symmetric QR
/// steps with Wilkinson shifts; `O(n^3)`, in `f64`). Returns `(values, vectors)`; column `k` of
/// `vectors` (row-major `n x n`) is the eigenvector of `values[k]`. Only the lower triangle of
/// `a` is read. Errors unless `a` has `n * n` values.
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    check_square(a, n, "symmetric_eigen")?;
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let eigen = SymmetricEigen::new(to_matrix(a, n));
    // The transpose's column-major storage is the row-major storage of the vectors.
    let vectors = eigen.eigenvectors.transpose().as_slice().to_vec();
    Ok((eigen.eigenvalues.as_slice().to_vec(), vectors))
}

/// The eigenvalues of the symmetric `n x n` matrix `a` (row-major), without the eigenvectors:
/// the tridiagonalisation does not accumulate its reflections, about a third of the cost of
/// [`symmetric_eigen`]. Errors unless `a` has `n * n` values.
pub fn symmetric_eigenvalues(a: &[f64], n: usize) -> Result<Vec<f64>> {
    check_square(a, n, "symmetric_eigenvalues")?;
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(to_matrix(a, n).symmetric_eigenvalues().as_slice().to_vec())
}

/// The square root of a symmetric positive semi-definite matrix, `V sqrt(max(L, 0)) V^T`
/// (eigenvalues that rounding made slightly negative count as 0).
pub fn sqrt_psd(a: &[f64], n: usize) -> Result<Vec<f64>> {
    check_square(a, n, "sqrt_psd")?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let eigen = SymmetricEigen::new(to_matrix(a, n));
    let mut scaled = eigen.eigenvectors.clone();
    for (k, &l) in eigen.eigenvalues.iter().enumerate() {
        scaled.column_mut(k).scale_mut(l.max(0.0).sqrt());
    }
    // Symmetric, so the column-major storage is also the row-major one.
    let root = &scaled * eigen.eigenvectors.transpose();
    Ok(root.transpose().as_slice().to_vec())
}

/// The Fréchet distance between `N(m1, S1)` and `N(m2, S2)`:
/// `|m1 - m2|^2 + tr S1 + tr S2 - 2 tr sqrt(sqrt(S1) S2 sqrt(S1))`.
///
/// With `S1 = V diag(l) V^T` (one symmetric eigendecomposition), `sqrt(S1) S2 sqrt(S1)` is
/// similar to `M = diag(sqrt(l)) V^T S2 V diag(sqrt(l))`, a symmetric positive semi-definite
/// matrix with the eigenvalues of `S1 S2`; the trace root is the sum of the square roots of
/// `M`'s eigenvalues (values only, no vectors). All in `f64`, `O(n^3)`: two eigendecompositions
/// and two matrix products. Only the `r` eigenvalues of `S1` above `n eps` of its largest (its
/// numerical rank; fewer than `n` when fewer vectors than dimensions were seen) span `M`, which
/// is then `r x r`; eigenvalues of `M` that rounding made slightly negative count as 0, and a
/// result a hair below 0 is clamped to 0. Errors on non-finite numbers.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    if a.dim != b.dim {
        return Err(TrainError::Other(format!(
            "Fréchet distance between features of dimension {} and {}",
            a.dim, b.dim
        )));
    }
    let n = a.dim;
    check_square(&a.cov, n, "Fréchet distance (first covariance)")?;
    check_square(&b.cov, n, "Fréchet distance (second covariance)")?;
    if a.mean.len() != n || b.mean.len() != n {
        return Err(TrainError::Other(format!(
            "Fréchet distance: means of {} and {} values for dimension {n}",
            a.mean.len(),
            b.mean.len()
        )));
    }
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let trace = |m: &[f64]| (0..n).map(|i| m[i * n + i]).sum::<f64>();
    if n == 0 {
        return Ok(mean_term);
    }
    let eigen = SymmetricEigen::new(to_matrix(&a.cov, n));
    check_finite(eigen.eigenvalues.as_slice(), "the first covariance")?;
    // Only S1's eigenvalues above rounding noise (n eps of the largest, as a numerical rank)
    // count: the others add nothing in exact arithmetic, and the Householder steps of the
    // eigensolver can break down on a matrix with rows that are exactly zero.
    let largest = eigen.eigenvalues.iter().cloned().fold(0.0, f64::max);
    let tol = largest * n as f64 * f64::EPSILON;
    let keep: Vec<usize> = (0..n).filter(|&k| eigen.eigenvalues[k] > tol).collect();
    let trace_sqrt = if keep.is_empty() {
        0.0
    } else {
        let v = eigen.eigenvectors.select_columns(&keep);
        let mut m = v.tr_mul(&(to_matrix(&b.cov, n) * &v));
        let roots: Vec<f64> = keep.iter().map(|&k| eigen.eigenvalues[k].sqrt()).collect();
        let r = keep.len();
        for j in 0..r {
            for i in 0..r {
                m[(i, j)] *= roots[i] * roots[j];
            }
        }
        // Symmetrize away the rounding of the products.
        let m = (&m + m.transpose()) * 0.5;
        let values = m.symmetric_eigenvalues();
        check_finite(values.as_slice(), "sqrt(S1) S2 sqrt(S1)")?;
        values.iter().map(|&l| l.max(0.0).sqrt()).sum()
    };
    let d = mean_term + trace(&a.cov) + trace(&b.cov) - 2.0 * trace_sqrt;
    if !d.is_finite() {
        return Err(TrainError::Other(format!(
            "Fréchet distance is {d}: the features' statistics are not finite"
        )));
    }
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

    /// `a b` of `n x n` row-major matrices.
    fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
        let mut out = vec![0f64; n * n];
        for i in 0..n {
            for k in 0..n {
                let aik = a[i * n + k];
                for j in 0..n {
                    out[i * n + j] += aik * b[k * n + j];
                }
            }
        }
        out
    }

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
    fn symmetric_eigen_diagonalizes_symmetric_matrices() {
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

    /// `H A H` for the Householder reflection `H = I - 2 u u^T` of the unit vector `u`:
    /// `A - 2 u (A u)^T - 2 (A u) u^T + 4 (u^T A u) u u^T` for symmetric `A`, in `O(n^2)`.
    fn reflect(a: &mut [f64], u: &[f64], n: usize) {
        let au: Vec<f64> = (0..n)
            .map(|i| (0..n).map(|k| a[i * n + k] * u[k]).sum())
            .collect();
        let uau: f64 = u.iter().zip(&au).map(|(x, y)| x * y).sum();
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] += -2.0 * u[i] * au[j] - 2.0 * au[i] * u[j] + 4.0 * uau * u[i] * u[j];
            }
        }
    }

    #[test]
    fn frechet_distance_at_inception_dimension_is_the_closed_form() {
        // The 2048 dimensions of pool3 features. S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T with
        // Q a product of three random Householder reflections (dense, exactly orthogonal up to
        // rounding); a quarter of a is 0, as when fewer samples than dimensions are compared.
        let n = 2048;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let a: Vec<f64> = (0..n)
            .map(|i| {
                if i % 4 == 0 {
                    0.0
                } else {
                    rng.random_range(0.0..2.0)
                }
            })
            .collect();
        let b: Vec<f64> = (0..n).map(|_| rng.random_range(0.01..3.0)).collect();
        let m1: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let m2: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let reflections: Vec<Vec<f64>> = (0..3)
            .map(|_| {
                let u: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
                u.iter().map(|x| x / norm).collect()
            })
            .collect();
        let cov = |d: &[f64]| {
            let mut c = vec![0f64; n * n];
            for i in 0..n {
                c[i * n + i] = d[i];
            }
            for u in &reflections {
                reflect(&mut c, u, n);
            }
            c
        };
        let want: f64 = m1
            .iter()
            .zip(&m2)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            + a.iter()
                .zip(&b)
                .map(|(x, y)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        let s1 = GaussianStats {
            dim: n,
            count: 1536,
            mean: m1,
            cov: cov(&a),
        };
        let s2 = GaussianStats {
            dim: n,
            count: 4096,
            mean: m2,
            cov: cov(&b),
        };
        let start = std::time::Instant::now();
        let got = frechet_distance(&s1, &s2).expect("fid");
        let elapsed = start.elapsed();
        // The 512 zero eigenvalues of S1 come out as rounding noise below the numerical rank's
        // cut and drop out; the rest is rounding of sums of about 2000 terms of order 1
        // (measured 4.9e-15 relative; 1e-10 leaves room).
        assert!(
            (got - want).abs() < 1e-10 * want,
            "{got} vs {want}: {:e} relative",
            (got - want).abs() / want
        );
        eprintln!(
            "n = 2048: {got} vs {want}: {:e} relative, in {elapsed:.2?}",
            (got - want).abs() / want
        );
    }

    #[test]
    fn frechet_distance_of_few_vectors_in_many_dimensions_is_the_gram_form() {
        // 4 and 5 post-ReLU-like vectors in 2048 dimensions, a third of them always 0 (dead
        // features): covariances of rank 3 and 4 with exactly zero rows. With the centered rows
        // C1, C2, S1 S2 has the nonzero eigenvalues of G G^T for G = C1 C2^T / sqrt(3 * 4), so
        // tr sqrt(sqrt(S1) S2 sqrt(S1)) is the sum of G's singular values: a 4 x 4 problem.
        let d = 2048;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut rows = |count: usize| -> Vec<f64> {
            (0..count * d)
                .map(|k| {
                    let v: f64 = rng.random_range(-1.0..3.0);
                    if k % 3 == 0 {
                        0.0
                    } else {
                        10.0 * v.max(0.0)
                    }
                })
                .collect()
        };
        let (x1, x2) = (rows(4), rows(5));
        let a = GaussianStats::from_rows(&x1, d).expect("stats");
        let b = GaussianStats::from_rows(&x2, d).expect("stats");
        let centered = |x: &[f64], s: &GaussianStats| -> Vec<Vec<f64>> {
            x.chunks(d)
                .map(|r| r.iter().zip(&s.mean).map(|(v, m)| v - m).collect())
                .collect()
        };
        let (c1, c2) = (centered(&x1, &a), centered(&x2, &b));
        let g: Vec<Vec<f64>> = c1
            .iter()
            .map(|p| {
                c2.iter()
                    .map(|q| p.iter().zip(q).map(|(x, y)| x * y).sum::<f64>() / 12f64.sqrt())
                    .collect()
            })
            .collect();
        let ggt: Vec<f64> = (0..16)
            .map(|k| (0..5).map(|j| g[k / 4][j] * g[k % 4][j]).sum())
            .collect();
        let (values, _) = symmetric_eigen(&ggt, 4).expect("eigen");
        let trace_sqrt: f64 = values.iter().map(|l| l.max(0.0).sqrt()).sum();
        let trace = |s: &GaussianStats| (0..d).map(|i| s.cov[i * d + i]).sum::<f64>();
        let mean_term: f64 = a
            .mean
            .iter()
            .zip(&b.mean)
            .map(|(x, y)| (x - y).powi(2))
            .sum();
        let want = mean_term + trace(&a) + trace(&b) - 2.0 * trace_sqrt;
        let got = frechet_distance(&a, &b).expect("fid");
        // A distance of about 3e5 from sums of about 1e5: rounding of 1e-12 relative.
        assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
        let back = frechet_distance(&b, &a).expect("fid");
        assert!((back - want).abs() < 1e-9 * want, "{back} vs {want}");
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
