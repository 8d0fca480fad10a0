/* linear.c -- the dense layer out = act(inp @ W + b), forward and backward. */
#include "hvae.h"
#include "internal.h"
#include "blas.h"

#include <math.h>

void hvae_dense_forward(float *out, const float *inp, const float *weight,
                        const float *bias, hvae_activation act, int64_t B,
                        int64_t n_in, int64_t n_out)
{
    /* inp (B, n_in), weight (n_in, n_out), bias (n_out) -> out (B, n_out) */
    hvae_dense_cond_forward(out, inp, NULL, weight, bias, act, B, n_in, 0, n_out, 0);
}

void hvae_dense_backward(float *dinp, float *dweight, float *dbias,
                         float *dout, const float *out, const float *inp,
                         const float *weight, hvae_activation act, int64_t B,
                         int64_t n_in, int64_t n_out)
{
    /* dout (B, n_out) becomes dpre in place; dweight (n_in, n_out) +=
     * inp^T @ dpre; dbias += column sums of dpre; dinp (B, n_in) +=
     * dpre @ weight^T. */
    hvae_dense_cond_backward(dinp, dweight, dbias, dout, out, inp, NULL, weight, act,
                             B, n_in, 0, n_out, NULL);
}

/*
 * out (B, n_out) = inp (B, n_in) @ weight (n_in, n_out), computed so that
 * every output element is the same sequence of fused multiply-adds over
 * k = 0..n_in-1 whatever the other rows are. BLAS results depend on a row's
 * position in the batch (at the 1e-7 level); evaluation (transform,
 * score_samples, decode, sample) must not, so that a row's result does not
 * change when the data set is reordered or split.
 *
 * Register blocking: 4 rows x 16 columns of accumulators; weight panels of
 * 16 columns stay in cache while all rows stream past. fmaf is exact
 * (one rounding), so its vector and scalar forms agree bit for bit.
 */
#define RW_COLS 16
#define RW_ROWS 4
#define RW_KC 256
#define RW_MC 96
#define RW_TILE_ROWS 6
#define RW_NARROW_ROWS 12

#if defined(__GNUC__) && defined(__x86_64__) && !defined(HVAE_NO_CLONES)
#include <immintrin.h>
#define HVAE_HAVE_FMA_KERNEL 1

/* The same computation with AVX + FMA registers, blocked for the caches
 * as a BLAS would be (but never splitting or reordering a sum): the inputs
 * are walked in blocks of RW_KC values of k and RW_MC rows (an L2-sized
 * block of inp), the weights in panels of RW_KC x 16 copied to a
 * contiguous L1-resident buffer, and a 6 x 16 tile of accumulators (12 ymm)
 * runs down the k of a block. Between k blocks a tile is stored to out and
 * loaded back, which is exact, so each output element is still one chain of
 * FMAs over k = 0..n_in-1 in order, started from zero (or from out when
 * accumulating); vector and scalar FMAs round identically, so the row tail
 * (one row at a time) and the column tail (tiles on a copy) agree with the
 * tiles and with the scalar fallback. */

/* A tile of `rows` (1..6) rows x 16 columns; always inlined with a constant
 * `rows`, so each size is its own unrolled loop. The rows left over by the
 * 6-row tiles (a part of 508 rows leaves 4) run as one tile of 2..5 rows:
 * one row at a time they would load two panel vectors for every two
 * FMAs. */
__attribute__((target("avx,fma"), always_inline))
static inline void rowwise_tile(float *out, int64_t n_out, const float *x, int64_t n_in,
                                const float *panel, int64_t kc, int load_out, int rows)
{
    __m256 acc[RW_TILE_ROWS][2];
    for (int r = 0; r < rows; r++) {
        acc[r][0] = load_out ? _mm256_loadu_ps(out + r * n_out) : _mm256_setzero_ps();
        acc[r][1] = load_out ? _mm256_loadu_ps(out + r * n_out + 8) : _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < kc; k++) {
        __m256 w0 = _mm256_load_ps(panel + 16 * k);
        __m256 w1 = _mm256_load_ps(panel + 16 * k + 8);
        for (int r = 0; r < rows; r++) {
            __m256 v = _mm256_broadcast_ss(x + r * n_in + k);
            acc[r][0] = _mm256_fmadd_ps(v, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(v, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(out + r * n_out, acc[r][0]);
        _mm256_storeu_ps(out + r * n_out + 8, acc[r][1]);
    }
}

__attribute__((target("avx,fma")))
static void rowwise_tile6(float *out, int64_t n_out, const float *x, int64_t n_in,
                          const float *panel, int64_t kc, int load_out)
{
    rowwise_tile(out, n_out, x, n_in, panel, kc, load_out, RW_TILE_ROWS);
}

/* The last rows % 6 rows of a block (1..5), at once. */
__attribute__((target("avx,fma")))
static void rowwise_tile_rest(float *out, int64_t n_out, const float *x, int64_t n_in,
                              const float *panel, int64_t kc, int load_out, int64_t rows)
{
    switch (rows) {
    case 5: rowwise_tile(out, n_out, x, n_in, panel, kc, load_out, 5); break;
    case 4: rowwise_tile(out, n_out, x, n_in, panel, kc, load_out, 4); break;
    case 3: rowwise_tile(out, n_out, x, n_in, panel, kc, load_out, 3); break;
    case 2: rowwise_tile(out, n_out, x, n_in, panel, kc, load_out, 2); break;
    case 1: rowwise_tile(out, n_out, x, n_in, panel, kc, load_out, 1); break;
    default: break;
    }
}

/* The last n_out % 16 columns of up to 6 rows: the same tile run on a
 * 16-column copy of them (the panel's unused columns zero), copied back.
 * Copies are exact, so each real column is still one chain of FMAs over k
 * in order, and the results are those of the scalar form. */
__attribute__((target("avx,fma")))
static void rowwise_tail(float *out, int64_t n_out, const float *x, int64_t n_in,
                         const float *panel, int64_t kc, int load_out, int64_t rows,
                         int64_t tail)
{
    float tile[RW_TILE_ROWS * RW_COLS] __attribute__((aligned(32))) = {0};
    if (load_out)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < tail; j++)
                tile[r * RW_COLS + j] = out[r * n_out + j];
    if (rows == RW_TILE_ROWS)
        rowwise_tile6(tile, RW_COLS, x, n_in, panel, kc, load_out);
    else
        rowwise_tile_rest(tile, RW_COLS, x, n_in, panel, kc, load_out, rows);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < tail; j++)
            out[r * n_out + j] = tile[r * RW_COLS + j];
}

/* A tail of at most 8 columns: one vector per row, so 12-row tiles
 * (panel rows of 8). */
__attribute__((target("avx,fma")))
static void rowwise_tail8(float *out, int64_t n_out, const float *x, int64_t n_in,
                          const float *panel8, int64_t kc, int load_out, int64_t rows,
                          int64_t tail)
{
    float tile[RW_NARROW_ROWS * 8] __attribute__((aligned(32))) = {0};
    if (load_out)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t j = 0; j < tail; j++)
                tile[r * 8 + j] = out[r * n_out + j];
    if (rows == RW_NARROW_ROWS) {
        __m256 acc[RW_NARROW_ROWS];
        for (int r = 0; r < RW_NARROW_ROWS; r++)
            acc[r] = _mm256_load_ps(tile + 8 * r);
        for (int64_t k = 0; k < kc; k++) {
            __m256 w = _mm256_load_ps(panel8 + 8 * k);
            for (int r = 0; r < RW_NARROW_ROWS; r++)
                acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * n_in + k), w, acc[r]);
        }
        for (int r = 0; r < RW_NARROW_ROWS; r++)
            _mm256_store_ps(tile + 8 * r, acc[r]);
    } else {
        for (int64_t r = 0; r < rows; r++) {
            __m256 acc = _mm256_load_ps(tile + 8 * r);
            for (int64_t k = 0; k < kc; k++)
                acc = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * n_in + k),
                                      _mm256_load_ps(panel8 + 8 * k), acc);
            _mm256_store_ps(tile + 8 * r, acc);
        }
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < tail; j++)
            out[r * n_out + j] = tile[r * 8 + j];
}

/* k blocks of equal length, at most RW_KC (784 = 4 x 196, not 3 x 256 +
 * 16): a short last block would pay a tile's loads and stores for a few
 * FMAs. */
static int64_t rowwise_kblock(int64_t n_in)
{
    int64_t n_kblocks = (n_in + RW_KC - 1) / RW_KC;
    return n_kblocks > 0 ? (n_in + n_kblocks - 1) / n_kblocks : 1;
}

/* Panel columns of the last n_out % 16 columns: none, 8 (at most 8 of them)
 * or 16 (zero beyond n_out). */
static int64_t rowwise_tail_width(int64_t n_out)
{
    int64_t tail = n_out % RW_COLS;
    return tail == 0 ? 0 : tail <= 8 ? 8 : RW_COLS;
}

/* Rows k0..k0+kc of columns j0..j0+width of W (n_in, n_out) as the kernel
 * reads them: kc rows of `width` floats, zero past n_out. */
__attribute__((target("avx,fma")))
static void rowwise_pack_panel(float *panel, const float *weight, int64_t n_out, int64_t k0,
                               int64_t kc, int64_t j0, int64_t width)
{
    const float *w = weight + k0 * n_out + j0;
    int64_t cols = n_out - j0 < width ? n_out - j0 : width;
    if (cols == RW_COLS) {
        for (int64_t k = 0; k < kc; k++) {
            _mm256_store_ps(panel + 16 * k, _mm256_loadu_ps(w + k * n_out));
            _mm256_store_ps(panel + 16 * k + 8, _mm256_loadu_ps(w + k * n_out + 8));
        }
        return;
    }
    for (int64_t k = 0; k < kc; k++)
        for (int64_t j = 0; j < width; j++)
            panel[width * k + j] = j < cols ? w[k * n_out + j] : 0.0f;
}

/* packed (see hvae_rowwise_pack) or NULL: then each panel is copied from
 * weight into an L1-resident buffer for every block of rows. The panels'
 * contents are the same either way, so are the results. */
__attribute__((target("avx,fma")))
static void gemm_rowwise_fma(float *out, const float *inp, const float *weight,
                             const float *packed, int64_t B, int64_t n_in, int64_t n_out,
                             int accumulate)
{
    float buffer[RW_KC * RW_COLS] __attribute__((aligned(32)));
    int64_t full_cols = n_out - n_out % RW_COLS;
    int64_t tail = n_out - full_cols, tail_width = rowwise_tail_width(n_out);
    int64_t packed_cols = full_cols + tail_width, kblock = rowwise_kblock(n_in);
    if (n_in == 0 && !accumulate) {
        for (int64_t i = 0; i < B * n_out; i++)
            out[i] = 0.0f;
        return;
    }
    for (int64_t k0 = 0; k0 < n_in; k0 += kblock) {
        int64_t kc = n_in - k0 < kblock ? n_in - k0 : kblock;
        int load_out = k0 > 0 || accumulate;
        const float *panels = packed ? packed + k0 * packed_cols : NULL;
        for (int64_t b0 = 0; b0 < B; b0 += RW_MC) {
            int64_t b1 = B - b0 < RW_MC ? B : b0 + RW_MC;
            for (int64_t j0 = 0; j0 < full_cols; j0 += RW_COLS) {
                const float *panel = buffer;
                const float *next = NULL;
                if (panels) {
                    panel = panels + kc * j0;
                } else {
                    rowwise_pack_panel(buffer, weight, n_out, k0, kc, j0, RW_COLS);
                    /* The next panel's rows of W (the next 16 columns, or
                     * the first 16 again for the next block of rows) are
                     * 64-byte pieces n_out floats apart, a stride the
                     * hardware does not prefetch across pages: ask for them
                     * while the tiles run. */
                    next = weight + k0 * n_out + (j0 + RW_COLS < full_cols ? j0 + RW_COLS : 0);
                }
                int64_t n_tiles = (b1 - b0) / RW_TILE_ROWS;
                int64_t per_tile = n_tiles > 0 ? (kc + n_tiles - 1) / n_tiles : 0;
                int64_t pk = 0;
                int64_t b = b0;
                for (; b + RW_TILE_ROWS <= b1; b += RW_TILE_ROWS) {
                    for (int64_t e = pk + per_tile; next && pk < e && pk < kc; pk++)
                        _mm_prefetch((const char *)(next + pk * n_out), _MM_HINT_T1);
                    rowwise_tile6(out + b * n_out + j0, n_out, inp + b * n_in + k0, n_in,
                                  panel, kc, load_out);
                }
                if (b < b1)
                    rowwise_tile_rest(out + b * n_out + j0, n_out, inp + b * n_in + k0, n_in,
                                      panel, kc, load_out, b1 - b);
            }
            if (tail == 0)
                continue;
            const float *panel = buffer;
            if (panels)
                panel = panels + kc * full_cols;
            else
                rowwise_pack_panel(buffer, weight, n_out, k0, kc, full_cols, tail_width);
            if (tail_width == 8) {
                for (int64_t b = b0; b < b1; b += RW_NARROW_ROWS)
                    rowwise_tail8(out + b * n_out + full_cols, n_out, inp + b * n_in + k0,
                                  n_in, panel, kc, load_out,
                                  b1 - b < RW_NARROW_ROWS ? b1 - b : RW_NARROW_ROWS, tail);
                continue;
            }
            for (int64_t b = b0; b < b1; b += RW_TILE_ROWS)
                rowwise_tail(out + b * n_out + full_cols, n_out, inp + b * n_in + k0, n_in,
                             panel, kc, load_out,
                             b1 - b < RW_TILE_ROWS ? b1 - b : RW_TILE_ROWS, tail);
        }
    }
}

static int rowwise_fma_available(void)
{
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma");
}
#endif

int64_t hvae_rowwise_packed_floats(int64_t n_in, int64_t n_out)
{
#ifdef HVAE_HAVE_FMA_KERNEL
    if (rowwise_fma_available())
        return n_in * (n_out - n_out % RW_COLS + rowwise_tail_width(n_out));
#endif
    (void)n_in, (void)n_out;
    return 0;
}

void hvae_rowwise_pack(float *packed, const float *weight, int64_t n_in, int64_t n_out)
{
#ifdef HVAE_HAVE_FMA_KERNEL
    if (!rowwise_fma_available())
        return;
    int64_t full_cols = n_out - n_out % RW_COLS, tail_width = rowwise_tail_width(n_out);
    int64_t packed_cols = full_cols + tail_width, kblock = rowwise_kblock(n_in);
    for (int64_t k0 = 0; k0 < n_in; k0 += kblock) {
        int64_t kc = n_in - k0 < kblock ? n_in - k0 : kblock;
        float *panels = packed + k0 * packed_cols;
        for (int64_t j0 = 0; j0 < full_cols; j0 += RW_COLS)
            rowwise_pack_panel(panels + kc * j0, weight, n_out, k0, kc, j0, RW_COLS);
        if (tail_width)
            rowwise_pack_panel(panels + kc * full_cols, weight, n_out, k0, kc, full_cols,
                               tail_width);
    }
#else
    (void)packed, (void)weight, (void)n_in, (void)n_out;
#endif
}

static void gemm_rowwise(float *out, const float *inp, const float *weight,
                         const float *packed, int64_t B, int64_t n_in, int64_t n_out,
                         int accumulate)
{
#ifdef HVAE_HAVE_FMA_KERNEL
    if (rowwise_fma_available()) {
        gemm_rowwise_fma(out, inp, weight, packed, B, n_in, n_out, accumulate);
        return;
    }
#endif
    (void)packed;
    int64_t full_cols = n_out - n_out % RW_COLS;
    for (int64_t j0 = 0; j0 < full_cols; j0 += RW_COLS) {
        const float *w = weight + j0;
        int64_t b = 0;
        for (; b + RW_ROWS <= B; b += RW_ROWS) {
            float acc[RW_ROWS][RW_COLS] = {{0}};
            if (accumulate)
                for (int r = 0; r < RW_ROWS; r++)
                    for (int j = 0; j < RW_COLS; j++)
                        acc[r][j] = out[(b + r) * n_out + j0 + j];
            const float *x = inp + b * n_in;
            for (int64_t k = 0; k < n_in; k++) {
                const float *wk = w + k * n_out;
                for (int r = 0; r < RW_ROWS; r++) {
                    float xr = x[r * n_in + k];
                    for (int j = 0; j < RW_COLS; j++)
                        acc[r][j] = fmaf(xr, wk[j], acc[r][j]);
                }
            }
            for (int r = 0; r < RW_ROWS; r++)
                for (int j = 0; j < RW_COLS; j++)
                    out[(b + r) * n_out + j0 + j] = acc[r][j];
        }
        for (; b < B; b++) {
            float acc[RW_COLS] = {0};
            if (accumulate)
                for (int j = 0; j < RW_COLS; j++)
                    acc[j] = out[b * n_out + j0 + j];
            const float *x = inp + b * n_in;
            for (int64_t k = 0; k < n_in; k++)
                for (int j = 0; j < RW_COLS; j++)
                    acc[j] = fmaf(x[k], w[k * n_out + j], acc[j]);
            for (int j = 0; j < RW_COLS; j++)
                out[b * n_out + j0 + j] = acc[j];
        }
    }
    for (int64_t b = 0; b < B; b++) {
        for (int64_t j = full_cols; j < n_out; j++) {
            float acc = accumulate ? out[b * n_out + j] : 0.0f;
            for (int64_t k = 0; k < n_in; k++)
                acc = fmaf(inp[b * n_in + k], weight[k * n_out + j], acc);
            out[b * n_out + j] = acc;
        }
    }
}

/*
 * Threads: a dense layer is one region of the pool. Forward, each part
 * takes a block of output columns (BLAS) or of rows (rowwise), computes
 * its product and applies bias and activation while the block is in
 * cache. Backward, each part takes a block of output columns: the
 * activation's derivative and dbias on those columns, then those columns
 * of dW; then dinp in a second region (it needs every column of dpre).
 * Every element is computed by the same operations whatever the split
 * (bias sums run down the rows in order), so results do not depend on the
 * thread count.
 */
typedef struct dense_args {
    float *out;           /* forward output, or backward dout/dpre */
    const float *inp, *cond, *weight, *bias;
    const float *packed, *packed_cond; /* rowwise: hvae_rowwise_pack's, or NULL */
    const float *act_out; /* backward: the forward output */
    float *dweight, *dbias;
    hvae_activation act;
    int64_t B, n_in, n_cond, n_out;
    int64_t row0, row1;   /* backward: the rows of dpre a region computes */
    int rowwise;
    /* backward: what columns_part runs on each part's output columns */
    void (*columns)(const struct dense_args *a, int64_t j0, int64_t j1);
} dense_args;

/* Splits of fewer multiply-adds run on one thread. */
#define DENSE_PARALLEL_MIN (1 << 18)

static int dense_parts(int64_t B, int64_t n_in, int64_t n_out)
{
    return hvae_parts((double)B * (double)n_in * (double)n_out, DENSE_PARALLEL_MIN);
}

/* out[:, j0:j1] = inp @ weight[:n_in, j0:j1] (+ cond @ weight[n_in:, j0:j1]). */
static void product_columns(const dense_args *a, int64_t j0, int64_t j1)
{
    int64_t n_out = a->n_out;
    hvae_sgemm(HVAE_CBLAS_NO_TRANS, HVAE_CBLAS_NO_TRANS, (int)a->B, (int)(j1 - j0),
               (int)a->n_in, 1.0f, a->inp, (int)a->n_in, a->weight + j0, (int)n_out,
               0.0f, a->out + j0, (int)n_out);
    if (a->n_cond > 0)
        hvae_sgemm(HVAE_CBLAS_NO_TRANS, HVAE_CBLAS_NO_TRANS, (int)a->B, (int)(j1 - j0),
                   (int)a->n_cond, 1.0f, a->cond, (int)a->n_cond,
                   a->weight + a->n_in * n_out + j0, (int)n_out, 1.0f, a->out + j0,
                   (int)n_out);
}

static void dense_forward_part(void *ctx, int part, int n_parts)
{
    const dense_args *a = ctx;
    int64_t n_out = a->n_out, lo, hi;
    if (a->rowwise) {
        /* Whole 12-row tiles (two 6-row tiles, one narrow tile) per part. */
        hvae_split(a->B, part, n_parts, RW_NARROW_ROWS, &lo, &hi);
        if (hi <= lo)
            return;
        float *out = a->out + lo * n_out;
        gemm_rowwise(out, a->inp + lo * a->n_in, a->weight, a->packed, hi - lo, a->n_in,
                     n_out, 0);
        if (a->n_cond > 0)
            gemm_rowwise(out, a->cond + lo * a->n_cond, a->weight + a->n_in * n_out,
                         a->packed_cond, hi - lo, a->n_cond, n_out, 1);
        for (int64_t b = 0; b < hi - lo; b++)
            hvae_bias_activation_row_inplace(out + b * n_out, a->bias, a->act, n_out);
        return;
    }
    hvae_split(n_out, part, n_parts, 16, &lo, &hi);
    if (hi <= lo)
        return;
    product_columns(a, lo, hi);
    for (int64_t b = 0; b < a->B; b++)
        hvae_bias_activation_row_inplace(a->out + b * n_out + lo, a->bias + lo, a->act,
                                         hi - lo);
}

void hvae_dense_cond_forward(float *out, const float *inp, const float *cond,
                             const float *weight, const float *bias,
                             hvae_activation act, int64_t B, int64_t n_in,
                             int64_t n_cond, int64_t n_out, int rowwise)
{
    hvae_dense_packed_forward(out, inp, cond, weight, NULL, NULL, bias, act, B, n_in, n_cond,
                              n_out, rowwise);
}

void hvae_dense_packed_forward(float *out, const float *inp, const float *cond,
                               const float *weight, const float *packed,
                               const float *packed_cond, const float *bias,
                               hvae_activation act, int64_t B, int64_t n_in,
                               int64_t n_cond, int64_t n_out, int rowwise)
{
    if (B <= 0 || n_out <= 0)
        return;
    dense_args a = {.out = out, .inp = inp, .cond = cond, .weight = weight,
                    .packed = rowwise ? packed : NULL,
                    .packed_cond = rowwise ? packed_cond : NULL, .bias = bias, .act = act,
                    .B = B, .n_in = n_in, .n_cond = n_cond, .n_out = n_out,
                    .rowwise = rowwise};
    hvae_parallel(dense_forward_part, &a, dense_parts(B, n_in + n_cond, n_out));
}

/* Columns j0..j1 of dpre (from dout, in place) and dbias, over rows
 * row0 .. row1 - 1. */
static void activation_backward_columns(const dense_args *a, int64_t j0, int64_t j1)
{
    int64_t n_out = a->n_out;
    float *dpre = a->out;
    for (int64_t b = a->row0; b < a->row1; b++)
        hvae_activation_backward_row_inplace(dpre + b * n_out + j0, a->dbias + j0,
                                             a->act_out + b * n_out + j0, a->act, j1 - j0);
}

/* Columns j0..j1 of dW += inp^T @ dpre, over all rows. */
static void weight_gradient_columns(const dense_args *a, int64_t j0, int64_t j1)
{
    int64_t n_out = a->n_out;
    const float *dpre = a->out;
    hvae_sgemm(HVAE_CBLAS_TRANS, HVAE_CBLAS_NO_TRANS, (int)a->n_in, (int)(j1 - j0),
               (int)a->B, 1.0f, a->inp, (int)a->n_in, dpre + j0, (int)n_out, 1.0f,
               a->dweight + j0, (int)n_out);
    /* The condition's rows of W: dW[n_in:] += cond^T @ dpre; the condition
     * itself needs no gradient. */
    if (a->n_cond > 0)
        hvae_sgemm(HVAE_CBLAS_TRANS, HVAE_CBLAS_NO_TRANS, (int)a->n_cond, (int)(j1 - j0),
                   (int)a->B, 1.0f, a->cond, (int)a->n_cond, dpre + j0, (int)n_out, 1.0f,
                   a->dweight + a->n_in * n_out + j0, (int)n_out);
}

/* Columns j0..j1 of dpre, dbias and dW: both of the above in one region. */
static void backward_columns(const dense_args *a, int64_t j0, int64_t j1)
{
    activation_backward_columns(a, j0, j1);
    weight_gradient_columns(a, j0, j1);
}

/* A backward region: each part takes a block of output columns (multiples
 * of 16) and runs a->columns on it. */
static void columns_part(void *ctx, int part, int n_parts)
{
    const dense_args *a = ctx;
    int64_t j0, j1;
    hvae_split(a->n_out, part, n_parts, 16, &j0, &j1);
    if (j1 > j0)
        a->columns(a, j0, j1);
}

void hvae_dense_cond_backward(float *dinp, float *dweight, float *dbias,
                              float *dout, const float *out, const float *inp,
                              const float *cond, const float *weight,
                              hvae_activation act, int64_t B, int64_t n_in,
                              int64_t n_cond, int64_t n_out, const hvae_workspace *ws)
{
    if (B <= 0 || n_out <= 0)
        return;
    dense_args a = {.out = dout, .inp = inp, .cond = cond, .act_out = out,
                    .dweight = dweight, .dbias = dbias, .act = act, .B = B,
                    .n_in = n_in, .n_cond = n_cond, .n_out = n_out, .row0 = 0, .row1 = B};
    int parts = dense_parts(B, n_in + n_cond, n_out);
    int64_t piece = ws ? ws_poll_rows(n_out) : B;
    if (piece >= B) {
        a.columns = backward_columns;
        hvae_parallel(columns_part, &a, parts);
    } else {
        /* A long pass: dpre and dbias in pieces of rows with a poll after
         * each (the same column split, each column's rows still in order,
         * so dbias sums alike), then dW over all rows at once. */
        for (int64_t r0 = 0; r0 < B; r0 += piece) {
            a.row0 = r0;
            a.row1 = B - r0 < piece ? B : r0 + piece;
            a.columns = activation_backward_columns;
            hvae_parallel(columns_part, &a, parts);
            if (ws_stop(ws))
                return; /* the caller sees the stop at its next poll */
        }
        a.columns = weight_gradient_columns;
        hvae_parallel(columns_part, &a, parts);
        if (ws_stop(ws))
            return;
    }
    if (dinp)
        hvae_sgemm(HVAE_CBLAS_NO_TRANS, HVAE_CBLAS_TRANS, (int)B, (int)n_in, (int)n_out,
                   1.0f, dout, (int)n_out, weight, (int)n_out, 1.0f, dinp, (int)n_in);
}
