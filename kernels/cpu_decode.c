/* One-token decode steps of a llama-family decoder on the CPU, every layer in one call
 * (kernels/cpu_native.py builds this file, which includes the matmul of cpu_gemv.c).
 *
 * With our matmul, most of a one-row decode step of the default model went to the ~25 small torch
 * ops a layer runs between its matmuls (norms, rotary, cache writes, attention, activation),
 * each microseconds of dispatch for a few hundred floats of work (docs/serving.md). Here those ops
 * are plain loops over fp32 rows, with the projections run by `gemv` straight from the packed
 * weights; the residual adds happen in the o and down projections' epilogue. Every row is
 * computed alone (norms, rotary and attention per row; `gemv` is row-independent), so a row's
 * result does not depend on the batch or the thread count.
 */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "cpu_gemv.c"

/* A packed projection (the layout of cpu_gemv.c) with its fp32 bias, or NULL. */
typedef struct {
  const uint8_t *w;
  const float *s, *zs, *bias;
  int k, n, group, bits;
} bs_matrix;

/* One decoder layer: its projections (q/k/v fused as [q heads, k heads, v heads], gate/up
 * fused as [gate, up]), its two RMSNorms and its K/V cache [slots][kv_heads][max_len][head_dim]
 * (fp32, or fp16 where the model's kv_half is set). */
typedef struct {
  bs_matrix qkv, o, gate_up, down;
  const float *attn_norm, *mlp_norm;
  float attn_eps, mlp_eps;
  void *k_cache, *v_cache;
} bs_layer;

/* The model's sizes, attention scale, rotary tables [max_len][head_dim] (sin with its first half
 * negated: rotate_half(x) * sin is x rolled by half a head times it) and the K/V cache's element
 * type (kv_half: IEEE fp16, half the bytes; values are rounded to nearest even when written and
 * widened exactly when read, as torch's casts do). */
typedef struct {
  int dim, heads, kv_heads, head_dim, max_len;
  float scale;
  const float *cos, *sin;
  int kv_half;
} bs_model;

static int project(const bs_matrix *m, const float *x, float *out, int rows, int add,
                   int threads) {
  return gemv(m->w, m->s, m->zs, m->bias, x, out, rows, m->k, m->n, m->group, m->bits, add,
              threads);
}

/* out = x / sqrt(mean(x^2) + eps) * weight, rounded after each product as torch's is. */
static void rms_norm(const float *x, const float *weight, float eps, float *out, int n) {
  double sum = 0.0;
  for (int i = 0; i < n; i++) sum += (double)x[i] * x[i];
  const float r = 1.f / sqrtf((float)(sum / n) + eps);
  for (int i = 0; i < n; i++) {
    const float y = x[i] * r;
    out[i] = y * weight[i];
  }
}

/* Attention and the activation run on 8-wide vectors on every x86-64 CPU with AVX2 (head_dim a
 * multiple of 8). */
typedef __m256 v8;

/* The lane sums of a[0..7], as the lanes of one vector. */
static inline v8 sum8(const v8 *a) {
  const v8 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const v8 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* e^x of 8 floats (Cephes' expf polynomial, within 2 ulp of expf for the x <= 0 that softmax
 * gives it); NaN stays NaN. */
static inline v8 exp8(v8 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), _mm256_min_ps(_mm256_set1_ps(88.3f), x));
  const v8 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), _mm256_set1_ps(.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  v8 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* Cache element i (fp32, or fp16 with half) and the 7 after it, as fp32: fp16 widens exactly. */
static inline __attribute__((always_inline)) v8 load8(const void *p, size_t i, int half) {
  return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
              : _mm256_loadu_ps((const float *)p + i);
}

/* The dot products of q [d] with `keys` (at most 8) keys k [keys][d], as the lanes of one vector
 * (zeros past `keys`); inlined, so the whole blocks of 8 keys run without a branch per key. */
static inline __attribute__((always_inline)) v8 dots(const float *q, const void *k, int half,
                                                     int d, int keys) {
  v8 acc[8];
  for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
  for (int i = 0; i < d; i += 8) {
    const v8 qv = _mm256_loadu_ps(q + i);
    for (int j = 0; j < keys; j++)
      acc[j] = _mm256_fmadd_ps(qv, load8(k, (size_t)j * d + i, half), acc[j]);
  }
  return sum8(acc);
}

/* `attend` with `half` fixed at each call, so that each cache type compiles to loops of its own. */
static inline __attribute__((always_inline)) void attend_as(const float *const *q, const int *len,
                                                            int nq, const void *k, const void *v,
                                                            int half, int d, float scale,
                                                            float *scores, int stride,
                                                            float *const *out) {
  enum { VALUES = 32 }; /* positions of V per block: 8 KB at 64 fp32 values a head */
  const size_t size = half ? 2 : 4; /* bytes a cached value */
  int longest = 0;
  for (int i = 0; i < nq; i++) longest = len[i] > longest ? len[i] : longest;
  v8 top[nq];
  for (int i = 0; i < nq; i++) top[i] = _mm256_set1_ps(-INFINITY);
  for (int t = 0; t < longest; t += 8) { /* eight keys' dot products at a time, for each query */
    const void *kt = (const char *)k + (size_t)t * d * size;
    for (int c = 0; c < nq; c++) {
      if (t >= len[c]) continue;
      const int keys = len[c] - t < 8 ? len[c] - t : 8;
      v8 sc = _mm256_mul_ps(keys == 8 ? dots(q[c], kt, half, d, 8) : dots(q[c], kt, half, d, keys),
                            _mm256_set1_ps(scale));
      if (keys < 8) /* past the last key: -inf, a weight of e^-87.3 that no V meets */
        sc = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), sc,
                              _mm256_castsi256_ps(_mm256_cmpgt_epi32(
                                  _mm256_set1_epi32(keys), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
      _mm256_storeu_ps(scores + (size_t)c * stride + t, sc);
      top[c] = _mm256_max_ps(top[c], sc);
    }
  }
  float sum[nq];
  for (int c = 0; c < nq; c++) { /* softmax's numerators, and their sum */
    float lanes[8], m = -INFINITY, *s = scores + (size_t)c * stride;
    v8 total = _mm256_setzero_ps();
    _mm256_storeu_ps(lanes, top[c]);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (int t = 0; t < len[c]; t += 8) {
      const v8 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(m)));
      _mm256_storeu_ps(s + t, e);
      total = _mm256_add_ps(total, e);
    }
    _mm256_storeu_ps(lanes, total);
    sum[c] = 0.f;
    for (int j = 0; j < 8; j++) sum[c] += lanes[j];
  }
  for (int t0 = 0; t0 < longest; t0 += VALUES) {
    const void *vb = (const char *)v + (size_t)t0 * d * size; /* position t: row t - t0 */
    for (int c = 0; c < nq; c++) {
      if (t0 >= len[c]) continue;
      const int end = len[c] < t0 + VALUES ? len[c] : t0 + VALUES;
      const float *p = scores + (size_t)c * stride;
      int i0 = 0;
      for (; i0 + 64 <= d; i0 += 64) { /* 64 values of out in registers over the block */
        v8 o[8];
        for (int i = 0; i < 8; i++)
          o[i] = t0 ? _mm256_loadu_ps(out[c] + i0 + 8 * i) : _mm256_setzero_ps();
        for (int t = t0; t < end; t++) {
          const v8 pt = _mm256_set1_ps(p[t]);
          const size_t at = (size_t)(t - t0) * d + i0;
          for (int i = 0; i < 8; i++) o[i] = _mm256_fmadd_ps(pt, load8(vb, at + 8 * i, half), o[i]);
        }
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(out[c] + i0 + 8 * i, o[i]);
      }
      for (; i0 < d; i0 += 8) { /* what is left, 8 at a time: the same sums in the same order */
        v8 o = t0 ? _mm256_loadu_ps(out[c] + i0) : _mm256_setzero_ps();
        for (int t = t0; t < end; t++)
          o = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), load8(vb, (size_t)(t - t0) * d + i0, half), o);
        _mm256_storeu_ps(out[c] + i0, o);
      }
    }
  }
  for (int c = 0; c < nq; c++)
    for (int i = 0; i < d; i++) out[c][i] /= sum[c];
}

/* Query heads that share one KV head, each attending to positions 0..len[i]-1 of its keys and
 * values [max_len][d] (fp32, or fp16 with half; lens in any order): out[i] [d]. The loops run
 * over blocks of keys (and of values) on the outside and the queries inside, so a block read
 * from L2 serves every query from L1; each query's sums are the same, in the same order, as if
 * it ran alone. An fp16 value is widened as it is loaded (widening a block once into a buffer
 * for every query was no faster, even for 15 queries). scores: scratch of nq x stride floats,
 * stride at least the longest len rounded up to 8. */
static void attend(const float *const *q, const int *len, int nq, const void *k, const void *v,
                   int half, int d, float scale, float *scores, int stride, float *const *out) {
  if (half)
    attend_as(q, len, nq, k, v, 1, d, scale, scores, stride, out);
  else
    attend_as(q, len, nq, k, v, 0, d, scale, scores, stride, out);
}

/* Rows of one slot that one attention task takes: about 16 queries with the query heads of a KV
 * head (`group` of them), enough to serve each block of keys from L1 many times over. */
static int rows_per_task(int group) { return group >= 16 ? 1 : 16 / group; }

/* Rotary embedding of n heads of x [n][head_dim] in place, at the table row `cos`, `sin`. */
static void rotate(float *x, const float *cos, const float *sin, int n, int d) {
  float tmp[d];
  for (int h = 0; h < n; h++, x += d) {
    for (int i = 0; i < d; i++) tmp[i] = x[i];
    for (int i = 0; i < d; i++) x[i] = tmp[i] * cos[i] + tmp[(i + d / 2) % d] * sin[i];
  }
}

/* x [d] into a cache at element `at`: as it is, or (half) rounded to fp16, nearest even. */
static void store_row(void *cache, int half, size_t at, const float *x, int d) {
  if (!half) {
    memcpy((float *)cache + at, x, sizeof(float) * (size_t)d);
    return;
  }
  for (int i = 0; i < d; i += 8)
    _mm_storeu_si128((__m128i *)((uint16_t *)cache + at + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

/* One layer's attention block for `rows` one-token rows: norm, q/k/v, rotary, the new K/V
 * written at pos[b] of slot slots[b], attention over positions 0..pos[b], and the o projection
 * added to h. x, qkv, att: scratch of rows x dim, qkv's n, heads x head_dim floats; scores:
 * threads x rows_per_task x heads / kv_heads x stride, stride the longest row's length + 8. */
static int attention_block(const bs_model *m, const bs_layer *l, float *h, int rows,
                           const int64_t *slots, const int64_t *pos, float *x, float *qkv,
                           float *att, float *scores, int stride, int threads) {
  const int d = m->head_dim, heads = m->heads, kvh = m->kv_heads, group = heads / kvh;
  const int width = (heads + 2 * kvh) * d;
  for (int b = 0; b < rows; b++)
    rms_norm(h + (size_t)b * m->dim, l->attn_norm, l->attn_eps, x + (size_t)b * m->dim, m->dim);
  int err = project(&l->qkv, x, qkv, rows, 0, threads);
  if (err) return err;
  for (int b = 0; b < rows; b++) {
    float *row = qkv + (size_t)b * width;
    rotate(row, m->cos + pos[b] * d, m->sin + pos[b] * d, heads + kvh, d);
    for (int j = 0; j < kvh; j++) {
      const size_t at = (((size_t)slots[b] * kvh + j) * m->max_len + pos[b]) * d;
      store_row(l->k_cache, m->kv_half, at, row + (heads + j) * d, d);
      store_row(l->v_cache, m->kv_half, at, row + (heads + kvh + j) * d, d);
    }
  }
  /* tasks: blocks of up to `per` rows of one slot (a prompt chunk's tokens) x KV heads, each
   * with the query heads of its KV head (one query head a task where fewer tasks than twice the
   * threads would leave threads idle, as at decode's batch 1: then each thread takes a contiguous
   * share, so a KV head's query heads mostly stay on one thread) */
  const int per = rows_per_task(group);
  int start[rows + 1], blocks = 0;
  for (int b = 0; b < rows; b++)
    if (!b || slots[b] != slots[b - 1] || b - start[blocks - 1] == per) start[blocks++] = b;
  start[blocks] = rows;
  const int parts = blocks * kvh >= 2 * threads ? 1 : group, split = group / parts;
  const int tasks = blocks * kvh * parts, chunk = parts > 1 ? (tasks + threads - 1) / threads : 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, chunk) if (tasks > 1)
  for (int task = 0; task < tasks; task++) {
    const int blk = task / (kvh * parts), j = task / parts % kvh, part = task % parts;
    const int b0 = start[blk], nq = (start[blk + 1] - b0) * split;
    const float *q[nq];
    float *out[nq];
    int len[nq];
    for (int c = 0; c < nq; c++) {
      const int b = b0 + c / split, head = j * group + part * split + c % split;
      q[c] = qkv + (size_t)b * width + (size_t)head * d;
      out[c] = att + ((size_t)b * heads + head) * d;
      len[c] = (int)pos[b] + 1;
    }
    const size_t at = ((size_t)slots[b0] * kvh + j) * m->max_len * d, size = m->kv_half ? 2 : 4;
    float *own = scores + (size_t)omp_get_thread_num() * per * group * stride;
    attend(q, len, nq, (char *)l->k_cache + at * size, (char *)l->v_cache + at * size,
           m->kv_half, d, m->scale, own, stride, out);
  }
  return project(&l->o, att, h, rows, 1, threads);
}

/* One layer's MLP block: norm, gate/up, silu(gate) * up, and the down projection added to h.
 * x: scratch of rows x max(dim, inner) floats, gu: rows x 2 inner. */
static int mlp_block(const bs_model *m, const bs_layer *l, float *h, int rows, float *x, float *gu,
                     int threads) {
  const int inner = l->gate_up.n / 2;
  for (int b = 0; b < rows; b++)
    rms_norm(h + (size_t)b * m->dim, l->mlp_norm, l->mlp_eps, x + (size_t)b * m->dim, m->dim);
  int err = project(&l->gate_up, x, gu, rows, 0, threads);
  if (err) return err;
  for (int b = 0; b < rows; b++) { /* silu(gate) * up = gate / (1 + e^-gate) * up */
    const float *gate = gu + (size_t)b * 2 * inner, *up = gate + inner;
    float *out = x + (size_t)b * inner;
    int i = 0;
    for (; i + 8 <= inner; i += 8) {
      const v8 g = _mm256_loadu_ps(gate + i);
      const v8 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const v8 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    for (; i < inner; i++) out[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
  }
  return project(&l->down, x, h, rows, 1, threads);
}

/* The residual stream h [rows][dim] (the embedded tokens) through every layer, in place: row b
 * is the token at position pos[b] of the sequence in KV slot slots[b]. Returns 0, -1 without
 * memory for the scratch, -2 for a projection whose storage is neither 4 nor 8 bits. */
int bitserve_decode(const bs_model *m, const bs_layer *layers, int n_layers, float *h, int rows,
                    const int64_t *slots, const int64_t *pos, int threads) {
  const bs_layer *l0 = layers;
  const int inner = l0->gate_up.n / 2, wide = inner > m->dim ? inner : m->dim;
  float *x = malloc(sizeof(float) * (size_t)rows * wide);
  float *qkv = malloc(sizeof(float) * (size_t)rows * l0->qkv.n);
  float *att = malloc(sizeof(float) * (size_t)rows * m->heads * m->head_dim);
  float *gu = malloc(sizeof(float) * (size_t)rows * l0->gate_up.n);
  const int group = m->heads / m->kv_heads;
  int stride = 8; /* a query's scores: the longest row's length, rounded up to 8, or more */
  for (int r = 0; r < rows; r++) stride = pos[r] + 9 > stride ? (int)pos[r] + 9 : stride;
  float *scores = malloc(sizeof(float) * (size_t)threads * rows_per_task(group) * group * stride);
  int err = x && qkv && att && gu && scores ? 0 : -1;
  for (int i = 0; i < n_layers && !err; i++) {
    err = attention_block(m, layers + i, h, rows, slots, pos, x, qkv, att, scores, stride,
                          threads);
    if (!err) err = mlp_block(m, layers + i, h, rows, x, gu, threads);
  }
  free(x), free(qkv), free(att), free(gu), free(scores);
  return err;
}
