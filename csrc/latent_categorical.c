/* latent_categorical.c -- a layer of M independent categorical variables of
 * K classes (hvae.h, "Discrete latent layers"). Heads: one of M*K logits l;
 * q_mk = softmax(l_m)_k. Noise: K standard Gumbel draws per variable,
 * g = -log(-log u). Samples, by the call's mode:
 *   exact (tau = 0)      z_m = onehot(argmax_k (l_mk + g_mk))     Gumbel-max
 *   relaxed              z_m = softmax((l_m + g_m) / tau)          Gumbel-softmax
 *   straight-through     the exact one-hot forward, the relaxed backward.
 * (log pi + g and l + g differ by a constant per variable: the same argmax
 * and softmax.) The prior p is uniform (p heads NULL) or a softmax of the
 * decoder's logits. Terms, per variable:
 *   KL(q || p)           sum_k q_k (log q_k - log p_k)
 *   sampled ratio        sum_k z_k (log q_k - log p_k)   (= log q(z) - log p(z) at a one-hot z)
 * Every row's variables are independent groups of K; the work is linear in
 * B * M * K, with the log-sum-exp of each group in float and the row's sum
 * in double.
 *
 * Speed: this elementwise work is a large share of a step (every element
 * takes exps in forward and backward), so the rows are split over the
 * pool's threads (each group is computed alone: the split changes no
 * result), the exps of a group are computed once into a stack tile by a
 * loop the compiler vectorises (hvae_expf) and reused by the passes that
 * follow (a group wider than the tile is taken a tile at a time, its exps
 * computed again per pass), and the Gumbel noise takes its two logs with
 * hvae_logf rather than libm's scalar log. */
#include "extension.h"
#include "fastmath.h"
#include "internal.h"

#include <math.h>

/* Floats of exps a group keeps (q's and p's: 1 KB of stack each). */
#define CAT_TILE 256

/* g = -log(-log u) in place. */
HVAE_AVX2_CLONES
static void gumbel_from_uniform(float *u, int64_t n)
{
    for (int64_t k = 0; k < n; k++)
        u[k] = -hvae_logf(-hvae_logf(u[k]));
}

static void categorical_noise(float *eps, hvae_rng *rng, int64_t n)
{
    /* Two uniforms per draw of the generator, 23 bits each, centred in
     * their cells: u = (m + 1/2) 2^-23 is exact in float and never 0 or 1
     * (so the tails stop near g = -2.8 and g = 16.6, each beyond with
     * probability below 1e-7). The logs run as a second, vectorised loop. */
    int64_t k = 0;
    for (; k + 1 < n; k += 2) {
        uint64_t bits = hvae_rng_next(rng);
        eps[k] = ((float)(bits >> 41) + 0.5f) * 0x1.0p-23f;
        eps[k + 1] = ((float)((bits >> 9) & 0x7fffff) + 0.5f) * 0x1.0p-23f;
    }
    if (k < n)
        eps[k] = ((float)(hvae_rng_next(rng) >> 41) + 0.5f) * 0x1.0p-23f;
    gumbel_from_uniform(eps, n);
}

/* e_k = exp((a_k + b_k - shift) * scale), b NULL for none. */
HVAE_AVX2_CLONES
static void group_exps(float *e, const float *a, const float *b, float shift, float scale,
                       int64_t n)
{
    if (b)
        for (int64_t k = 0; k < n; k++)
            e[k] = hvae_expf((a[k] + b[k] - shift) * scale);
    else
        for (int64_t k = 0; k < n; k++)
            e[k] = hvae_expf((a[k] - shift) * scale);
}

static float group_max(const float *a, const float *b, int64_t K)
{
    float mx = a[0] + (b ? b[0] : 0.0f);
    for (int64_t k = 1; k < K; k++) {
        float v = a[k] + (b ? b[k] : 0.0f);
        mx = v > mx ? v : mx;
    }
    return mx;
}

/* A group's softmax((a + b) / tau) in pieces: its max, the sum s of
 * e_k = exp((a_k + b_k - max) / tau) and, for w, t = sum_k e_k w_k; e holds
 * the exps of the group when it fits the tile (K <= CAT_TILE), else of its
 * last tile, and softmax_tile() gives them back for a later pass. */
typedef struct {
    const float *a, *b;
    float mx, inv_tau, s, t;
    int64_t K;
    float *e;
} softmax_group;

static void softmax_sums(softmax_group *g, const float *a, const float *b, float inv_tau,
                         int64_t K, float *e, const float *w)
{
    *g = (softmax_group){a, b, group_max(a, b, K), inv_tau, 0.0f, 0.0f, K, e};
    for (int64_t lo = 0; lo < K; lo += CAT_TILE) {
        int64_t n = K - lo < CAT_TILE ? K - lo : CAT_TILE;
        group_exps(e, a + lo, b ? b + lo : NULL, g->mx, inv_tau, n);
        for (int64_t k = 0; k < n; k++)
            g->s += e[k];
        if (w)
            for (int64_t k = 0; k < n; k++)
                g->t += e[k] * w[lo + k];
    }
}

/* The exps of the group's tile from lo (n of them). */
static const float *softmax_tile(const softmax_group *g, int64_t lo, int64_t n)
{
    if (g->K > CAT_TILE)
        group_exps(g->e, g->a + lo, g->b ? g->b + lo : NULL, g->mx, g->inv_tau, n);
    return g->e;
}

static inline int64_t tile_size(int64_t K, int64_t lo)
{
    return K - lo < CAT_TILE ? K - lo : CAT_TILE;
}

/* ---- rows split over the pool ---------------------------------------------- */

/* Every operation's arguments; each reads the ones it needs. */
typedef struct cat_args {
    void (*rows)(const struct cat_args *a, int64_t r0, int64_t r1);
    const hvae_latent_call *c;
    const float *l, *p, *g, *z, *dz, *row_scale;
    float *out, *out2, *dl, *dp, *dzo;
    double *term;
    float scale;
} cat_args;

static void rows_part(void *ctx, int part, int n_parts)
{
    const cat_args *a = ctx;
    int64_t r0, r1;
    hvae_split(a->c->B, part, n_parts, 1, &r0, &r1);
    if (r1 > r0)
        a->rows(a, r0, r1);
}

/* Runs a->rows over the call's rows, split when they are many. */
static void run_rows(cat_args *a)
{
    hvae_parallel(rows_part, a, hvae_parts((double)(a->c->B * a->c->d), 1 << 13));
}

/* ---- the sample ------------------------------------------------------------- */

static void sample_forward_rows(const cat_args *a, int64_t r0, int64_t r1)
{
    const hvae_latent_call *c = a->c;
    int64_t K = c->K;
    int hard = c->temperature <= 0.0f || c->straight_through;
    float inv_tau = hard ? 0.0f : 1.0f / c->temperature;
    for (int64_t o = r0 * c->d; o < r1 * c->d; o += K) {
        const float *lv = a->l + o, *gv = a->g + o;
        float *zv = a->out + o;
        if (hard) {
            int64_t best = 0;
            float mx = lv[0] + gv[0];
            for (int64_t k = 1; k < K; k++)
                if (lv[k] + gv[k] > mx) {
                    mx = lv[k] + gv[k];
                    best = k;
                }
            for (int64_t k = 0; k < K; k++)
                zv[k] = k == best ? 1.0f : 0.0f;
            continue;
        }
        /* The exps straight into z, then normalised. */
        float mx = group_max(lv, gv, K), s = 0.0f;
        group_exps(zv, lv, gv, mx, inv_tau, K);
        for (int64_t k = 0; k < K; k++)
            s += zv[k];
        for (int64_t k = 0; k < K; k++)
            zv[k] /= s;
    }
}

static void categorical_sample_forward(float *z, const float *l, const float *unused,
                                       const float *g, const hvae_latent_call *c)
{
    (void)unused;
    cat_args a = {.rows = sample_forward_rows, .c = c, .l = l, .g = g, .out = z};
    run_rows(&a);
}

/* y = softmax((l + g) / tau) (recomputed: straight-through stored the hard
 * z); dl_k += y_k (dz_k - sum_j y_j dz_j) / tau. */
static void sample_backward_rows(const cat_args *a, int64_t r0, int64_t r1)
{
    const hvae_latent_call *c = a->c;
    int64_t K = c->K;
    float inv_tau = 1.0f / c->temperature, tile[CAT_TILE];
    for (int64_t o = r0 * c->d; o < r1 * c->d; o += K) {
        const float *dzv = a->dz + o;
        float *dlv = a->dl + o;
        softmax_group y;
        softmax_sums(&y, a->l + o, a->g + o, inv_tau, K, tile, dzv);
        float inv_s = 1.0f / y.s, dot = y.t * inv_s;
        for (int64_t lo = 0; lo < K; lo += CAT_TILE) {
            int64_t n = tile_size(K, lo);
            const float *e = softmax_tile(&y, lo, n);
            for (int64_t k = 0; k < n; k++)
                dlv[lo + k] += e[k] * inv_s * (dzv[lo + k] - dot) * inv_tau;
        }
    }
}

static void categorical_sample_backward(float *dl, float *unused_d, const float *dz,
                                        const float *l, const float *unused, const float *g,
                                        const hvae_latent_call *c)
{
    (void)unused_d;
    (void)unused;
    if (c->temperature <= 0.0f)
        return; /* an exact sample passes no pathwise gradient */
    cat_args a = {.rows = sample_backward_rows, .c = c, .l = l, .g = g, .dz = dz, .dl = dl};
    run_rows(&a);
}

/* d log q(z) / d l_k = z_k - q_k sum_j z_j. */
static void score_backward_rows(const cat_args *a, int64_t r0, int64_t r1)
{
    const hvae_latent_call *c = a->c;
    int64_t K = c->K, per_row = c->d / K;
    float tile[CAT_TILE];
    for (int64_t v = r0 * per_row; v < r1 * per_row; v++) {
        int64_t o = v * K;
        const float *zv = a->z + o;
        float *dlv = a->dl + o, rs = a->row_scale[v / per_row], total = 0.0f;
        for (int64_t k = 0; k < K; k++)
            total += zv[k];
        softmax_group q;
        softmax_sums(&q, a->l + o, NULL, 1.0f, K, tile, NULL);
        float w = total / q.s;
        for (int64_t lo = 0; lo < K; lo += CAT_TILE) {
            int64_t n = tile_size(K, lo);
            const float *e = softmax_tile(&q, lo, n);
            for (int64_t k = 0; k < n; k++)
                dlv[lo + k] += rs * (zv[lo + k] - e[k] * w);
        }
    }
}

static void categorical_score_backward(float *dl, float *unused_d, const float *row_scale,
                                       const float *z, const float *l, const float *unused,
                                       const hvae_latent_call *c)
{
    (void)unused_d;
    (void)unused;
    cat_args a = {.rows = score_backward_rows, .c = c, .l = l, .z = z, .row_scale = row_scale,
                  .dl = dl};
    run_rows(&a);
}

/* ---- KL(q || p) and the sampled ratio --------------------------------------- */

/* q and p of one group: log q_k = l_k - mx_q - log s_q, log p_k likewise
 * from p's logits, or -log K (uniform, p NULL). */
typedef struct {
    softmax_group q, p;
    float log_sq, log_sp; /* log p_k = -log_sp for the uniform p */
} group_pair;

static void pair_sums(group_pair *gp, const float *l, const float *p, int64_t K, float *tile_q,
                      float *tile_p)
{
    softmax_sums(&gp->q, l, NULL, 1.0f, K, tile_q, NULL);
    gp->log_sq = logf(gp->q.s);
    if (p) {
        softmax_sums(&gp->p, p, NULL, 1.0f, K, tile_p, NULL);
        gp->log_sp = logf(gp->p.s);
    } else {
        gp->p = (softmax_group){0};
        gp->log_sp = logf((float)K);
    }
}

/* log q_k - log p_k at element k of the group. */
static inline float log_ratio(const group_pair *gp, const float *l, const float *p, int64_t k)
{
    float lq = l[k] - gp->q.mx - gp->log_sq;
    float lp = p ? p[k] - gp->p.mx - gp->log_sp : -gp->log_sp;
    return lq - lp;
}

/* KL_m = sum_k q_k (log q_k - log p_k); the tiles keep q's exps (and p's). */
static float group_kl(const group_pair *gp, const float *l, const float *p, int64_t K)
{
    float sum = 0.0f;
    for (int64_t lo = 0; lo < K; lo += CAT_TILE) {
        int64_t n = tile_size(K, lo);
        const float *e = softmax_tile(&gp->q, lo, n);
        for (int64_t k = 0; k < n; k++)
            sum += e[k] * log_ratio(gp, l, p, lo + k);
    }
    return sum / gp->q.s;
}

static void kl_forward_rows(const cat_args *a, int64_t r0, int64_t r1)
{
    const hvae_latent_call *c = a->c;
    int64_t K = c->K;
    float tile_q[CAT_TILE], tile_p[CAT_TILE];
    for (int64_t r = r0; r < r1; r++) {
        double total = 0.0;
        for (int64_t o = r * c->d; o < (r + 1) * c->d; o += K) {
            const float *pv = a->p ? a->p + o : NULL;
            group_pair gp;
            pair_sums(&gp, a->l + o, pv, K, tile_q, tile_p);
            total += group_kl(&gp, a->l + o, pv, K);
        }
        a->term[r] = total;
    }
}

static void categorical_kl_forward(double *kl, const float *l, const float *unused,
                                   const float *p, const float *unused_p,
                                   const hvae_latent_call *c)
{
    (void)unused;
    (void)unused_p;
    cat_args a = {.rows = kl_forward_rows, .c = c, .l = l, .p = p, .term = kl};
    run_rows(&a);
}

/* dKL/dl_j = q_j (log q_j - log p_j - KL_m); dKL/dlp_j = p_j - q_j. */
static void kl_backward_rows(const cat_args *a, int64_t r0, int64_t r1)
{
    const hvae_latent_call *c = a->c;
    int64_t K = c->K;
    float tile_q[CAT_TILE], tile_p[CAT_TILE], scale = a->scale;
    for (int64_t o = r0 * c->d; o < r1 * c->d; o += K) {
        const float *lv = a->l + o, *pv = a->p ? a->p + o : NULL;
        float *dlv = a->dl + o, *dpv = pv && a->dp ? a->dp + o : NULL;
        group_pair gp;
        pair_sums(&gp, lv, pv, K, tile_q, tile_p);
        float klv = group_kl(&gp, lv, pv, K), inv_sq = 1.0f / gp.q.s;
        float inv_sp = pv ? 1.0f / gp.p.s : 0.0f;
        for (int64_t lo = 0; lo < K; lo += CAT_TILE) {
            int64_t n = tile_size(K, lo);
            const float *eq = softmax_tile(&gp.q, lo, n);
            for (int64_t k = 0; k < n; k++)
                dlv[lo + k] += scale * eq[k] * inv_sq * (log_ratio(&gp, lv, pv, lo + k) - klv);
            if (!dpv)
                continue;
            const float *ep = softmax_tile(&gp.p, lo, n);
            for (int64_t k = 0; k < n; k++)
                dpv[lo + k] += scale * (ep[k] * inv_sp - eq[k] * inv_sq);
        }
    }
}

static void categorical_kl_backward(float *dl, float *unused_d, float *dp, float *unused_dp,
                                    float scale, const float *l, const float *unused,
                                    const float *p, const float *unused_p,
                                    const hvae_latent_call *c)
{
    (void)unused_d;
    (void)unused_dp;
    (void)unused;
    (void)unused_p;
    cat_args a = {.rows = kl_backward_rows, .c = c, .l = l, .p = p, .dl = dl, .dp = dp,
                  .scale = scale};
    run_rows(&a);
}

static void logratio_forward_rows(const cat_args *a, int64_t r0, int64_t r1)
{
    const hvae_latent_call *c = a->c;
    int64_t K = c->K;
    float tile_q[CAT_TILE], tile_p[CAT_TILE];
    for (int64_t r = r0; r < r1; r++) {
        double total = 0.0;
        for (int64_t o = r * c->d; o < (r + 1) * c->d; o += K) {
            const float *lv = a->l + o, *pv = a->p ? a->p + o : NULL, *zv = a->z + o;
            group_pair gp;
            pair_sums(&gp, lv, pv, K, tile_q, tile_p);
            float sum = 0.0f;
            for (int64_t k = 0; k < K; k++)
                sum += zv[k] * log_ratio(&gp, lv, pv, k);
            total += sum;
        }
        a->term[r] = total;
    }
}

static void categorical_logratio_forward(double *kl, const float *z, const float *g,
                                         const float *l, const float *unused,
                                         const float *p, const float *unused_p,
                                         const hvae_latent_call *c)
{
    (void)g;
    (void)unused;
    (void)unused_p;
    cat_args a = {.rows = logratio_forward_rows, .c = c, .l = l, .p = p, .z = z, .term = kl};
    run_rows(&a);
}

/* d/dz_k = log q_k - log p_k; d/dl_j = z_j - q_j Z; d/dlp_j = -(z_j - p_j Z),
 * Z = sum_k z_k (1 for one-hot and relaxed samples alike). */
static void logratio_backward_rows(const cat_args *a, int64_t r0, int64_t r1)
{
    const hvae_latent_call *c = a->c;
    int64_t K = c->K;
    float tile_q[CAT_TILE], tile_p[CAT_TILE], scale = a->scale;
    for (int64_t o = r0 * c->d; o < r1 * c->d; o += K) {
        const float *lv = a->l + o, *pv = a->p ? a->p + o : NULL, *zv = a->z + o;
        float *dzv = a->dzo + o, *dlv = a->dl ? a->dl + o : NULL;
        float *dpv = pv && a->dp ? a->dp + o : NULL;
        group_pair gp;
        pair_sums(&gp, lv, pv, K, tile_q, tile_p);
        float Z = 0.0f;
        for (int64_t k = 0; k < K; k++)
            Z += zv[k];
        float wq = Z / gp.q.s, wp = pv ? Z / gp.p.s : 0.0f;
        for (int64_t lo = 0; lo < K; lo += CAT_TILE) {
            int64_t n = tile_size(K, lo);
            for (int64_t k = 0; k < n; k++)
                dzv[lo + k] += scale * log_ratio(&gp, lv, pv, lo + k);
            if (dlv) {
                const float *eq = softmax_tile(&gp.q, lo, n);
                for (int64_t k = 0; k < n; k++)
                    dlv[lo + k] += scale * (zv[lo + k] - eq[k] * wq);
            }
            if (dpv) {
                const float *ep = softmax_tile(&gp.p, lo, n);
                for (int64_t k = 0; k < n; k++)
                    dpv[lo + k] -= scale * (zv[lo + k] - ep[k] * wp);
            }
        }
    }
}

static void categorical_logratio_backward(float *dz, float *dl, float *unused_d, float *dp,
                                          float *unused_dp, float scale, const float *z,
                                          const float *l, const float *unused, const float *p,
                                          const float *unused_p, const hvae_latent_call *c)
{
    (void)unused_d;
    (void)unused_dp;
    (void)unused;
    (void)unused_p;
    cat_args a = {.rows = logratio_backward_rows, .c = c, .l = l, .p = p, .z = z, .dzo = dz,
                  .dl = dl, .dp = dp, .scale = scale};
    run_rows(&a);
}

/* ---- prior draws and the summary -------------------------------------------- */

/* Gumbel-max from p's logits (uniform when NULL): exact one-hot draws. */
static void categorical_prior_sample(float *z, const float *p, const float *unused,
                                     hvae_rng *rng, const hvae_latent_call *c)
{
    (void)unused;
    int64_t K = c->K, groups = c->B * c->d / K;
    categorical_noise(z, rng, c->B * c->d);
    for (int64_t v = 0; v < groups; v++) {
        float *zv = z + v * K;
        int64_t best = 0;
        float mx = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            float a = (p ? p[v * K + k] : 0.0f) + zv[k];
            if (a > mx) {
                mx = a;
                best = k;
            }
        }
        for (int64_t k = 0; k < K; k++)
            zv[k] = k == best ? 1.0f : 0.0f;
    }
}

/* The class probabilities and their logs. */
static void summary_rows(const cat_args *a, int64_t r0, int64_t r1)
{
    const hvae_latent_call *c = a->c;
    int64_t K = c->K;
    float tile[CAT_TILE];
    for (int64_t o = r0 * c->d; o < r1 * c->d; o += K) {
        softmax_group q;
        softmax_sums(&q, a->l + o, NULL, 1.0f, K, tile, NULL);
        float inv_s = 1.0f / q.s, log_s = logf(q.s);
        for (int64_t lo = 0; lo < K; lo += CAT_TILE) {
            int64_t n = tile_size(K, lo);
            const float *e = softmax_tile(&q, lo, n);
            for (int64_t k = 0; k < n; k++) {
                if (a->out)
                    a->out[o + lo + k] = e[k] * inv_s;
                if (a->out2)
                    a->out2[o + lo + k] = a->l[o + lo + k] - q.mx - log_s;
            }
        }
    }
}

static void categorical_summary(float *prob, float *log_prob, const float *l,
                                const float *unused, const hvae_latent_call *c)
{
    (void)unused;
    cat_args a = {.rows = summary_rows, .c = c, .l = l, .out = prob, .out2 = log_prob};
    run_rows(&a);
}

const hvae_latent_family_ops hvae_latent_categorical = {
    .n_heads = 1,
    .top_prior_table = 0,
    .noise = categorical_noise,
    .sample_forward = categorical_sample_forward,
    .sample_backward = categorical_sample_backward,
    .score_backward = categorical_score_backward,
    .kl_forward = categorical_kl_forward,
    .kl_backward = categorical_kl_backward,
    .logratio_forward = categorical_logratio_forward,
    .logratio_backward = categorical_logratio_backward,
    .prior_sample = categorical_prior_sample,
    .summary = categorical_summary,
};
