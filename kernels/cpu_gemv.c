/* bitserve's CPU matmul for 2-8 bit group-wise weights and a few rows of activations
 * (kernels/cpu_native.py compiles it at first use with -march=native and calls it).
 *
 * torch's int4 CPU kernel is bound by its own unpacking at one row (docs/kernels.md). Here each
 * row of x is first quantized to int16 per block of 32 values (scale max|x| / 32767: an error
 * of about 1e-5, against bf16's 3e-3), then the codes, unpacked from nibbles into 16-bit lanes,
 * meet it in integer dot products (vpdpwssd where AVX512-VNNI or AVX-VNNI exists, vpmaddwd
 * otherwise) over COLS output columns at a time; scale and zero are applied once per block:
 *     out += sx * (s * sum(q * xq) - s * z * sum(xq)).
 * Up to ROWS rows share one unpacking of each weight register.
 *
 * Weight layout, codes below 16 (2-4 bits): [N / COLS][K / 8][COLS][4 bytes]; byte j of a
 * column holds the code of k0 + j in its low nibble and of k0 + 4 + j in its high one.
 * 8-bit codes: [N / COLS][K / 8][2][COLS][4 bytes], byte j of the first word the code of
 * k0 + j, of the second k0 + 4 + j. Either way a 16-bit lane of the unpacked registers holds
 * the codes of k0 + i and k0 + i + 2. Scales s and s * z: fp32 [N / COLS][groups][COLS].
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define COLS 16
typedef __m512i vi;
typedef __m512 vf;
#define LOADI(p) _mm512_loadu_si512((const void *)(p))
#define AND _mm512_and_si512
#define SRLI16 _mm512_srli_epi16
#define SET1_8 _mm512_set1_epi8
#define SET1_16 _mm512_set1_epi16
#define SET1_32 _mm512_set1_epi32
#define ADD32 _mm512_add_epi32
#define ZEROI _mm512_setzero_si512
#define ZEROF _mm512_setzero_ps
#define LOADF _mm512_loadu_ps
#define STOREF _mm512_storeu_ps
#define CVT _mm512_cvtepi32_ps
#define FMSUB _mm512_fmsub_ps
#define FMADD _mm512_fmadd_ps
#define MULF _mm512_mul_ps
#define ADDF _mm512_add_ps
#define SET1F _mm512_set1_ps
#ifdef __AVX512VNNI__
#define DOT(acc, w, x) _mm512_dpwssd_epi32(acc, w, x)
#define ISA "AVX512-VNNI"
#else
#define DOT(acc, w, x) _mm512_add_epi32(acc, _mm512_madd_epi16(w, x))
#define ISA "AVX512"
#endif
#else
#define COLS 8
typedef __m256i vi;
typedef __m256 vf;
#define LOADI(p) _mm256_loadu_si256((const __m256i *)(p))
#define AND _mm256_and_si256
#define SRLI16 _mm256_srli_epi16
#define SET1_8 _mm256_set1_epi8
#define SET1_16 _mm256_set1_epi16
#define SET1_32 _mm256_set1_epi32
#define ADD32 _mm256_add_epi32
#define ZEROI _mm256_setzero_si256
#define ZEROF _mm256_setzero_ps
#define LOADF _mm256_loadu_ps
#define STOREF _mm256_storeu_ps
#define CVT _mm256_cvtepi32_ps
#define FMSUB _mm256_fmsub_ps
#define FMADD _mm256_fmadd_ps
#define MULF _mm256_mul_ps
#define ADDF _mm256_add_ps
#define SET1F _mm256_set1_ps
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT(acc, w, x) _mm256_dpwssd_epi32(acc, w, x)
#define ISA "AVX2, AVX512-VNNI"
#elif defined(__AVXVNNI__)
#define DOT(acc, w, x) _mm256_dpwssd_avx_epi32(acc, w, x)
#define ISA "AVX-VNNI"
#else
#define DOT(acc, w, x) _mm256_add_epi32(acc, _mm256_madd_epi16(w, x))
#define ISA "AVX2"
#endif
#endif

#define ROWS 4
/* Bytes ahead of the weight loads to prefetch: a decode step's layers come from DRAM, not
 * cache, and in short per-thread streams that the hardware prefetcher picks up late. */
#define PREFETCH 2048

/* Columns per block of the weight layout (for the packing code) and the instructions used. */
int bitserve_gemv_cols(void) { return COLS; }
const char *bitserve_gemv_isa(void) { return ISA; }

/* Four values of x times inv, in double (no overflow for a tiny block maximum), rounded half
 * away from zero to int32. */
static inline __m128i round4(__m128 x, __m256d inv) {
  const __m256d v = _mm256_mul_pd(_mm256_cvtps_pd(x), inv);
  const __m256d half = _mm256_or_pd(_mm256_and_pd(v, _mm256_set1_pd(-0.0)), _mm256_set1_pd(0.5));
  return _mm256_cvttpd_epi32(_mm256_add_pd(v, half));
}

/* 32 values of x to int16 in the order the dot products read them: within each 8, the pairs
 * (0, 2), (1, 3), (4, 6), (5, 7), as the codes sit in the 16-bit lanes. Returns the scale and
 * writes the sum of the int16 values to *sum. A NaN or infinity in the block makes the scale
 * NaN, so the row's outputs are NaN as a float matmul's would be, not quietly finite. In AVX2
 * vectors, the same values bit for bit as a scalar loop, which cost as much as a small layer's
 * matmul (docs/kernels.md). */
static float quantize_block(const float *x, int16_t *xq, int32_t *sum) {
  const __m256 sign = _mm256_set1_ps(-0.f), big = _mm256_set1_ps(3.4028235e38f);
  __m256 v[4], m = _mm256_setzero_ps();
  int finite = 1;
  for (int j = 0; j < 4; j++) {
    v[j] = _mm256_loadu_ps(x + 8 * j);
    const __m256 a = _mm256_andnot_ps(sign, v[j]);
    finite &= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_LE_OQ)) == 255; /* no NaN, no inf */
    m = _mm256_max_ps(m, a);
  }
  if (!finite) {
    for (int i = 0; i < 32; i++) xq[i] = 0;
    *sum = 0;
    return __builtin_nanf("");
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  const __m256d inv = _mm256_set1_pd(mx > 0.f ? 32767.0 / mx : 0.0);
  const __m256i order = _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7);
  __m256i s = _mm256_setzero_si256();
  for (int j = 0; j < 4; j++) {
    const __m256 p = _mm256_permutevar8x32_ps(v[j], order);
    const __m128i lo = round4(_mm256_castps256_ps128(p), inv);
    const __m128i hi = round4(_mm256_extractf128_ps(p, 1), inv);
    _mm_storeu_si128((__m128i *)(xq + 8 * j), _mm_packs_epi32(lo, hi)); /* |values| <= 32767 */
    s = _mm256_add_epi32(s, _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  *sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
  return mx / 32767.f;
}

static inline vi pair(const int16_t *p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return SET1_32(v);
}

/* out[r][COLS columns] for `rows` (1..ROWS) rows of quantized x against one column block of
 * `bits`-wide codes (4: nibbles, 8: bytes). Each row keeps four dot accumulators (one per lane
 * pair) so that their dependency chains overlap; two from three rows up, where sixteen
 * accumulators would spill registers. */
static inline __attribute__((always_inline)) void column_block(
    const uint8_t *w, const float *s, const float *zs, const int16_t *xq, const float *sx,
    const int32_t *sq, const float *bias, float *out, int k, int n, int blocks_per_group, int rows,
    int bits, int add) {
  const vi nib = SET1_8(15), low = SET1_16(255);
  const int blocks = k / 32;
  vf acc[ROWS];
  for (int r = 0; r < rows; r++) acc[r] = ZEROF();
  for (int b = 0, g = 0, left = blocks_per_group; b < blocks; b++) {
    vi dot[ROWS][4];
    const int chains = rows <= 2 ? 4 : 2;
    for (int r = 0; r < rows; r++)
      for (int j = 0; j < 4; j++) dot[r][j] = ZEROI();
    for (int o = 0; o < 4; o++) {
      /* 16-bit lanes: the codes (k0, k2), (k1, k3), (k4, k6), (k5, k7) of each column */
      vi c[4];
      const uint8_t *at = w + (size_t)(b * 4 + o) * bits * COLS;
      _mm_prefetch((const char *)at + PREFETCH, _MM_HINT_T0);
      if (bits == 4) {
        const vi v = LOADI(at);
        const vi lo = AND(v, nib), hi = AND(SRLI16(v, 4), nib);
        c[0] = AND(lo, low), c[1] = SRLI16(lo, 8), c[2] = AND(hi, low), c[3] = SRLI16(hi, 8);
      } else {
        _mm_prefetch((const char *)at + 4 * COLS + PREFETCH, _MM_HINT_T0);
        const vi v0 = LOADI(at), v1 = LOADI(at + 4 * COLS);
        c[0] = AND(v0, low), c[1] = SRLI16(v0, 8), c[2] = AND(v1, low), c[3] = SRLI16(v1, 8);
      }
      for (int r = 0; r < rows; r++) {
        const int16_t *x = xq + (size_t)r * k + b * 32 + o * 8;
        for (int j = 0; j < 4; j++) {
          dot[r][j % chains] = DOT(dot[r][j % chains], c[j], pair(x + 2 * j));
          /* one chain per accumulator: integer sums may be re-associated, and GCC otherwise
           * computes every product of a step first and spills them to the stack */
          __asm__("" : "+v"(dot[r][j % chains]));
        }
      }
    }
    const vf sv = LOADF(s + g * COLS), zv = LOADF(zs + g * COLS);
    for (int r = 0; r < rows; r++) {
      const int i = r * blocks + b;
      const vi d = chains == 4 ? ADD32(ADD32(dot[r][0], dot[r][1]), ADD32(dot[r][2], dot[r][3]))
                               : ADD32(dot[r][0], dot[r][1]);
      const vf t = FMSUB(sv, CVT(d), MULF(zv, SET1F((float)sq[i])));
      acc[r] = FMADD(t, SET1F(sx[i]), acc[r]);
    }
    if (--left == 0) g++, left = blocks_per_group;
  }
  for (int r = 0; r < rows; r++) {
    vf v = bias ? ADDF(acc[r], LOADF(bias)) : acc[r];
    STOREF(out + (size_t)r * n, add ? ADDF(v, LOADF(out + (size_t)r * n)) : v);
  }
}

/* column_block with `rows` and `bits` as constants, so that each case compiles to its own
 * straight-line code. */
static void column_block_any(const uint8_t *w, const float *s, const float *zs, const int16_t *xq,
                             const float *sx, const int32_t *sq, const float *bias, float *out,
                             int k, int n, int bpg, int rows, int bits, int add) {
#define CASE(R, B)                                                          \
  if (rows == R && bits == B) {                                             \
    column_block(w, s, zs, xq, sx, sq, bias, out, k, n, bpg, R, B, add);    \
    return;                                                                 \
  }
  CASE(1, 4) CASE(2, 4) CASE(3, 4) CASE(4, 4) CASE(1, 8) CASE(2, 8) CASE(3, 8) CASE(4, 8)
#undef CASE
}

/* out [m, n] fp32 = x [m, k] fp32 times the packed weight of `bits` (4: codes below 16, or 8)
 * (k a multiple of 32, n of COLS, group a multiple of 32 or k), plus bias [n] where not NULL,
 * added to what out holds where `add` (a residual). Rows are independent: a row's result does
 * not depend on m or on the thread count. Returns 0, -1 if the scratch for the quantized x
 * cannot be had, -2 for a `bits` that is neither 4 nor 8. */
static int gemv(const uint8_t *w, const float *s, const float *zs, const float *bias,
                const float *x, float *out, int m, int k, int n, int group, int bits, int add,
                int threads) {
  if (bits != 4 && bits != 8) return -2;
  int16_t *xq = malloc(sizeof(int16_t) * (size_t)m * k);
  float *sx = malloc(sizeof(float) * (size_t)m * (k / 32));
  int32_t *sq = malloc(sizeof(int32_t) * (size_t)m * (k / 32));
  if (!xq || !sx || !sq) {
    free(xq), free(sx), free(sq);
    return -1;
  }
  const int blocks = k / 32, groups = (k + group - 1) / group, bpg = group / 32;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int i = 0; i < m * blocks; i++)
      sx[i] = quantize_block(x + (size_t)i * 32, xq + (size_t)i * 32, sq + i);
#pragma omp for schedule(static) collapse(2)
    for (int c = 0; c < n / COLS; c++) {
      for (int r0 = 0; r0 < m; r0 += ROWS) {
        const int rows = m - r0 < ROWS ? m - r0 : ROWS;
        column_block_any(w + (size_t)c * k * COLS * bits / 8, s + (size_t)c * groups * COLS,
                         zs + (size_t)c * groups * COLS, xq + (size_t)r0 * k,
                         sx + (size_t)r0 * blocks, sq + (size_t)r0 * blocks,
                         bias ? bias + c * COLS : NULL, out + (size_t)r0 * n + c * COLS, k, n,
                         bpg, rows, bits, add);
      }
    }
  }
  free(xq), free(sx), free(sq);
  return 0;
}

/* `gemv` without bias or residual: out = x times the weight. */
int bitserve_gemv(const uint8_t *w, const float *s, const float *zs, const float *x, float *out,
                  int m, int k, int n, int group, int bits, int threads) {
  return gemv(w, s, zs, NULL, x, out, m, k, n, group, bits, 0, threads);
}

/* Output columns n0..n1 (multiples of COLS) of the packed weight of `bits`, dequantized into
 * out [k][n1 - n0], fp32, or rounded to bf16 (to nearest even) where `bf16`: the weights of
 * the dense path for many rows. Returns 0, or -2 for a `bits` that is neither 4 nor 8. */
int bitserve_dequant(const uint8_t *w, const float *s, const float *zs, int k, int n0, int n1,
                     int group, int bits, void *out, int bf16, int threads) {
  if (bits != 4 && bits != 8) return -2;
  const int groups = (k + group - 1) / group, ld = n1 - n0;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int c = n0 / COLS; c < n1 / COLS; c++) {
    const uint8_t *wc = w + (size_t)c * k * COLS * bits / 8;
    for (int k8 = 0; k8 < k / 8; k8++) {
      const size_t at = ((size_t)c * groups + k8 * 8 / group) * COLS;
      for (int j = 0; j < 8; j++) {
        const size_t o = (size_t)(k8 * 8 + j) * ld + (c * COLS - n0);
        for (int col = 0; col < COLS; col++) {
          int code;
          if (bits == 4) {
            const uint8_t byte = wc[(k8 * COLS + col) * 4 + (j & 3)];
            code = j < 4 ? byte & 15 : byte >> 4;
          } else {
            code = wc[((k8 * 2 + j / 4) * COLS + col) * 4 + (j & 3)];
          }
          const float v = __builtin_fmaf((float)code, s[at + col], -zs[at + col]);
          if (!bf16) {
            ((float *)out)[o + col] = v;
            continue;
          }
          uint32_t u;
          __builtin_memcpy(&u, &v, 4);
          ((uint16_t *)out)[o + col] = (u & 0x7fffffff) > 0x7f800000 /* NaN stays NaN */
                                           ? (uint16_t)((u >> 16) | 0x40)
                                           : (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
        }
      }
    }
  }
  return 0;
}
