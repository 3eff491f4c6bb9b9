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
 * so that an adapter's A is one contiguous stream whatever P was allocated). Packed slots may also carry
 * a_mask ([S, n*R, ceil(in/16)] 16-bit words): bit c of word w is set when the row has an entry at column
 * 16w + c. A row's values are in column order, so word w's entries are its next popcount(w) values.
 *
 * Work items are (slot, block of up to TB of its tokens, a range of slices), run in parallel: all slices
 * of the block when there are enough blocks to keep every thread busy (x is then converted, and
 * transposed, once per block), one slice each otherwise (so that a lone decode token still uses every
 * thread). Per item and slice:
 *   shrink  one or two tokens: per token, four A rows at a time, so each FMA chain has independent
 *           neighbours and four streams are in flight. Dense A: 16-wide FMAs along `in`. Packed A with
 *           a_mask, on AVX-512: 16 columns per step, the row's next values expanded into the word's set
 *           lanes (4 bytes per entry and 2 bits per column streamed, no gathers); with bf16 A and bf16 x
 *           on AVX512-BF16, 32 columns per step and one vdpbf16ps (exact products, fp32 sums; nothing is
 *           widened). Other compact A: scalar loads of x at the row's columns.
 *           Three or more tokens: x transposed to [in][TB] once per item, then each A element (or entry)
 *           is one broadcast and one TB-wide FMA: A is read once per block, and each row's TB results
 *           are one vector store. With AMX (bf16 x, A, B and out; blocks of AMX_MIN_NT+ tokens): the
 *           slice's rows expanded to dense bf16 and multiplied with the block as 16 x 16 tiles (below).
 *   top-k   the place of each rank is the number of scores that beat it: per token, two vector compares
 *           per 16 scores (AVX-512); in blocks of TOPK_BLOCK_MIN_NT+ tokens (and on the AMX path), across the
 *           block's 16 tokens at once, r*r compares of 16 lanes (a fifth of a prefill block's time before).
 *   expand  per token, the k selected rows of B^T (contiguous rows of `b`) accumulated 16 columns at a
 *           time in registers, in selection order (k streams in flight), added to out and rounded once.
 *           bf16 B into bf16 out: each 32-column load is split into its even and odd columns by a shift
 *           and an and (no shuffles), accumulated apart and recombined at the rounding. Blocks of 4+
 *           tokens with bf16 B and fp32 out first widen the slice's B rows to fp32 once.
 *
 * Exported (the library's whole ABI; flylora_runtime/kernels/native.py declares the same and refuses a
 * library whose flylora_cpu_abi() reports anything else):
 *   flylora_cpu_apply_slots  one layer call: the slot buffers as one SlotArgs struct, then the per-call
 *                            tensors (section 11)
 *   flylora_cpu_pack_rows    one slice's A into the packed compact layout with its bitmasks (section 12)
 *   flylora_cpu_abi          the constants the caller must agree with: ABI version, MAX_R, sizeof(SlotArgs),
 *                            the dtype codes (section 13)
 *   flylora_cpu_copy_pieces  a slot image into a slot: its copies, described by a table, in one call (section 14)
 *   flylora_cpu_count_many   flylora_cpu_pack_rows' count pass for many slices, one call (section 15)
 *   flylora_cpu_pack_many    its fill pass for many slices into one slot of their slot sets (section 15)
 * Bump FLYLORA_CPU_ABI_VERSION whenever an exported signature, SlotArgs, a dtype code or a return code
 * changes.
 *
 * Map (sections in file order):
 *    1. Constants, vector types, dtype codes, ABI version
 *    2. Scalar conversions and whole-row helpers (bf16/fp16 <-> fp32, load_row, axpy_row, add_row)
 *    3. Layer: the description of one call's A that the shrinks read
 *    4. 16-lane vector helpers (loads, the rounding add into out, bf16 even/odd columns)
 *    5. Expand: the k selected rows of B^T into out (expand_add)
 *    6. Shrink, compact A: entry access and the scalar compact dot product
 *    7. Shrink, packed A with bitmasks on AVX-512 (fp32, and bf16 with vdpbf16ps)
 *    8. Shrink: one slice of one block of tokens, choosing among the above (shrink)
 *    9. Top-k of one token's scores (topk), and of a block's tokens at once (block_places)
 *   10. AMX: the block shrink and block top-k of bf16 engines (built only with AMX-BF16)
 *   11. The layer call: grouping by slot, work items, the parallel loop; SlotArgs and its entry point
 *   12. Packing one slice's A (flylora_cpu_pack_rows)
 *   13. ABI report (flylora_cpu_abi)
 *   14. Writing a slot image (flylora_cpu_copy_pieces)
 *   15. One adapter's A, every layer and slice in one call (flylora_cpu_count_many, flylora_cpu_pack_many)
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* ======== 1. Constants, vector types, dtype codes, ABI version ======== */

#define TB 16   /* tokens per block: one 16-float vector in the transposed shrink */
#define MAX_R 64   /* largest rank a slot may hold (reported by flylora_cpu_abi) */
#define SMALL_NT 2  /* blocks of at most this many tokens use the per-token shrink */
#define PREFETCH 256 /* elements ahead in the compact streams */
#define TOPK_BLOCK_MIN_NT 8 /* blocks of at least this many tokens pick every token's top-k at once (block_places) */
#define BCONV_MIN_NT 4 /* blocks of at least this many tokens widen bf16 B rows once for fp32 out (bf16 out: the
                        * even/odd expand reads bf16 B faster, measured 0.93x) */

typedef float v16 __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

enum { F32 = 0, BF16 = 1, F16 = 2 }; /* dtype codes of every *_dt argument (reported by flylora_cpu_abi) */

#define FLYLORA_CPU_ABI_VERSION 3 /* 2: flylora_cpu_copy_pieces; 3: flylora_cpu_count_many, flylora_cpu_pack_many.
                                     * Bump on any change listed at the top */

/* ======== 2. Scalar conversions and whole-row helpers ======== */

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

/* ======== 3. Layer: one call's A as the shrinks read it ======== */

typedef struct {
    int64_t in, n, R, S, P;  /* P: entries per compact row (0: A dense) */
    const int64_t *out_off;  /* [n + 1] column offsets of the slices in `out` */
    const void *a_val;       /* dense [S, n*R, in] or compact [S, n*R, P] values, dtype a_dt */
    int a_dt;
    const void *a_idx;       /* compact column indices [S, n*R, P] (idx_bytes 2: uint16, 4: int32) */
    int idx_bytes;
    const int32_t *a_nnz;    /* compact: [S, n] entries used per row (NULL: all P) */
    int packed;              /* packed compact: slice (s, i)'s row j starts at ((s*n + i)*R)*P + j*nnz[s, i] */
    const uint16_t *a_mask;  /* packed only, or NULL: [S, n*R, ceil(in/16)] column bitmasks */
} Layer;

/* ======== 4. 16-lane vector helpers ======== */

/* 16 elements of b (bf16 or fp32) from b[offset], as fp32. */
static inline v16 load16_b(const void *b, int64_t offset, int dt) {
    if (dt == BF16) {
        v16h h;
        memcpy(&h, (const uint16_t *)b + offset, sizeof h);
        const v16u u = __builtin_convertvector(h, v16u) << 16;
        v16 f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    return load16((const float *)b + offset);
}

/* out[0:16] (bf16 or fp32) = round(float(out[0:16]) + acc): f32_to_bf16 on 16 lanes. */
static inline void add16(void *out, int64_t offset, v16 acc, int dt) {
    if (dt == F32) {
        float *o = (float *)out + offset;
        const v16 sum = load16(o) + acc;
        memcpy(o, &sum, sizeof sum);
        return;
    }
    uint16_t *o = (uint16_t *)out + offset;
    const v16 sum = load16_b(o, 0, BF16) + acc;
    v16u u;
    memcpy(&u, &sum, sizeof u);
    const v16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const v16u nan = (v16u)((u & 0x7fffffffu) > 0x7f800000u); /* all ones where NaN: quiet it as the scalar path */
    const v16u bits = (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
    const v16h h = __builtin_convertvector(bits, v16h);
    memcpy(o, &h, sizeof h);
}

/* 16 bits of each 32-bit lane of u as the bf16 -> fp32 widening of the lane's even (low) or odd (high) element:
 * 32 bf16 columns in one load become two fp32 vectors with one shift and one and, no shuffles. */
static inline v16 bf16_even(v16u u) {
    const v16u e = u << 16;
    v16 f;
    memcpy(&f, &e, sizeof f);
    return f;
}

static inline v16 bf16_odd(v16u u) {
    const v16u o = u & 0xffff0000u;
    v16 f;
    memcpy(&f, &o, sizeof f);
    return f;
}

static inline v16u load32_bf16(const uint16_t *p) {
    v16u u;
    memcpy(&u, p, sizeof u);
    return u;
}

/* f32_to_bf16 on 16 lanes, the bits in the low half of each lane. */
static inline v16u round_bf16(v16 sum) {
    v16u u;
    memcpy(&u, &sum, sizeof u);
    const v16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const v16u nan = (v16u)((u & 0x7fffffffu) > 0x7f800000u); /* all ones where NaN: quiet it as the scalar path */
    return (rounded & ~nan) | (((u >> 16) | 0x40u) & nan & 0xffffu);
}

/* bf16 out[0:32] = round(float(out[0:32]) + acc), acc as even columns (ae) and odd columns (ao). */
static inline void add32_bf16(uint16_t *o, v16 ae, v16 ao) {
    const v16u u = load32_bf16(o);
    const v16u bits = round_bf16(bf16_even(u) + ae) | (round_bf16(bf16_odd(u) + ao) << 16);
    memcpy(o, &bits, sizeof bits);
}

/* ======== 5. Expand: the k selected rows of B^T into out ======== */

/* out[o_off : o_off + oi] = round(float(out[...]) + sum_q w[q] * b[bbase + sel[q]*oi : ...]), the sum in
 * q order from zero (bit for bit what acc[] += w*b; out += acc computes). acc: scratch of oi floats, for
 * the fp16 fallback only. */
static void expand_add(void *out, int64_t o_off, int out_dt, const void *b, int b_dt, int64_t bbase, int64_t oi,
                       const int *sel, const float *w, int64_t k, float *acc) {
    if (b_dt == F16 || out_dt == F16) {
        memset(acc, 0, sizeof(float) * (size_t)oi);
        for (int64_t q = 0; q < k; q++) axpy_row(acc, w[q], b, bbase + (int64_t)sel[q] * oi, oi, b_dt);
        add_row(out, o_off, acc, oi, out_dt);
        return;
    }
    const float *rf[MAX_R];
    const uint16_t *rh[MAX_R];
    for (int64_t q = 0; q < k; q++) {
        const int64_t row = bbase + (int64_t)sel[q] * oi;
        rf[q] = (const float *)b + row, rh[q] = (const uint16_t *)b + row;
    }
    int64_t c = 0;
    /* 64 columns per step: the per-rank work (row pointer, weight broadcast) is shared by four vectors */
    if (b_dt == F32) {
        for (; c + 64 <= oi; c += 64) {
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t q = 0; q < k; q++) {
                const float wq = w[q], *p = rf[q] + c;
                a0 += wq * load16(p), a1 += wq * load16(p + 16), a2 += wq * load16(p + 32), a3 += wq * load16(p + 48);
            }
            add16(out, o_off + c, a0, out_dt), add16(out, o_off + c + 16, a1, out_dt);
            add16(out, o_off + c + 32, a2, out_dt), add16(out, o_off + c + 48, a3, out_dt);
        }
    } else if (out_dt == BF16) { /* even and odd columns in separate registers: see bf16_even */
        for (; c + 64 <= oi; c += 64) {
            v16 e0 = {0}, o0 = {0}, e1 = {0}, o1 = {0};
            for (int64_t q = 0; q < k; q++) {
                const float wq = w[q];
                const v16u u0 = load32_bf16(rh[q] + c), u1 = load32_bf16(rh[q] + c + 32);
                e0 += wq * bf16_even(u0), o0 += wq * bf16_odd(u0);
                e1 += wq * bf16_even(u1), o1 += wq * bf16_odd(u1);
            }
            uint16_t *o = (uint16_t *)out + o_off + c;
            add32_bf16(o, e0, o0), add32_bf16(o + 32, e1, o1);
        }
    } else {
        for (; c + 64 <= oi; c += 64) {
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t q = 0; q < k; q++) {
                const float wq = w[q];
                const uint16_t *p = rh[q] + c;
                a0 += wq * load16_b(p, 0, BF16), a1 += wq * load16_b(p, 16, BF16);
                a2 += wq * load16_b(p, 32, BF16), a3 += wq * load16_b(p, 48, BF16);
            }
            add16(out, o_off + c, a0, out_dt), add16(out, o_off + c + 16, a1, out_dt);
            add16(out, o_off + c + 32, a2, out_dt), add16(out, o_off + c + 48, a3, out_dt);
        }
    }
    for (; c + 16 <= oi; c += 16) {
        v16 a = {0};
        for (int64_t q = 0; q < k; q++) a += w[q] * (b_dt == F32 ? load16(rf[q] + c) : load16_b(rh[q], c, BF16));
        add16(out, o_off + c, a, out_dt);
    }
    for (; c < oi; c++) {
        float a = 0.0f;
        for (int64_t q = 0; q < k; q++) a += w[q] * (b_dt == F32 ? rf[q][c] : bf16_to_f32(rh[q][c]));
        add_row(out, o_off + c, &a, 1, out_dt);
    }
}

/* ======== 6. Shrink, compact A: entry access and the scalar dot product ======== */

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

/* ======== 7. Shrink, packed A with bitmasks (AVX-512) ======== */

#ifdef __AVX512F__
/* The next popcount(k) values at *p (fp32, or bf16 when bf16), expanded into the set lanes of k, as fp32. */
static inline __m512 expand_values(__mmask16 k, const void *p, int bf16) {
#ifdef __AVX512VBMI2__
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_expandloadu_epi16(k, p)), 16));
#else
    (void)bf16;
#endif
    return _mm512_maskz_expandloadu_ps(k, p);
}

/* The four rows' lane sums: y0[q] (token 0), and y1[q] when nt == 2 (token 1). */
static inline void sums4(__m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 b0, __m512 b1, __m512 b2, __m512 b3,
                         int nt, float *y0, float *y1) {
    y0[0] = _mm512_reduce_add_ps(a0), y0[1] = _mm512_reduce_add_ps(a1);
    y0[2] = _mm512_reduce_add_ps(a2), y0[3] = _mm512_reduce_add_ps(a3);
    if (nt == 2) {
        y1[0] = _mm512_reduce_add_ps(b0), y1[1] = _mm512_reduce_add_ps(b1);
        y1[2] = _mm512_reduce_add_ps(b2), y1[3] = _mm512_reduce_add_ps(b3);
    }
}

/* Four packed rows (values from v[q], column words m[q]) dotted with one token x0, or two (x1 when nt == 2):
 * y0[q], y1[q]. Per 16 columns: each row's next popcount(word) values expanded into the word's set lanes
 * (zeros elsewhere) and one FMA with the dense x columns. */
static void dot_mask4(const void *const v[4], const uint16_t *const m[4], int64_t in, const float *x0,
                      const float *x1, int nt, float *y0, float *y1, int bf16) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const char *p0 = v[0], *p1 = v[1], *p2 = v[2], *p3 = v[3];
    const int esz = bf16 ? 2 : 4;
    const int64_t words = (in + 15) / 16;
    for (int64_t w = 0; w < words; w++) {
        const int64_t c = 16 * w;
        const __mmask16 lanes = in - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (in - c)) - 1u);
        if ((w & 3) == 0) { /* keep the four value streams' next lines in flight */
            _mm_prefetch(p0 + 4 * PREFETCH, _MM_HINT_T0);
            _mm_prefetch(p1 + 4 * PREFETCH, _MM_HINT_T0);
            _mm_prefetch(p2 + 4 * PREFETCH, _MM_HINT_T0);
            _mm_prefetch(p3 + 4 * PREFETCH, _MM_HINT_T0);
        }
        const __mmask16 k0 = m[0][w], k1 = m[1][w], k2 = m[2][w], k3 = m[3][w];
        const __m512 e0 = expand_values(k0, p0, bf16), e1 = expand_values(k1, p1, bf16);
        const __m512 e2 = expand_values(k2, p2, bf16), e3 = expand_values(k3, p3, bf16);
        p0 += esz * __builtin_popcount(k0), p1 += esz * __builtin_popcount(k1);
        p2 += esz * __builtin_popcount(k2), p3 += esz * __builtin_popcount(k3);
        const __m512 xa = _mm512_maskz_loadu_ps(lanes, x0 + c);
        a0 = _mm512_fmadd_ps(e0, xa, a0), a1 = _mm512_fmadd_ps(e1, xa, a1);
        a2 = _mm512_fmadd_ps(e2, xa, a2), a3 = _mm512_fmadd_ps(e3, xa, a3);
        if (nt == 2) {
            const __m512 xb = _mm512_maskz_loadu_ps(lanes, x1 + c);
            b0 = _mm512_fmadd_ps(e0, xb, b0), b1 = _mm512_fmadd_ps(e1, xb, b1);
            b2 = _mm512_fmadd_ps(e2, xb, b2), b3 = _mm512_fmadd_ps(e3, xb, b3);
        }
    }
    sums4(a0, a1, a2, a3, b0, b1, b2, b3, nt, y0, y1);
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
/* dot_mask4 for bf16 A values and bf16 tokens (what a bf16 engine runs): 32 columns per step, each row's
 * next popcount(word pair) values expanded into their lanes as bf16 and multiplied with the token's bf16
 * columns by vdpbf16ps (the products of two bf16 numbers are exact in fp32; lane l accumulates columns 2l
 * and 2l+1 in fp32, flushing subnormals). One instruction per 32 columns and row, nothing widened. */
static inline __attribute__((always_inline)) void
dot_mask4_bf16_nt(const void *const v[4], const uint16_t *const m[4], int64_t in, const uint16_t *x0,
                  const uint16_t *x1, const int nt, float *y0, float *y1) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const char *p0 = v[0], *p1 = v[1], *p2 = v[2], *p3 = v[3];
    const uint16_t *m0 = m[0], *m1 = m[1], *m2 = m[2], *m3 = m[3];
    const int64_t full = in / 32, words = (in + 15) / 16;
    for (int64_t g = 0; g < full; g++) {
        /* masks straight from memory into mask registers (kmovd from a GPR would take port 5, which the
         * expands saturate); the counts come back through port 0 */
        const __mmask32 k0 = _load_mask32((__mmask32 *)(m0 + 2 * g));
        const __mmask32 k1 = _load_mask32((__mmask32 *)(m1 + 2 * g));
        const __mmask32 k2 = _load_mask32((__mmask32 *)(m2 + 2 * g));
        const __mmask32 k3 = _load_mask32((__mmask32 *)(m3 + 2 * g));
        if ((g & 3) == 0) _mm_prefetch(p3 + 2 * PREFETCH, _MM_HINT_T0); /* the four rows are one stream */
        const __m512bh e0 = (__m512bh)_mm512_maskz_expandloadu_epi16(k0, p0);
        const __m512bh e1 = (__m512bh)_mm512_maskz_expandloadu_epi16(k1, p1);
        const __m512bh e2 = (__m512bh)_mm512_maskz_expandloadu_epi16(k2, p2);
        const __m512bh e3 = (__m512bh)_mm512_maskz_expandloadu_epi16(k3, p3);
        p0 += 2 * __builtin_popcount(_cvtmask32_u32(k0)), p1 += 2 * __builtin_popcount(_cvtmask32_u32(k1));
        p2 += 2 * __builtin_popcount(_cvtmask32_u32(k2)), p3 += 2 * __builtin_popcount(_cvtmask32_u32(k3));
        const __m512bh xa = (__m512bh)_mm512_loadu_si512(x0 + 32 * g);
        a0 = _mm512_dpbf16_ps(a0, e0, xa), a1 = _mm512_dpbf16_ps(a1, e1, xa);
        a2 = _mm512_dpbf16_ps(a2, e2, xa), a3 = _mm512_dpbf16_ps(a3, e3, xa);
        if (nt == 2) {
            const __m512bh xb = (__m512bh)_mm512_loadu_si512(x1 + 32 * g);
            b0 = _mm512_dpbf16_ps(b0, e0, xb), b1 = _mm512_dpbf16_ps(b1, e1, xb);
            b2 = _mm512_dpbf16_ps(b2, e2, xb), b3 = _mm512_dpbf16_ps(b3, e3, xb);
        }
    }
    if (32 * full < in) { /* the last, partial 32 columns */
        const int64_t c = 32 * full, w = 2 * full;
        const __mmask32 lanes = (__mmask32)((1ull << (in - c)) - 1ull);
        const int hi = w + 1 < words;
        const __mmask32 k0 = m0[w] | (hi ? (uint32_t)m0[w + 1] << 16 : 0u);
        const __mmask32 k1 = m1[w] | (hi ? (uint32_t)m1[w + 1] << 16 : 0u);
        const __mmask32 k2 = m2[w] | (hi ? (uint32_t)m2[w + 1] << 16 : 0u);
        const __mmask32 k3 = m3[w] | (hi ? (uint32_t)m3[w + 1] << 16 : 0u);
        const __m512bh e0 = (__m512bh)_mm512_maskz_expandloadu_epi16(k0, p0);
        const __m512bh e1 = (__m512bh)_mm512_maskz_expandloadu_epi16(k1, p1);
        const __m512bh e2 = (__m512bh)_mm512_maskz_expandloadu_epi16(k2, p2);
        const __m512bh e3 = (__m512bh)_mm512_maskz_expandloadu_epi16(k3, p3);
        const __m512bh xa = (__m512bh)_mm512_maskz_loadu_epi16(lanes, x0 + c);
        a0 = _mm512_dpbf16_ps(a0, e0, xa), a1 = _mm512_dpbf16_ps(a1, e1, xa);
        a2 = _mm512_dpbf16_ps(a2, e2, xa), a3 = _mm512_dpbf16_ps(a3, e3, xa);
        if (nt == 2) {
            const __m512bh xb = (__m512bh)_mm512_maskz_loadu_epi16(lanes, x1 + c);
            b0 = _mm512_dpbf16_ps(b0, e0, xb), b1 = _mm512_dpbf16_ps(b1, e1, xb);
            b2 = _mm512_dpbf16_ps(b2, e2, xb), b3 = _mm512_dpbf16_ps(b3, e3, xb);
        }
    }
    sums4(a0, a1, a2, a3, b0, b1, b2, b3, nt, y0, y1);
}

static void dot_mask4_bf16(const void *const v[4], const uint16_t *const m[4], int64_t in, const uint16_t *x0,
                           const uint16_t *x1, int nt, float *y0, float *y1) {
    if (nt == 2)
        dot_mask4_bf16_nt(v, m, in, x0, x1, 2, y0, y1);
    else
        dot_mask4_bf16_nt(v, m, in, x0, x1, 1, y0, y1);
}
#endif

/* ======== 8. Shrink: one slice of one block of tokens ======== */

/* yT[j][t] (j < r, t < nt) for the nt tokens xs[t] (fp32 rows), rows row0.. of A. xT: the block transposed
 * to [in][TB] by the caller when nt > SMALL_NT; conv: scratch of `in` floats (a converted A row). */
static void shrink(const Layer *L, int64_t s, int64_t i, int64_t r, int nt, float *const *xs,
                   const uint16_t *const *xb, const float *xT, float *conv, float yT[][TB]) {
    const int64_t in = L->in, row0 = (s * L->n + i) * L->R;
    (void)xb; /* read only by the AVX512-BF16 decode shrink */
    if (L->P == 0) { /* ---------------- dense A ---------------- */
        if (nt <= SMALL_NT || L->a_dt != F32) {
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
                        yT[j][t] = s0, yT[j + 1][t] = s1, yT[j + 2][t] = s2, yT[j + 3][t] = s3;
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
                    yT[j][t] = acc;
                }
            }
            return;
        }
        const v16 *xv = (const v16 *)xT;
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
            memcpy(yT[j], &c0, sizeof c0);
        }
        return;
    }
    /* ---------------- compact A ---------------- */
    const int64_t P = L->P;
    const int64_t m = L->a_nnz ? L->a_nnz[s * L->n + i] : P;
    if (nt <= SMALL_NT) {
#ifdef __AVX512F__
#ifdef __AVX512VBMI2__
        const int mask_ok = L->a_dt == F32 || L->a_dt == BF16;
#else
        const int mask_ok = L->a_dt == F32;
#endif
        if (L->a_mask != NULL && mask_ok) {
            const int64_t words = (in + 15) / 16;
            const int esz = L->a_dt == F32 ? 4 : 2;
            for (int64_t j = 0; j < r; j += 4) {
                const void *v[4];
                const uint16_t *mk[4];
                for (int q = 0; q < 4; q++) { /* past the last row: repeat it, results dropped */
                    const int64_t jj = j + q < r ? j + q : r - 1;
                    v[q] = (const char *)L->a_val + esz * row_start(L, s, i, jj, m);
                    mk[q] = L->a_mask + (row0 + jj) * words;
                }
                float y0[4], y1[4];
#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__)
                if (xb != NULL && L->a_dt == BF16)
                    dot_mask4_bf16(v, mk, in, xb[0], nt == 2 ? xb[1] : xb[0], nt, y0, y1);
                else
#endif
                    dot_mask4(v, mk, in, xs[0], nt == 2 ? xs[1] : xs[0], nt, y0, y1, L->a_dt == BF16);
                for (int q = 0; q < 4 && j + q < r; q++) {
                    yT[j + q][0] = y0[q];
                    if (nt == 2) yT[j + q][1] = y1[q];
                }
            }
            return;
        }
#endif
        for (int64_t j = 0; j < r; j++)
            for (int t = 0; t < nt; t++) yT[j][t] = dot_compact(L, row_start(L, s, i, j, m), m, xs[t]);
        return;
    }
    const v16 *xv = (const v16 *)xT;
    for (int64_t j = 0; j < r; j++) {
        const int64_t e0 = row_start(L, s, i, j, m);
        const float *v = (const float *)L->a_val + e0;
        if (L->a_dt != F32) { /* the row's values widened once (vectorised), then broadcast from memory */
            load_row(conv, L->a_val, e0, m, L->a_dt);
            v = conv;
        }
        v16 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}; /* four FMA chains */
        int64_t p = 0;
        for (; p + 4 <= m; p += 4) {
            c0 += v[p] * xv[col(L, e0 + p)];
            c1 += v[p + 1] * xv[col(L, e0 + p + 1)];
            c2 += v[p + 2] * xv[col(L, e0 + p + 2)];
            c3 += v[p + 3] * xv[col(L, e0 + p + 3)];
        }
        for (; p < m; p++) c0 += v[p] * xv[col(L, e0 + p)];
        c0 = (c0 + c1) + (c2 + c3);
        memcpy(yT[j], &c0, sizeof c0);
    }
}

/* The block's fp32 rows xs[t] (t < nt <= TB) transposed to xv[p][t] = xs[t][p], zeros for t >= nt: what the
 * transposed shrink reads. On AVX-512, 16 columns at a time by the usual 16x16 register transpose (unpack
 * pairs of rows, then pairs of pairs, then two 128-bit lane shuffles): a scalar copy with a compare per element
 * was ~12% of a prefill block's time on a machine without AMX. */
static void transpose_block(v16 *restrict xv, float *const *xs, int nt, int64_t in) {
    int64_t p = 0;
#ifdef __AVX512F__
    for (; p + 16 <= in; p += 16) {
        __m512 row[16], a[16], b[16];
        for (int t = 0; t < 16; t++) row[t] = t < nt ? _mm512_loadu_ps(xs[t] + p) : _mm512_setzero_ps();
        for (int i = 0; i < 8; i++) { /* per 128-bit lane l: rows 2i, 2i+1 at columns 4l..4l+1 / 4l+2..4l+3 */
            a[2 * i] = _mm512_unpacklo_ps(row[2 * i], row[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_ps(row[2 * i], row[2 * i + 1]);
        }
        for (int i = 0; i < 4; i++) { /* b[4i+e], lane l: rows 4i..4i+3 at column 4l+e */
            b[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[4 * i]), _mm512_castps_pd(a[4 * i + 2])));
            b[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[4 * i]), _mm512_castps_pd(a[4 * i + 2])));
            b[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[4 * i + 1]), _mm512_castps_pd(a[4 * i + 3])));
            b[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[4 * i + 1]), _mm512_castps_pd(a[4 * i + 3])));
        }
        for (int e = 0; e < 4; e++) { /* column 4l+e: lane l of b[e], b[4+e], b[8+e], b[12+e] */
            const __m512 lo02 = _mm512_shuffle_f32x4(b[e], b[4 + e], 0x88), lo13 = _mm512_shuffle_f32x4(b[e], b[4 + e], 0xdd);
            const __m512 hi02 = _mm512_shuffle_f32x4(b[8 + e], b[12 + e], 0x88);
            const __m512 hi13 = _mm512_shuffle_f32x4(b[8 + e], b[12 + e], 0xdd);
            _mm512_store_ps((float *)&xv[p + e], _mm512_shuffle_f32x4(lo02, hi02, 0x88));
            _mm512_store_ps((float *)&xv[p + 4 + e], _mm512_shuffle_f32x4(lo13, hi13, 0x88));
            _mm512_store_ps((float *)&xv[p + 8 + e], _mm512_shuffle_f32x4(lo02, hi02, 0xdd));
            _mm512_store_ps((float *)&xv[p + 12 + e], _mm512_shuffle_f32x4(lo13, hi13, 0xdd));
        }
    }
#endif
    for (; p < in; p++)
        for (int t = 0; t < TB; t++) xv[p][t] = t < nt ? xs[t][p] : 0.0f;
}

/* ======== 9. Top-k of one token's scores ======== */

/* score[0..r)'s ranks in order into sel[0..r): the k largest are sel[0..k) for any k (ties: the lower index first;
 * NaN counts as +inf). The places are a permutation of 0..r-1, so all r are written, with no branch on a
 * place < k that the data would make unpredictable (bench.step's prefill96 1.09x faster than with it). */
static void topk(float *score, int64_t r, int *sel) {
    for (int64_t j = 0; j < r; j++)
        if (isnan(score[j])) score[j] = INFINITY;
#ifdef __AVX512F__
    /* The place of j is the number of scores that beat it (greater, or equal at a lower index): two vector
     * compares per 16 scores, independent across j. */
    const int nv = (int)((r + 15) / 16);
    const uint64_t valid = r == 64 ? ~0ull : (1ull << r) - 1ull;
    __m512 v[MAX_R / 16];
    for (int c = 0; c < nv; c++) v[c] = _mm512_maskz_loadu_ps((__mmask16)(valid >> (16 * c)), score + 16 * c);
    for (int64_t j = 0; j < r; j++) {
        const __m512 sj = _mm512_set1_ps(score[j]);
        const uint64_t below = valid & ((1ull << j) - 1ull);
        int place = 0;
        for (int c = 0; c < nv; c++) {
            const __mmask16 gt = _mm512_mask_cmp_ps_mask((__mmask16)(valid >> (16 * c)), v[c], sj, _CMP_GT_OQ);
            const __mmask16 eq = _mm512_mask_cmp_ps_mask((__mmask16)(below >> (16 * c)), v[c], sj, _CMP_EQ_OQ);
            place += __builtin_popcount((unsigned)(gt | eq));
        }
        sel[place] = (int)j;
    }
#else
    /* the place of j is the number of scores that beat it: r*r compares (<= 4096), no branches */
    for (int64_t j = 0; j < r; j++) {
        const float sj = score[j];
        int place = 0;
        for (int64_t i = 0; i < r; i++) place += (score[i] > sj) | ((score[i] == sj) & (i < j));
        sel[place] = (int)j;
    }
#endif
}

typedef int32_t v16i __attribute__((vector_size(64)));

/* The place of every rank j < r for each of a block's 16 tokens at once (yT[j][t] + ds[j], |...| when mag; the
 * rules of topk: NaN counts as +inf, ties go to the lower rank): place[j][t] is the number of ranks that beat j
 * for token t, so j is selected when place[j][t] < k. r*r vector compares for 16 tokens instead of topk's 2r
 * compares and a popcount per rank and token. Lanes t >= the block's tokens hold whatever yT holds. */
static void block_places(float yT[][TB], const float *ds, int mag, int64_t r, v16i *place) {
    v16 sc[MAX_R];
    const v16 inf = {INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY,
                     INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY, INFINITY};
    for (int64_t j = 0; j < r; j++) {
        v16 v = load16(yT[j]) + ds[j];
        if (mag) {
            v16u u;
            memcpy(&u, &v, sizeof u);
            u &= 0x7fffffffu;
            memcpy(&v, &u, sizeof v);
        }
        const v16i nan = (v16i)(v != v), vi = (v16i)v, ii = (v16i)inf; /* NaN counts as +inf */
        sc[j] = (v16)((vi & ~nan) | (ii & nan));
    }
    for (int64_t j = 0; j < r; j++) { /* beats j: greater, or equal at a lower rank (compares are -1/0) */
        v16i p = {0};
        for (int64_t q = 0; q < j; q++) p -= (v16i)(sc[q] >= sc[j]);
        for (int64_t q = j + 1; q < r; q++) p -= (v16i)(sc[q] > sc[j]);
        place[j] = p;
    }
}

/* topk for each token t < nt of a block: sel[t][0..r) exactly what topk gives for its scores (the same ranks in
 * the same order, so the expand sums in the same order). */
static void topk_block_order(float yT[][TB], const float *ds, int mag, int64_t r, int nt, int sel[][MAX_R]) {
    v16i place[MAX_R];
    block_places(yT, ds, mag, r, place);
    for (int64_t j = 0; j < r; j++) /* all r places, as topk writes them */
        for (int t = 0; t < nt; t++) sel[t][place[j][t]] = (int)j;
}

#ifdef HAVE_AMX
/* sel[j]: bit t set when rank j is among token t's k largest scores (the rules of topk), t < nt; tok[t]: the
 * same as bit j of token t's mask. */
static void topk_block(float yT[][TB], const float *ds, int mag, int64_t r, int64_t k, int nt, uint16_t *sel,
                       uint64_t *tok) {
    v16i place[MAX_R];
    block_places(yT, ds, mag, r, place);
    const uint16_t live = (uint16_t)((1u << nt) - 1u);
    for (int64_t j = 0; j < r; j++) {
        uint16_t bits = 0;
        for (int t = 0; t < 16; t++) bits |= (uint16_t)((place[j][t] < k) << t);
        sel[j] = bits & live;
    }
    for (int t = 0; t < nt; t++) {
        uint64_t m = 0;
        for (int64_t j = 0; j < r; j++) m |= (uint64_t)(sel[j] >> t & 1) << j;
        tok[t] = m;
    }
}
#endif

/* ======== 10. AMX: block shrink and block top-k of bf16 engines ======== */

#ifdef HAVE_AMX
/* Blocks of tokens in bf16 engines.
 * Shrink: Y^T[ranks][tokens] = A[ranks][in] . X^T, 16 ranks x 16 tokens per tile, 32 columns per step. A's
 * packed rows are expanded to dense bf16 once per slice and block; X^T is the block's x in VNNI pairs
 * ([in/2][16 tokens] of 2 bf16), built once per block. The products of two bf16 numbers are exact; the
 * tile sums them in fp32 (subnormals flushed). The top-k then runs across the block's tokens at once, and
 * the expand is the FMA one (a dense tile expand over all r ranks does 4x the work at k = r/4 and, with y
 * split into two bf16 terms for accuracy, measured no faster). */
enum { AMX_MIN_NT = 4 }; /* blocks of at least this many tokens take the AMX path */

static int amx_state = 0; /* 0: not asked yet, 1: the kernel granted the tile data, -1: refused */

static int amx_available(void) {
    int st = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (st == 0) { /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: process-wide, idempotent */
        st = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
        __atomic_store_n(&amx_state, st, __ATOMIC_RELEASE);
    }
    return st == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) TileCfg;

static void amx_configure(void) { /* every tile used: 16 rows of 64 bytes */
    TileCfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16;
    _tile_loadconfig(&c);
}

/* The block's x (nt bf16 rows) as VNNI pairs: xv[p*16 + t] = (x[t][2p], x[t][2p+1]); zero past nt and in.
 * Per 32 columns: the 16 rows' 16 pairs (32-bit elements) transposed in registers. */
static void amx_pack_x(uint32_t *restrict xv, const uint16_t *const *xrow, int nt, int64_t in, int64_t in_p) {
    for (int64_t c = 0; c < in_p; c += 32) {
        const __mmask32 lanes = in - c >= 32 ? 0xffffffffu : (__mmask32)((1ull << (in - c)) - 1ull);
        __m512i v[16], u[16];
        for (int t = 0; t < 16; t++) v[t] = t < nt ? _mm512_maskz_loadu_epi16(lanes, xrow[t] + c) : _mm512_setzero_si512();
        for (int t = 0; t < 16; t += 2) { /* 16 x 16 transpose of 32-bit elements, four shuffle stages */
            u[t] = _mm512_unpacklo_epi32(v[t], v[t + 1]);
            u[t + 1] = _mm512_unpackhi_epi32(v[t], v[t + 1]);
        }
        for (int t = 0; t < 16; t += 4) {
            v[t] = _mm512_unpacklo_epi64(u[t], u[t + 2]);
            v[t + 1] = _mm512_unpackhi_epi64(u[t], u[t + 2]);
            v[t + 2] = _mm512_unpacklo_epi64(u[t + 1], u[t + 3]);
            v[t + 3] = _mm512_unpackhi_epi64(u[t + 1], u[t + 3]);
        }
        /* v[4g + m], 128-bit lane L: tokens 4g..4g+3 at pair 4L + m. Pair 4L + m is lane L of v[m], v[4 + m],
         * v[8 + m], v[12 + m]. */
        uint32_t *dst = xv + (c / 2) * 16;
        for (int m = 0; m < 4; m++) {
            const __m512i x0 = _mm512_shuffle_i32x4(v[m], v[4 + m], 0x44), y0 = _mm512_shuffle_i32x4(v[m], v[4 + m], 0xee);
            const __m512i x1 = _mm512_shuffle_i32x4(v[8 + m], v[12 + m], 0x44);
            const __m512i y1 = _mm512_shuffle_i32x4(v[8 + m], v[12 + m], 0xee);
            _mm512_storeu_si512(dst + 16 * m, _mm512_shuffle_i32x4(x0, x1, 0x88));
            _mm512_storeu_si512(dst + 16 * (4 + m), _mm512_shuffle_i32x4(x0, x1, 0xdd));
            _mm512_storeu_si512(dst + 16 * (8 + m), _mm512_shuffle_i32x4(y0, y1, 0x88));
            _mm512_storeu_si512(dst + 16 * (12 + m), _mm512_shuffle_i32x4(y0, y1, 0xdd));
        }
    }
}

/* yT[j][t] for j < rg*16 (zero past r), t < 16, of slot s's slice i; ad: scratch [rg*16][in_p] bf16. */
static void amx_shrink(const Layer *L, int64_t s, int64_t i, int64_t r, const uint32_t *xv, int64_t in_p,
                       uint16_t *restrict ad, float yT[][TB]) {
    const int64_t in = L->in, words = (in + 15) / 16, row0 = (s * L->n + i) * L->R;
    const int64_t m = L->a_nnz[s * L->n + i];
    const int rg = (int)((r + 15) / 16);
    for (int64_t j = 0; j < 16 * rg; j++) { /* the packed rows, dense */
        uint16_t *dst = ad + j * in_p;
        if (j >= r) {
            memset(dst, 0, 2 * (size_t)in_p);
            continue;
        }
        const char *v = (const char *)L->a_val + 2 * row_start(L, s, i, j, m);
        const uint16_t *mk = L->a_mask + (row0 + j) * words;
        for (int64_t w = 0; w < in_p / 16; w += 2) {
            uint32_t k = w < words ? mk[w] : 0;
            if (w + 1 < words) k |= (uint32_t)mk[w + 1] << 16;
            _mm512_storeu_si512(dst + 16 * w, _mm512_maskz_expandloadu_epi16(k, v));
            v += 2 * __builtin_popcount(k);
        }
    }
    const size_t as = 2 * (size_t)in_p;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < in_p; c += 32) {
        _tile_loadd(5, xv + (c / 2) * 16, 64);
        _tile_loadd(4, ad + c, as);
        _tile_dpbf16ps(0, 4, 5);
        if (rg > 1) { _tile_loadd(4, ad + 16 * in_p + c, as); _tile_dpbf16ps(1, 4, 5); }
        if (rg > 2) { _tile_loadd(4, ad + 32 * in_p + c, as); _tile_dpbf16ps(2, 4, 5); }
        if (rg > 3) { _tile_loadd(4, ad + 48 * in_p + c, as); _tile_dpbf16ps(3, 4, 5); }
    }
    _tile_stored(0, yT[0], 64);
    if (rg > 1) _tile_stored(1, yT[16], 64);
    if (rg > 2) _tile_stored(2, yT[32], 64);
    if (rg > 3) _tile_stored(3, yT[48], 64);
}

#endif

/* ======== 11. The layer call ======== */

/*
 * One layer call, every argument spelled out (static: callers use flylora_cpu_apply_slots below).
 * token_slot: [T] int32 (ts_i64 = 0) or int64 (ts_i64 = 1). Tokens are grouped by slot (a
 * counting sort), cut into items (slot, up to TB of its tokens, slices) that run in parallel.
 * Returns 0; -1 when a buffer could not be allocated (`out` may then be partly updated); -2 when
 * R > MAX_R or a packed layout comes without nnz; -3 when a slot is outside [-1, S) (nothing written).
 */
static int flylora_cpu_apply(int64_t T, int64_t in, int64_t n, int64_t R, int64_t S, int64_t P,
                             const int64_t *out_off, const void *x, int64_t x_stride, int x_dt, void *out,
                             int64_t out_stride, int out_dt, const void *a_val, int a_dt, const void *a_idx,
                             int idx_bytes, const int32_t *a_nnz, int packed, const uint16_t *a_mask, const void *b,
                             int b_dt, const float *d, const int32_t *k, const int32_t *r, const uint8_t *magnitude,
                             const void *token_slot, int ts_i64) {
    if (R > MAX_R) return -2;
    if (T <= 0) return 0;
    if (packed && (P == 0 || a_nnz == NULL)) return -2;
    const Layer L = {in, n, R, S, P, out_off, a_val, a_dt, a_idx, idx_bytes, a_nnz, packed, packed ? a_mask : NULL};
    int64_t *start = (int64_t *)calloc((size_t)S + 1, sizeof(int64_t));
    int64_t *slot_of = (int64_t *)malloc(sizeof(int64_t) * (size_t)T);
    int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)T);
    int64_t *items = NULL, n_items = 0, n_blocks = 0, max_out = 0;
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
        n_blocks += (start[s + 1] + TB - 1) / TB;
        start[s + 1] += start[s]; /* start[s]: position of slot s's first token in `order` */
    }
    if (n_blocks == 0) goto done;
    /* Fewer blocks than threads: one slice per item, so that every thread has work. */
    const int per_slice = n > 1 && n_blocks < omp_get_max_threads();
    n_items = per_slice ? n_blocks * n : n_blocks;
    if (!(items = (int64_t *)malloc(sizeof(int64_t) * 4 * (size_t)n_items))) { rc = -1; goto done; }
    for (int64_t s = 0, w = 0; s < S; s++)
        for (int64_t st = start[s]; st < start[s + 1]; st += TB)
            for (int64_t i = 0; i < (per_slice ? n : 1); i++, w++) {
                items[4 * w] = st;
                items[4 * w + 1] = start[s + 1] - st < TB ? start[s + 1] - st : TB;
                items[4 * w + 2] = per_slice ? i : 0;
                items[4 * w + 3] = per_slice ? i + 1 : n;
            }
    for (int64_t t = 0; t < T; t++)
        if (slot_of[t] >= 0) order[start[slot_of[t]]++] = t;
    for (int64_t i = 0; i < n; i++)
        if (out_off[i + 1] - out_off[i] > max_out) max_out = out_off[i + 1] - out_off[i];

    int failed = 0;
#ifdef HAVE_AMX
    const int amx = x_dt == BF16 && a_dt == BF16 && packed && a_mask != NULL && b_dt == BF16 && out_dt == BF16 &&
                    amx_available();
    const int64_t in_p = (in + 31) / 32 * 32;
#endif
#pragma omp parallel if (n_items > 1)
    {
#ifdef HAVE_AMX
        char *abuf = NULL; /* the AMX path's scratch, allocated at this thread's first AMX item */
        uint32_t *xv = NULL;
        uint16_t *ad = NULL;
#endif
        /* per thread: TB fp32 x rows, the transposed block, a converted A row, an fp16 expand row, and one
         * slice's B rows widened to fp32 */
        const size_t floats = (size_t)((2 * TB * in + in + max_out + R * max_out + 15) / 16 * 16);
        float *buf = (float *)aligned_alloc(64, sizeof(float) * floats);
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < n_items; w++) {
            if (buf == NULL) continue;
            const int64_t st = items[4 * w], nt = items[4 * w + 1], i0 = items[4 * w + 2], i1 = items[4 * w + 3];
            const int64_t s = slot_of[order[st]];
            float *xs[TB], *xT = buf + TB * in, *conv = buf + 2 * TB * in, *acc = conv + in, *bconv = acc + max_out;
            const uint16_t *xb[SMALL_NT]; /* bf16 x: the block's own rows (read as they are by the bf16 shrink) */
            for (int t = 0; t < SMALL_NT && t < nt; t++)
                xb[t] = (const uint16_t *)x + order[st + t] * x_stride;
            int loaded = 0;
#ifdef HAVE_AMX
            if (amx && nt >= AMX_MIN_NT) {
                if (abuf == NULL) {
                    const size_t xv_b = 32 * (size_t)in_p;
                    if (!(abuf = (char *)aligned_alloc(64, xv_b + 2 * (size_t)MAX_R * in_p))) {
#pragma omp atomic write
                        failed = 1;
                        continue;
                    }
                    xv = (uint32_t *)abuf, ad = (uint16_t *)(abuf + xv_b);
                    amx_configure();
                }
                const uint16_t *xrow[TB];
                int64_t orow[TB];
                for (int t = 0; t < nt; t++) {
                    xrow[t] = (const uint16_t *)x + order[st + t] * x_stride;
                    orow[t] = order[st + t] * out_stride;
                }
                for (int64_t i = i0; i < i1; i++) {
                    const int64_t ri = r[s * n + i], ki = k[s * n + i];
                    if (ki <= 0 || ri <= 0) continue;
                    if (!loaded) amx_pack_x(xv, xrow, (int)nt, in, in_p), loaded = 1;
                    float yT[MAX_R][TB];
                    uint16_t sel[MAX_R];
                    uint64_t tok[TB];
                    amx_shrink(&L, s, i, ri, xv, in_p, ad, yT);
                    topk_block(yT, d + (s * n + i) * R, magnitude[s], ri, ki, (int)nt, sel, tok);
                    const int64_t o0 = out_off[i], oi = out_off[i + 1] - out_off[i];
                    for (int t = 0; t < nt; t++) { /* the selected ranks in rank order */
                        int selt[MAX_R];
                        float wsel[MAX_R];
                        int64_t q = 0;
                        for (uint64_t m = tok[t]; m != 0; m &= m - 1) { /* no branch per rank */
                            const int j = __builtin_ctzll(m);
                            selt[q] = j, wsel[q++] = yT[j][t];
                        }
                        expand_add(out, orow[t] + o0, BF16, b, BF16, S * R * o0 + s * R * oi, oi, selt, wsel, q, acc);
                    }
                }
                continue;
            }
#endif
            for (int64_t i = i0; i < i1; i++) {
                const int64_t ri = r[s * n + i], ki = k[s * n + i];
                if (ki <= 0 || ri <= 0) continue;
                if (!loaded) { /* x of the block, as fp32 (and transposed), once for all its slices */
                    for (int t = 0; t < nt; t++) {
                        xs[t] = buf + t * in;
                        load_row(xs[t], x, order[st + t] * x_stride, in, x_dt);
                    }
                    if (nt > SMALL_NT) transpose_block((v16 *)xT, xs, (int)nt, in);
                    loaded = 1;
                }
                float yT[MAX_R][TB];
                shrink(&L, s, i, ri, (int)nt, xs, x_dt == BF16 && nt <= SMALL_NT ? xb : NULL, xT, conv, yT);
                const float *ds = d + (s * n + i) * R;
                const int64_t o0 = out_off[i], oi = out_off[i + 1] - out_off[i];
                const int64_t bbase = S * R * o0 + s * R * oi; /* row j of this slot's B^T block: bbase + j*oi */
                /* A block of 4+ tokens: B's rows of this slot and slice widened to fp32 once, then read by
                 * every token's expand (each row is used nt*k/r >= 1 times on average). */
                const void *bs = b;
                int bs_dt = b_dt;
                int64_t bs_base = bbase;
                if (nt >= BCONV_MIN_NT && b_dt == BF16 && out_dt == F32) {
                    load_row(bconv, b, bbase, ri * oi, BF16);
                    bs = bconv, bs_dt = F32, bs_base = 0;
                }
                int selb[TB][MAX_R]; /* blocks of TOPK_BLOCK_MIN_NT+ tokens: every token's selection at once */
                const int block_topk = nt >= TOPK_BLOCK_MIN_NT;
                if (block_topk) topk_block_order(yT, ds, magnitude[s], ri, (int)nt, selb);
                for (int t = 0; t < nt; t++) {
                    float wsel[MAX_R];
                    int *sel = selb[t];
                    if (!block_topk) {
                        float score[MAX_R];
                        for (int64_t j = 0; j < ri; j++)
                            score[j] = magnitude[s] ? fabsf(yT[j][t] + ds[j]) : yT[j][t] + ds[j];
                        topk(score, ri, sel);
                    }
                    for (int64_t q = 0; q < ki; q++) wsel[q] = yT[sel[q]][t];
                    expand_add(out, order[st + t] * out_stride + o0, out_dt, bs, bs_dt, bs_base, oi, sel, wsel, ki, acc);
                }
            }
        }
        free(buf);
#ifdef HAVE_AMX
        if (abuf != NULL) {
            _tile_release(); /* leave the tiles as we found them: whoever uses them next configures them */
            free(abuf);
        }
#endif
    }
    if (failed) rc = -1;
done:
    free(start);
    free(slot_of);
    free(order);
    free(items);
    return rc;
}

/* The slot buffers' part of flylora_cpu_apply's arguments, built once per slot set by the caller: the entry
 * point below takes a pointer to it and the per-call tensors only (ten arguments instead of 28: a ctypes
 * call pays for every argument, about 0.3 us each). Every field is 8 bytes; native.py's _SlotArgs mirrors it
 * and flylora_cpu_abi reports its size. Returns what flylora_cpu_apply returns. */
typedef struct {
    int64_t in, n, R, S, P;
    const int64_t *out_off;
    const void *a_val;
    int64_t a_dt;
    const void *a_idx;
    int64_t idx_bytes;
    const int32_t *a_nnz;
    int64_t packed;
    const uint16_t *a_mask;
    const void *b;
    int64_t b_dt;
    const float *d;
    const int32_t *k, *r;
    const uint8_t *magnitude;
} SlotArgs;

int flylora_cpu_apply_slots(const SlotArgs *a, int64_t T, const void *x, int64_t x_stride, int x_dt, void *out,
                            int64_t out_stride, int out_dt, const void *token_slot, int ts_i64) {
    return flylora_cpu_apply(T, a->in, a->n, a->R, a->S, a->P, a->out_off, x, x_stride, x_dt, out, out_stride,
                             out_dt, a->a_val, (int)a->a_dt, a->a_idx, (int)a->idx_bytes, a->a_nnz, (int)a->packed,
                             a->a_mask, a->b, (int)a->b_dt, a->d, a->k, a->r, a->magnitude, token_slot, ts_i64);
}

/* ======== 12. Packing one slice's A ======== */

/* The raw bits of element q of a row of 4- or 2-byte elements. */
static inline uint32_t raw_bits(const char *row, int64_t q, int size) {
    if (size == 4) {
        uint32_t u;
        memcpy(&u, row + 4 * q, 4);
        return u;
    }
    uint16_t h;
    memcpy(&h, row + 2 * q, 2);
    return h;
}

#if defined(__AVX512BW__) && defined(__AVX512VBMI2__)
/* The 16-bit rows of pack_rows without a conversion (bf16 A into bf16 values: a bf16 engine's first
 * activation), 32 columns per step: vptestmw gives the step's nonzero columns, which are its two mask words,
 * and vpcompressw packs its values and (16-bit) column indices, stored back to back. The same output as the
 * scalar loop below, bit for bit. */
static inline __mmask32 low_lanes(int64_t n) { /* the first n of 32 lanes, 0 <= n <= 32 */
    return n >= 32 ? 0xffffffffu : (__mmask32)((1u << n) - 1u);
}

static int64_t count_rows16(const uint16_t *A, int64_t r, int64_t in) {
    int64_t most = 0;
    for (int64_t j = 0; j < r; j++) {
        const uint16_t *row = A + j * in;
        int64_t c = 0;
        for (int64_t q = 0; q < in; q += 32) {
            const __m512i v = _mm512_maskz_loadu_epi16(low_lanes(in - q), row + q);
            c += __builtin_popcount((uint32_t)_mm512_test_epi16_mask(v, v));
        }
        if (c > most) most = c;
    }
    return most;
}

static int64_t pack_rows16(const uint16_t *A, int64_t r, int64_t in, int64_t p, void *idx, int idx_bytes,
                           uint16_t *val, uint16_t *mask) {
    const int64_t words = (in + 15) / 16;
    const __m512i iota = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14,
                                          13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t j = 0; j < r; j++) {
        const uint16_t *row = A + j * in;
        uint16_t *mk = mask + j * words;
        int64_t e = j * p;
        const int64_t end = e + p;
        for (int64_t q = 0; q < in; q += 32) {
            const int64_t n = in - q >= 32 ? 32 : in - q;
            const __m512i v = _mm512_maskz_loadu_epi16(low_lanes(n), row + q);
            const uint32_t nz = (uint32_t)_mm512_test_epi16_mask(v, v);
            const int64_t c = __builtin_popcount(nz);
            if (e + c > end) return -3;
            mk[q >> 4] = (uint16_t)nz; /* q is a multiple of 32: its two words are q/16 and q/16 + 1 */
            if (n > 16) mk[(q >> 4) + 1] = (uint16_t)(nz >> 16);
            /* compress in a register, then a masked store of the first c lanes: a compressing store to memory
             * is microcoded on AMD Zen 4 (measured 1.6x slower than the scalar loop) */
            const __mmask32 first = low_lanes(c);
            _mm512_mask_storeu_epi16(val + e, first, _mm512_maskz_compress_epi16((__mmask32)nz, v));
            if (idx_bytes == 2) {
                const __m512i cols = _mm512_add_epi16(iota, _mm512_set1_epi16((short)q));
                _mm512_mask_storeu_epi16((uint16_t *)idx + e, first, _mm512_maskz_compress_epi16((__mmask32)nz, cols));
            } else {
                int64_t t = e;
                for (uint32_t m = nz; m; m &= m - 1) ((int32_t *)idx)[t++] = (int32_t)(q + __builtin_ctz(m));
            }
            e += c;
        }
        if (e < end) { /* padding: column 0, value 0 */
            memset((char *)idx + e * idx_bytes, 0, (size_t)((end - e) * idx_bytes));
            memset(val + e, 0, (size_t)(end - e) * sizeof(uint16_t));
        }
    }
    return p;
}
#endif

/* One slice's A [r, in] (dtype a_dt, rows contiguous) into the packed compact layout (see the top of this
 * file): row j's entries with nonzero raw bits (so -0.0 is kept), in column order, at idx/val[j*p ...],
 * padded to p with column 0 and value 0; mask[j*words + w] bit c set for an entry at column 16w + c. Values
 * are converted to val_dt (fp32 to bf16 or fp16 rounds to nearest even, as torch does; the same dtype is
 * copied bit for bit). What prepare_slot computes with torch (compact_rows and the column words), in one pass
 * over A: a first activation of a q/v adapter took ~1 ms per layer that way, most of it in torch calls.
 * p < 0: only returns the largest row count (writes nothing). Else returns p; -2 for a conversion it does
 * not do (between bf16 and fp16), -3 when a row holds more than p entries (rows before it may be written). */
int64_t flylora_cpu_pack_rows(const void *A, int a_dt, int64_t r, int64_t in, int64_t p, void *idx, int idx_bytes,
                              void *val, int val_dt, uint16_t *mask) {
    const int a_sz = a_dt == F32 ? 4 : 2;
#if defined(__AVX512BW__) && defined(__AVX512VBMI2__)
    if (a_sz == 2 && p < 0) return count_rows16((const uint16_t *)A, r, in);
    if (a_sz == 2 && val_dt == a_dt && (idx_bytes == 2 ? in <= 32767 : idx_bytes == 4))
        return pack_rows16((const uint16_t *)A, r, in, p, idx, idx_bytes, (uint16_t *)val, mask);
#endif
    if (p < 0) {
        int64_t most = 0;
        for (int64_t j = 0; j < r; j++) {
            int64_t c = 0;
            const char *row = (const char *)A + j * in * a_sz;
            for (int64_t q = 0; q < in; q++) c += raw_bits(row, q, a_sz) != 0;
            if (c > most) most = c;
        }
        return most;
    }
    if (a_dt != val_dt && !(a_dt == F32 && (val_dt == BF16 || val_dt == F16)) && !(val_dt == F32 && a_dt != F32))
        return -2;
    const int64_t words = (in + 15) / 16;
    const int v_sz = val_dt == F32 ? 4 : 2;
    for (int64_t j = 0; j < r; j++) {
        const char *row = (const char *)A + j * in * a_sz;
        uint16_t *mk = mask + j * words;
        memset(mk, 0, sizeof(uint16_t) * (size_t)words);
        int64_t e = j * p, end = e + p;
        for (int64_t q = 0; q < in; q++) {
            const uint32_t bits = raw_bits(row, q, a_sz);
            if (bits == 0) continue;
            if (e == end) return -3;
            mk[q >> 4] |= (uint16_t)(1u << (q & 15));
            if (idx_bytes == 2) ((uint16_t *)idx)[e] = (uint16_t)q;
            else ((int32_t *)idx)[e] = (int32_t)q;
            char *v = (char *)val + e * v_sz;
            if (a_dt == val_dt) {
                if (v_sz == 4) memcpy(v, &bits, 4);
                else memcpy(v, &bits, 2); /* little endian: the low half */
            } else if (a_dt == F32) {
                float f;
                memcpy(&f, &bits, 4);
                if (val_dt == BF16) {
                    const uint16_t h = f32_to_bf16(f);
                    memcpy(v, &h, 2);
                } else {
                    const _Float16 h = (_Float16)f;
                    memcpy(v, &h, 2);
                }
            } else { /* bf16 or fp16 to fp32: exact */
                const uint16_t h = (uint16_t)bits;
                _Float16 hf;
                memcpy(&hf, &h, 2);
                const float f = a_dt == BF16 ? bf16_to_f32(h) : (float)hf;
                memcpy(v, &f, 4);
            }
            e++;
        }
        if (e < end) { /* padding: column 0, value 0 */
            memset((char *)idx + e * idx_bytes, 0, (size_t)((end - e) * idx_bytes));
            memset((char *)val + e * v_sz, 0, (size_t)((end - e) * v_sz));
        }
    }
    return p;
}

/* ======== 13. ABI report ======== */

/* What the caller must agree with, by key: 0 the ABI version (FLYLORA_CPU_ABI_VERSION), 1 MAX_R, 2 sizeof(SlotArgs)
 * in bytes, 3/4/5 the dtype codes of fp32/bf16/fp16. -1 for any other key. native.py reads every key once when
 * it loads the library and refuses a library that disagrees (a stale or foreign build). */
int64_t flylora_cpu_abi(int key) {
    switch (key) {
    case 0: return FLYLORA_CPU_ABI_VERSION;
    case 1: return MAX_R;
    case 2: return (int64_t)sizeof(SlotArgs);
    case 3: return F32;
    case 4: return BF16;
    case 5: return F16;
    default: return -1;
    }
}

/* ======== 14. Writing a slot image ======== */

/* Copy n pieces of a slot image into slot `slot`: row i of `table` (5 int64 each) is (destination buffer
 * address, bytes per slot, byte offset within the slot, source address, bytes), and piece i goes to
 * buffer + slot * per_slot + offset. One call writes a whole layer's image (a dozen or more copies), which
 * torch did one dispatched copy at a time. lifecycle.py builds the table from the tensors' own sizes and
 * checks every destination range against its buffer before the first call. */
void flylora_cpu_copy_pieces(const int64_t *table, int64_t n, int64_t slot) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t *t = table + 5 * i;
        memcpy((char *)(intptr_t)(t[0] + slot * t[1] + t[2]), (const char *)(intptr_t)t[3], (size_t)t[4]);
    }
}

/* ======== 15. One adapter's A, every layer and slice in one call ======== */

/* The count pass of flylora_cpu_pack_rows for n slices: row i of `table` (6 int64 each) is (A address, A dtype,
 * r, in, index bytes, value dtype), and out[i] gets what flylora_cpu_pack_rows(..., p = -1, ...) returns for
 * it. A cold adapter's 210 slices (SmolLM2, seven projections) were 210 ctypes calls. */
void flylora_cpu_count_many(const int64_t *table, int64_t n, int64_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t *t = table + 6 * i;
        out[i] = flylora_cpu_pack_rows((const void *)(intptr_t)t[0], (int)t[1], t[2], t[3], -1, NULL, (int)t[4], NULL,
                                       (int)t[5], NULL);
    }
}

/* The fill pass of flylora_cpu_pack_rows for n slices into slot `slot` of their slot sets: row i of `table`
 * (13 int64 each) is (A address, A dtype, r, in, p, index base, index bytes per slot, index bytes, value base,
 * value bytes per slot, value dtype, column-word base, column-word bytes per slot); slice i's rows go to
 * base + slot * per_slot for each of the three. lifecycle.py builds the table from the slots' own buffers and
 * checks every range against them. Returns n, or the first failing row's index (its pack returned other than
 * p: that slice and every later one are left unwritten). */
int64_t flylora_cpu_pack_many(const int64_t *table, int64_t n, int64_t slot) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t *t = table + 13 * i;
        const int64_t got = flylora_cpu_pack_rows(
            (const void *)(intptr_t)t[0], (int)t[1], t[2], t[3], t[4], (void *)(intptr_t)(t[5] + slot * t[6]),
            (int)t[7], (void *)(intptr_t)(t[8] + slot * t[9]), (int)t[10], (uint16_t *)(intptr_t)(t[11] + slot * t[12]));
        if (got != t[4]) return i;
    }
    return n;
}
