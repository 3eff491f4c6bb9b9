/*
 * FlyLoRA CPU kernel: a whole adapted layer (every slice, every token) in one call.
 *
 * Built at first use by flylora_runtime/kernels/native.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes. Threads come from the OpenMP runtime torch has already loaded (same soname: one pool).
 *
 * Semantics (those of flylora_runtime.kernels.flylora_apply; see its docstring):
 *   for every token t with slot s = token_slot[t] >= 0, and every slice i with k[s,i] > 0:
 *     y     = A[s, i*R : i*R + r[s,i]] @ float(x[t])             fp32 accumulation
 *     score = y + d[s, i*R : i*R + r]   (|y + d| when magnitude[s])
 *     sel   = the k[s,i] largest scores (ties: the lower rank first)
 *     out[t, off_i : off_i + out_i] = round(float(out[t, ...]) + sum_{j in sel} y[j] * B_i[s, j, :])
 *   rows with slot -1, and rows of empty slots (k = 0 for every slice), are never written.
 *
 * A is dense ([S, n*R, in] values) or compact ([S, n*R, P] column indices, uint16 or int32, and values;
 * only the first nnz[s, i] entries of a row are read, the rest is padding), or packed compact (slice
 * (s, i)'s rows of nnz[s, i] entries back to back from the start of its R*P block: what the engine uses,
 * so that an adapter's A is one contiguous stream whatever P was allocated).
 *
 * Work items are (slot, block of up to TB of its tokens, slice), run in parallel. Per item:
 *   shrink  one or two tokens: per token, four A rows at a time (dense: 16-wide FMAs along `in`; compact:
 *           16-wide gathers of x at the row's columns), so A is streamed once and each FMA chain has
 *           independent neighbours. Three or more: x transposed to [in][TB] once per item, then each
 *           A element (or nonzero) is one broadcast and one TB-wide FMA: A is read once per block.
 *   top-k   k passes of argmax over at most 64 scores.
 *   expand  the k selected rows of B^T (contiguous rows of `b`) accumulated in fp32, rounded once.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TB 16   /* tokens per block: one 16-float vector in the transposed shrink */
#define MAX_R 64
#define SMALL_NT 2  /* blocks of at most this many tokens use the per-token shrink */
#define PREFETCH 256 /* elements ahead in the compact streams */

typedef float v16 __attribute__((vector_size(64)));

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, quiet NaN: as c10::BFloat16 */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : rounded);
}

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum16(v16 v) {
    float s = 0.0f;
    for (int l = 0; l < 16; l++) s += v[l];
    return s;
}

/* n elements at src[offset:] of dtype dt into fp32 dst. */
static void load_row(float *restrict dst, const void *src, int64_t offset, int64_t n, int dt) {
    if (dt == F32) {
        memcpy(dst, (const float *)src + offset, (size_t)n * 4);
    } else if (dt == BF16) {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int64_t j = 0; j < n; j++) dst[j] = bf16_to_f32(s[j]);
    } else {
        const _Float16 *s = (const _Float16 *)src + offset;
        for (int64_t j = 0; j < n; j++) dst[j] = (float)s[j];
    }
}

/* acc[j] += w * b[offset + j] */
static inline void axpy_row(float *restrict acc, float w, const void *b, int64_t offset, int64_t n, int dt) {
    if (dt == BF16) {
        const uint16_t *s = (const uint16_t *)b + offset;
        for (int64_t j = 0; j < n; j++) acc[j] += w * bf16_to_f32(s[j]);
    } else if (dt == F32) {
        const float *s = (const float *)b + offset;
        for (int64_t j = 0; j < n; j++) acc[j] += w * s[j];
    } else {
        const _Float16 *s = (const _Float16 *)b + offset;
        for (int64_t j = 0; j < n; j++) acc[j] += w * (float)s[j];
    }
}

/* out[offset + j] = round(float(out[offset + j]) + acc[j]) */
static void add_row(void *out, int64_t offset, const float *restrict acc, int64_t n, int dt) {
    if (dt == F32) {
        float *o = (float *)out + offset;
        for (int64_t j = 0; j < n; j++) o[j] += acc[j];
    } else if (dt == BF16) {
        uint16_t *o = (uint16_t *)out + offset;
        for (int64_t j = 0; j < n; j++) o[j] = f32_to_bf16(bf16_to_f32(o[j]) + acc[j]);
    } else {
        _Float16 *o = (_Float16 *)out + offset;
        for (int64_t j = 0; j < n; j++) o[j] = (_Float16)((float)o[j] + acc[j]);
    }
}

typedef struct {
    int64_t in, n, R, S, P;  /* P: entries per compact row (0: A dense) */
    const int64_t *out_off;  /* [n + 1] column offsets of the slices in `out` */
    const void *a_val;       /* dense [S, n*R, in] or compact [S, n*R, P] values, dtype a_dt */
    int a_dt;
    const void *a_idx;       /* compact column indices [S, n*R, P] (idx_bytes 2: uint16, 4: int32) */
    int idx_bytes;
    const int32_t *a_nnz;    /* compact: [S, n] entries used per row (NULL: all P) */
    int packed;              /* packed compact: slice (s, i)'s row j starts at ((s*n + i)*R)*P + j*nnz[s, i] */
} Layer;

/* Value of compact entry e, as fp32. */
static inline float a_value(const Layer *L, int64_t e) {
    switch (L->a_dt) {
    case BF16: return bf16_to_f32(((const uint16_t *)L->a_val)[e]);
    case F16: return (float)((const _Float16 *)L->a_val)[e];
    default: return ((const float *)L->a_val)[e];
    }
}

/* First entry of row j of slot s's slice i in a compact layout with m entries used per row. */
static inline int64_t row_start(const Layer *L, int64_t s, int64_t i, int64_t j, int64_t m) {
    const int64_t block = (s * L->n + i) * L->R * L->P;
    return L->packed ? block + j * m : block + j * L->P;
}

static inline int64_t col(const Layer *L, int64_t e) {
    return L->idx_bytes == 2 ? (int64_t)((const uint16_t *)L->a_idx)[e] : (int64_t)((const int32_t *)L->a_idx)[e];
}

/* Compact row (entries [e0, e0 + m)) dotted with one fp32 token x. Scalar loads with four independent
 * accumulators, deliberately not vectorised: hardware gathers are slow on current Intel cores (microcode
 * mitigations), and three scalar loads per nonzero from L1/L2 beat streaming the dense row. */
__attribute__((optimize("no-tree-vectorize")))
static float dot_compact(const Layer *L, int64_t e0, int64_t m, const float *restrict x) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int64_t p = 0;
    if (L->a_dt == F32 && L->idx_bytes == 2) {
        const float *v = (const float *)L->a_val + e0;
        const uint16_t *ix = (const uint16_t *)L->a_idx + e0;
        for (; p + 4 <= m; p += 4) {
            if ((p & 15) == 0) {  /* keep the two streams' next lines in flight */
                __builtin_prefetch(v + p + PREFETCH);
                __builtin_prefetch(ix + p + PREFETCH);
            }
            s0 += v[p] * x[ix[p]];
            s1 += v[p + 1] * x[ix[p + 1]];
            s2 += v[p + 2] * x[ix[p + 2]];
            s3 += v[p + 3] * x[ix[p + 3]];
        }
    } else if (L->a_dt == F32) {
        const float *v = (const float *)L->a_val + e0;
        const int32_t *ix = (const int32_t *)L->a_idx + e0;
        for (; p + 4 <= m; p += 4) {
            s0 += v[p] * x[ix[p]];
            s1 += v[p + 1] * x[ix[p + 1]];
            s2 += v[p + 2] * x[ix[p + 2]];
            s3 += v[p + 3] * x[ix[p + 3]];
        }
    }
    for (; p < m; p++) {
        const int64_t e = e0 + p;
        s0 += a_value(L, e) * x[col(L, e)];
    }
    return (s0 + s1) + (s2 + s3);
}

/* y[t][j], j < r, for the nt tokens xs[t] (fp32 rows), rows row0.. of A; xT: scratch of TB*in floats. */
static void shrink(const Layer *L, int64_t s, int64_t i, int64_t r, int nt, float *const *xs, float *xT,
                   float y[][MAX_R]) {
    const int64_t in = L->in, row0 = (s * L->n + i) * L->R;
    if (L->P == 0) { /* ---------------- dense A ---------------- */
        if (nt <= SMALL_NT || L->a_dt != F32) {
            float *conv = xT; /* a converted row when A is not fp32 */
            int64_t j = 0;
            if (L->a_dt == F32) {
                for (; j + 4 <= r; j += 4) { /* four rows at a time: independent FMA chains, x loaded once */
                    const float *a0 = (const float *)L->a_val + (row0 + j) * in;
                    for (int t = 0; t < nt; t++) {
                        const float *x = xs[t];
                        v16 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
                        int64_t p = 0;
                        for (; p + 16 <= in; p += 16) {
                            const v16 xv = load16(x + p);
                            c0 += load16(a0 + p) * xv;
                            c1 += load16(a0 + in + p) * xv;
                            c2 += load16(a0 + 2 * in + p) * xv;
                            c3 += load16(a0 + 3 * in + p) * xv;
                        }
                        float s0 = hsum16(c0), s1 = hsum16(c1), s2 = hsum16(c2), s3 = hsum16(c3);
                        for (; p < in; p++) {
                            s0 += a0[p] * x[p];
                            s1 += a0[in + p] * x[p];
                            s2 += a0[2 * in + p] * x[p];
                            s3 += a0[3 * in + p] * x[p];
                        }
                        y[t][j] = s0, y[t][j + 1] = s1, y[t][j + 2] = s2, y[t][j + 3] = s3;
                    }
                }
            }
            for (; j < r; j++) {
                const float *a;
                if (L->a_dt == F32) {
                    a = (const float *)L->a_val + (row0 + j) * in;
                } else {
                    load_row(conv, L->a_val, (row0 + j) * in, in, L->a_dt);
                    a = conv;
                }
                for (int t = 0; t < nt; t++) {
                    float acc = 0.0f;
                    for (int64_t p = 0; p < in; p++) acc += a[p] * xs[t][p];
                    y[t][j] = acc;
                }
            }
            return;
        }
        v16 *xv = (v16 *)xT;
        for (int64_t p = 0; p < in; p++)
            for (int t = 0; t < TB; t++) xv[p][t] = t < nt ? xs[t][p] : 0.0f;
        for (int64_t j = 0; j < r; j++) {
            const float *a = (const float *)L->a_val + (row0 + j) * in;
            v16 c0 = {0}, c1 = {0};
            int64_t p = 0;
            for (; p + 2 <= in; p += 2) {
                c0 += a[p] * xv[p];
                c1 += a[p + 1] * xv[p + 1];
            }
            if (p < in) c0 += a[p] * xv[p];
            c0 += c1;
            for (int t = 0; t < nt; t++) y[t][j] = c0[t];
        }
        return;
    }
    /* ---------------- compact A ---------------- */
    const int64_t P = L->P;
    const int64_t m = L->a_nnz ? L->a_nnz[s * L->n + i] : P;
    if (nt <= SMALL_NT) {
        for (int64_t j = 0; j < r; j++)
            for (int t = 0; t < nt; t++) y[t][j] = dot_compact(L, row_start(L, s, i, j, m), m, xs[t]);
        return;
    }
    v16 *xv = (v16 *)xT;
    for (int64_t p = 0; p < in; p++)
        for (int t = 0; t < TB; t++) xv[p][t] = t < nt ? xs[t][p] : 0.0f;
    for (int64_t j = 0; j < r; j++) {
        const int64_t e0 = row_start(L, s, i, j, m);
        v16 c0 = {0}, c1 = {0};
        int64_t p = 0;
        if (L->a_dt == F32) {
            const float *v = (const float *)L->a_val + e0;
            for (; p + 2 <= m; p += 2) {
                c0 += v[p] * xv[col(L, e0 + p)];
                c1 += v[p + 1] * xv[col(L, e0 + p + 1)];
            }
        }
        for (; p < m; p++) {
            const int64_t e = e0 + p;
            c0 += a_value(L, e) * xv[col(L, e)];
        }
        c0 += c1;
        for (int t = 0; t < nt; t++) y[t][j] = c0[t];
    }
}

/* The k largest of score[0..r) into sel, in rank order (ties: the lower index first; NaN counts as
 * +inf). Branch-free: the place of j is the number of scores that beat it, r*r compares (<= 4096). */
static void topk(float *score, int64_t r, int64_t k, int *sel) {
    for (int64_t j = 0; j < r; j++)
        if (isnan(score[j])) score[j] = INFINITY;
    for (int64_t j = 0; j < r; j++) {
        const float sj = score[j];
        int place = 0;
        for (int64_t i = 0; i < r; i++) place += (score[i] > sj) | ((score[i] == sj) & (i < j));
        if (place < k) sel[place] = (int)j;
    }
}

/*
 * Entry point. token_slot: [T] int32 (ts_i64 = 0) or int64 (ts_i64 = 1). Tokens are grouped by slot (a
 * counting sort), cut into items (slot, up to TB of its tokens, slice) that run in parallel.
 * Returns 0; -1 when a buffer could not be allocated (`out` may then be partly updated); -2 when
 * R > MAX_R or a packed layout comes without nnz; -3 when a slot is outside [-1, S) (nothing written).
 */
int flylora_cpu_apply(int64_t T, int64_t in, int64_t n, int64_t R, int64_t S, int64_t P,
                      const int64_t *out_off, const void *x, int64_t x_stride, int x_dt, void *out,
                      int64_t out_stride, int out_dt, const void *a_val, int a_dt, const void *a_idx,
                      int idx_bytes, const int32_t *a_nnz, int packed, const void *b, int b_dt, const float *d,
                      const int32_t *k, const int32_t *r, const uint8_t *magnitude, const void *token_slot,
                      int ts_i64) {
    if (R > MAX_R) return -2;
    if (T <= 0) return 0;
    if (packed && (P == 0 || a_nnz == NULL)) return -2;
    const Layer L = {in, n, R, S, P, out_off, a_val, a_dt, a_idx, idx_bytes, a_nnz, packed};
    int64_t *start = (int64_t *)calloc((size_t)S + 1, sizeof(int64_t));
    int64_t *slot_of = (int64_t *)malloc(sizeof(int64_t) * (size_t)T);
    int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)T);
    int64_t *items = NULL, n_items = 0, max_out = 0;
    int rc = 0;
    if (!start || !slot_of || !order) { rc = -1; goto done; }
    for (int64_t t = 0; t < T; t++) { /* counting sort by slot; empty slots are dropped */
        const int64_t s = ts_i64 ? ((const int64_t *)token_slot)[t] : ((const int32_t *)token_slot)[t];
        if (s < -1 || s >= S) { rc = -3; goto done; }
        int live = 0;
        for (int64_t i = 0; s >= 0 && i < n; i++) live |= k[s * n + i] > 0;
        slot_of[t] = live ? s : -1;
        if (live) start[s + 1]++;
    }
    for (int64_t s = 0; s < S; s++) {
        n_items += (start[s + 1] + TB - 1) / TB * n;
        start[s + 1] += start[s]; /* start[s]: position of slot s's first token in `order` */
    }
    if (n_items == 0) goto done;
    if (!(items = (int64_t *)malloc(sizeof(int64_t) * 3 * (size_t)n_items))) { rc = -1; goto done; }
    for (int64_t s = 0, w = 0; s < S; s++)
        for (int64_t st = start[s]; st < start[s + 1]; st += TB)
            for (int64_t i = 0; i < n; i++, w++) {
                items[3 * w] = st;
                items[3 * w + 1] = start[s + 1] - st < TB ? start[s + 1] - st : TB;
                items[3 * w + 2] = i;
            }
    for (int64_t t = 0; t < T; t++)
        if (slot_of[t] >= 0) order[start[slot_of[t]]++] = t;
    for (int64_t i = 0; i < n; i++)
        if (out_off[i + 1] - out_off[i] > max_out) max_out = out_off[i + 1] - out_off[i];

    int failed = 0;
#pragma omp parallel if (n_items > 1)
    {
        /* per thread: TB fp32 x rows, the transposed block (or a converted A row), one output row */
        float *buf = (float *)aligned_alloc(64, sizeof(float) * (size_t)((2 * TB * in + max_out + 15) / 16 * 16));
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < n_items; w++) {
            if (buf == NULL) continue;
            const int64_t st = items[3 * w], nt = items[3 * w + 1], i = items[3 * w + 2];
            const int64_t s = slot_of[order[st]];
            const int64_t ri = r[s * n + i], ki = k[s * n + i];
            if (ki <= 0 || ri <= 0) continue;
            float *xs[TB], *xT = buf + TB * in, *acc = buf + 2 * TB * in;
            for (int t = 0; t < nt; t++) {
                xs[t] = buf + t * in;
                load_row(xs[t], x, order[st + t] * x_stride, in, x_dt);
            }
            float y[TB][MAX_R];
            shrink(&L, s, i, ri, (int)nt, xs, xT, y);
            const float *ds = d + (s * n + i) * R;
            const int64_t o0 = out_off[i], oi = out_off[i + 1] - out_off[i];
            const int64_t bbase = S * R * o0 + s * R * oi; /* row j of this slot's B^T block: bbase + j*oi */
            for (int t = 0; t < nt; t++) {
                float score[MAX_R];
                int sel[MAX_R];
                for (int64_t j = 0; j < ri; j++) score[j] = magnitude[s] ? fabsf(y[t][j] + ds[j]) : y[t][j] + ds[j];
                topk(score, ri, ki, sel);
                memset(acc, 0, sizeof(float) * (size_t)oi);
                for (int64_t q = 0; q < ki; q++) axpy_row(acc, y[t][sel[q]], b, bbase + (int64_t)sel[q] * oi, oi, b_dt);
                add_row(out, order[st + t] * out_stride + o0, acc, oi, out_dt);
            }
        }
        free(buf);
    }
    if (failed) rc = -1;
done:
    free(start);
    free(slot_of);
    free(order);
    free(items);
    return rc;
}
