/*
 * hvaemodule.c -- hvae._core: the CPython + NumPy binding of the C core.
 * The only file that includes Python.h.
 *
 * Conventions: inputs are converted to float32 C-contiguous at most once
 * (an array that already is one is used in place); every output is allocated
 * and every input validated before the GIL is released; inside
 * Py_BEGIN_ALLOW_THREADS only a status is set, and the exception is raised
 * after the GIL is back. Every exit goes through one `done:` label that
 * drops references.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <pythread.h>

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hvae.h"

/* Rows per chunk for evaluation calls on many rows. */
#define EVAL_ROWS 1024

static PyObject *DivergenceError;

/* ---- names ---------------------------------------------------------------
 * Every option chosen by name comes from the C core's name functions (see
 * "Names" in hvae.h): the module's tuples (ACTIVATIONS, ...) and the
 * parser below read the same list, so what Python reports is what it
 * accepts. */

#define NAME_OF(fn, type) \
    static const char *fn##_int(int v) { return fn((type)v); }
NAME_OF(hvae_likelihood_name, hvae_likelihood)
NAME_OF(hvae_activation_name, hvae_activation)
NAME_OF(hvae_decoder_variance_name, hvae_decoder_variance)
NAME_OF(hvae_inference_name, hvae_inference)
NAME_OF(hvae_objective_name, hvae_objective)
NAME_OF(hvae_optimizer_name, hvae_optimizer_kind)
NAME_OF(hvae_prior_name, hvae_prior_kind)
NAME_OF(hvae_latent_family_name, hvae_latent_family)
NAME_OF(hvae_markov_kl_name, hvae_markov_kl)

typedef enum {
    CHOICE_LIKELIHOOD, CHOICE_ACTIVATION, CHOICE_DECODER_VARIANCE,
    CHOICE_INFERENCE, CHOICE_OBJECTIVE, CHOICE_OPTIMIZER, CHOICE_PRIOR,
    CHOICE_LATENT_FAMILY, CHOICE_MARKOV_KL, N_CHOICES
} choice_kind;

typedef struct {
    const char *attribute;      /* the module's tuple of names */
    const char *(*name)(int);   /* the C core's name function */
    int count;                  /* its enum's *_COUNT */
} choice_list;

static const choice_list choices[N_CHOICES] = {
    {"LIKELIHOODS", hvae_likelihood_name_int, HVAE_LIKELIHOOD_COUNT},
    {"ACTIVATIONS", hvae_activation_name_int, HVAE_ACT_COUNT},
    {"DECODER_VARIANCES", hvae_decoder_variance_name_int, HVAE_DECODER_VARIANCE_COUNT},
    {"INFERENCES", hvae_inference_name_int, HVAE_INFERENCE_COUNT},
    {"OBJECTIVES", hvae_objective_name_int, HVAE_OBJECTIVE_COUNT},
    {"OPTIMIZERS", hvae_optimizer_name_int, HVAE_OPTIMIZER_COUNT},
    {"PRIORS", hvae_prior_name_int, HVAE_PRIOR_COUNT},
    {"LATENT_FAMILIES", hvae_latent_family_name_int, HVAE_LATENT_FAMILY_COUNT},
    {"MARKOV_KLS", hvae_markov_kl_name_int, HVAE_MARKOV_KL_COUNT},
};

/* The name of value v of a choice (values come from a validated config). */
static const char *choice_name(choice_kind kind, int v)
{
    const char *name = choices[kind].name(v);
    return name ? name : "?";
}

/* The names of a choice as a tuple of str, in enum order. */
static PyObject *choice_tuple(choice_kind kind)
{
    PyObject *names = PyList_New(0);
    for (int v = 0; names && v < choices[kind].count; v++) {
        const char *name = choices[kind].name(v);
        PyObject *s = name ? PyUnicode_FromString(name) : NULL;
        if (name && (!s || PyList_Append(names, s) < 0))
            Py_CLEAR(names);
        Py_XDECREF(s);
    }
    PyObject *tuple = names ? PyList_AsTuple(names) : NULL;
    Py_XDECREF(names);
    return tuple;
}

/* The enum value named `value`, or -1 with a ValueError that lists every
 * accepted name. */
static int parse_choice(const char *what, const char *value, choice_kind kind)
{
    const choice_list *list = &choices[kind];
    for (int v = 0; v < list->count; v++)
        if (list->name(v) && strcmp(value, list->name(v)) == 0)
            return v;
    PyObject *options = PyUnicode_FromString("");
    for (int v = 0, listed = 0; v < list->count && options; v++) {
        if (!list->name(v))
            continue;
        PyObject *next = PyUnicode_FromFormat("%U%s'%s'", options,
                                              listed++ ? ", " : "", list->name(v));
        Py_SETREF(options, next);
    }
    if (options)
        PyErr_Format(PyExc_ValueError, "%s must be one of %U; got '%s'", what,
                     options, value);
    Py_XDECREF(options);
    return -1;
}

/* O& converter: an int in 0..2**64 - 1 (seeds, generator words); anything
 * else is refused instead of wrapping. */
static int u64_converter(PyObject *obj, void *out)
{
    PyObject *index = PyNumber_Index(obj); /* ints and NumPy integers */
    if (!index) {
        PyErr_Format(PyExc_TypeError, "a seed must be an int; got %.100s",
                     Py_TYPE(obj)->tp_name);
        return 0;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "a seed must be an int in [0, 2**64); got %R", obj);
        return 0;
    }
    *(unsigned long long *)out = v;
    return 1;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- the Model type ------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    hvae_model *model;
    hvae_workspace *ws;
    hvae_optimizer *opt; /* NULL until the first fit */
    hvae_rng rng;        /* training noise, shuffling and sampling */
    PyThread_type_lock lock;
    unsigned long owner; /* the thread holding lock, 0 when free */
    int n_threads;       /* 0: leave the BLAS thread count alone */
    unsigned long long seed;
    hvae_optimizer *disc_opt; /* the discriminator's, NULL until needed */
    hvae_discriminator_stats disc_stats; /* since the last epoch record */
} ModelObject;

static PyTypeObject ModelType;

static int raise_status(hvae_status status, const char *context)
{
    PyObject *type = PyExc_RuntimeError;
    switch (status) {
    case HVAE_OK: return 0;
    case HVAE_ERR_OUT_OF_MEMORY:
    case HVAE_ERR_SIZE_OVERFLOW: type = PyExc_MemoryError; break;
    case HVAE_ERR_INVALID_ARGUMENT:
    case HVAE_ERR_NONFINITE_INPUT:
    case HVAE_ERR_INPUT_RANGE:
    case HVAE_ERR_BATCH_TOO_LARGE: type = PyExc_ValueError; break;
    case HVAE_ERR_NONFINITE_LOSS: type = DivergenceError; break;
    default: break;
    }
    PyErr_Format(type, "%s: %s", context, hvae_status_to_string(status));
    return -1;
}

/* One call at a time: a call from another thread waits for the model (with
 * the GIL released, and Ctrl-C still heard); a call from inside the
 * model's own fit (a callback or progress function) is refused, as it
 * would wait for itself. */
static int model_enter(ModelObject *self)
{
    if (!self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Model is not initialised");
        return -1;
    }
    unsigned long me = PyThread_get_thread_ident();
    if (self->owner == me) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this Model is busy in a call of this thread (a fit whose "
                        "callback or progress function called back into it); use "
                        "the model after that call returns");
        return -1;
    }
    while (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        PyLockStatus got;
        Py_BEGIN_ALLOW_THREADS
        got = PyThread_acquire_lock_timed(self->lock, 50000, 0); /* 50 ms */
        Py_END_ALLOW_THREADS
        if (got == PY_LOCK_ACQUIRED)
            break;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
    self->owner = me;
    if (self->n_threads > 0)
        hvae_set_num_threads(self->n_threads);
    return 0;
}

static void model_leave(ModelObject *self)
{
    self->owner = 0;
    PyThread_release_lock(self->lock);
}

static int ensure_workspace(ModelObject *self, int64_t rows)
{
    if (self->ws && hvae_workspace_max_rows(self->ws) >= rows)
        return 0;
    hvae_workspace *ws = NULL;
    hvae_status st = hvae_workspace_create(self->model, rows, &ws);
    if (st != HVAE_OK)
        return raise_status(st, "cannot allocate the workspace");
    hvae_workspace_free(self->ws);
    self->ws = ws;
    return 0;
}

static int64_t eval_rows(int64_t n)
{
    return n < EVAL_ROWS ? (n > 0 ? n : 1) : EVAL_ROWS;
}

/* Workspace rows for n data rows of S draws each: whole rows' draws, about
 * EVAL_ROWS in all, at least one row's. */
static int64_t sampled_rows(int64_t n, int64_t S)
{
    int64_t rows = EVAL_ROWS / S;
    rows = rows < 1 ? 1 : rows;
    rows = rows < n ? rows : (n > 0 ? n : 1);
    return rows * S;
}

/*
 * Converts obj to a float32 C-contiguous 2-D array of `cols` columns with at
 * least one row. An array that already is one is returned as is (a new
 * reference, no copy); anything else is converted once.
 */
static PyArrayObject *as_matrix(PyObject *obj, int64_t cols, const char *name)
{
    PyArrayObject *any = (PyArrayObject *)PyArray_FROM_O(obj);
    if (!any)
        return NULL;
    char kind = PyArray_DESCR(any)->kind;
    if (kind == 'c' || kind == 'U' || kind == 'S' || kind == 'V' ||
        kind == 'M' || kind == 'm') {
        PyErr_Format(PyExc_ValueError,
                     "%s must hold real numbers; got an array of dtype %R",
                     name, (PyObject *)PyArray_DESCR(any));
        Py_DECREF(any);
        return NULL;
    }
    if (PyArray_NDIM(any) != 2) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be a 2-D array (n_samples, n_features); got %d "
                     "dimension(s)", name, PyArray_NDIM(any));
        Py_DECREF(any);
        return NULL;
    }
    if (PyArray_DIM(any, 0) < 1) {
        PyErr_Format(PyExc_ValueError, "%s has 0 rows; at least 1 is required",
                     name);
        Py_DECREF(any);
        return NULL;
    }
    if (cols >= 0 && PyArray_DIM(any, 1) != cols) {
        PyErr_Format(PyExc_ValueError, "%s has %zd columns, but the model "
                     "expects %lld", name, (Py_ssize_t)PyArray_DIM(any, 1),
                     (long long)cols);
        Py_DECREF(any);
        return NULL;
    }
    PyArrayObject *arr = (PyArrayObject *)PyArray_FROM_OTF(
        (PyObject *)any, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    Py_DECREF(any);
    return arr;
}

/* as_matrix, then refuses NaN and infinity (inputs that are not data rows:
 * latent codes, noise, conditions). */
static PyArrayObject *as_finite_matrix(PyObject *obj, int64_t cols, const char *name)
{
    PyArrayObject *arr = as_matrix(obj, cols, name);
    if (!arr)
        return NULL;
    const float *v = PyArray_DATA(arr);
    int bad = 0;
    for (npy_intp k = 0; k < PyArray_SIZE(arr); k++)
        bad |= !(v[k] - v[k] == 0.0f);
    if (bad) {
        PyErr_Format(PyExc_ValueError, "%s contains NaN or infinity", name);
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* Raises the ValueError for a failed hvae_model_check_data. */
static void raise_bad_data(ModelObject *self, hvae_status st, PyArrayObject *x,
                           int64_t bad, const char *name)
{
    int64_t D = hvae_model_config(self->model)->n_features;
    double value = ((const float *)PyArray_DATA(x))[bad];
    char text[64];
    snprintf(text, sizeof text, "%g", value);
    if (st == HVAE_ERR_NONFINITE_INPUT)
        PyErr_Format(PyExc_ValueError,
                     "%s contains NaN or infinity (first at row %lld, column "
                     "%lld)", name, (long long)(bad / D), (long long)(bad % D));
    else if (st == HVAE_ERR_INPUT_MAGNITUDE)
        PyErr_Format(PyExc_ValueError,
                     "%s has values beyond +-1e12 (%s[%lld, %lld] = %s), too large "
                     "for float32 training; rescale the data", name, name,
                     (long long)(bad / D), (long long)(bad % D), text);
    else
        PyErr_Format(PyExc_ValueError,
                     "%s has values outside [0, 1] (%s[%lld, %lld] = %s), but the "
                     "Bernoulli likelihood needs data in [0, 1]; rescale it or "
                     "use likelihood='gaussian'", name, name,
                     (long long)(bad / D), (long long)(bad % D), text);
}

/* X as a validated float32 matrix of the model's width, checked for NaN,
 * inf and (Bernoulli) range. */
static PyArrayObject *as_data(ModelObject *self, PyObject *obj, const char *name)
{
    int64_t D = hvae_model_config(self->model)->n_features;
    PyArrayObject *x = as_matrix(obj, D, name);
    if (!x)
        return NULL;
    int64_t bad = 0;
    hvae_status st;
    Py_BEGIN_ALLOW_THREADS
    st = hvae_model_check_data(self->model, PyArray_DATA(x), PyArray_DIM(x, 0),
                               &bad);
    Py_END_ALLOW_THREADS
    if (st != HVAE_OK) {
        raise_bad_data(self, st, x, bad, name);
        Py_DECREF(x);
        return NULL;
    }
    return x;
}

/* cond: None for a model without conditions; otherwise (n, C), finite.
 * Returns 0 with *out NULL for None, 1 with a new reference, -1 on error. */
static int as_cond(ModelObject *self, PyObject *obj, int64_t n, PyArrayObject **out)
{
    int64_t C = hvae_model_config(self->model)->n_conditions;
    *out = NULL;
    if (obj == NULL || obj == Py_None) {
        if (C == 0 || n == 0)
            return 0;
        PyErr_Format(PyExc_ValueError, "this model is conditional (%lld condition "
                     "columns): pass cond, an array of shape (n, %lld)",
                     (long long)C, (long long)C);
        return -1;
    }
    if (C == 0) {
        PyErr_SetString(PyExc_ValueError, "this model has no conditions "
                        "(n_conditions=0); cond must be None");
        return -1;
    }
    PyArrayObject *c = as_finite_matrix(obj, C, "cond");
    if (!c)
        return -1;
    if (PyArray_DIM(c, 0) != n) {
        PyErr_Format(PyExc_ValueError, "cond has %zd rows but there are %lld "
                     "samples", (Py_ssize_t)PyArray_DIM(c, 0), (long long)n);
        Py_DECREF(c);
        return -1;
    }
    *out = c;
    return 1;
}

static const float *cond_data(PyArrayObject *c)
{
    return c ? PyArray_DATA(c) : NULL;
}

/* noise: None, or a sequence of T arrays (n, d_i). Fills arrays[] (new
 * references) and ptrs[]; returns 1 if noise was given, 0 if None, -1 on
 * error. */
static int as_noise(ModelObject *self, PyObject *noise, int64_t n,
                    PyArrayObject **arrays, const float **ptrs)
{
    const hvae_config *c = hvae_model_config(self->model);
    if (noise == NULL || noise == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(noise, "noise must be None or a list of "
                                           "one array per latent layer");
    if (!seq)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != c->n_layers) {
        PyErr_Format(PyExc_ValueError, "noise must hold %d arrays (one per "
                     "latent layer); got %zd", (int)c->n_layers,
                     PySequence_Fast_GET_SIZE(seq));
        Py_DECREF(seq);
        return -1;
    }
    for (int32_t i = 0; i < c->n_layers; i++) {
        char name[32];
        snprintf(name, sizeof name, "noise[%d]", (int)i);
        arrays[i] = as_finite_matrix(PySequence_Fast_GET_ITEM(seq, i),
                                     c->latent_dims[i], name);
        if (arrays[i] && PyArray_DIM(arrays[i], 0) != n) {
            PyErr_Format(PyExc_ValueError, "%s has %zd rows but X has %lld",
                         name, (Py_ssize_t)PyArray_DIM(arrays[i], 0),
                         (long long)n);
            Py_CLEAR(arrays[i]);
        }
        if (!arrays[i]) {
            for (int32_t k = 0; k < i; k++)
                Py_CLEAR(arrays[k]);
            Py_DECREF(seq);
            return -1;
        }
        ptrs[i] = PyArray_DATA(arrays[i]);
    }
    Py_DECREF(seq);
    return 1;
}

/* Finite inputs give finite outputs unless the parameters are not finite or
 * absurdly large (set through the writable view): never return NaN silently. */
static int check_outputs(const char *what, int finite)
{
    if (finite)
        return 0;
    PyErr_Format(PyExc_FloatingPointError,
                 "%s produced NaN or infinity: the model's parameters are not finite "
                 "or far too large (if they were set through the parameters view, "
                 "restore them or call init_parameters())", what);
    return -1;
}


static int doubles_finite(PyObject *arr)
{
    const double *v = PyArray_DATA((PyArrayObject *)arr);
    int bad = 0;
    for (npy_intp k = 0; k < PyArray_SIZE((PyArrayObject *)arr); k++)
        bad |= !(v[k] - v[k] == 0.0);
    return !bad;
}

static int floats_finite(PyObject *arr)
{
    return hvae_all_finite(PyArray_DATA((PyArrayObject *)arr),
                           PyArray_SIZE((PyArrayObject *)arr));
}

static PyObject *new_array(int nd, npy_intp *dims, int typenum)
{
    return PyArray_SimpleNew(nd, dims, typenum);
}

/* ---- the shared call frame -------------------------------------------------
 * Every method that runs the model on data has the same frame (pydata/
 * bottleneck's templates): its own argument parsing, then frame_enter takes
 * the model and converts the inputs (X or latent codes, the noise, the
 * conditions) and sizes the workspace; frame_output allocates outputs;
 * frame_call runs the C call with the GIL released and raises its status
 * once the GIL is back; frame_leave releases the model and every reference.
 * A method is then the few lines particular to it. */

typedef enum {
    WS_EVAL,     /* eval_rows(n): chunks of EVAL_ROWS */
    WS_SAMPLED,  /* sampled_rows(n, draws): whole rows' draws */
    WS_FIXED     /* EVAL_ROWS (streamed draws) */
} workspace_rows;

typedef struct {
    ModelObject *self;
    int entered;
    PyArrayObject *x, *cond;     /* X (or Z) and the conditions */
    npy_intp n;                  /* rows of X */
    int have_noise;
    PyArrayObject *noise_arrays[HVAE_MAX_LAYERS];
    const float *noise[HVAE_MAX_LAYERS];
    PyObject *out[2 * HVAE_MAX_LAYERS];
    int n_out;
} call_frame;

/* What frame_enter converts: X as data rows (checked like training data) or,
 * with latent, as codes of d_1 columns (finite); noise (NULL: none) of
 * n * draws rows; cond. */
typedef struct {
    PyObject *X;
    int latent;
    PyObject *noise;
    int64_t draws;
    PyObject *cond;
    workspace_rows rows;
} frame_inputs;

static int frame_enter(call_frame *f, ModelObject *self, const frame_inputs *in)
{
    memset(f, 0, sizeof *f);
    f->self = self;
    if (model_enter(self) < 0)
        return -1;
    f->entered = 1;
    const hvae_config *c = hvae_model_config(self->model);
    f->x = in->latent ? as_finite_matrix(in->X, c->latent_dims[0], "Z")
                      : as_data(self, in->X, "X");
    if (!f->x)
        return -1;
    f->n = PyArray_DIM(f->x, 0);
    if (in->noise) {
        f->have_noise = as_noise(self, in->noise, f->n * in->draws, f->noise_arrays, f->noise);
        if (f->have_noise < 0)
            return -1;
    }
    if (as_cond(self, in->cond, f->n, &f->cond) < 0)
        return -1;
    int64_t rows = in->rows == WS_EVAL      ? eval_rows(f->n)
                   : in->rows == WS_SAMPLED ? sampled_rows(f->n, in->draws)
                                            : EVAL_ROWS;
    return ensure_workspace(self, rows);
}

/* A new output array owned by the frame (NULL with MemoryError). */
static PyObject *frame_output(call_frame *f, int nd, npy_intp *dims, int typenum)
{
    PyObject *arr = new_array(nd, dims, typenum);
    if (arr)
        f->out[f->n_out++] = arr;
    return arr;
}

static void *out_data(PyObject *arr)
{
    return arr ? PyArray_DATA((PyArrayObject *)arr) : NULL;
}

/* The C part of a call: runs without the GIL, touches no Python object. */
typedef hvae_status (*frame_body)(call_frame *f, void *args);

static int frame_call(call_frame *f, frame_body body, void *args, const char *failed)
{
    hvae_status st;
    Py_BEGIN_ALLOW_THREADS
    st = body(f, args);
    Py_END_ALLOW_THREADS
    return raise_status(st, failed);
}

static void frame_leave(call_frame *f)
{
    if (f->entered)
        model_leave(f->self);
    Py_XDECREF(f->x);
    Py_XDECREF(f->cond);
    for (int32_t i = 0; i < HVAE_MAX_LAYERS; i++)
        Py_XDECREF(f->noise_arrays[i]);
    for (int k = 0; k < f->n_out; k++)
        Py_XDECREF(f->out[k]);
}

/* Model's latent_dims (1..HVAE_MAX_LAYERS sizes) and hidden_dims (up to
 * HVAE_MAX_HIDDEN), every size in 1..2**31 - 1. */
static int parse_dims(PyObject *latent_obj, PyObject *hidden_obj, int64_t *latent,
                      Py_ssize_t *n_latent, int64_t *hidden, Py_ssize_t *n_hidden)
{
    int status = -1;
    PyObject *latent_seq = PySequence_Fast(latent_obj, "latent_dims must be a sequence of ints");
    PyObject *hidden_seq = latent_seq ? PySequence_Fast(hidden_obj, "hidden_dims must be a sequence of ints") : NULL;
    if (!hidden_seq)
        goto done;
    Py_ssize_t T = PySequence_Fast_GET_SIZE(latent_seq);
    Py_ssize_t H = PySequence_Fast_GET_SIZE(hidden_seq);
    if (T < 1 || T > HVAE_MAX_LAYERS) {
        PyErr_Format(PyExc_ValueError, "latent_dims must have 1 to %d entries; "
                     "got %zd", HVAE_MAX_LAYERS, T);
        goto done;
    }
    if (H > HVAE_MAX_HIDDEN) {
        PyErr_Format(PyExc_ValueError, "hidden_dims may have at most %d entries; "
                     "got %zd", HVAE_MAX_HIDDEN, H);
        goto done;
    }
    for (Py_ssize_t k = 0; k < T + H; k++) {
        PyObject *item = k < T ? PySequence_Fast_GET_ITEM(latent_seq, k)
                               : PySequence_Fast_GET_ITEM(hidden_seq, k - T);
        long long v = PyLong_AsLongLong(item);
        if (v == -1 && PyErr_Occurred())
            goto done;
        if (v < 1 || v > INT_MAX) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] must be a positive size "
                         "below 2**31; got %lld", k < T ? "latent_dims" : "hidden_dims",
                         k < T ? k : k - T, v);
            goto done;
        }
        if (k < T)
            latent[k] = v;
        else
            hidden[k - T] = v;
    }
    *n_latent = T;
    *n_hidden = H;
    status = 0;
done:
    Py_XDECREF(latent_seq);
    Py_XDECREF(hidden_seq);
    return status;
}

static PyObject *Model_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n_features", "latent_dims", "hidden_dims",
                             "likelihood", "activation", "decoder_variance",
                             "seed", "inference", "n_conditions", "markov_kl",
                             "prior", "latent_family", "discriminator_hidden", NULL};
    long long n_features;
    PyObject *disc_obj = Py_None;
    PyObject *latent_obj, *hidden_obj;
    const char *likelihood = "gaussian", *activation = "relu",
               *variance = "learned", *inference = "markov";
    const char *markov_kl = "sampled", *prior = "standard", *latent_family = "gaussian";
    long long n_conditions = 0;
    unsigned long long seed = 0;
    ModelObject *self = NULL;
    int64_t latent[HVAE_MAX_LAYERS], hidden[HVAE_MAX_HIDDEN];

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LOO|sssO&sLsssO:Model", kwlist,
                                     &n_features, &latent_obj, &hidden_obj,
                                     &likelihood, &activation, &variance,
                                     u64_converter, &seed,
                                     &inference, &n_conditions, &markov_kl,
                                     &prior, &latent_family, &disc_obj))
        return NULL;
    int lik = parse_choice("likelihood", likelihood, CHOICE_LIKELIHOOD);
    int act = lik < 0 ? -1 : parse_choice("activation", activation, CHOICE_ACTIVATION);
    int var = act < 0 ? -1 : parse_choice("decoder_variance", variance, CHOICE_DECODER_VARIANCE);
    int inf = var < 0 ? -1 : parse_choice("inference", inference, CHOICE_INFERENCE);
    int mkl = inf < 0 ? -1 : parse_choice("markov_kl", markov_kl, CHOICE_MARKOV_KL);
    int pri = mkl < 0 ? -1 : parse_choice("prior", prior, CHOICE_PRIOR);
    int fam = pri < 0 ? -1 : parse_choice("latent_family", latent_family, CHOICE_LATENT_FAMILY);
    if (fam < 0)
        return NULL;
    if (n_conditions < 0 || n_conditions > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "n_conditions must be between 0 and 2**31 - 1; "
                     "got %lld", n_conditions);
        return NULL;
    }
    if (n_features < 1 || n_features > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "n_features must be between 1 and 2**31 - 1; "
                     "got %lld", n_features);
        return NULL;
    }
    Py_ssize_t T, H, DH = 0;
    if (parse_dims(latent_obj, hidden_obj, latent, &T, hidden, &H) < 0)
        return NULL;
    /* discriminator_hidden: None for no discriminator, else its hidden
     * widths (parsed as parse_dims parses hidden_dims). */
    int64_t disc_hidden[HVAE_MAX_HIDDEN];
    if (disc_obj != Py_None &&
        parse_dims(latent_obj, disc_obj, latent, &T, disc_hidden, &DH) < 0)
        return NULL;

    self = (ModelObject *)type->tp_alloc(type, 0);
    if (!self)
        goto done;
    self->lock = PyThread_allocate_lock();
    if (!self->lock) {
        PyErr_NoMemory();
        Py_CLEAR(self);
        goto done;
    }
    hvae_config cfg = hvae_config_default(n_features, (int32_t)T, latent,
                                          (int32_t)H, hidden);
    cfg.likelihood = (hvae_likelihood)lik;
    cfg.activation = (hvae_activation)act;
    cfg.decoder_variance = (hvae_decoder_variance)var;
    cfg.inference = (hvae_inference)inf;
    cfg.markov_kl = (hvae_markov_kl)mkl;
    cfg.prior = (hvae_prior_kind)pri;
    cfg.latent_family = (hvae_latent_family)fam;
    cfg.n_conditions = n_conditions;
    /* The density-ratio prior always has one: without discriminator_hidden,
     * two hidden layers of 256. */
    cfg.discriminator = disc_obj != Py_None || cfg.prior == HVAE_PRIOR_DENSITY_RATIO;
    if (disc_obj == Py_None && cfg.discriminator) {
        DH = 2;
        disc_hidden[0] = disc_hidden[1] = 256;
    }
    cfg.discriminator_n_hidden = (int32_t)DH;
    memcpy(cfg.discriminator_hidden, disc_hidden, (size_t)DH * sizeof(int64_t));
    hvae_status st = hvae_model_create(&cfg, &self->model);
    if (st != HVAE_OK) {
        raise_status(st, "cannot create the model (its parameters, gradients "
                         "and optimizer moments need 16 bytes per parameter)");
        Py_CLEAR(self);
        goto done;
    }
    self->seed = seed;
    hvae_model_init(self->model, seed);
    /* The training stream is decorrelated from the initialisation stream. */
    hvae_rng_seed(&self->rng, seed ^ 0x9e3779b97f4a7c15ULL);
done:
    return (PyObject *)self;
}

static void Model_dealloc(ModelObject *self)
{
    hvae_optimizer_free(self->opt);
    hvae_optimizer_free(self->disc_opt);
    hvae_workspace_free(self->ws);
    hvae_model_free(self->model);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A float32 view of n floats at p, keeping self alive. */
static PyObject *view_of(ModelObject *self, float *p, int nd, npy_intp *dims)
{
    PyObject *arr = PyArray_SimpleNewFromData(nd, dims, NPY_FLOAT32, p);
    if (!arr)
        return NULL;
    Py_INCREF(self);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)self) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

static PyObject *Model_get_parameters(ModelObject *self, void *closure)
{
    (void)closure;
    npy_intp n = hvae_model_n_params(self->model);
    return view_of(self, hvae_model_params(self->model), 1, &n);
}

static PyObject *Model_named_parameters(ModelObject *self, PyObject *noargs)
{
    (void)noargs;
    int32_t count = hvae_model_n_tensors(self->model);
    PyObject *list = PyList_New(count);
    if (!list)
        return NULL;
    for (int32_t t = 0; t < count; t++) {
        hvae_tensor_info info;
        hvae_model_tensor(self->model, t, &info);
        npy_intp dims[2] = {info.rows, info.cols};
        PyObject *view = view_of(self, hvae_model_params(self->model) + info.offset,
                                 info.cols > 0 ? 2 : 1, dims);
        PyObject *pair = view ? Py_BuildValue("(sN)", info.name, view) : NULL;
        if (!pair) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, t, pair);
    }
    return list;
}

static PyObject *dims_tuple(const int64_t *dims, int32_t n)
{
    PyObject *tuple = PyTuple_New(n);
    for (int32_t i = 0; tuple && i < n; i++) {
        PyObject *v = PyLong_FromLongLong(dims[i]);
        if (!v) {
            Py_CLEAR(tuple);
            break;
        }
        PyTuple_SET_ITEM(tuple, i, v);
    }
    return tuple;
}

static PyObject *Model_get_config_value(ModelObject *self, void *closure)
{
    const hvae_config *c = hvae_model_config(self->model);
    const char *which = closure;
    if (strcmp(which, "n_features") == 0)
        return PyLong_FromLongLong(c->n_features);
    if (strcmp(which, "latent_dims") == 0)
        return dims_tuple(c->latent_dims, c->n_layers);
    if (strcmp(which, "hidden_dims") == 0)
        return dims_tuple(c->hidden_dims, c->n_hidden);
    if (strcmp(which, "likelihood") == 0)
        return PyUnicode_FromString(choice_name(CHOICE_LIKELIHOOD, c->likelihood));
    if (strcmp(which, "activation") == 0)
        return PyUnicode_FromString(choice_name(CHOICE_ACTIVATION, c->activation));
    if (strcmp(which, "decoder_variance") == 0)
        return PyUnicode_FromString(choice_name(CHOICE_DECODER_VARIANCE, c->decoder_variance));
    if (strcmp(which, "n_params") == 0)
        return PyLong_FromLongLong(hvae_model_n_params(self->model));
    if (strcmp(which, "n_layers") == 0)
        return PyLong_FromLong(c->n_layers);
    if (strcmp(which, "inference") == 0)
        return PyUnicode_FromString(choice_name(CHOICE_INFERENCE, c->inference));
    if (strcmp(which, "markov_kl") == 0)
        return PyUnicode_FromString(choice_name(CHOICE_MARKOV_KL, c->markov_kl));
    if (strcmp(which, "prior") == 0)
        return PyUnicode_FromString(choice_name(CHOICE_PRIOR, c->prior));
    if (strcmp(which, "latent_family") == 0)
        return PyUnicode_FromString(choice_name(CHOICE_LATENT_FAMILY, c->latent_family));
    if (strcmp(which, "n_conditions") == 0)
        return PyLong_FromLongLong(c->n_conditions);
    if (strcmp(which, "seed") == 0)
        return PyLong_FromUnsignedLongLong(self->seed);
    if (strcmp(which, "discriminator_hidden") == 0) {
        if (!c->discriminator)
            Py_RETURN_NONE;
        return dims_tuple(c->discriminator_hidden, c->discriminator_n_hidden);
    }
    if (strcmp(which, "optimizer_steps") == 0)
        return PyLong_FromLongLong(self->opt ? *hvae_optimizer_step_count(self->opt) : 0);
    PyErr_SetString(PyExc_AttributeError, which);
    return NULL;
}

static PyObject *Model_get_n_threads(ModelObject *self, void *closure)
{
    (void)closure;
    if (self->n_threads > 0)
        return PyLong_FromLong(self->n_threads);
    Py_RETURN_NONE;
}

static int Model_set_n_threads(ModelObject *self, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL || value == Py_None) {
        self->n_threads = 0;
        return 0;
    }
    long n = PyLong_AsLong(value);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n < 1 || n > 1024) {
        PyErr_Format(PyExc_ValueError, "n_threads must be None or between 1 "
                     "and 1024; got %ld", n);
        return -1;
    }
    self->n_threads = (int)n;
    return 0;
}

static PyObject *rng_tuple(const hvae_rng *rng)
{
    return Py_BuildValue("(KKKK)", (unsigned long long)rng->s[0],
                         (unsigned long long)rng->s[1], (unsigned long long)rng->s[2],
                         (unsigned long long)rng->s[3]);
}

static PyObject *Model_get_rng_state(ModelObject *self, void *closure)
{
    (void)closure;
    if (model_enter(self) < 0)
        return NULL;
    PyObject *state = rng_tuple(&self->rng);
    model_leave(self);
    return state;
}

/* Sets the generator from a tuple of 4 words; the caller holds the model. */
static int set_rng_state(ModelObject *self, PyObject *value)
{
    unsigned long long s[4];
    if (!value || !PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 4) {
        PyErr_SetString(PyExc_TypeError, "rng_state must be a tuple of 4 ints in [0, 2**64)");
        return -1;
    }
    for (int i = 0; i < 4; i++)
        if (!u64_converter(PyTuple_GET_ITEM(value, i), &s[i]))
            return -1;
    if ((s[0] | s[1] | s[2] | s[3]) == 0) {
        PyErr_SetString(PyExc_ValueError, "rng_state must not be all zeros");
        return -1;
    }
    for (int i = 0; i < 4; i++)
        self->rng.s[i] = s[i];
    return 0;
}

static int Model_set_rng_state(ModelObject *self, PyObject *value, void *closure)
{
    (void)closure;
    if (model_enter(self) < 0)
        return -1;
    int r = set_rng_state(self, value);
    model_leave(self);
    return r;
}

/* A setting must be finite in float32, where the core uses it. */
static int check_float32(const char *name, double value, double low, int low_inclusive)
{
    float f = (float)value;
    if (!isfinite(f) || (low_inclusive ? !(value >= low) : !(value > low))) {
        char text[64];
        snprintf(text, sizeof text, "%g", value);
        PyErr_Format(PyExc_ValueError, "%s must be a number %s %g that is finite in "
                     "float32 (below 3.4e38); got %s", name, low_inclusive ? ">=" : ">",
                     low, text);
        return -1;
    }
    return 0;
}

/* beta-TCVAE's settings: tcvae_weights None (off) or (alpha, beta, gamma),
 * each >= 0; n_data >= 0 (0: the rows of the call). */
static int parse_tcvae(PyObject *weights, double n_data, hvae_objective_options *o)
{
    if (weights != Py_None) {
        double w[3];
        if (!PyArg_ParseTuple(weights, "ddd;tcvae_weights must be None or (alpha, beta, gamma)",
                              &w[0], &w[1], &w[2]))
            return -1;
        for (int k = 0; k < 3; k++)
            if (check_float32("each of tcvae_weights", w[k], 0.0, 1) < 0)
                return -1;
        o->tcvae = 1;
        for (int k = 0; k < 3; k++)
            o->tcvae_weights[k] = (float)w[k];
        if (o->objective != HVAE_OBJECTIVE_ELBO || o->free_bits != 0.0f ||
            o->tc_weight != 0.0f) {
            PyErr_SetString(PyExc_ValueError, "tcvae_weights (beta-TCVAE) needs the ELBO "
                            "objective, free_bits=0 and tc_weight=0");
            return -1;
        }
    }
    if (check_float32("n_data", n_data, 0.0, 1) < 0)
        return -1;
    o->n_data = n_data;
    return 0;
}

static int parse_objective(const char *objective, long long n_samples, double beta,
                           double free_bits, hvae_objective_options *out)
{
    int kind = parse_choice("objective", objective, CHOICE_OBJECTIVE);
    if (kind < 0)
        return -1;
    if (n_samples < 1 || n_samples > (1 << 20)) {
        PyErr_Format(PyExc_ValueError, "n_samples must be between 1 and 2**20; got %lld",
                     n_samples);
        return -1;
    }
    if (check_float32("beta", beta, 0.0, 1) < 0 ||
        check_float32("free_bits", free_bits, 0.0, 1) < 0)
        return -1;
    if (kind == HVAE_OBJECTIVE_IWAE && (beta != 1.0 || free_bits != 0.0)) {
        PyErr_SetString(PyExc_ValueError, "objective='iwae' is the importance-weighted "
                        "bound itself: it takes no beta (must be 1) or free_bits (must be 0)");
        return -1;
    }
    *out = hvae_objective_options_default();
    out->objective = (hvae_objective)kind;
    out->n_samples = (int32_t)n_samples;
    out->beta = (float)beta;
    out->free_bits = (float)free_bits;
    return 0;
}

typedef struct {
    unsigned long long seed;
    PyObject *elbo, *rec, *kl;
} elbo_call;

static hvae_status elbo_body(call_frame *f, void *args)
{
    elbo_call *a = args;
    return hvae_elbo(f->self->model, f->self->ws, PyArray_DATA(f->x), cond_data(f->cond),
                     f->n, f->have_noise ? f->noise : NULL, a->seed, out_data(a->elbo),
                     out_data(a->rec), out_data(a->kl));
}

/* elbo(X, noise=None, seed=0, cond=None) and elbo_terms share this. */
static PyObject *elbo_impl(ModelObject *self, PyObject *args, PyObject *kwds,
                           int want_terms)
{
    static char *kwlist[] = {"X", "noise", "seed", "cond", NULL};
    frame_inputs in = {NULL, 0, Py_None, 1, Py_None, WS_EVAL};
    elbo_call a = {0, NULL, NULL, NULL};
    call_frame f;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO&O", kwlist, &in.X, &in.noise,
                                     u64_converter, &a.seed, &in.cond))
        return NULL;
    if (frame_enter(&f, self, &in) < 0)
        goto done;
    npy_intp kl_dims[2] = {f.n, hvae_model_config(self->model)->n_layers};
    a.elbo = frame_output(&f, 1, &f.n, NPY_FLOAT64);
    if (want_terms) {
        a.rec = frame_output(&f, 1, &f.n, NPY_FLOAT64);
        a.kl = frame_output(&f, 2, kl_dims, NPY_FLOAT64);
    }
    if (!a.elbo || (want_terms && (!a.rec || !a.kl)) ||
        frame_call(&f, elbo_body, &a, "elbo failed") < 0 ||
        check_outputs("elbo", doubles_finite(a.elbo)) < 0)
        goto done;
    result = want_terms ? Py_BuildValue("{sOsOsO}", "elbo", a.elbo, "reconstruction",
                                        a.rec, "kl", a.kl)
                        : Py_NewRef(a.elbo);
done:
    frame_leave(&f);
    return result;
}

typedef struct {
    unsigned long long seed;
    double n_data;
    PyObject *mi, *tc, *dw;
} tcvae_call;

static hvae_status tcvae_body(call_frame *f, void *args)
{
    tcvae_call *a = args;
    return hvae_tcvae_terms(f->self->model, f->self->ws, PyArray_DATA(f->x),
                            cond_data(f->cond), f->n, f->have_noise ? f->noise : NULL,
                            a->seed, a->n_data, out_data(a->mi), out_data(a->tc),
                            out_data(a->dw));
}

/* tcvae_terms(X, n_data, noise=None, seed=0, cond=None): X one minibatch. */
static PyObject *Model_tcvae_terms(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"X", "n_data", "noise", "seed", "cond", NULL};
    frame_inputs in = {NULL, 0, Py_None, 1, Py_None, WS_SAMPLED};
    tcvae_call a = {0, 0.0, NULL, NULL, NULL};
    call_frame f;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Od|OO&O:tcvae_terms", kwlist, &in.X,
                                     &a.n_data, &in.noise, u64_converter, &a.seed, &in.cond))
        return NULL;
    if (!(a.n_data >= 1.0) || !isfinite(a.n_data)) {
        PyErr_SetString(PyExc_ValueError, "n_data must be a finite number >= 1");
        return NULL;
    }
    if (frame_enter(&f, self, &in) < 0)
        goto done;
    a.mi = frame_output(&f, 1, &f.n, NPY_FLOAT64);
    a.tc = frame_output(&f, 1, &f.n, NPY_FLOAT64);
    a.dw = frame_output(&f, 1, &f.n, NPY_FLOAT64);
    if (!a.mi || !a.tc || !a.dw || frame_call(&f, tcvae_body, &a, "tcvae_terms failed") < 0)
        goto done;
    result = Py_BuildValue("{sOsOsO}", "mutual_information", a.mi, "total_correlation", a.tc,
                           "dimension_wise_kl", a.dw);
done:
    frame_leave(&f);
    return result;
}

static PyObject *Model_elbo(ModelObject *self, PyObject *args, PyObject *kwds)
{
    return elbo_impl(self, args, kwds, 0);
}

static PyObject *Model_elbo_terms(ModelObject *self, PyObject *args, PyObject *kwds)
{
    return elbo_impl(self, args, kwds, 1);
}

typedef struct {
    unsigned long long seed;
    hvae_objective_options objective;
    hvae_epoch_stats stats;
    PyObject *grad;
} loss_and_grad_call;

static hvae_status loss_and_grad_body(call_frame *f, void *args)
{
    loss_and_grad_call *a = args;
    hvae_model *model = f->self->model;
    hvae_status st = hvae_loss_and_grad(model, f->self->ws, PyArray_DATA(f->x),
                                        cond_data(f->cond), f->n,
                                        f->have_noise ? f->noise : NULL, a->seed,
                                        &a->objective, &a->stats);
    if (st == HVAE_OK)
        memcpy(out_data(a->grad), hvae_model_grads(model),
               (size_t)hvae_model_n_params(model) * sizeof(float));
    return st;
}

static PyObject *Model_loss_and_grad(ModelObject *self, PyObject *args,
                                     PyObject *kwds)
{
    static char *kwlist[] = {"X", "noise", "seed", "beta", "objective",
                             "n_samples", "free_bits", "cond", "tc_weight", "tcvae_weights",
                             "n_data", NULL};
    frame_inputs in = {NULL, 0, Py_None, 1, Py_None, WS_SAMPLED};
    loss_and_grad_call a = {0};
    double beta = 1.0, free_bits = 0.0, tc_weight = 0.0, n_data = 0.0;
    PyObject *tcvae = Py_None;
    const char *objective = "elbo";
    int n_samples = 1;
    call_frame f;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO&dsidOdOd", kwlist, &in.X,
                                     &in.noise, u64_converter, &a.seed, &beta, &objective,
                                     &n_samples, &free_bits, &in.cond, &tc_weight, &tcvae,
                                     &n_data))
        return NULL;
    if (parse_objective(objective, n_samples, beta, free_bits, &a.objective) < 0 ||
        check_float32("tc_weight", tc_weight, 0.0, 1) < 0)
        return NULL;
    a.objective.tc_weight = (float)tc_weight;
    if (parse_tcvae(tcvae, n_data, &a.objective) < 0)
        return NULL;
    in.draws = n_samples;
    if (frame_enter(&f, self, &in) < 0)
        goto done;
    npy_intp P = hvae_model_n_params(self->model);
    a.grad = frame_output(&f, 1, &P, NPY_FLOAT32);
    if (!a.grad || frame_call(&f, loss_and_grad_body, &a, "loss_and_grad failed") < 0 ||
        check_outputs("loss_and_grad", isfinite(a.stats.loss) && floats_finite(a.grad)) < 0)
        goto done;
    result = Py_BuildValue("(dO)", a.stats.loss, a.grad);
done:
    frame_leave(&f);
    return result;
}

typedef struct {
    PyThreadState *saved; /* the released thread state, NULL with the GIL */
    int check_signals;    /* running in the main thread */
    int interrupted;      /* PyErr_CheckSignals, progress or reduce raised */
    PyObject *progress;   /* progress(n_rows) after each minibatch, or NULL */
    /* Data-parallel fit: reduce(grads or None, values) sums both in place
     * across the processes; grads views the model's gradient buffer, and
     * values[k] (k = 0, 1) carry the doubles of the two kinds of call. */
    PyObject *reduce;
    PyObject *grads;
    PyObject *values[2];
} fit_ctx;

static unsigned long main_thread_ident;

/* Between minibatches: take the GIL back only to see whether Ctrl-C was
 * pressed, which stops after this minibatch with a valid model. Python runs
 * signal handlers in the main thread only, so other threads skip the round
 * trip. */
static int fit_batch_hook(void *ctx_ptr, int64_t batch_index,
                          const hvae_epoch_stats *batch)
{
    (void)batch_index;
    fit_ctx *ctx = ctx_ptr;
    if (!ctx->check_signals && !ctx->progress)
        return 0;
    PyEval_RestoreThread(ctx->saved);
    int stop = 0;
    if (ctx->check_signals && PyErr_CheckSignals() < 0)
        stop = 1;
    if (!stop && ctx->progress) {
        PyObject *r = PyObject_CallFunction(ctx->progress, "L",
                                            (long long)batch->n_rows);
        if (!r)
            stop = 1;
        Py_XDECREF(r);
    }
    ctx->interrupted = stop;
    ctx->saved = PyEval_SaveThread();
    return stop;
}

/* Data-parallel fit: hands the C buffers to the Python reduction (which
 * reads and writes them in place, zero-copy for the gradient). */
static int fit_reduce_hook(void *ctx_ptr, float *grads, int64_t n_grads,
                           double *values, int64_t n_values)
{
    (void)n_grads;
    fit_ctx *ctx = ctx_ptr;
    PyEval_RestoreThread(ctx->saved);
    PyArrayObject *v = (PyArrayObject *)ctx->values[grads != NULL];
    int stop = PyArray_DIM(v, 0) != n_values; /* cannot happen: sized by fit */
    if (stop)
        PyErr_SetString(PyExc_SystemError, "reduce: unexpected number of values");
    PyObject *r = NULL;
    if (!stop) {
        memcpy(PyArray_DATA(v), values, (size_t)n_values * sizeof(double));
        r = PyObject_CallFunctionObjArgs(ctx->reduce, grads ? ctx->grads : Py_None,
                                         (PyObject *)v, NULL);
        stop = r == NULL;
    }
    if (!stop)
        memcpy(values, PyArray_DATA(v), (size_t)n_values * sizeof(double));
    Py_XDECREF(r);
    ctx->interrupted = stop;
    ctx->saved = PyEval_SaveThread();
    return stop;
}

static PyObject *Model_log_likelihood(ModelObject *self, PyObject *args,
                                      PyObject *kwds)
{
    static char *kwlist[] = {"X", "n_samples", "seed", "cond", NULL};
    frame_inputs in = {NULL, 0, NULL, 1, Py_None, WS_FIXED};
    long long n_samples = 1000;
    unsigned long long seed = 0;
    call_frame f;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|LO&O", kwlist, &in.X, &n_samples,
                                     u64_converter, &seed, &in.cond))
        return NULL;
    if (n_samples < 1) {
        PyErr_Format(PyExc_ValueError, "n_samples must be >= 1; got %lld", n_samples);
        return NULL;
    }
    if (frame_enter(&f, self, &in) < 0)
        goto done;
    PyObject *out = frame_output(&f, 1, &f.n, NPY_FLOAT64);
    if (!out)
        goto done;
    /* A long estimate stays interruptible: Ctrl-C is checked between passes,
     * so this call releases the GIL itself rather than through frame_call. */
    fit_ctx ctx = {NULL, PyThread_get_thread_ident() == main_thread_ident, 0, NULL,
                   NULL, NULL, {NULL, NULL}};
    ctx.saved = PyEval_SaveThread();
    hvae_status st = hvae_log_likelihood(self->model, self->ws, PyArray_DATA(f.x),
                                         cond_data(f.cond), f.n, n_samples, seed,
                                         out_data(out), fit_batch_hook, &ctx);
    PyEval_RestoreThread(ctx.saved);
    if (st == HVAE_ERR_STOPPED && ctx.interrupted)
        goto done; /* the KeyboardInterrupt is set */
    if (raise_status(st, "log_likelihood failed") < 0 ||
        check_outputs("log_likelihood", doubles_finite(out)) < 0)
        goto done;
    result = Py_NewRef(out);
done:
    frame_leave(&f);
    return result;
}

typedef struct {
    float *mu[HVAE_MAX_LAYERS], *logvar[HVAE_MAX_LAYERS];
} encode_call;

static hvae_status encode_body(call_frame *f, void *args)
{
    encode_call *a = args;
    return hvae_encode(f->self->model, f->self->ws, PyArray_DATA(f->x), cond_data(f->cond),
                       f->n, a->mu, a->logvar);
}

static PyObject *Model_encode(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"X", "cond", NULL};
    frame_inputs in = {NULL, 0, NULL, 1, Py_None, WS_EVAL};
    encode_call a;
    call_frame f;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O", kwlist, &in.X, &in.cond))
        return NULL;
    if (frame_enter(&f, self, &in) < 0)
        goto done;
    const hvae_config *c = hvae_model_config(self->model);
    int32_t T = c->n_layers;
    for (int32_t i = 0; i < T; i++) {
        npy_intp dims[2] = {f.n, c->latent_dims[i]};
        a.mu[i] = out_data(frame_output(&f, 2, dims, NPY_FLOAT32));
        a.logvar[i] = out_data(frame_output(&f, 2, dims, NPY_FLOAT32));
        if (!a.mu[i] || !a.logvar[i])
            goto done;
    }
    if (frame_call(&f, encode_body, &a, "encode failed") < 0)
        goto done;
    for (int32_t i = 0; i < T; i++) /* out: mu_1, logvar_1, mu_2, ... */
        if (check_outputs("encode", floats_finite(f.out[2 * i]) &&
                                        floats_finite(f.out[2 * i + 1])) < 0)
            goto done;
    result = PyList_New(T);
    for (int32_t i = 0; result && i < T; i++) {
        PyObject *pair = PyTuple_Pack(2, f.out[2 * i], f.out[2 * i + 1]);
        if (!pair) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, pair);
    }
done:
    frame_leave(&f);
    return result;
}

typedef struct {
    PyObject *mean, *logvar;
} decode_call;

static hvae_status decode_body(call_frame *f, void *args)
{
    decode_call *a = args;
    return hvae_decode(f->self->model, f->self->ws, PyArray_DATA(f->x), cond_data(f->cond),
                       f->n, out_data(a->mean), out_data(a->logvar));
}

static PyObject *Model_decode(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"Z", "return_logvar", "cond", NULL};
    frame_inputs in = {NULL, 1, NULL, 1, Py_None, WS_EVAL};
    decode_call a = {NULL, NULL};
    int return_logvar = 0;
    call_frame f;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|pO", kwlist, &in.X, &return_logvar,
                                     &in.cond))
        return NULL;
    if (frame_enter(&f, self, &in) < 0)
        goto done;
    npy_intp dims[2] = {f.n, hvae_model_config(self->model)->n_features};
    a.mean = frame_output(&f, 2, dims, NPY_FLOAT32);
    if (return_logvar)
        a.logvar = frame_output(&f, 2, dims, NPY_FLOAT32);
    if (!a.mean || (return_logvar && !a.logvar) ||
        frame_call(&f, decode_body, &a, "decode failed") < 0 ||
        check_outputs("decode", floats_finite(a.mean) &&
                                    (!a.logvar || floats_finite(a.logvar))) < 0)
        goto done;
    result = return_logvar ? PyTuple_Pack(2, a.mean, a.logvar) : Py_NewRef(a.mean);
done:
    frame_leave(&f);
    return result;
}

static PyObject *Model_sample(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n", "seed", "observation_noise", "cond", NULL};
    long long n;
    PyObject *seed_obj = Py_None, *out = NULL, *cond_obj = Py_None;
    PyArrayObject *cond = NULL;
    int observation_noise = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "L|OpO", kwlist, &n, &seed_obj,
                                     &observation_noise, &cond_obj))
        return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "n must be >= 0; got %lld", n);
        return NULL;
    }
    hvae_rng local;
    if (seed_obj != Py_None) {
        unsigned long long seed;
        if (!u64_converter(seed_obj, &seed))
            return NULL;
        hvae_rng_seed(&local, seed);
    }
    if (model_enter(self) < 0)
        return NULL;
    const hvae_config *c = hvae_model_config(self->model);
    npy_intp dims[2] = {(npy_intp)n, c->n_features};
    if (as_cond(self, cond_obj, n, &cond) < 0 || ensure_workspace(self, eval_rows(n)) < 0)
        goto done;
    out = new_array(2, dims, NPY_FLOAT32);
    if (!out)
        goto done;
    hvae_rng *rng = seed_obj != Py_None ? &local : &self->rng;
    hvae_status st;
    Py_BEGIN_ALLOW_THREADS
    st = hvae_sample(self->model, self->ws, rng, n, cond_data(cond), observation_noise,
                     PyArray_DATA((PyArrayObject *)out));
    Py_END_ALLOW_THREADS
    if (raise_status(st, "sample failed") < 0 || check_outputs("sample", floats_finite(out)) < 0)
        Py_CLEAR(out);
done:
    model_leave(self);
    Py_XDECREF(cond);
    return out;
}

/* ---- fit ----------------------------------------------------------------- */


/* The keys of fit's per-epoch records, in record order; exported as
 * EPOCH_RECORD_KEYS. */
enum {
    RECORD_LOSS, RECORD_OBJECTIVE, RECORD_ELBO, RECORD_RECONSTRUCTION,
    RECORD_KL, RECORD_SECONDS, RECORD_N_BATCHES, RECORD_N_ROWS,
    RECORD_COMPLETE, RECORD_DISC_LOG_RATIO, RECORD_DISC_ACCURACY, N_RECORD_KEYS
};
/* The records of a model with a discriminator also have the last
 * N_DISC_RECORD_KEYS keys (exported as DISCRIMINATOR_RECORD_KEYS):
 * discriminator_log_ratio, the epoch's mean over its steps of T on the real
 * rows (FactorVAE: the total-correlation estimate; density-ratio prior: of
 * KL(q(z_T) || N(0, I))), and discriminator_accuracy, its mean accuracy. */
#define N_DISC_RECORD_KEYS 2
static const char *const epoch_record_keys[N_RECORD_KEYS] = {
    "loss", "objective", "elbo", "reconstruction", "kl", "seconds",
    "n_batches", "n_rows", "complete", "discriminator_log_ratio",
    "discriminator_accuracy"};

/* One epoch's record: a dict of epoch_record_keys; kl a list of T floats. */
static PyObject *epoch_record(const hvae_epoch_stats *s, int32_t T,
                              double seconds, int complete,
                              const hvae_discriminator_stats *ds)
{
    PyObject *values[N_RECORD_KEYS] = {NULL};
    PyObject *record = NULL;
    values[RECORD_LOSS] = PyFloat_FromDouble(s->loss);
    values[RECORD_OBJECTIVE] = PyFloat_FromDouble(s->objective);
    values[RECORD_ELBO] = PyFloat_FromDouble(s->elbo);
    values[RECORD_RECONSTRUCTION] = PyFloat_FromDouble(s->reconstruction);
    values[RECORD_KL] = PyList_New(T);
    for (int32_t i = 0; values[RECORD_KL] && i < T; i++) {
        PyObject *v = PyFloat_FromDouble(s->kl[i]);
        if (!v) {
            Py_CLEAR(values[RECORD_KL]);
            break;
        }
        PyList_SET_ITEM(values[RECORD_KL], i, v);
    }
    values[RECORD_SECONDS] = PyFloat_FromDouble(seconds);
    values[RECORD_N_BATCHES] = PyLong_FromLongLong((long long)s->n_batches);
    values[RECORD_N_ROWS] = PyLong_FromLongLong((long long)s->n_rows);
    values[RECORD_COMPLETE] = Py_NewRef(complete ? Py_True : Py_False);
    double steps = ds && ds->n_steps > 0 ? (double)ds->n_steps : NAN;
    values[RECORD_DISC_LOG_RATIO] = PyFloat_FromDouble(ds ? ds->log_ratio / steps : NAN);
    values[RECORD_DISC_ACCURACY] = PyFloat_FromDouble(ds ? ds->accuracy / steps : NAN);
    for (int k = 0; k < N_RECORD_KEYS; k++)
        if (!values[k])
            goto done;
    record = PyDict_New();
    int n_keys = ds ? N_RECORD_KEYS : N_RECORD_KEYS - N_DISC_RECORD_KEYS;
    for (int k = 0; record && k < n_keys; k++)
        if (PyDict_SetItemString(record, epoch_record_keys[k], values[k]) < 0)
            Py_CLEAR(record);
done:
    for (int k = 0; k < N_RECORD_KEYS; k++)
        Py_XDECREF(values[k]);
    return record;
}

/* fit's arguments, parsed and checked before the model is entered. */
typedef struct {
    PyObject *X, *callback, *history, *progress, *cond, *reduce;
    long long n_epochs, batch_size, n_global, shard_start;
    double learning_rate;
    int shuffle;
    hvae_objective_options objective;
    hvae_optimizer_config optimizer;
    hvae_optimizer_config disc_optimizer; /* the discriminator's Adam */
} fit_args;

static int parse_fit_args(PyObject *args, PyObject *kwds, fit_args *a)
{
    static char *kwlist[] = {"X", "n_epochs", "batch_size", "learning_rate",
                             "optimizer", "beta", "shuffle", "callback",
                             "history", "weight_decay", "momentum", "adam_betas",
                             "adam_eps", "progress", "objective", "n_samples",
                             "free_bits", "cond", "reduce", "n_global",
                             "shard_start", "tc_weight", "discriminator_learning_rate",
                             "discriminator_betas", "tcvae_weights", "n_data", NULL};
    PyObject *tcvae = Py_None;
    double n_data = 0.0;
    const char *objective = "elbo", *optimizer = "adam";
    double tc_weight = 0.0, disc_lr = 1e-4, disc_beta1 = 0.5, disc_beta2 = 0.9;
    long long n_samples = 1;
    double beta = 1.0, weight_decay = 0.0, momentum = 0.0, free_bits = 0.0;
    double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
    *a = (fit_args){NULL, Py_None, NULL, Py_None, Py_None, Py_None, 1, 128, 0, 0, 1e-3, 1,
                    hvae_objective_options_default(), hvae_optimizer_config_default(),
                    hvae_optimizer_config_default()};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|LLdsdpOO!dd(dd)dOsLdOOLLdd(dd)Od:fit", kwlist,
                                     &a->X, &a->n_epochs, &a->batch_size, &a->learning_rate,
                                     &optimizer, &beta, &a->shuffle, &a->callback,
                                     &PyList_Type, &a->history, &weight_decay,
                                     &momentum, &beta1, &beta2, &adam_eps,
                                     &a->progress, &objective, &n_samples, &free_bits,
                                     &a->cond, &a->reduce, &a->n_global, &a->shard_start,
                                     &tc_weight, &disc_lr, &disc_beta1, &disc_beta2,
                                     &tcvae, &n_data))
        return -1;
    if (parse_objective(objective, n_samples, beta, free_bits, &a->objective) < 0)
        return -1;
    if (check_float32("tc_weight", tc_weight, 0.0, 1) < 0 ||
        check_float32("discriminator_learning_rate", disc_lr, 0.0, 0) < 0)
        return -1;
    if (!(disc_beta1 >= 0.0 && (float)disc_beta1 < 1.0f) ||
        !(disc_beta2 >= 0.0 && (float)disc_beta2 < 1.0f)) {
        PyErr_SetString(PyExc_ValueError, "discriminator_betas must lie in [0, 1)");
        return -1;
    }
    a->objective.tc_weight = (float)tc_weight;
    if (parse_tcvae(tcvae, n_data, &a->objective) < 0)
        return -1;
    if (a->objective.tcvae && a->reduce != Py_None) {
        PyErr_SetString(PyExc_ValueError, "beta-TCVAE (tcvae_weights) is not supported in "
                        "data-parallel training: its minibatch-weighted sampling needs every "
                        "row of the minibatch on one process");
        return -1;
    }
    a->disc_optimizer.learning_rate = (float)disc_lr;
    a->disc_optimizer.beta1 = (float)disc_beta1;
    a->disc_optimizer.beta2 = (float)disc_beta2;
    int kind = parse_choice("optimizer", optimizer, CHOICE_OPTIMIZER);
    if (kind < 0)
        return -1;
    if (a->n_epochs < 0 || a->batch_size < 1 || a->batch_size > (1LL << 30)) {
        PyErr_Format(PyExc_ValueError, "n_epochs must be >= 0 and batch_size "
                     ">= 1; got n_epochs=%lld, batch_size=%lld", a->n_epochs,
                     a->batch_size);
        return -1;
    }
    if (check_float32("learning_rate", a->learning_rate, 0.0, 0) < 0 ||
        check_float32("weight_decay", weight_decay, 0.0, 1) < 0 ||
        check_float32("adam_eps", adam_eps, 0.0, 1) < 0)
        return -1;
    if (!(momentum >= 0.0 && (float)momentum < 1.0f) ||
        !(beta1 >= 0.0 && (float)beta1 < 1.0f) || !(beta2 >= 0.0 && (float)beta2 < 1.0f)) {
        PyErr_SetString(PyExc_ValueError, "momentum and adam_betas must lie in [0, 1) "
                        "(in float32: 1 - 1e-8 rounds to 1)");
        return -1;
    }
    if ((a->callback != Py_None && !PyCallable_Check(a->callback)) ||
        (a->progress != Py_None && !PyCallable_Check(a->progress)) ||
        (a->reduce != Py_None && !PyCallable_Check(a->reduce))) {
        PyErr_SetString(PyExc_TypeError, "callback, progress and reduce must be "
                        "callable or None");
        return -1;
    }
    int parallel = a->reduce != Py_None;
    if (parallel ? a->n_global < 1 || a->shard_start < 0
                 : a->n_global != 0 || a->shard_start != 0) {
        PyErr_Format(PyExc_ValueError, "data-parallel fit: pass reduce with n_global "
                     ">= 1 and shard_start >= 0, or none of the three; got n_global=%lld, "
                     "shard_start=%lld", a->n_global, a->shard_start);
        return -1;
    }
    hvae_optimizer_config *oc = &a->optimizer;
    oc->kind = (hvae_optimizer_kind)kind;
    oc->learning_rate = (float)a->learning_rate;
    oc->weight_decay = (float)weight_decay;
    oc->momentum = (float)momentum;
    oc->beta1 = (float)beta1;
    oc->beta2 = (float)beta2;
    oc->eps = (float)adam_eps;
    return 0;
}

/* Data-parallel fit: the reduce hook's buffers, sized by the C core
 * (hvae_train_reduce_values), and the shard in the training options. */
static int fit_setup_parallel(ModelObject *self, const fit_args *a, fit_ctx *ctx,
                              hvae_train_options *to)
{
    npy_intp P = hvae_model_n_params(self->model);
    npy_intp n_values[2] = {hvae_train_reduce_values(self->model, 0),
                            hvae_train_reduce_values(self->model, 1)};
    ctx->reduce = a->reduce;
    ctx->grads = view_of(self, hvae_model_grads(self->model), 1, &P);
    ctx->values[0] = new_array(1, &n_values[0], NPY_FLOAT64);
    ctx->values[1] = new_array(1, &n_values[1], NPY_FLOAT64);
    if (!ctx->grads || !ctx->values[0] || !ctx->values[1])
        return -1;
    to->n_global = a->n_global;
    to->shard_start = a->shard_start;
    to->reduce = fit_reduce_hook;
    to->reduce_ctx = ctx;
    return 0;
}

/* The discriminator's step after each of the model's (hvae_train_options.
 * aux_step): on the minibatch's top-layer samples against their
 * counterpart (hvae_discriminator_step), its stats into the model's. */
static int fit_aux_step(void *ctx, hvae_model *model, const hvae_workspace *ws,
                        const float *x, const float *cond, int64_t B)
{
    (void)x;
    (void)cond;
    ModelObject *self = ctx;
    int32_t top = hvae_model_config(model)->n_layers - 1;
    return hvae_discriminator_step(model, self->disc_opt, &self->rng,
                                   hvae_workspace_samples(ws, top), NULL, B,
                                   &self->disc_stats) != HVAE_OK;
}

/* A fit of a model with a discriminator: refuses what it cannot do, and
 * readies the discriminator's optimizer (its moments kept across fits). */
static int fit_setup_discriminator(ModelObject *self, const fit_args *a,
                                   hvae_train_options *to)
{
    const hvae_config *c = hvae_model_config(self->model);
    if (!c->discriminator) {
        if (a->objective.tc_weight != 0.0f) {
            PyErr_SetString(PyExc_ValueError, "tc_weight > 0 needs a discriminator: create "
                            "the Model with discriminator_hidden");
            return -1;
        }
        return 0;
    }
    if (a->objective.tc_weight != 0.0f &&
        (c->prior == HVAE_PRIOR_DENSITY_RATIO || a->objective.objective != HVAE_OBJECTIVE_ELBO)) {
        PyErr_SetString(PyExc_ValueError, "tc_weight > 0 (FactorVAE) needs the ELBO objective "
                        "and a prior other than 'density_ratio', whose discriminator "
                        "estimates another ratio");
        return -1;
    }
    if (a->reduce != Py_None) {
        PyErr_SetString(PyExc_ValueError, "data-parallel training of a model with a "
                        "discriminator is not supported (its gradient is not reduced "
                        "across processes)");
        return -1;
    }
    if (a->optimizer.weight_decay != 0.0f) {
        PyErr_SetString(PyExc_ValueError, "weight_decay must be 0 for a model with a "
                        "discriminator: the model's optimizer would shrink the "
                        "discriminator's weights, which share its buffer");
        return -1;
    }
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    oc.learning_rate = a->disc_optimizer.learning_rate;
    oc.beta1 = a->disc_optimizer.beta1;
    oc.beta2 = a->disc_optimizer.beta2;
    hvae_status st = self->disc_opt
        ? hvae_optimizer_configure(self->disc_opt, &oc)
        : hvae_optimizer_create_for(hvae_discriminator_n_params(self->model), &oc,
                                    &self->disc_opt);
    if (raise_status(st, "cannot set up the discriminator's optimizer") < 0)
        return -1;
    to->aux_step = fit_aux_step;
    to->aux_ctx = self;
    return 0;
}

/* After an epoch that applied steps (or completed): its record into the
 * returned list and history, then the callback (complete epochs only).
 * Returns 0 to go on, 1 when the callback returned False, -1 on error. */
static int fit_record_epoch(const fit_args *a, PyObject *records, long long epoch,
                            const hvae_epoch_stats *stats, int32_t T, double seconds,
                            int complete, hvae_discriminator_stats *ds, int has_disc)
{
    PyObject *rec = epoch_record(stats, T, seconds, complete, has_disc ? ds : NULL);
    memset(ds, 0, sizeof *ds);
    if (!rec || PyList_Append(records, rec) < 0 ||
        (a->history && PyList_Append(a->history, rec) < 0)) {
        Py_XDECREF(rec);
        return -1;
    }
    int outcome = 0;
    if (complete && a->callback != Py_None) {
        PyObject *r = PyObject_CallFunction(a->callback, "LO", epoch, rec);
        outcome = !r ? -1 : r == Py_False;
        Py_XDECREF(r);
    }
    Py_DECREF(rec);
    return outcome;
}

/* The exception for an epoch that ended with status st (set, returning -1),
 * or 0 when training may go on. */
static int fit_raise_epoch_status(hvae_status st, const fit_ctx *ctx, long long epoch,
                                  const hvae_epoch_stats *stats, double learning_rate)
{
    if (st == HVAE_ERR_STOPPED && ctx->interrupted)
        return -1; /* KeyboardInterrupt, a signal handler's or progress's error */
    if (st == HVAE_ERR_NONFINITE_LOSS) {
        char lr_text[32];
        snprintf(lr_text, sizeof lr_text, "%g", learning_rate);
        PyErr_Format(DivergenceError,
                     "the loss, its gradient or the parameters became NaN or "
                     "infinite in epoch %lld of this call, after %lld "
                     "minibatch(es); the model was returned to its state at "
                     "the start of that epoch (parameters, optimizer, random "
                     "generator), so it can be trained on. Lower the learning "
                     "rate (now %s) or rescale the data.", epoch + 1,
                     (long long)stats->n_batches, lr_text);
        return -1;
    }
    return st == HVAE_OK ? 0 : raise_status(st, "fit failed");
}

/* The epochs of a fit, appending their records; -1 with an exception set. */
static int fit_epochs(ModelObject *self, const fit_args *a, PyArrayObject *x,
                      PyArrayObject *cond, int64_t *order, hvae_train_options *to,
                      fit_ctx *ctx, PyObject *records)
{
    int32_t T = hvae_model_config(self->model)->n_layers;
    npy_intp n = PyArray_DIM(x, 0);
    for (long long epoch = 0; epoch < a->n_epochs; epoch++) {
        hvae_epoch_stats stats;
        double t0 = now_seconds();
        ctx->saved = PyEval_SaveThread();
        /* On divergence the C loop returns the model, the optimizer and the
         * generator to their state at the start of the epoch. */
        memset(&self->disc_stats, 0, sizeof self->disc_stats);
        hvae_status st = hvae_train_epoch(self->model, self->ws, self->opt, &self->rng,
                                          PyArray_DATA(x), cond_data(cond), n, order, to,
                                          &stats);
        PyEval_RestoreThread(ctx->saved);
        ctx->saved = NULL;
        double seconds = now_seconds() - t0;
        if (st != HVAE_ERR_NONFINITE_LOSS && (stats.n_batches > 0 || st == HVAE_OK)) {
            int outcome = fit_record_epoch(a, records, epoch, &stats, T, seconds,
                                           st == HVAE_OK, &self->disc_stats,
                                           hvae_model_config(self->model)->discriminator);
            if (outcome != 0)
                return outcome < 0 ? -1 : 0;
        }
        if (fit_raise_epoch_status(st, ctx, epoch, &stats, a->learning_rate) < 0)
            return -1;
    }
    return 0;
}

static PyObject *Model_fit(ModelObject *self, PyObject *args, PyObject *kwds)
{
    fit_args a;
    PyObject *records = NULL;
    PyArrayObject *x = NULL, *cond = NULL;
    int64_t *order = NULL;
    fit_ctx ctx = {NULL, PyThread_get_thread_ident() == main_thread_ident, 0, NULL, NULL,
                   NULL, {NULL, NULL}};
    if (parse_fit_args(args, kwds, &a) < 0 || model_enter(self) < 0)
        return NULL;
    int parallel = a.reduce != Py_None;
    x = as_data(self, a.X, "X");
    if (!x)
        goto done;
    npy_intp n = PyArray_DIM(x, 0);
    if (parallel && a.shard_start > a.n_global - n) {
        PyErr_Format(PyExc_ValueError, "data-parallel fit: this process holds rows "
                     "%lld..%lld, beyond n_global=%lld", a.shard_start,
                     a.shard_start + (long long)n - 1, a.n_global);
        goto done;
    }
    /* The order and the minibatches run over all rows, on every process. */
    int64_t N = parallel ? a.n_global : n;
    int64_t rows = a.batch_size < N ? a.batch_size : N;
    if (as_cond(self, a.cond, n, &cond) < 0 ||
        ensure_workspace(self, rows * a.objective.n_samples) < 0)
        goto done;
    hvae_status st = self->opt ? hvae_optimizer_configure(self->opt, &a.optimizer)
                               : hvae_optimizer_create(self->model, &a.optimizer, &self->opt);
    if (raise_status(st, "cannot set up the optimizer") < 0)
        goto done;
    order = PyMem_RawMalloc((size_t)N * sizeof(int64_t));
    if (!order) {
        PyErr_NoMemory();
        goto done;
    }
    hvae_train_options to = hvae_train_options_default();
    to.batch_size = rows;
    to.objective = a.objective;
    to.shuffle = a.shuffle;
    to.hook = fit_batch_hook;
    to.hook_ctx = &ctx;
    ctx.progress = a.progress == Py_None ? NULL : a.progress;
    records = PyList_New(0);
    if (!records || fit_setup_discriminator(self, &a, &to) < 0 ||
        (parallel && fit_setup_parallel(self, &a, &ctx, &to) < 0) ||
        fit_epochs(self, &a, x, cond, order, &to, &ctx, records) < 0)
        Py_CLEAR(records);
done:
    Py_XDECREF(ctx.grads);
    Py_XDECREF(ctx.values[0]);
    Py_XDECREF(ctx.values[1]);
    model_leave(self);
    PyMem_RawFree(order);
    Py_XDECREF(x);
    Py_XDECREF(cond);
    return records;
}

static PyObject *Model_reset_optimizer(ModelObject *self, PyObject *noargs)
{
    (void)noargs;
    if (model_enter(self) < 0)
        return NULL;
    hvae_optimizer_free(self->opt);
    self->opt = NULL;
    hvae_optimizer_free(self->disc_opt);
    self->disc_opt = NULL;
    model_leave(self);
    Py_RETURN_NONE;
}

static PyObject *Model_init_parameters(ModelObject *self, PyObject *args,
                                       PyObject *kwds)
{
    static char *kwlist[] = {"seed", NULL};
    unsigned long long seed = self->seed;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|O&", kwlist, u64_converter, &seed))
        return NULL;
    if (model_enter(self) < 0)
        return NULL;
    hvae_model_init(self->model, seed);
    self->seed = seed;
    hvae_rng_seed(&self->rng, seed ^ 0x9e3779b97f4a7c15ULL);
    hvae_optimizer_free(self->opt);
    self->opt = NULL;
    hvae_optimizer_free(self->disc_opt);
    self->disc_opt = NULL;
    model_leave(self);
    Py_RETURN_NONE;
}

/* ---- pickling ------------------------------------------------------------ */

static PyObject *copy_floats(const float *p, npy_intp n)
{
    PyObject *arr = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    if (arr)
        memcpy(PyArray_DATA((PyArrayObject *)arr), p, (size_t)n * sizeof(float));
    return arr;
}

static PyObject *Model_getstate_locked(ModelObject *self);

/* A consistent snapshot needs the model idle: it waits for a fit to end. */
static PyObject *Model_getstate(ModelObject *self, PyObject *noargs)
{
    (void)noargs;
    if (model_enter(self) < 0)
        return NULL;
    PyObject *state = Model_getstate_locked(self);
    model_leave(self);
    return state;
}

static PyObject *Model_getstate_locked(ModelObject *self)
{
    npy_intp P = hvae_model_n_params(self->model);
    PyObject *opt_state = Py_None;
    Py_INCREF(opt_state);
    if (self->opt) {
        const hvae_optimizer_config *oc = hvae_optimizer_get_config(self->opt);
        float *v = hvae_optimizer_state(self->opt, 1);
        Py_DECREF(opt_state);
        opt_state = Py_BuildValue(
            "{sssdsdsdsdsdsdsLsNsN}", "kind", choice_name(CHOICE_OPTIMIZER, oc->kind),
            "learning_rate", (double)oc->learning_rate, "beta1", (double)oc->beta1,
            "beta2", (double)oc->beta2, "eps", (double)oc->eps, "momentum",
            (double)oc->momentum, "weight_decay", (double)oc->weight_decay,
            "step", (long long)*hvae_optimizer_step_count(self->opt), "m",
            copy_floats(hvae_optimizer_state(self->opt, 0), P), "v",
            v ? copy_floats(v, P) : Py_NewRef(Py_None));
        if (!opt_state)
            return NULL;
    }
    PyObject *rng = rng_tuple(&self->rng);
    PyObject *threads = Model_get_n_threads(self, NULL);
    return Py_BuildValue("{sNsNsNsN}", "parameters",
                         copy_floats(hvae_model_params(self->model), P),
                         "optimizer", opt_state, "rng_state", rng, "n_threads",
                         threads);
}

/* Copies a float sequence of exactly n values into dst. */
static int load_floats(PyObject *obj, float *dst, npy_intp n, const char *what)
{
    PyArrayObject *arr = (PyArrayObject *)PyArray_FROM_OTF(
        obj, NPY_FLOAT32, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_FORCECAST);
    if (!arr)
        return -1;
    if (PyArray_SIZE(arr) != n) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd values; the model needs %zd",
                     what, (Py_ssize_t)PyArray_SIZE(arr), (Py_ssize_t)n);
        Py_DECREF(arr);
        return -1;
    }
    memcpy(dst, PyArray_DATA(arr), (size_t)n * sizeof(float));
    Py_DECREF(arr);
    return 0;
}

static PyObject *dict_item(PyObject *d, const char *key)
{
    PyObject *v = PyDict_GetItemString(d, key); /* borrowed */
    if (!v)
        PyErr_Format(PyExc_ValueError, "Model state lacks '%s'", key);
    return v;
}

static PyObject *Model_setstate(ModelObject *self, PyObject *state)
{
    if (!PyDict_Check(state)) {
        PyErr_SetString(PyExc_TypeError, "Model state must be a dict");
        return NULL;
    }
    if (model_enter(self) < 0)
        return NULL;
    PyObject *result = NULL;
    npy_intp P = hvae_model_n_params(self->model);
    hvae_optimizer *opt = NULL;
    float *params = PyMem_RawMalloc((size_t)P * sizeof(float));
    PyObject *p = dict_item(state, "parameters"), *o, *rng, *threads;
    if (!params) {
        PyErr_NoMemory();
        goto done;
    }
    if (!p || load_floats(p, params, P, "parameters") < 0)
        goto done;
    if (!hvae_all_finite(params, P)) {
        PyErr_SetString(PyExc_ValueError, "Model state's parameters contain NaN or infinity");
        goto done;
    }
    o = dict_item(state, "optimizer");
    rng = o ? dict_item(state, "rng_state") : NULL;
    threads = rng ? dict_item(state, "n_threads") : NULL;
    if (!threads)
        goto done;
    if (o != Py_None && !PyDict_Check(o)) {
        PyErr_Format(PyExc_TypeError, "Model state's 'optimizer' must be None or a dict; "
                     "got %.100s", Py_TYPE(o)->tp_name);
        goto done;
    }
    if (o != Py_None) {
        const char *kind_name;
        hvae_optimizer_config oc = hvae_optimizer_config_default();
        long long step;
        PyObject *m_obj, *v_obj;
        static char *keys[] = {"kind", "learning_rate", "beta1", "beta2", "eps",
                               "momentum", "weight_decay", "step", "m", "v", NULL};
        PyObject *empty = PyTuple_New(0);
        int ok = empty && PyArg_ParseTupleAndKeywords(
            empty, o, "sffffffLOO", keys, &kind_name, &oc.learning_rate,
            &oc.beta1, &oc.beta2, &oc.eps, &oc.momentum, &oc.weight_decay,
            &step, &m_obj, &v_obj);
        Py_XDECREF(empty);
        if (!ok)
            goto done;
        int kind = parse_choice("optimizer kind", kind_name, CHOICE_OPTIMIZER);
        if (kind < 0)
            goto done;
        oc.kind = (hvae_optimizer_kind)kind;
        if (raise_status(hvae_optimizer_create(self->model, &oc, &opt),
                         "invalid optimizer state") < 0 ||
            load_floats(m_obj, hvae_optimizer_state(opt, 0), P, "optimizer m") < 0 ||
            (hvae_optimizer_state(opt, 1) &&
             load_floats(v_obj, hvae_optimizer_state(opt, 1), P, "optimizer v") < 0))
            goto done;
        *hvae_optimizer_step_count(opt) = step;
    }
    if (set_rng_state(self, rng) < 0 ||
        Model_set_n_threads(self, threads, NULL) < 0)
        goto done;
    /* Everything is valid: commit. */
    memcpy(hvae_model_params(self->model), params, (size_t)P * sizeof(float));
    hvae_optimizer_free(self->opt);
    self->opt = opt;
    opt = NULL;
    result = Py_NewRef(Py_None);
done:
    hvae_optimizer_free(opt);
    PyMem_RawFree(params);
    model_leave(self);
    return result;
}

static PyObject *Model_reduce(ModelObject *self, PyObject *noargs)
{
    (void)noargs;
    const hvae_config *c = hvae_model_config(self->model);
    PyObject *state = Model_getstate(self, NULL);
    if (!state)
        return NULL;
    PyObject *disc = c->discriminator
        ? dims_tuple(c->discriminator_hidden, c->discriminator_n_hidden) : Py_NewRef(Py_None);
    if (!disc) {
        Py_DECREF(state);
        return NULL;
    }
    return Py_BuildValue("(O(LNNsssKsLsssN)N)", (PyObject *)Py_TYPE(self),
                         (long long)c->n_features,
                         dims_tuple(c->latent_dims, c->n_layers),
                         dims_tuple(c->hidden_dims, c->n_hidden),
                         choice_name(CHOICE_LIKELIHOOD, c->likelihood),
                         choice_name(CHOICE_ACTIVATION, c->activation),
                         choice_name(CHOICE_DECODER_VARIANCE, c->decoder_variance), self->seed,
                         choice_name(CHOICE_INFERENCE, c->inference), (long long)c->n_conditions,
                         choice_name(CHOICE_MARKOV_KL, c->markov_kl),
                         choice_name(CHOICE_PRIOR, c->prior),
                         choice_name(CHOICE_LATENT_FAMILY, c->latent_family), disc, state);
}

static PyObject *Model_repr(ModelObject *self)
{
    const hvae_config *c = hvae_model_config(self->model);
    PyObject *latent = dims_tuple(c->latent_dims, c->n_layers);
    PyObject *hidden = dims_tuple(c->hidden_dims, c->n_hidden);
    PyObject *r = NULL;
    if (latent && hidden)
        r = PyUnicode_FromFormat(
            "Model(n_features=%lld, latent_dims=%R, hidden_dims=%R, "
            "likelihood='%s', activation='%s', decoder_variance='%s', seed=%llu, "
            "inference='%s', n_conditions=%lld, markov_kl='%s', prior='%s', "
            "latent_family='%s')",
            (long long)c->n_features, latent, hidden,
            choice_name(CHOICE_LIKELIHOOD, c->likelihood), choice_name(CHOICE_ACTIVATION, c->activation),
            choice_name(CHOICE_DECODER_VARIANCE, c->decoder_variance), self->seed,
            choice_name(CHOICE_INFERENCE, c->inference), (long long)c->n_conditions,
            choice_name(CHOICE_MARKOV_KL, c->markov_kl), choice_name(CHOICE_PRIOR, c->prior),
            choice_name(CHOICE_LATENT_FAMILY, c->latent_family));
    Py_XDECREF(latent);
    Py_XDECREF(hidden);
    return r;
}

/* ---- the discriminator ---------------------------------------------------- */

static int model_has_discriminator(ModelObject *self)
{
    if (hvae_model_config(self->model)->discriminator)
        return 1;
    PyErr_SetString(PyExc_ValueError, "this Model has no discriminator (create it with "
                    "discriminator_hidden)");
    return 0;
}

static PyObject *Model_discriminator_log_ratio(ModelObject *self, PyObject *args,
                                               PyObject *kwds)
{
    static char *kwlist[] = {"Z", NULL};
    PyObject *z_obj, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:discriminator_log_ratio", kwlist, &z_obj) ||
        !model_has_discriminator(self))
        return NULL;
    const hvae_config *c = hvae_model_config(self->model);
    PyArrayObject *z = as_finite_matrix(z_obj, c->latent_dims[c->n_layers - 1], "Z");
    if (!z)
        return NULL;
    npy_intp n = PyArray_DIM(z, 0);
    out = new_array(1, &n, NPY_FLOAT32);
    if (out && model_enter(self) == 0) {
        hvae_status st;
        Py_BEGIN_ALLOW_THREADS
        st = hvae_discriminator_log_ratio(self->model, PyArray_DATA(z), n, out_data(out));
        Py_END_ALLOW_THREADS
        model_leave(self);
        if (raise_status(st, "discriminator_log_ratio failed") < 0)
            Py_CLEAR(out);
    } else {
        Py_CLEAR(out);
    }
    Py_DECREF(z);
    return out;
}

static PyObject *Model_discriminator_step(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"Z", "other", "learning_rate", "adam_betas", NULL};
    PyObject *z_obj, *other_obj = Py_None, *result = NULL;
    double lr = 1e-4, b1 = 0.5, b2 = 0.9;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|Od(dd):discriminator_step", kwlist,
                                     &z_obj, &other_obj, &lr, &b1, &b2) ||
        !model_has_discriminator(self) || check_float32("learning_rate", lr, 0.0, 0) < 0)
        return NULL;
    if (!(b1 >= 0.0 && (float)b1 < 1.0f) || !(b2 >= 0.0 && (float)b2 < 1.0f)) {
        PyErr_SetString(PyExc_ValueError, "adam_betas must lie in [0, 1)");
        return NULL;
    }
    const hvae_config *c = hvae_model_config(self->model);
    int64_t d = c->latent_dims[c->n_layers - 1];
    PyArrayObject *z = as_finite_matrix(z_obj, d, "Z"), *other = NULL;
    if (!z)
        return NULL;
    if (other_obj != Py_None) {
        other = as_finite_matrix(other_obj, d, "other");
        if (!other)
            goto done;
        if (PyArray_DIM(other, 0) != PyArray_DIM(z, 0)) {
            PyErr_SetString(PyExc_ValueError, "other must have as many rows as Z");
            goto done;
        }
    }
    if (PyArray_DIM(z, 0) < 1) {
        PyErr_SetString(PyExc_ValueError, "Z must have at least one row");
        goto done;
    }
    if (model_enter(self) < 0)
        goto done;
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    oc.learning_rate = (float)lr;
    oc.beta1 = (float)b1;
    oc.beta2 = (float)b2;
    hvae_status st = self->disc_opt
        ? hvae_optimizer_configure(self->disc_opt, &oc)
        : hvae_optimizer_create_for(hvae_discriminator_n_params(self->model), &oc,
                                    &self->disc_opt);
    hvae_discriminator_stats ds = {0.0, 0.0, 0};
    if (st == HVAE_OK) {
        Py_BEGIN_ALLOW_THREADS
        st = hvae_discriminator_step(self->model, self->disc_opt, &self->rng, PyArray_DATA(z),
                                     other ? PyArray_DATA(other) : NULL, PyArray_DIM(z, 0),
                                     &ds);
        Py_END_ALLOW_THREADS
    }
    model_leave(self);
    if (raise_status(st, "discriminator_step failed") == 0)
        result = Py_BuildValue("{sdsd}", "log_ratio", ds.log_ratio, "accuracy", ds.accuracy);
done:
    Py_DECREF(z);
    Py_XDECREF(other);
    return result;
}

static PyMethodDef Model_methods[] = {
    {"tcvae_terms", (PyCFunction)(void (*)(void))Model_tcvae_terms, METH_VARARGS | METH_KEYWORDS,
     "tcvae_terms(X, n_data, noise=None, seed=0, cond=None) -> dict of (n,) float64\n"
     "beta-TCVAE's decomposition of each row's sampled top-layer KL estimate, with X\n"
     "one minibatch from a data set of n_data rows (minibatch-weighted sampling):\n"
     "'mutual_information', 'total_correlation', 'dimension_wise_kl'; they sum to\n"
     "log q(z_T|x) - log N(z_T; 0, I) at the same samples."},
    {"discriminator_log_ratio", (PyCFunction)(void (*)(void))Model_discriminator_log_ratio,
     METH_VARARGS | METH_KEYWORDS,
     "discriminator_log_ratio(Z) -> (n,) float32: T(z) for top-layer rows Z (n, d_T), the\n"
     "discriminator's logit, an estimate of log q(z)/other(z)."},
    {"discriminator_step", (PyCFunction)(void (*)(void))Model_discriminator_step,
     METH_VARARGS | METH_KEYWORDS,
     "discriminator_step(Z, other=None, learning_rate=1e-4, adam_betas=(0.5, 0.9)) -> dict\n"
     "One Adam step of the discriminator: real rows Z (B, d_T) against other (B, d_T),\n"
     "or with other=None the model's counterpart (FactorVAE: Z with each dimension\n"
     "permuted across rows; density-ratio prior: N(0, I) draws). Returns the step's\n"
     "mean T over Z ('log_ratio') and its accuracy."},
    {"named_parameters", (PyCFunction)Model_named_parameters, METH_NOARGS,
     "named_parameters()\n--\n\n"
     "Ordered list of (name, view) pairs that tile ``parameters``.\n\n"
     "Names: ``enc{i}.hidden{j}.W/.b``, ``enc{i}.mu.W/.b``, "
     "``enc{i}.logvar.W/.b`` for i = 1..T, then ``dec{i}.hidden{j}.W/.b``, "
     "``dec{i}.mu.W/.b``, ``dec{i}.logvar.W/.b`` (no logvar with "
     "decoder_variance='unit'; ``dec1.logits`` for a Bernoulli likelihood).\n"
     "W has shape (n_in, n_out); every view is writable and shares memory "
     "with the model."},
    {"elbo", (PyCFunction)(void (*)(void))Model_elbo, METH_VARARGS | METH_KEYWORDS,
     "elbo(X, noise=None, seed=0, cond=None)\n--\n\n"
     "Per-sample ELBO in nats, float64 array of shape (n,).\n\n"
     "noise: None, or a list of T arrays eps_i of shape (n, d_i). With None,\n"
     "each row's noise is drawn from a generator seeded by the row's values\n"
     "and ``seed``, so a row gets the same value wherever it sits in X."},
    {"elbo_terms", (PyCFunction)(void (*)(void))Model_elbo_terms,
     METH_VARARGS | METH_KEYWORDS,
     "elbo_terms(X, noise=None, seed=0, cond=None)\n--\n\n"
     "Dict of per-sample terms: 'elbo' (n,), 'reconstruction' log p(x|z_1)\n"
     "(n,) and 'kl' (n, T), column i the KL term of layer i+1."},
    {"loss_and_grad", (PyCFunction)(void (*)(void))Model_loss_and_grad,
     METH_VARARGS | METH_KEYWORDS,
     "loss_and_grad(X, noise=None, seed=0, beta=1.0, objective='elbo',\n"
     "              n_samples=1, free_bits=0.0, cond=None, tc_weight=0.0,\n"
     "              tcvae_weights=None, n_data=0.0)\n--\n\n"
     "(loss, grad): the training loss over X and its gradient as a float32\n"
     "array aligned with ``parameters``. objective='elbo': -mean of\n"
     "(reconstruction - beta * KL) averaged over n_samples draws, each layer's\n"
     "batch-mean KL floored at free_bits when free_bits > 0; objective='iwae':\n"
     "-mean of log (1/k) sum_j p(x, z_j)/q(z_j|x), k = n_samples. With noise,\n"
     "the T arrays hold (n * n_samples, d_i) draws, row b * n_samples + s.\n"
     "tc_weight: FactorVAE's + tc_weight * mean T(z_T) at the discriminator as it\n"
     "stands (which gets no gradient). tcvae_weights (alpha, beta, gamma):\n"
     "beta-TCVAE's weighted MI, TC and dimension-wise KL replace beta * KL for\n"
     "the top layer, by minibatch-weighted sampling over a data set of n_data\n"
     "rows (0: the rows of X); see tcvae_terms."},
    {"log_likelihood", (PyCFunction)(void (*)(void))Model_log_likelihood,
     METH_VARARGS | METH_KEYWORDS,
     "log_likelihood(X, n_samples=1000, seed=0, cond=None)\n--\n\n"
     "Importance-sampled estimate of log p(x) per row (float64, nats): the\n"
     "posterior as proposal, log (1/S) sum_s p(x, z_s) / q(z_s | x) over\n"
     "S = n_samples draws streamed in chunks (memory does not grow with S).\n"
     "It is the IWAE bound with S draws: at least the ELBO on average, and\n"
     "tending to log p(x) as S grows. Each row's draws are seeded by its\n"
     "values and seed."},
    {"encode", (PyCFunction)(void (*)(void))Model_encode, METH_VARARGS | METH_KEYWORDS,
     "encode(X, cond=None)\n--\n\n"
     "List of T (mu, logvar) pairs, each (n, d_i) float32: the posterior of\n"
     "every layer, layers above the first evaluated at the posterior mean of\n"
     "the layer below."},
    {"decode", (PyCFunction)(void (*)(void))Model_decode, METH_VARARGS | METH_KEYWORDS,
     "decode(Z, return_logvar=False, cond=None)\n--\n\n"
     "The mean of p(x | z_1) for Z of shape (n, d_1): (n, D) float32\n"
     "(probabilities for a Bernoulli likelihood). With return_logvar, also\n"
     "its log-variance (zeros where the variance is fixed to 1)."},
    {"sample", (PyCFunction)(void (*)(void))Model_sample, METH_VARARGS | METH_KEYWORDS,
     "sample(n, seed=None, observation_noise=False, cond=None)\n--\n\n"
     "n draws by ancestral sampling: z_T ~ N(0, I), each z_{i-1} ~ p(z_{i-1}|z_i),\n"
     "then the mean of p(x | z_1), or a draw from it with observation_noise.\n"
     "With seed=None the model's own generator is used (and advanced)."},
    {"fit", (PyCFunction)(void (*)(void))Model_fit, METH_VARARGS | METH_KEYWORDS,
     "fit(X, n_epochs=1, batch_size=128, learning_rate=1e-3, optimizer='adam',\n"
     "    beta=1.0, shuffle=True, callback=None, history=None, weight_decay=0.0,\n"
     "    momentum=0.0, adam_betas=(0.9, 0.999), adam_eps=1e-8, progress=None,\n"
     "    objective='elbo', n_samples=1, free_bits=0.0, cond=None, reduce=None,\n"
     "    n_global=0, shard_start=0, tc_weight=0.0, discriminator_learning_rate=1e-4,\n"
     "    discriminator_betas=(0.5, 0.9), tcvae_weights=None, n_data=0.0)\n--\n\n"
     "Minibatch training; the optimizer state persists across calls.\n\n"
     "objective, n_samples, beta, free_bits, tc_weight, tcvae_weights and n_data\n"
     "as in loss_and_grad (n_data 0: the rows of X); cond holds the rows'\n"
     "conditions for a conditional model. A model with a discriminator also\n"
     "trains it, one Adam step (discriminator_learning_rate, discriminator_betas)\n"
     "after each of the model's, on that minibatch's top-layer samples; its\n"
     "records then also hold DISCRIMINATOR_RECORD_KEYS.\n\n"
     "Returns one record per epoch (dict: loss, objective, elbo, reconstruction, kl per\n"
     "layer, seconds, n_batches, n_rows, complete). Records are also appended\n"
     "to ``history`` (a list) as they are made, so they survive an exception.\n"
     "callback(epoch, record) runs after each epoch; returning False stops.\n"
     "progress(n_rows) runs after each minibatch (for progress bars); an\n"
     "exception from it stops training after that minibatch and propagates.\n"
     "Ctrl-C stops after the current minibatch (KeyboardInterrupt); a\n"
     "non-finite loss raises DivergenceError before the step is applied.\n\n"
     "Data-parallel training: X holds rows shard_start.. of n_global rows spread\n"
     "over processes that call fit alike, with the same generator state; every\n"
     "step, reduce(grads, values) must sum both float arrays over the processes\n"
     "in place (grads is None in a call that sums values only). See\n"
     "hvae.distributed."},
    {"reset_optimizer", (PyCFunction)Model_reset_optimizer, METH_NOARGS,
     "reset_optimizer()\n--\n\nForget the optimizer's moments and step count."},
    {"init_parameters", (PyCFunction)(void (*)(void))Model_init_parameters,
     METH_VARARGS | METH_KEYWORDS,
     "init_parameters(seed=None)\n--\n\n"
     "Re-draw every parameter (PyTorch's Linear default, U(-1/sqrt(n_in),\n"
     "1/sqrt(n_in))), reseed the training generator, reset the optimizer."},
    {"__getstate__", (PyCFunction)Model_getstate, METH_NOARGS, NULL},
    {"__setstate__", (PyCFunction)Model_setstate, METH_O, NULL},
    {"__reduce__", (PyCFunction)Model_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Model_getset[] = {
    {"parameters", (getter)Model_get_parameters, NULL,
     "All parameters: a writable 1-D float32 view of the C buffer (no copy).", NULL},
    {"n_features", (getter)Model_get_config_value, NULL, "D", "n_features"},
    {"latent_dims", (getter)Model_get_config_value, NULL, "(d_1, ..., d_T)", "latent_dims"},
    {"hidden_dims", (getter)Model_get_config_value, NULL, "Encoder hidden widths", "hidden_dims"},
    {"likelihood", (getter)Model_get_config_value, NULL, "'gaussian' or 'bernoulli'", "likelihood"},
    {"activation", (getter)Model_get_config_value, NULL, "Hidden activation", "activation"},
    {"decoder_variance", (getter)Model_get_config_value, NULL, "'learned' or 'unit'", "decoder_variance"},
    {"n_params", (getter)Model_get_config_value, NULL, "Number of parameters", "n_params"},
    {"n_layers", (getter)Model_get_config_value, NULL, "T", "n_layers"},
    {"seed", (getter)Model_get_config_value, NULL, "Initialisation seed", "seed"},
    {"inference", (getter)Model_get_config_value, NULL, "'markov' or 'ladder'", "inference"},
    {"markov_kl", (getter)Model_get_config_value, NULL,
     "A lower Markov layer's ELBO term: 'sampled' log-density ratio or 'analytic' KL",
     "markov_kl"},
    {"prior", (getter)Model_get_config_value, NULL, "The top layer's prior (PRIORS)", "prior"},
    {"latent_family", (getter)Model_get_config_value, NULL,
     "The latent layers' distribution family (LATENT_FAMILIES)", "latent_family"},
    {"discriminator_hidden", (getter)Model_get_config_value, NULL,
     "The discriminator's hidden widths, None without one", "discriminator_hidden"},
    {"n_conditions", (getter)Model_get_config_value, NULL,
     "Width of the condition (0: not conditional)", "n_conditions"},
    {"optimizer_steps", (getter)Model_get_config_value, NULL,
     "Optimizer steps taken since the optimizer was created", "optimizer_steps"},
    {"n_threads", (getter)Model_get_n_threads, (setter)Model_set_n_threads,
     "Threads of hvae's pool for this model's calls (None: leave the setting alone).", NULL},
    {"rng_state", (getter)Model_get_rng_state, (setter)Model_set_rng_state,
     "State of the training and sampling generator (4 uint64).", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hvae._core.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_repr = (reprfunc)Model_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Model(n_features, latent_dims, hidden_dims, likelihood='gaussian', "
              "activation='relu', decoder_variance='learned', seed=0, "
              "inference='markov', n_conditions=0, markov_kl='sampled', "
              "prior='standard', latent_family='gaussian', discriminator_hidden=None)\n--\n\n"
              "A Markov hierarchical VAE held in C buffers.\n\n"
              "latent_dims: sizes (d_1, ..., d_T) of the latent layers; hidden_dims:\n"
              "widths of every encoder block's MLP (decoders use them reversed; may\n"
              "be empty). Parameters are initialised from ``seed`` like PyTorch's\n"
              "Linear default. inference: 'markov' (bottom-up q(z_i | z_{i-1})) or\n"
              "'ladder' (a deterministic bottom-up pass, then top-down precision-\n"
              "weighted posteriors). n_conditions: width of a condition that enters\n"
              "the first layer of every block (conditional VAE); the methods then\n"
              "take cond, an (n, n_conditions) array. markov_kl: a lower Markov\n"
              "layer's ELBO term, 'sampled' (log q - log p at the samples, unbiased)\n"
              "or 'analytic' (the closed-form KL at the sampled z_{i+1}; a different,\n"
              "not unbiased, estimate; IWAE and log_likelihood keep the sampled\n"
              "ratio). prior: the top layer's prior (PRIORS); latent_family: the\n"
              "latent layers' family (LATENT_FAMILIES). discriminator_hidden: None,\n"
              "or the hidden widths of a discriminator T(z_T) (leaky-ReLU MLP, one\n"
              "linear output; its tensors 'discriminator.*' close the parameter\n"
              "buffer), trained beside the model by fit: FactorVAE's total-correlation\n"
              "estimate (fit's tc_weight), or the 'density_ratio' prior's\n"
              "log q(z_T)/N(z_T; 0, I) (that prior always has one: (256, 256) by default).",
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
    .tp_new = Model_new,
};

/* ---- module -------------------------------------------------------------- */

static PyObject *mod_set_num_threads(PyObject *mod, PyObject *arg)
{
    (void)mod;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > 1024) {
        PyErr_Format(PyExc_ValueError, "n_threads must be in 1..1024; got %ld", n);
        return NULL;
    }
    hvae_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *mod_get_num_threads(PyObject *mod, PyObject *noargs)
{
    (void)mod;
    (void)noargs;
    return PyLong_FromLong(hvae_get_num_threads());
}

static PyObject *mod_blas_info(PyObject *mod, PyObject *noargs)
{
    (void)mod;
    (void)noargs;
    return PyUnicode_FromString(hvae_blas_info());
}

static PyObject *mod_permute_dims(PyObject *mod, PyObject *args, PyObject *kwds)
{
    (void)mod;
    static char *kwlist[] = {"Z", "seed", NULL};
    PyObject *z_obj, *out = NULL;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O&:permute_dims", kwlist, &z_obj,
                                     u64_converter, &seed))
        return NULL;
    PyArrayObject *z = (PyArrayObject *)PyArray_FROM_OTF(z_obj, NPY_FLOAT32,
                                                         NPY_ARRAY_IN_ARRAY);
    if (!z)
        return NULL;
    if (PyArray_NDIM(z) != 2) {
        PyErr_SetString(PyExc_ValueError, "Z must be a 2-D array");
        Py_DECREF(z);
        return NULL;
    }
    npy_intp B = PyArray_DIM(z, 0), d = PyArray_DIM(z, 1), dims[2] = {B, d};
    int64_t *perm = PyMem_RawMalloc((size_t)(B > 0 ? B : 1) * sizeof(int64_t));
    out = new_array(2, dims, NPY_FLOAT32);
    if (!perm || !out) {
        Py_CLEAR(out);
        if (!perm)
            PyErr_NoMemory();
    } else {
        hvae_rng rng;
        hvae_rng_seed(&rng, seed);
        hvae_permute_dims(out_data(out), PyArray_DATA(z), B, d, &rng, perm);
    }
    PyMem_RawFree(perm);
    Py_DECREF(z);
    return out;
}

static PyMethodDef module_methods[] = {
    {"permute_dims", (PyCFunction)(void (*)(void))mod_permute_dims, METH_VARARGS | METH_KEYWORDS,
     "permute_dims(Z, seed=0) -> (B, d) float32: each column of Z (B, d) under its own\n"
     "random permutation of the rows (FactorVAE's samples of prod_j q(z_j))."},
    {"set_num_threads", mod_set_num_threads, METH_O,
     "set_num_threads(n)\n--\n\nThreads of hvae's pool (which splits its matrix "
     "products, each part on OpenBLAS with one thread, and its elementwise work) for "
     "calls of models without their own n_threads."},
    {"get_num_threads", mod_get_num_threads, METH_NOARGS,
     "get_num_threads()\n--\n\nThe BLAS thread count now in force for hvae."},
    {"blas_info", mod_blas_info, METH_NOARGS,
     "blas_info()\n--\n\nThe configuration string of the BLAS hvae uses."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_core",
    "hvae's native core: the Model type and BLAS settings.", -1, module_methods,
    NULL, NULL, NULL, NULL};

/* PyModule_Add of Python 3.13: adds obj (a new reference, NULL after a
 * failure) and drops it. */
static int module_add_new(PyObject *m, const char *name, PyObject *obj)
{
    int r = obj ? PyModule_AddObjectRef(m, name, obj) : -1;
    Py_XDECREF(obj);
    return r;
}

PyMODINIT_FUNC PyInit__core(void)
{
    import_array();
    /* Python handles signals in the thread that initialised it; ask
     * threading which one that is, as this module may be imported elsewhere. */
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *main = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    Py_XDECREF(threading);
    Py_XDECREF(main);
    if (!ident)
        return NULL;
    main_thread_ident = PyLong_AsUnsignedLong(ident);
    Py_DECREF(ident);
    if (PyErr_Occurred())
        return NULL;
    if (PyType_Ready(&ModelType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    DivergenceError = PyErr_NewExceptionWithDoc(
        "hvae._core.DivergenceError",
        "Training produced a NaN or infinite loss or gradient. The offending "
        "step was not applied: the model keeps its last finite parameters.",
        PyExc_FloatingPointError, NULL);
    if (!DivergenceError || PyModule_AddObjectRef(m, "DivergenceError", DivergenceError) < 0 ||
        PyModule_AddObjectRef(m, "Model", (PyObject *)&ModelType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_LAYERS", HVAE_MAX_LAYERS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HIDDEN", HVAE_MAX_HIDDEN) < 0)
        goto fail;
    for (int kind = 0; kind < N_CHOICES; kind++)
        if (module_add_new(m, choices[kind].attribute, choice_tuple((choice_kind)kind)) < 0)
            goto fail;
    int first[2] = {0, N_RECORD_KEYS - N_DISC_RECORD_KEYS};
    int count[2] = {N_RECORD_KEYS - N_DISC_RECORD_KEYS, N_DISC_RECORD_KEYS};
    const char *names[2] = {"EPOCH_RECORD_KEYS", "DISCRIMINATOR_RECORD_KEYS"};
    for (int g = 0; g < 2; g++) {
        PyObject *keys = PyTuple_New(count[g]);
        for (int k = 0; keys && k < count[g]; k++) {
            PyObject *key = PyUnicode_FromString(epoch_record_keys[first[g] + k]);
            if (!key)
                Py_CLEAR(keys);
            else
                PyTuple_SET_ITEM(keys, k, key);
        }
        if (module_add_new(m, names[g], keys) < 0)
            goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
