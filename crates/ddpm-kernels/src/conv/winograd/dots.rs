//! Lane-wise dot products of rows, for the Winograd weight gradient's `dU_ξ = Y'_ξ V_ξ^T`: two
//! small matrices (channels x tiles) multiplied along their long side. A GEMM library packs
//! both operands (one of them transposed) for an output of only `o x c` values; here the rows
//! are read where they are, 4 rows of one by 3 of the other in 12 AVX2 accumulators (7 loads
//! per 12 FMAs; 4 by 4 in 16 AVX-512 ones where the CPU has them), and the 8 lanes of each
//! product are kept apart in `acc` so that the horizontal sums happen once, after all images.

/// `acc[(i * n + j) * 8 + l] += Σ_t a[i * lda + 8 t + l] · b[j * ldb + 8 t + l]` for `i < m`,
/// `j < n`, `8 t < k`: `k` a multiple of 8. Only on a CPU with AVX2 and FMA (callers check
/// [`crate::avx2`]; it panics elsewhere).
#[allow(clippy::too_many_arguments)]
pub(super) fn accumulate(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    acc: &mut [f32],
) {
    assert!(crate::avx2(), "dots::accumulate needs AVX2 and FMA");
    assert!(
        k.is_multiple_of(8),
        "dots::accumulate: k = {k} is not a multiple of 8"
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        a.len() >= (m - 1) * lda + k && lda >= k,
        "dots::accumulate: a too short"
    );
    assert!(
        b.len() >= (n - 1) * ldb + k && ldb >= k,
        "dots::accumulate: b too short"
    );
    assert!(acc.len() >= m * n * 8, "dots::accumulate: acc too short");
    #[cfg(target_arch = "x86_64")]
    {
        let ops = Operands {
            n,
            k,
            a,
            lda,
            b,
            ldb,
        };
        if k.is_multiple_of(16) && crate::avx512() {
            // SAFETY: AVX-512F and VL checked; the rest as below.
            unsafe { ops.blocks::<4, 4>(m, acc, Operands::block512::<4, 4>) };
        } else {
            // SAFETY: AVX2 and FMA checked above; the rest as below.
            unsafe { ops.blocks::<4, 3>(m, acc, Operands::block::<4, 3>) };
        }
    }
}

/// The two matrices of [`accumulate`].
#[cfg(target_arch = "x86_64")]
struct Operands<'a> {
    n: usize,
    k: usize,
    a: &'a [f32],
    lda: usize,
    b: &'a [f32],
    ldb: usize,
}

#[cfg(target_arch = "x86_64")]
impl Operands<'_> {
    /// Runs `full` (the `A x B` block of rows) over the `m x n` output in blocks, and the
    /// remainders one row or column at a time through [`Self::block`].
    ///
    /// # Safety
    /// The CPU has the features `full` needs, AVX2 and FMA; `acc` and the operands are as
    /// [`accumulate`] asserts.
    unsafe fn blocks<const A: usize, const B: usize>(
        &self,
        m: usize,
        acc: &mut [f32],
        full: unsafe fn(&Self, usize, usize, &mut [f32]),
    ) {
        let (ma, nb) = (m / A * A, self.n / B * B);
        for i in (0..m).step_by(A) {
            for j in (0..self.n).step_by(B) {
                // SAFETY: every row read is inside `a` or `b` and every accumulator inside
                // `acc` (asserted by `accumulate`); the features by the caller.
                unsafe {
                    match (i < ma, j < nb) {
                        (true, true) => full(self, i, j, acc),
                        (true, false) => (j..self.n).for_each(|j| self.block::<A, 1>(i, j, acc)),
                        (false, true) => (i..m).for_each(|i| self.block::<1, B>(i, j, acc)),
                        (false, false) => {
                            for i in i..m {
                                (j..self.n).for_each(|j| self.block::<1, 1>(i, j, acc))
                            }
                        }
                    }
                }
            }
        }
    }

    /// [`Self::block`] with 16-lane AVX-512 vectors: `k` a multiple of 16, the two halves of
    /// each sum added into its 8 lanes of `acc` at the end; 32 registers hold a 4 x 4 block
    /// (8 loads per 16 FMAs); faster than the AVX2 build on an Intel Xeon (docs/benchmarks.md,
    /// "Kernel decisions").
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn block512<const A: usize, const B: usize>(&self, i: usize, j: usize, acc: &mut [f32]) {
        use std::arch::x86_64::*;
        let cell = |r: usize, s: usize| ((i + r) * self.n + j + s) * 8;
        let mut sums = [[_mm512_setzero_ps(); B]; A];
        let pa = self.a.as_ptr().add(i * self.lda);
        let pb = self.b.as_ptr().add(j * self.ldb);
        let mut bv = [_mm512_setzero_ps(); B];
        for t in (0..self.k).step_by(16) {
            for (s, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(pb.add(s * self.ldb + t));
            }
            for (r, row) in sums.iter_mut().enumerate() {
                let av = _mm512_loadu_ps(pa.add(r * self.lda + t));
                for (v, &b) in row.iter_mut().zip(&bv) {
                    *v = _mm512_fmadd_ps(av, b, *v);
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            for (s, &v) in row.iter().enumerate() {
                let at = acc.as_mut_ptr().add(cell(r, s));
                let lo = _mm512_castps512_ps256(v);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
                _mm256_storeu_ps(
                    at,
                    _mm256_add_ps(_mm256_loadu_ps(at), _mm256_add_ps(lo, hi)),
                );
            }
        }
    }

    /// Rows `i..i + A` of `a` against rows `j..j + B` of `b`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const A: usize, const B: usize>(&self, i: usize, j: usize, acc: &mut [f32]) {
        use std::arch::x86_64::*;
        let cell = |r: usize, s: usize| ((i + r) * self.n + j + s) * 8;
        let mut sums = [[_mm256_setzero_ps(); B]; A];
        for (r, row) in sums.iter_mut().enumerate() {
            for (s, v) in row.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(acc.as_ptr().add(cell(r, s)));
            }
        }
        let pa = self.a.as_ptr().add(i * self.lda);
        let pb = self.b.as_ptr().add(j * self.ldb);
        let mut bv = [_mm256_setzero_ps(); B];
        for t in (0..self.k).step_by(8) {
            for (s, v) in bv.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(pb.add(s * self.ldb + t));
            }
            for (r, row) in sums.iter_mut().enumerate() {
                let av = _mm256_loadu_ps(pa.add(r * self.lda + t));
                for (v, &b) in row.iter_mut().zip(&bv) {
                    *v = _mm256_fmadd_ps(av, b, *v);
                }
            }
        }
        for (r, row) in sums.iter().enumerate() {
            for (s, &v) in row.iter().enumerate() {
                _mm256_storeu_ps(acc.as_mut_ptr().add(cell(r, s)), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_direct_sums_on_every_remainder() {
        // k a multiple of 16 takes the AVX-512 build where the CPU has it, the others AVX2.
        for (m, n, k) in [
            (4, 3, 8),
            (9, 7, 24),
            (1, 1, 16),
            (5, 2, 256),
            (0, 3, 8),
            (8, 8, 48),
            (6, 9, 32),
        ] {
            let (lda, ldb) = (k + 8, k);
            let a: Vec<f32> = (0..m * lda).map(|i| (i % 13) as f32 * 0.25 - 1.0).collect();
            let b: Vec<f32> = (0..n * ldb).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect();
            let mut acc = vec![1f32; m * n * 8];
            if !crate::avx2() {
                return;
            }
            accumulate((m, n, k), &a, lda, &b, ldb, &mut acc);
            for i in 0..m {
                for j in 0..n {
                    for l in 0..8 {
                        let want: f32 = (l..k)
                            .step_by(8)
                            .map(|t| a[i * lda + t] * b[j * ldb + t])
                            .sum::<f32>()
                            + 1.0;
                        let got = acc[(i * n + j) * 8 + l];
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{m}x{n}x{k}"
                        );
                    }
                }
            }
        }
    }
}
