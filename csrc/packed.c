/*
 * packed.c -- the evaluation calls' weights, packed once per parameter
 * version: every dense layer's W in the order the row-wise kernel reads its
 * panels (hvae_rowwise_pack), kept with the workspace.
 *
 * Why: the row-wise kernel otherwise copies each 16-column panel of W into
 * an L1 buffer for every block of 96 rows, and those copies read W 64 bytes
 * at a time n_out floats apart, a stride the hardware prefetchers do not
 * follow across pages: about a tenth of the products' time at W2's shapes.
 * Packed, a panel is one contiguous run that streams in.
 *
 * When to repack: the parameters change by training steps, by loads, and by
 * writes through the views Python holds of the parameter buffer, which C
 * never hears of. So no version counter can be trusted; instead each call
 * that uses the packed copy compares the block parameters with the copy
 * they were packed from (one memcmp of W2's 4.4 MB: 0.09 ms from the
 * cache, several times that when the data has pushed the parameters out to
 * memory) and repacks when anything differs. That exact check is paid once
 * per call, on one thread, and costs about a nanosecond per parameter,
 * while packing saves some 5% of a row's two FLOPs per parameter, about a
 * picosecond per row per parameter on one thread: it pays from some
 * thousand rows up, whatever the model's size, and more on two threads.
 * So only calls of HVAE_PACKED_MIN_ROWS rows or more use the packed
 * weights; smaller calls copy panels as before. Either way each output
 * element is the same chain of FMAs, so results do not depend on which was
 * used.
 *
 * Memory: two copies of the block parameters (packed, and the source),
 * allocated at the first large evaluation call, never in a training step.
 */
#include "hvae.h"
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#define HVAE_PACKED_MIN_ROWS 2048

struct hvae_packed_cache {
    float *packed;      /* every layer's panels, 32-byte aligned */
    float *source;      /* the block parameters they were packed from */
    int64_t n_source;   /* floats of them: the parameters before the prior's */
    int valid;          /* packed and source hold a version */
    /* Each block's (enc[0..T), then dec[0..T)) layers: the offsets in
     * packed of W's data rows [0] and condition rows [1], -1 for none. */
    int64_t offset[2 * HVAE_MAX_LAYERS][HVAE_MAX_DENSE][2];
};

void hvae_packed_free(hvae_packed_cache *c)
{
    if (!c)
        return;
    free(c->packed);
    free(c->source);
    free(c);
}

static const hvae_block *block_of(const hvae_model *m, int32_t e)
{
    int32_t T = m->config.n_layers;
    return e < T ? &m->enc[e] : &m->dec[e - T];
}

/* Offsets of every layer's packed panels; the total through *total (0 when
 * nothing can be packed). */
static void packed_layout(const hvae_model *m, hvae_packed_cache *c, int64_t *total)
{
    int64_t at = 0;
    for (int32_t e = 0; e < 2 * m->config.n_layers; e++) {
        const hvae_block *blk = block_of(m, e);
        for (int32_t l = 0; l < blk->n_hidden + blk->n_heads; l++) {
            const hvae_dense_layer *L = &blk->layer[l];
            int64_t sizes[2] = {hvae_rowwise_packed_floats(L->n_data, L->n_out),
                                hvae_rowwise_packed_floats(L->n_in - L->n_data, L->n_out)};
            for (int part = 0; part < 2; part++) {
                c->offset[e][l][part] = sizes[part] > 0 ? at : -1;
                /* whole 64-byte lines per panel set: every offset stays
                 * 32-byte aligned */
                at += (sizes[part] + 15) / 16 * 16;
            }
        }
    }
    *total = at;
}

static void repack(const hvae_model *m, hvae_packed_cache *c)
{
    for (int32_t e = 0; e < 2 * m->config.n_layers; e++) {
        const hvae_block *blk = block_of(m, e);
        for (int32_t l = 0; l < blk->n_hidden + blk->n_heads; l++) {
            const hvae_dense_layer *L = &blk->layer[l];
            const float *W = m->params + L->W;
            if (c->offset[e][l][0] >= 0)
                hvae_rowwise_pack(c->packed + c->offset[e][l][0], W, L->n_data, L->n_out);
            if (c->offset[e][l][1] >= 0)
                hvae_rowwise_pack(c->packed + c->offset[e][l][1], W + L->n_data * L->n_out,
                                  L->n_in - L->n_data, L->n_out);
        }
    }
    memcpy(c->source, m->params, (size_t)c->n_source * sizeof(float));
    c->valid = 1;
}

static hvae_packed_cache *packed_create(const hvae_model *m)
{
    hvae_packed_cache *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    int64_t total;
    packed_layout(m, c, &total);
    c->n_source = m->prior_offset;
    if (total <= 0 || c->n_source <= 0) {
        free(c);
        return NULL;
    }
    /* aligned_alloc wants a multiple of the alignment */
    size_t bytes = ((size_t)total * sizeof(float) + 63) / 64 * 64;
    c->packed = aligned_alloc(64, bytes);
    c->source = malloc((size_t)c->n_source * sizeof(float));
    if (!c->packed || !c->source) {
        hvae_packed_free(c);
        return NULL;
    }
    return c;
}

void hvae_packed_begin(const hvae_model *m, hvae_workspace *ws, int64_t n_rows)
{
    ws->packed_on = 0;
    if (n_rows < HVAE_PACKED_MIN_ROWS)
        return;
    if (!ws->packed) {
        ws->packed = packed_create(m);
        if (!ws->packed)
            return; /* no kernel to read them, or no memory: copy panels */
    }
    hvae_packed_cache *c = ws->packed;
    if (!c->valid || memcmp(c->source, m->params, (size_t)c->n_source * sizeof(float)) != 0)
        repack(m, c);
    ws->packed_on = 1;
}

void hvae_packed_end(hvae_workspace *ws)
{
    ws->packed_on = 0;
}

const float *hvae_packed_layer(const hvae_workspace *ws, const hvae_block *blk, int32_t l,
                               int part)
{
    if (!ws->packed_on)
        return NULL;
    const hvae_model *m = ws->model;
    int32_t T = m->config.n_layers;
    int32_t e;
    if (blk >= m->enc && blk < m->enc + T)
        e = (int32_t)(blk - m->enc);
    else if (blk >= m->dec && blk < m->dec + T)
        e = T + (int32_t)(blk - m->dec);
    else
        return NULL;
    int64_t at = ws->packed->offset[e][l][part];
    return at >= 0 ? ws->packed->packed + at : NULL;
}
