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
#include <unistd.h>

#include "hvae.h"

/* Rows per chunk for evaluation calls on many rows. */
#define EVAL_ROWS 1024
/* The binding's limits, exported (MAX_THREADS, MAX_BATCH_SIZE, MAX_SAMPLES)
 * for the estimator's parameter table: threads of a model, rows per
 * minibatch, draws per row. */
#define MAX_MODEL_THREADS 1024
#define MAX_BATCH_SIZE (1LL << 30)
#define MAX_SAMPLES (1LL << 20)
/* How often a long call takes the GIL back to look for Ctrl-C. */
#define POLL_SECONDS 0.02

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
NAME_OF(hvae_gradient_estimator_name, hvae_gradient_estimator)
NAME_OF(hvae_score_baseline_name, hvae_score_baseline)
NAME_OF(hvae_covariance_type_name, hvae_covariance_type)

typedef enum {
    CHOICE_LIKELIHOOD, CHOICE_ACTIVATION, CHOICE_DECODER_VARIANCE,
    CHOICE_INFERENCE, CHOICE_OBJECTIVE, CHOICE_OPTIMIZER, CHOICE_PRIOR,
    CHOICE_LATENT_FAMILY, CHOICE_MARKOV_KL, CHOICE_GRADIENT_ESTIMATOR,
    CHOICE_SCORE_BASELINE, CHOICE_COVARIANCE_TYPE, N_CHOICES
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
    {"GRADIENT_ESTIMATORS", hvae_gradient_estimator_name_int, HVAE_GRADIENT_ESTIMATOR_COUNT},
    {"SCORE_BASELINES", hvae_score_baseline_name_int, HVAE_BASELINE_COUNT},
    {"COVARIANCE_TYPES", hvae_covariance_type_name_int, HVAE_COVARIANCE_COUNT},
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
    long lock_pid;       /* the process whose thread holds lock, 0 when free */
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
    /* Fork policy: a model that a thread of the parent was using when the
     * process forked is refused in the child (that thread does not exist
     * here, its lock is never released, and the buffers may be mid-update);
     * a model idle at the fork works in the child as in the parent. */
    long pid = (long)getpid();
    if (self->lock_pid != 0 && self->lock_pid != pid) {
        PyErr_Format(PyExc_RuntimeError,
                     "this Model was in use by another thread of process %ld when this "
                     "process (%ld) was forked from it: its state may be mid-update, so "
                     "it cannot be used here; pickle or save it in the parent when it is "
                     "idle, or use the 'spawn' start method", self->lock_pid, pid);
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
    if (PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        self->lock_pid = pid;
    } else {
        for (;;) {
            PyLockStatus got;
            Py_BEGIN_ALLOW_THREADS
            got = PyThread_acquire_lock_timed(self->lock, 50000, 0); /* 50 ms */
            /* At once, without waiting for the GIL: a fork in between
             * would see the lock held and no owner process. */
            if (got == PY_LOCK_ACQUIRED)
                self->lock_pid = pid;
            Py_END_ALLOW_THREADS
            if (got == PY_LOCK_ACQUIRED)
                break;
            if (PyErr_CheckSignals() < 0)
                return -1;
        }
    }
    self->owner = me;
    if (self->n_threads > 0)
        hvae_set_num_threads(self->n_threads);
    return 0;
}

static void model_leave(ModelObject *self)
{
    self->owner = 0;
    self->lock_pid = 0;
    PyThread_release_lock(self->lock);
}

/* A MemoryError that says what could not be allocated and how much; bytes
 * 0 means more than the address space. Returns -1. */
static int raise_no_memory(const char *what, long long count, const char *unit,
                           size_t bytes)
{
    if (bytes == 0)
        PyErr_Format(PyExc_MemoryError, "cannot allocate %s: %lld %s need more bytes than "
                     "the address space holds", what, count, unit);
    else {
        char size[32]; /* PyErr_Format has no %g */
        snprintf(size, sizeof size, "%.3g GB", (double)bytes / 1e9);
        PyErr_Format(PyExc_MemoryError, "cannot allocate %s: %lld %s, %s", what, count,
                     unit, size);
    }
    return -1;
}

/* count items of size bytes each with PyMem_RawMalloc, the product checked
 * first; NULL with a MemoryError naming `what`. */
static void *raw_array(long long count, size_t size, const char *what, const char *unit)
{
    size_t bytes;
    if (count < 0 || __builtin_mul_overflow((size_t)count, size, &bytes) ||
        bytes > (size_t)PY_SSIZE_T_MAX) {
        raise_no_memory(what, count, unit, 0);
        return NULL;
    }
    void *p = PyMem_RawMalloc(bytes ? bytes : 1);
    if (!p)
        raise_no_memory(what, count, unit, bytes);
    return p;
}

static int ensure_workspace(ModelObject *self, int64_t rows)
{
    if (self->ws && hvae_workspace_max_rows(self->ws) >= rows)
        return 0;
    hvae_workspace *ws = NULL;
    if (rows > INT_MAX) {
        PyErr_Format(PyExc_MemoryError, "cannot allocate the workspace: %lld rows (minibatch "
                     "rows times draws per row), more than the 2**31 - 1 it may hold",
                     (long long)rows);
        return -1;
    }
    hvae_status st = hvae_workspace_create(self->model, rows, &ws);
    if (st == HVAE_ERR_OUT_OF_MEMORY || st == HVAE_ERR_SIZE_OVERFLOW)
        return raise_no_memory("the workspace", (long long)rows, "rows (minibatch rows "
                               "times draws per row)", hvae_workspace_bytes(self->model, rows));
    if (st != HVAE_OK)
        return raise_status(st, "cannot allocate the workspace");
    hvae_workspace_free(self->ws);
    self->ws = ws;
    return 0;
}

/* Ctrl-C during a long call: the workspace's poll hook (hvae.h) takes the
 * GIL back every POLL_SECONDS to run the signal handlers; once one raised,
 * the call stops and its exception propagates. Python runs signal handlers
 * in the main thread only, so the hook is set there only. */
typedef struct {
    PyThreadState **saved; /* where the call keeps its released thread state */
    PyThreadState *own;    /* that place, unless the call has its own */
    unsigned long thread;
    double next;           /* when to look next */
    int stopped;           /* a handler raised: the exception is set */
} poll_ctx;

static unsigned long main_thread_ident;

static int poll_signals(void *ptr)
{
    poll_ctx *c = ptr;
    if (c->stopped)
        return 1;
    if (PyThread_get_thread_ident() != c->thread)
        return 0;
    double t = now_seconds();
    if (t < c->next)
        return 0;
    c->next = t + POLL_SECONDS;
    PyEval_RestoreThread(*c->saved);
    c->stopped = PyErr_CheckSignals() < 0;
    *c->saved = PyEval_SaveThread();
    return c->stopped;
}

/* Sets the poll hook on self's workspace (main thread only) for a call
 * that keeps its released thread state at *saved (NULL: in c). */
static void poll_install(poll_ctx *c, ModelObject *self, PyThreadState **saved)
{
    c->saved = saved ? saved : &c->own;
    c->thread = PyThread_get_thread_ident();
    c->next = now_seconds() + POLL_SECONDS;
    c->stopped = 0;
    if (c->thread == main_thread_ident && self->ws)
        hvae_workspace_set_poll(self->ws, poll_signals, c);
}

static void poll_remove(ModelObject *self)
{
    if (self->ws)
        hvae_workspace_set_poll(self->ws, NULL, NULL);
}

/* Releases the GIL for a call on self's workspace, polling for Ctrl-C. */
static void poll_begin(poll_ctx *c, ModelObject *self)
{
    poll_install(c, self, NULL);
    c->own = PyEval_SaveThread();
}

/* Takes the GIL back; raises for st (-1) or returns 0. A stop by a signal
 * handler keeps its exception. */
static int poll_end(poll_ctx *c, ModelObject *self, hvae_status st, const char *failed)
{
    PyEval_RestoreThread(c->own);
    poll_remove(self);
    if (st == HVAE_ERR_STOPPED && c->stopped)
        return -1;
    return raise_status(st, failed);
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
                                     hvae_model_latent_width(self->model, i), name);
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
    int32_t z_layer = in->latent == 2 ? hvae_model_config(self->model)->n_layers - 1 : 0;
    f->x = in->latent ? as_finite_matrix(in->X, hvae_model_latent_width(self->model, z_layer),
                                         "Z")
                      : as_data(self, in->X, "X");
    if (!f->x)
        return -1;
    f->n = PyArray_DIM(f->x, 0);
    if (in->noise) {
        int64_t noise_rows;
        if (__builtin_mul_overflow((int64_t)f->n, in->draws, &noise_rows)) {
            PyErr_SetString(PyExc_ValueError, "noise: rows times draws overflow");
            return -1;
        }
        f->have_noise = as_noise(self, in->noise, noise_rows, f->noise_arrays, f->noise);
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
    poll_ctx pc;
    poll_begin(&pc, f->self);
    hvae_status st = body(f, args);
    return poll_end(&pc, f->self, st, failed);
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

/* Model's latent_family (a name for every layer, or a sequence of T names)
 * and n_categories (None: 10, the classic choice; an int for every
 * categorical layer; or a sequence of T ints) into families[] and K[]. */
static int parse_families(PyObject *family_obj, PyObject *k_obj, Py_ssize_t T,
                          hvae_latent_family *families, int64_t *K)
{
    for (Py_ssize_t i = 0; i < T; i++) {
        PyObject *item = family_obj;
        if (!PyUnicode_Check(family_obj)) {
            if (!PySequence_Check(family_obj) || PySequence_Size(family_obj) != T) {
                PyErr_Format(PyExc_ValueError, "latent_family must be a name or a sequence "
                             "of %zd names (one per latent layer)", T);
                return -1;
            }
            item = PySequence_GetItem(family_obj, i);
        } else {
            Py_INCREF(item);
        }
        if (!item)
            return -1;
        const char *name = PyUnicode_Check(item) ? PyUnicode_AsUTF8(item) : NULL;
        int fam = name ? parse_choice("latent_family", name, CHOICE_LATENT_FAMILY) : -1;
        if (!name && !PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "latent_family entries must be str; got %.100s",
                         Py_TYPE(item)->tp_name);
        Py_DECREF(item);
        if (fam < 0)
            return -1;
        families[i] = (hvae_latent_family)fam;
        long long k = fam == HVAE_LATENT_CATEGORICAL ? 10 : 0; /* the classic K */
        if (k_obj != Py_None) {
            PyObject *kv = PyLong_Check(k_obj) ? Py_NewRef(k_obj)
                           : PySequence_Check(k_obj) && PySequence_Size(k_obj) == T
                               ? PySequence_GetItem(k_obj, i) : NULL;
            if (!kv) {
                if (!PyErr_Occurred())
                    PyErr_Format(PyExc_ValueError, "n_categories must be None, an int or a "
                                 "sequence of %zd ints", T);
                return -1;
            }
            k = PyLong_AsLongLong(kv);
            Py_DECREF(kv);
            if (k == -1 && PyErr_Occurred())
                return -1;
        }
        if (fam == HVAE_LATENT_CATEGORICAL && (k < 2 || k > INT_MAX)) {
            PyErr_Format(PyExc_ValueError, "latent layer %zd is categorical: n_categories "
                         "must give it 2 to 2**31 - 1 classes; got %lld", i + 1, k);
            return -1;
        }
        K[i] = k;
    }
    return 0;
}

/* Model's n_conditions, n_components (with prior='gmm') and n_features,
 * checked in that order. */
static int check_model_sizes(int pri, long long n_conditions, long long n_components,
                             long long n_features)
{
    if (n_conditions < 0 || n_conditions > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "n_conditions must be between 0 and 2**31 - 1; "
                     "got %lld", n_conditions);
        return -1;
    }
    if (pri == HVAE_PRIOR_GMM && (n_components < 1 || n_components > HVAE_MAX_COMPONENTS)) {
        PyErr_Format(PyExc_ValueError, "n_components must be between 1 and %d; got %lld",
                     HVAE_MAX_COMPONENTS, n_components);
        return -1;
    }
    if (n_features < 1 || n_features > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "n_features must be between 1 and 2**31 - 1; "
                     "got %lld", n_features);
        return -1;
    }
    return 0;
}

/* Model's prior_covariance_type: 'full' needs the mixture prior and a top
 * layer of at most HVAE_MAX_FULL_COVARIANCE_DIM units. */
static int check_covariance(int cov, int pri, const char *prior, int64_t top_dim)
{
    if (cov == HVAE_COVARIANCE_DIAG)
        return 0;
    if (pri != HVAE_PRIOR_GMM) {
        PyErr_Format(PyExc_ValueError, "prior_covariance_type='%s' is the mixture prior's: "
                     "it needs prior='gmm'; got prior='%s'",
                     choice_name(CHOICE_COVARIANCE_TYPE, cov), prior);
        return -1;
    }
    if (top_dim > HVAE_MAX_FULL_COVARIANCE_DIM) {
        PyErr_Format(PyExc_ValueError, "prior_covariance_type='full' takes a top latent layer "
                     "of at most %d units; got %lld", HVAE_MAX_FULL_COVARIANCE_DIM,
                     (long long)top_dim);
        return -1;
    }
    return 0;
}

/* Model's n_pseudo_inputs (None: the paper's K for the VampPrior, none for
 * another prior) into *n_pseudo_inputs; the VampPrior takes no condition. */
static int parse_pseudo_inputs(int pri, const char *prior, long long n_conditions,
                               PyObject *pseudo_obj, long long *n_pseudo_inputs)
{
    long long n = 0;
    if (pseudo_obj == Py_None) {
        n = pri == HVAE_PRIOR_VAMP ? HVAE_VAMP_PSEUDO_INPUTS : 0;
    } else {
        n = PyLong_AsLongLong(pseudo_obj);
        if (n == -1 && PyErr_Occurred())
            return -1;
    }
    if ((pri == HVAE_PRIOR_VAMP) != (n != 0) || n < 0 || n > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "n_pseudo_inputs must be between 1 and 2**31 - 1 "
                     "with prior='vamp', and 0 with any other prior; got %lld with "
                     "prior='%s'", n, prior);
        return -1;
    }
    if (pri == HVAE_PRIOR_VAMP && n_conditions != 0) {
        PyErr_SetString(PyExc_ValueError, "prior='vamp' takes no condition "
                        "(n_conditions must be 0): its pseudo-inputs have none");
        return -1;
    }
    *n_pseudo_inputs = n;
    return 0;
}

/* Model's discriminator_hidden into cfg: None for no discriminator, else
 * its hidden widths (parsed as parse_dims parses hidden_dims). The
 * density-ratio prior always has one: without discriminator_hidden, two
 * hidden layers of 256. */
static int parse_discriminator(PyObject *latent_obj, PyObject *disc_obj, int64_t *latent,
                               hvae_config *cfg)
{
    Py_ssize_t T = 0, DH = 0;
    int64_t disc_hidden[HVAE_MAX_HIDDEN];
    if (disc_obj != Py_None &&
        parse_dims(latent_obj, disc_obj, latent, &T, disc_hidden, &DH) < 0)
        return -1;
    cfg->discriminator = disc_obj != Py_None || cfg->prior == HVAE_PRIOR_DENSITY_RATIO;
    if (disc_obj == Py_None && cfg->discriminator) {
        DH = 2;
        disc_hidden[0] = disc_hidden[1] = 256;
    }
    cfg->discriminator_n_hidden = (int32_t)DH;
    memcpy(cfg->discriminator_hidden, disc_hidden, (size_t)DH * sizeof(int64_t));
    return 0;
}

/* Model's latent_family and n_categories (parse_families; default
 * 'gaussian') into families[] and K[], then the checks a categorical layer
 * needs: Markov inference, and the standard prior on top. */
static int parse_layer_families(PyObject *family_obj, PyObject *k_obj, Py_ssize_t T,
                                int inf, int pri, const char *prior,
                                hvae_latent_family *families, int64_t *K)
{
    PyObject *default_family = PyUnicode_FromString("gaussian");
    int bad = !default_family || parse_families(family_obj ? family_obj : default_family,
                                                k_obj, T, families, K) < 0;
    Py_XDECREF(default_family);
    if (bad)
        return -1;
    for (Py_ssize_t i = 0; i < T; i++) {
        if (families[i] != HVAE_LATENT_CATEGORICAL)
            continue;
        if (inf == HVAE_INFERENCE_LADDER) {
            PyErr_SetString(PyExc_ValueError, "inference='ladder' merges Gaussian "
                            "posteriors: every latent layer must be 'gaussian'");
            return -1;
        }
        if (i == T - 1 && pri != HVAE_PRIOR_NORMAL) {
            PyErr_Format(PyExc_ValueError, "a categorical top layer has its own uniform "
                         "prior: prior must be 'standard' (the default); got '%s'", prior);
            return -1;
        }
    }
    return 0;
}

/* A new Model of the config cfg: its lock, its C model, the parameters
 * initialised from seed. NULL with an exception set on failure. */
static ModelObject *model_alloc(PyTypeObject *type, const hvae_config *cfg,
                                unsigned long long seed)
{
    ModelObject *self = (ModelObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->lock = PyThread_allocate_lock();
    if (!self->lock) {
        PyErr_NoMemory();
        Py_CLEAR(self);
        return NULL;
    }
    hvae_status st = hvae_model_create(cfg, &self->model);
    if (st != HVAE_OK) {
        raise_status(st, "cannot create the model (its parameters, gradients "
                         "and optimizer moments need 16 bytes per parameter)");
        Py_CLEAR(self);
        return NULL;
    }
    self->seed = seed;
    hvae_model_init(self->model, seed);
    /* The training stream is decorrelated from the initialisation stream. */
    hvae_rng_seed(&self->rng, seed ^ 0x9e3779b97f4a7c15ULL);
    return self;
}

static PyObject *Model_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n_features", "latent_dims", "hidden_dims",
                             "likelihood", "activation", "decoder_variance",
                             "seed", "inference", "n_conditions", "markov_kl",
                             "prior", "latent_family", "n_categories", "n_components",
                             "n_pseudo_inputs", "discriminator_hidden",
                             "prior_covariance_type", NULL};
    long long n_features, n_components = 1;
    PyObject *latent_obj, *hidden_obj;
    const char *likelihood = "gaussian", *activation = "relu",
               *variance = "learned", *inference = "markov";
    const char *markov_kl = "sampled", *prior = "standard", *covariance = "diag";
    PyObject *family_obj = NULL, *k_obj = Py_None;
    long long n_conditions = 0, n_pseudo_inputs = 0;
    PyObject *pseudo_obj = Py_None, *disc_obj = Py_None;
    unsigned long long seed = 0;
    int64_t latent[HVAE_MAX_LAYERS], hidden[HVAE_MAX_HIDDEN];

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "LOO|sssO&sLssOOLOOs:Model", kwlist,
                                     &n_features, &latent_obj, &hidden_obj,
                                     &likelihood, &activation, &variance,
                                     u64_converter, &seed,
                                     &inference, &n_conditions, &markov_kl,
                                     &prior, &family_obj, &k_obj, &n_components,
                                     &pseudo_obj, &disc_obj, &covariance))
        return NULL;
    int lik = parse_choice("likelihood", likelihood, CHOICE_LIKELIHOOD);
    int act = lik < 0 ? -1 : parse_choice("activation", activation, CHOICE_ACTIVATION);
    int var = act < 0 ? -1 : parse_choice("decoder_variance", variance, CHOICE_DECODER_VARIANCE);
    int inf = var < 0 ? -1 : parse_choice("inference", inference, CHOICE_INFERENCE);
    int mkl = inf < 0 ? -1 : parse_choice("markov_kl", markov_kl, CHOICE_MARKOV_KL);
    int pri = mkl < 0 ? -1 : parse_choice("prior", prior, CHOICE_PRIOR);
    int cov = pri < 0 ? -1 : parse_choice("prior_covariance_type", covariance,
                                          CHOICE_COVARIANCE_TYPE);
    if (cov < 0 || check_model_sizes(pri, n_conditions, n_components, n_features) < 0 ||
        parse_pseudo_inputs(pri, prior, n_conditions, pseudo_obj, &n_pseudo_inputs) < 0)
        return NULL;
    Py_ssize_t T = 0, H = 0;
    if (parse_dims(latent_obj, hidden_obj, latent, &T, hidden, &H) < 0 ||
        check_covariance(cov, pri, prior, latent[T - 1]) < 0)
        return NULL;
    hvae_config cfg = hvae_config_default(n_features, (int32_t)T, latent,
                                          (int32_t)H, hidden);
    cfg.prior = (hvae_prior_kind)pri;
    if (parse_discriminator(latent_obj, disc_obj, latent, &cfg) < 0)
        return NULL;
    hvae_latent_family families[HVAE_MAX_LAYERS];
    int64_t n_categories[HVAE_MAX_LAYERS];
    if (parse_layer_families(family_obj, k_obj, T, inf, pri, prior, families,
                             n_categories) < 0)
        return NULL;

    cfg.likelihood = (hvae_likelihood)lik;
    cfg.activation = (hvae_activation)act;
    cfg.decoder_variance = (hvae_decoder_variance)var;
    cfg.inference = (hvae_inference)inf;
    cfg.markov_kl = (hvae_markov_kl)mkl;
    cfg.latent_family = families[0];
    cfg.latent_families = families;
    cfg.n_categories = n_categories;
    cfg.n_conditions = n_conditions;
    cfg.n_components = n_components;
    cfg.n_pseudo_inputs = n_pseudo_inputs;
    cfg.prior_covariance = (hvae_covariance_type)cov;
    return (PyObject *)model_alloc(type, &cfg, seed);
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
    if (strcmp(which, "prior_covariance_type") == 0)
        return PyUnicode_FromString(choice_name(CHOICE_COVARIANCE_TYPE, c->prior_covariance));
    if (strcmp(which, "latent_family") == 0) {
        /* One name when every layer shares it, else one per layer. */
        int same = 1;
        for (int32_t i = 1; i < c->n_layers; i++)
            same &= c->latent_families[i] == c->latent_families[0];
        if (same)
            return PyUnicode_FromString(choice_name(CHOICE_LATENT_FAMILY, c->latent_families[0]));
        PyObject *names = PyTuple_New(c->n_layers);
        for (int32_t i = 0; names && i < c->n_layers; i++) {
            PyObject *v = PyUnicode_FromString(choice_name(CHOICE_LATENT_FAMILY,
                                                           c->latent_families[i]));
            if (!v) {
                Py_CLEAR(names);
                break;
            }
            PyTuple_SET_ITEM(names, i, v);
        }
        return names;
    }
    if (strcmp(which, "n_categories") == 0) {
        int64_t K[HVAE_MAX_LAYERS];
        for (int32_t i = 0; i < c->n_layers; i++)
            K[i] = c->latent_families[i] == HVAE_LATENT_CATEGORICAL ? c->n_categories[i] : 0;
        return dims_tuple(K, c->n_layers);
    }
    if (strcmp(which, "latent_widths") == 0) {
        int64_t w[HVAE_MAX_LAYERS];
        for (int32_t i = 0; i < c->n_layers; i++)
            w[i] = hvae_model_latent_width(self->model, i);
        return dims_tuple(w, c->n_layers);
    }
    if (strcmp(which, "n_conditions") == 0)
        return PyLong_FromLongLong(c->n_conditions);
    if (strcmp(which, "n_components") == 0)
        return PyLong_FromLongLong(c->n_components);
    if (strcmp(which, "prior_offset") == 0)
        return PyLong_FromLongLong(hvae_model_prior_offset(self->model));
    if (strcmp(which, "n_pseudo_inputs") == 0)
        return PyLong_FromLongLong(c->n_pseudo_inputs);
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
    if (n < 1 || n > MAX_MODEL_THREADS) {
        PyErr_Format(PyExc_ValueError, "n_threads must be None or between 1 "
                     "and %d; got %ld", MAX_MODEL_THREADS, n);
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
        char text[64], bound[32]; /* PyErr_Format has no %g */
        snprintf(text, sizeof text, "%g", value);
        snprintf(bound, sizeof bound, "%g", low);
        PyErr_Format(PyExc_ValueError, "%s must be a number %s %s that is finite in "
                     "float32 (below 3.4e38); got %s", name, low_inclusive ? ">=" : ">",
                     bound, text);
        return -1;
    }
    return 0;
}

/* The objective's options for categorical layers and the gradient
 * estimator (loss_and_grad's and fit's keywords of the same names). */
typedef struct {
    double temperature, temperature_min, temperature_decay;
    int straight_through;
    const char *gradient_estimator, *score_baseline;
} estimator_args;
#define ESTIMATOR_ARGS_DEFAULT {1.0, 0.5, 0.0, 0, "auto", "auto"}

static int parse_estimator(const estimator_args *e, hvae_objective_options *out)
{
    int est = parse_choice("gradient_estimator", e->gradient_estimator,
                           CHOICE_GRADIENT_ESTIMATOR);
    int base = est < 0 ? -1 : parse_choice("score_baseline", e->score_baseline,
                                           CHOICE_SCORE_BASELINE);
    if (base < 0 || check_float32("temperature", e->temperature, 0.0, 0) < 0 ||
        check_float32("temperature_min", e->temperature_min, 0.0, 0) < 0 ||
        check_float32("temperature_decay", e->temperature_decay, 0.0, 1) < 0)
        return -1;
    if (est == HVAE_GRADIENT_SCORE_FUNCTION && out->objective != HVAE_OBJECTIVE_ELBO) {
        PyErr_SetString(PyExc_ValueError, "gradient_estimator='score_function' trains the "
                        "ELBO only; got objective='iwae'");
        return -1;
    }
    if (est == HVAE_GRADIENT_SCORE_FUNCTION && base == HVAE_BASELINE_LEAVE_ONE_OUT &&
        out->n_samples < 2) {
        PyErr_SetString(PyExc_ValueError, "score_baseline='leave_one_out' needs "
                        "n_samples >= 2 (the other draws of a row make its baseline)");
        return -1;
    }
    out->temperature = (float)e->temperature;
    out->temperature_min = (float)e->temperature_min;
    out->temperature_decay = (float)e->temperature_decay;
    out->straight_through = e->straight_through;
    out->gradient_estimator = (hvae_gradient_estimator)est;
    out->score_baseline = (hvae_score_baseline)base;
    return 0;
}

/* The estimator named must fit the model's layers (hvae_loss_and_grad would
 * refuse it with a bare status). */
static int check_estimator_fits(ModelObject *self, const hvae_objective_options *o)
{
    const hvae_config *c = hvae_model_config(self->model);
    int categorical = 0;
    for (int32_t i = 0; i < c->n_layers; i++)
        categorical |= c->latent_families[i] == HVAE_LATENT_CATEGORICAL;
    const char *problem =
        o->gradient_estimator == HVAE_GRADIENT_REPARAMETERIZATION && categorical
            ? "gradient_estimator='reparameterization' cannot pass through a categorical "
              "layer: use 'gumbel_softmax' (or 'auto') or 'score_function'"
        : o->gradient_estimator == HVAE_GRADIENT_GUMBEL_SOFTMAX && !categorical
            ? "gradient_estimator='gumbel_softmax' needs a categorical latent layer"
        : o->gradient_estimator == HVAE_GRADIENT_SCORE_FUNCTION &&
                c->inference != HVAE_INFERENCE_MARKOV
            ? "gradient_estimator='score_function' needs inference='markov'"
            : NULL;
    if (problem)
        PyErr_SetString(PyExc_ValueError, problem);
    return problem ? -1 : 0;
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
    if (n_samples < 1 || n_samples > MAX_SAMPLES) {
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

/* The keys of fit's per-epoch records, in record order; exported as
 * EPOCH_RECORD_KEYS (every record), DISCRIMINATOR_RECORD_KEYS and
 * TCVAE_RECORD_KEYS (the groups below). */
enum {
    RECORD_LOSS, RECORD_OBJECTIVE, RECORD_ELBO, RECORD_RECONSTRUCTION,
    RECORD_KL, RECORD_SECONDS, RECORD_N_BATCHES, RECORD_N_ROWS,
    RECORD_COMPLETE, RECORD_DISC_LOG_RATIO, RECORD_DISC_ACCURACY,
    RECORD_TCVAE_MI, RECORD_TCVAE_TC, RECORD_TCVAE_DW, N_RECORD_KEYS
};
/* The records of a model with a discriminator also have the keys from
 * RECORD_DISC_LOG_RATIO (DISCRIMINATOR_RECORD_KEYS): discriminator_log_ratio,
 * the epoch's mean over its steps of T on the real rows (FactorVAE: the
 * total-correlation estimate; density-ratio prior: of KL(q(z_T) || N(0, I))),
 * and discriminator_accuracy, its mean accuracy. Those of a beta-TCVAE fit
 * have the keys from RECORD_TCVAE_MI (TCVAE_RECORD_KEYS): the epoch's means
 * of the top layer's index-code mutual information, total correlation and
 * dimension-wise KL as trained (minibatch-weighted sampling), whose sum is
 * the sampled estimate of the top layer's KL term (also Model.tcvae_terms'
 * keys). */
enum { RECORD_GROUP_ALL, RECORD_GROUP_DISC, RECORD_GROUP_TCVAE, N_RECORD_GROUPS };
static const int record_group_start[N_RECORD_GROUPS + 1] = {
    0, RECORD_DISC_LOG_RATIO, RECORD_TCVAE_MI, N_RECORD_KEYS};
static const char *const record_group_names[N_RECORD_GROUPS] = {
    "EPOCH_RECORD_KEYS", "DISCRIMINATOR_RECORD_KEYS", "TCVAE_RECORD_KEYS"};
static const char *const epoch_record_keys[N_RECORD_KEYS] = {
    "loss", "objective", "elbo", "reconstruction", "kl", "seconds",
    "n_batches", "n_rows", "complete", "discriminator_log_ratio",
    "discriminator_accuracy", "mutual_information", "total_correlation",
    "dimension_wise_kl"};

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
    result = Py_BuildValue("{sOsOsO}", epoch_record_keys[RECORD_TCVAE_MI], a.mi,
                           epoch_record_keys[RECORD_TCVAE_TC], a.tc,
                           epoch_record_keys[RECORD_TCVAE_DW], a.dw);
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
                             "n_samples", "free_bits", "cond", "temperature",
                             "straight_through", "gradient_estimator", "score_baseline",
                             "tc_weight", "tcvae_weights", "n_data", NULL};
    frame_inputs in = {NULL, 0, Py_None, 1, Py_None, WS_SAMPLED};
    loss_and_grad_call a = {0};
    estimator_args e = ESTIMATOR_ARGS_DEFAULT;
    double beta = 1.0, free_bits = 0.0, tc_weight = 0.0, n_data = 0.0;
    PyObject *tcvae = Py_None;
    const char *objective = "elbo";
    int n_samples = 1;
    call_frame f;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO&dsidOdpssdOd", kwlist, &in.X,
                                     &in.noise, u64_converter, &a.seed, &beta, &objective,
                                     &n_samples, &free_bits, &in.cond, &e.temperature,
                                     &e.straight_through, &e.gradient_estimator,
                                     &e.score_baseline, &tc_weight, &tcvae, &n_data))
        return NULL;
    if (parse_objective(objective, n_samples, beta, free_bits, &a.objective) < 0 ||
        parse_estimator(&e, &a.objective) < 0 || check_estimator_fits(self, &a.objective) < 0 ||
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
 * reads and writes them in place, zero-copy): the model's gradient through
 * its cached view, any other float buffer (the discriminator's gradient, a
 * gather of the minibatch's rows) through a view made for the call; the
 * values through the cached array of their size or a new one. */
static int fit_reduce_hook(void *ctx_ptr, float *grads, int64_t n_grads,
                           double *values, int64_t n_values)
{
    fit_ctx *ctx = ctx_ptr;
    PyEval_RestoreThread(ctx->saved);
    PyObject *g = NULL, *v = ctx->values[grads != NULL], *r = NULL;
    npy_intp nv = (npy_intp)n_values, ng = (npy_intp)n_grads;
    int stop = 0;
    if (PyArray_DIM((PyArrayObject *)v, 0) != nv)
        v = new_array(1, &nv, NPY_FLOAT64);
    else
        Py_INCREF(v);
    if (!grads)
        g = Py_NewRef(Py_None);
    else if (grads == PyArray_DATA((PyArrayObject *)ctx->grads) &&
             ng == PyArray_DIM((PyArrayObject *)ctx->grads, 0))
        g = Py_NewRef(ctx->grads);
    else
        g = PyArray_SimpleNewFromData(1, &ng, NPY_FLOAT32, grads);
    stop = !v || !g;
    if (!stop) {
        if (nv > 0)
            memcpy(PyArray_DATA((PyArrayObject *)v), values, (size_t)nv * sizeof(double));
        r = PyObject_CallFunctionObjArgs(ctx->reduce, g, v, NULL);
        stop = r == NULL;
    }
    if (!stop && nv > 0)
        memcpy(values, PyArray_DATA((PyArrayObject *)v), (size_t)nv * sizeof(double));
    Py_XDECREF(r);
    Py_XDECREF(g);
    Py_XDECREF(v);
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
        npy_intp dims[2] = {f.n, hvae_model_latent_width(self->model, i)};
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

/* decode(encode(X)): encode's output, a list of T (mu, logvar) pairs, stands
 * for the means of z_1 (borrowed from the list, which the caller holds).
 * Z itself when it is not a list of tuples; NULL with a ValueError for a list
 * of tuples that is not such an output. */
static PyObject *encode_output_means(PyObject *Z, int32_t T)
{
    if (!PyList_Check(Z) || PyList_GET_SIZE(Z) == 0 || !PyTuple_Check(PyList_GET_ITEM(Z, 0)))
        return Z;
    Py_ssize_t n_pairs = PyList_GET_SIZE(Z);
    int pairs = n_pairs == T;
    for (Py_ssize_t i = 0; pairs && i < n_pairs; i++) {
        PyObject *item = PyList_GET_ITEM(Z, i);
        pairs = PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2 &&
                PyArray_Check(PyTuple_GET_ITEM(item, 0));
    }
    if (!pairs) {
        PyErr_Format(PyExc_ValueError,
                     "decode takes Z, the values of z_1 of shape (n, latent_dims[0]), or "
                     "encode's output, a list of %d (mu, logvar) pairs of arrays (it decodes "
                     "the first layer's means); got a list of %zd tuples",
                     (int)T, n_pairs);
        return NULL;
    }
    return PyTuple_GET_ITEM(PyList_GET_ITEM(Z, 0), 0);
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
    in.X = encode_output_means(in.X, hvae_model_config(self->model)->n_layers);
    if (!in.X)
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
    poll_ctx pc;
    poll_begin(&pc, self);
    hvae_status st = hvae_sample(self->model, self->ws, rng, n, cond_data(cond),
                                 observation_noise, PyArray_DATA((PyArrayObject *)out));
    if (poll_end(&pc, self, st, "sample failed") < 0 ||
        check_outputs("sample", floats_finite(out)) < 0)
        Py_CLEAR(out);
done:
    model_leave(self);
    Py_XDECREF(cond);
    return out;
}

typedef struct {
    PyObject *gamma;
} responsibilities_call;

static hvae_status responsibilities_body(call_frame *f, void *args)
{
    responsibilities_call *a = args;
    return hvae_responsibilities(f->self->model, f->self->ws, PyArray_DATA(f->x),
                                 cond_data(f->cond), f->n, out_data(a->gamma));
}

static PyObject *Model_responsibilities(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"X", "cond", NULL};
    frame_inputs in = {NULL, 0, NULL, 1, Py_None, WS_EVAL};
    responsibilities_call a = {NULL};
    call_frame f;
    PyObject *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|O", kwlist, &in.X, &in.cond))
        return NULL;
    if (hvae_model_n_components(self->model) < 1) {
        PyErr_Format(PyExc_ValueError, "responsibilities need a prior with components "
                     "(prior='gmm'); this model's prior is '%s'",
                     choice_name(CHOICE_PRIOR, hvae_model_config(self->model)->prior));
        return NULL;
    }
    if (frame_enter(&f, self, &in) < 0)
        goto done;
    npy_intp dims[2] = {f.n, hvae_model_n_components(self->model)};
    a.gamma = frame_output(&f, 2, dims, NPY_FLOAT64);
    if (!a.gamma || frame_call(&f, responsibilities_body, &a, "responsibilities failed") < 0 ||
        check_outputs("responsibilities", doubles_finite(a.gamma)) < 0)
        goto done;
    result = Py_NewRef(a.gamma);
done:
    frame_leave(&f);
    return result;
}

typedef struct {
    hvae_rng *rng;
    int observation_noise;
    PyObject *x;
} sample_top_call;

static hvae_status sample_top_body(call_frame *f, void *args)
{
    sample_top_call *a = args;
    return hvae_sample_top(f->self->model, f->self->ws, a->rng, f->n, PyArray_DATA(f->x),
                           cond_data(f->cond), a->observation_noise, out_data(a->x));
}

static PyObject *Model_sample_top(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"Z", "seed", "observation_noise", "cond", NULL};
    frame_inputs in = {NULL, 2, NULL, 1, Py_None, WS_EVAL};
    PyObject *seed_obj = Py_None, *result = NULL;
    sample_top_call a = {NULL, 0, NULL};
    call_frame f;
    hvae_rng local;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OpO", kwlist, &in.X, &seed_obj,
                                     &a.observation_noise, &in.cond))
        return NULL;
    if (seed_obj != Py_None) {
        unsigned long long seed;
        if (!u64_converter(seed_obj, &seed))
            return NULL;
        hvae_rng_seed(&local, seed);
    }
    if (frame_enter(&f, self, &in) < 0)
        goto done;
    a.rng = seed_obj != Py_None ? &local : &self->rng;
    npy_intp dims[2] = {f.n, hvae_model_config(self->model)->n_features};
    a.x = frame_output(&f, 2, dims, NPY_FLOAT32);
    if (!a.x || frame_call(&f, sample_top_body, &a, "sample_top failed") < 0 ||
        check_outputs("sample_top", floats_finite(a.x)) < 0)
        goto done;
    result = Py_NewRef(a.x);
done:
    frame_leave(&f);
    return result;
}

/* prior_log_density(Z): Z is checked (2-D, d_T columns, finite) before any
 * work; the call needs the workspace only for the VampPrior's pass over its
 * pseudo-inputs, so any workspace will do (no rows of its own). The model
 * takes no condition here: the top layer's prior has none. */
static PyObject *Model_prior_log_density(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"Z", NULL};
    PyObject *z_obj, *out = NULL;
    PyArrayObject *z = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:prior_log_density", kwlist, &z_obj))
        return NULL;
    const hvae_config *c = hvae_model_config(self->model);
    int32_t top = c->n_layers - 1;
    if (c->latent_families[top] != HVAE_LATENT_GAUSSIAN) {
        PyErr_Format(PyExc_ValueError, "prior_log_density needs a Gaussian top layer: this "
                     "model's top layer is '%s', whose uniform prior is over classes, not "
                     "a density over z_T", choice_name(CHOICE_LATENT_FAMILY,
                                                       c->latent_families[top]));
        return NULL;
    }
    if (model_enter(self) < 0)
        return NULL;
    z = as_finite_matrix(z_obj, hvae_model_latent_width(self->model, top), "Z");
    if (!z || ensure_workspace(self, 1) < 0)
        goto done;
    npy_intp n = PyArray_DIM(z, 0);
    out = new_array(1, &n, NPY_FLOAT64);
    if (!out)
        goto done;
    poll_ctx pc;
    poll_begin(&pc, self);
    hvae_status st = hvae_prior_log_density(self->model, self->ws, PyArray_DATA(z), n,
                                            out_data(out));
    /* -inf is an answer (a code so far out that its density underflows). */
    const double *v = out_data(out);
    int bad = 0;
    for (npy_intp k = 0; st == HVAE_OK && k < n; k++)
        bad |= v[k] != v[k] || v[k] == HUGE_VAL;
    if (poll_end(&pc, self, st, "prior_log_density failed") < 0 ||
        check_outputs("prior_log_density", !bad) < 0)
        Py_CLEAR(out);
done:
    model_leave(self);
    Py_XDECREF(z);
    return out;
}

/* ---- fit ----------------------------------------------------------------- */


/* One epoch's record: a dict of epoch_record_keys (the discriminator's
 * with ds, beta-TCVAE's with tcvae); kl a list of T floats. */
static PyObject *epoch_record(const hvae_epoch_stats *s, int32_t T,
                              double seconds, int complete,
                              const hvae_discriminator_stats *ds, int tcvae)
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
    for (int k = 0; k < 3; k++)
        values[RECORD_TCVAE_MI + k] = PyFloat_FromDouble(s->tcvae[k]);
    for (int k = 0; k < N_RECORD_KEYS; k++)
        if (!values[k])
            goto done;
    record = PyDict_New();
    int wanted[N_RECORD_GROUPS] = {1, ds != NULL, tcvae};
    for (int g = 0; record && g < N_RECORD_GROUPS; g++)
        for (int k = record_group_start[g]; wanted[g] && record && k < record_group_start[g + 1];
             k++)
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
    double prior_lr_scale; /* the prior's tensors' learning rate / learning_rate */
    hvae_optimizer_config disc_optimizer; /* the discriminator's Adam */
} fit_args;

/* fit's tc_weight, discriminator_learning_rate, discriminator_betas and
 * tcvae_weights (with n_data) into a->objective and a->disc_optimizer. */
static int parse_fit_discriminator(double tc_weight, double disc_lr, double disc_beta1,
                                   double disc_beta2, PyObject *tcvae, double n_data,
                                   fit_args *a)
{
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
    a->disc_optimizer.learning_rate = (float)disc_lr;
    a->disc_optimizer.beta1 = (float)disc_beta1;
    a->disc_optimizer.beta2 = (float)disc_beta2;
    return 0;
}

/* fit's optimizer and its settings, n_epochs and batch_size, checked, into
 * a->optimizer. */
static int parse_fit_optimizer(const char *optimizer, double weight_decay, double momentum,
                               double beta1, double beta2, double adam_eps, fit_args *a)
{
    int kind = parse_choice("optimizer", optimizer, CHOICE_OPTIMIZER);
    if (kind < 0)
        return -1;
    if (a->n_epochs < 0 || a->batch_size < 1 || a->batch_size > MAX_BATCH_SIZE) {
        PyErr_Format(PyExc_ValueError, "n_epochs must be >= 0 and batch_size "
                     "between 1 and 2**30; got n_epochs=%lld, batch_size=%lld", a->n_epochs,
                     a->batch_size);
        return -1;
    }
    if (check_float32("learning_rate", a->learning_rate, 0.0, 0) < 0 ||
        check_float32("weight_decay", weight_decay, 0.0, 1) < 0 ||
        check_float32("adam_eps", adam_eps, 0.0, 1) < 0 ||
        check_float32("prior_lr_scale", a->prior_lr_scale, 0.0, 0) < 0)
        return -1;
    if (!(momentum >= 0.0 && (float)momentum < 1.0f) ||
        !(beta1 >= 0.0 && (float)beta1 < 1.0f) || !(beta2 >= 0.0 && (float)beta2 < 1.0f)) {
        PyErr_SetString(PyExc_ValueError, "momentum and adam_betas must lie in [0, 1) "
                        "(in float32: 1 - 1e-8 rounds to 1)");
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

/* fit's callback, progress and reduce (callables or None), and the shard
 * of a data-parallel fit (n_global, shard_start with reduce). */
static int check_fit_hooks(const fit_args *a)
{
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
    return 0;
}

static int parse_fit_args(PyObject *args, PyObject *kwds, fit_args *a)
{
    static char *kwlist[] = {"X", "n_epochs", "batch_size", "learning_rate",
                             "optimizer", "beta", "shuffle", "callback",
                             "history", "weight_decay", "momentum", "adam_betas",
                             "adam_eps", "progress", "objective", "n_samples",
                             "free_bits", "cond", "reduce", "n_global",
                             "shard_start", "temperature", "temperature_min",
                             "temperature_decay", "straight_through", "gradient_estimator",
                             "score_baseline", "prior_lr_scale", "tc_weight",
                             "discriminator_learning_rate", "discriminator_betas",
                             "tcvae_weights", "n_data", NULL};
    estimator_args e = ESTIMATOR_ARGS_DEFAULT;
    PyObject *tcvae = Py_None;
    double n_data = 0.0;
    const char *objective = "elbo", *optimizer = "adam";
    double tc_weight = 0.0, disc_lr = 1e-4, disc_beta1 = 0.5, disc_beta2 = 0.9;
    long long n_samples = 1;
    double beta = 1.0, weight_decay = 0.0, momentum = 0.0, free_bits = 0.0;
    double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
    *a = (fit_args){NULL, Py_None, NULL, Py_None, Py_None, Py_None, 1, 128, 0, 0, 1e-3, 1,
                    hvae_objective_options_default(), hvae_optimizer_config_default(), 1.0,
                    hvae_optimizer_config_default()};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|LLdsdpOO!dd(dd)dOsLdOOLLdddpssddd(dd)Od:fit",
                                     kwlist,
                                     &a->X, &a->n_epochs, &a->batch_size, &a->learning_rate,
                                     &optimizer, &beta, &a->shuffle, &a->callback,
                                     &PyList_Type, &a->history, &weight_decay,
                                     &momentum, &beta1, &beta2, &adam_eps,
                                     &a->progress, &objective, &n_samples, &free_bits,
                                     &a->cond, &a->reduce, &a->n_global, &a->shard_start,
                                     &e.temperature, &e.temperature_min, &e.temperature_decay,
                                     &e.straight_through, &e.gradient_estimator,
                                     &e.score_baseline, &a->prior_lr_scale, &tc_weight,
                                     &disc_lr, &disc_beta1, &disc_beta2, &tcvae, &n_data))
        return -1;
    if (parse_objective(objective, n_samples, beta, free_bits, &a->objective) < 0 ||
        parse_estimator(&e, &a->objective) < 0)
        return -1;
    if (parse_fit_discriminator(tc_weight, disc_lr, disc_beta1, disc_beta2, tcvae, n_data,
                                a) < 0 ||
        parse_fit_optimizer(optimizer, weight_decay, momentum, beta1, beta2, adam_eps,
                            a) < 0 ||
        check_fit_hooks(a) < 0)
        return -1;
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
    /* The C loop steps it after each of the model's steps (also across
     * processes); its stats go into the model's. */
    to->disc_opt = self->disc_opt;
    to->disc_stats = &self->disc_stats;
    return 0;
}

/* After an epoch that applied steps (or completed): its record into the
 * returned list and history, then the callback (complete epochs only).
 * Returns 0 to go on, 1 when the callback returned False, -1 on error. */
static int fit_record_epoch(const fit_args *a, PyObject *records, long long epoch,
                            const hvae_epoch_stats *stats, int32_t T, double seconds,
                            int complete, hvae_discriminator_stats *ds, int has_disc)
{
    PyObject *rec = epoch_record(stats, T, seconds, complete, has_disc ? ds : NULL,
                                 a->objective.tcvae);
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
        /* Ctrl-C within a long minibatch too: the poll stops it before its
         * step (the batch hook looks between minibatches). */
        poll_ctx pc;
        poll_install(&pc, self, &ctx->saved);
        ctx->saved = PyEval_SaveThread();
        /* On divergence the C loop returns the model, the optimizer and the
         * generator to their state at the start of the epoch. */
        memset(&self->disc_stats, 0, sizeof self->disc_stats);
        hvae_status st = hvae_train_epoch(self->model, self->ws, self->opt, &self->rng,
                                          PyArray_DATA(x), cond_data(cond), n, order, to,
                                          &stats);
        PyEval_RestoreThread(ctx->saved);
        ctx->saved = NULL;
        poll_remove(self);
        if (pc.stopped)
            ctx->interrupted = 1;
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
    if (parse_fit_args(args, kwds, &a) < 0 || check_estimator_fits(self, &a.objective) < 0 ||
        model_enter(self) < 0)
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
    if (st == HVAE_OK)
        st = hvae_optimizer_set_lr_scale(self->opt, hvae_model_prior_offset(self->model),
                                         hvae_model_n_params(self->model),
                                         (float)a.prior_lr_scale);
    if (raise_status(st, "cannot set up the optimizer") < 0)
        goto done;
    order = raw_array(N, sizeof(int64_t), "the row order of the fit", "rows");
    if (!order)
        goto done;
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

/* reserve(rows, optimizer=None): what a fit allocates, ahead of it. */
static PyObject *Model_reserve(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"rows", "optimizer", NULL};
    long long rows;
    const char *optimizer = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "L|z:reserve", kwlist, &rows, &optimizer))
        return NULL;
    if (rows < 1) {
        PyErr_Format(PyExc_ValueError, "rows must be >= 1; got %lld", rows);
        return NULL;
    }
    int kind = optimizer ? parse_choice("optimizer", optimizer, CHOICE_OPTIMIZER) : 0;
    if (kind < 0 || model_enter(self) < 0)
        return NULL;
    PyObject *result = NULL;
    if (ensure_workspace(self, rows) < 0)
        goto done;
    if (optimizer && !self->opt) {
        hvae_optimizer_config oc = hvae_optimizer_config_default();
        oc.kind = (hvae_optimizer_kind)kind;
        hvae_status st = hvae_optimizer_create(self->model, &oc, &self->opt);
        if (st == HVAE_ERR_OUT_OF_MEMORY || st == HVAE_ERR_SIZE_OVERFLOW) {
            long long P = hvae_model_n_params(self->model);
            raise_no_memory("the optimizer's state", P, "parameters (5 floats each)",
                            (size_t)P * 5 * sizeof(float));
            goto done;
        }
        if (raise_status(st, "cannot set up the optimizer") < 0)
            goto done;
    }
    result = Py_NewRef(Py_None);
done:
    model_leave(self);
    return result;
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

/* The discriminator's Adam (its settings, step count and moments, over
 * hvae_discriminator_n_params floats), or None before its first step. */
static PyObject *disc_optimizer_state(ModelObject *self)
{
    if (!self->disc_opt)
        return Py_NewRef(Py_None);
    npy_intp P = hvae_discriminator_n_params(self->model);
    const hvae_optimizer_config *oc = hvae_optimizer_get_config(self->disc_opt);
    return Py_BuildValue("{sdsdsdsdsLsNsN}", "learning_rate", (double)oc->learning_rate,
                         "beta1", (double)oc->beta1, "beta2", (double)oc->beta2, "eps",
                         (double)oc->eps, "step",
                         (long long)*hvae_optimizer_step_count(self->disc_opt), "m",
                         copy_floats(hvae_optimizer_state(self->disc_opt, 0), P), "v",
                         copy_floats(hvae_optimizer_state(self->disc_opt, 1), P));
}

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
    PyObject *disc_state = disc_optimizer_state(self);
    if (!disc_state) {
        Py_DECREF(opt_state);
        return NULL;
    }
    PyObject *rng = rng_tuple(&self->rng);
    PyObject *threads = Model_get_n_threads(self, NULL);
    return Py_BuildValue("{sNsNsNsNsN}", "parameters",
                         copy_floats(hvae_model_params(self->model), P),
                         "optimizer", opt_state, "rng_state", rng, "n_threads",
                         threads, "discriminator_optimizer", disc_state);
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

/* The discriminator's Adam from disc_optimizer_state's dict into a new
 * optimizer *out (NULL for None); -1 with an exception. */
static int disc_optimizer_from_state(ModelObject *self, PyObject *o, hvae_optimizer **out)
{
    *out = NULL;
    if (o == Py_None)
        return 0;
    if (!PyDict_Check(o)) {
        PyErr_Format(PyExc_TypeError, "Model state's 'discriminator_optimizer' must be None "
                     "or a dict; got %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (!hvae_model_config(self->model)->discriminator) {
        PyErr_SetString(PyExc_ValueError, "Model state has a discriminator optimizer but the "
                        "model has no discriminator");
        return -1;
    }
    hvae_optimizer_config oc = hvae_optimizer_config_default();
    long long step;
    PyObject *m_obj, *v_obj;
    static char *keys[] = {"learning_rate", "beta1", "beta2", "eps", "step", "m", "v", NULL};
    PyObject *empty = PyTuple_New(0);
    int ok = empty && PyArg_ParseTupleAndKeywords(empty, o, "ffffLOO", keys, &oc.learning_rate,
                                                  &oc.beta1, &oc.beta2, &oc.eps, &step,
                                                  &m_obj, &v_obj);
    Py_XDECREF(empty);
    if (!ok)
        return -1;
    if (step < 0) {
        PyErr_SetString(PyExc_ValueError, "the discriminator optimizer's step must be >= 0");
        return -1;
    }
    npy_intp P = hvae_discriminator_n_params(self->model);
    if (raise_status(hvae_optimizer_create_for(P, &oc, out),
                     "invalid discriminator optimizer state") < 0 ||
        load_floats(m_obj, hvae_optimizer_state(*out, 0), P, "discriminator optimizer m") < 0 ||
        load_floats(v_obj, hvae_optimizer_state(*out, 1), P, "discriminator optimizer v") < 0) {
        hvae_optimizer_free(*out);
        *out = NULL;
        return -1;
    }
    *hvae_optimizer_step_count(*out) = step;
    return 0;
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
    hvae_optimizer *opt = NULL, *disc_opt = NULL;
    float *params = raw_array(P, sizeof(float), "a copy of the parameters", "floats");
    PyObject *p = dict_item(state, "parameters"), *o, *rng, *threads;
    if (!params)
        goto done;
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
    /* Absent from states written before it existed: None. */
    PyObject *d = PyDict_GetItemString(state, "discriminator_optimizer"); /* borrowed */
    if (disc_optimizer_from_state(self, d ? d : Py_None, &disc_opt) < 0)
        goto done;
    if (set_rng_state(self, rng) < 0 ||
        Model_set_n_threads(self, threads, NULL) < 0)
        goto done;
    /* Everything is valid: commit. */
    memcpy(hvae_model_params(self->model), params, (size_t)P * sizeof(float));
    hvae_optimizer_free(self->opt);
    self->opt = opt;
    opt = NULL;
    hvae_optimizer_free(self->disc_opt);
    self->disc_opt = disc_opt;
    disc_opt = NULL;
    result = Py_NewRef(Py_None);
done:
    hvae_optimizer_free(opt);
    hvae_optimizer_free(disc_opt);
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
    PyObject *family = Model_get_config_value(self, "latent_family");
    PyObject *K = family ? Model_get_config_value(self, "n_categories") : NULL;
    PyObject *disc = !K ? NULL
                     : c->discriminator
                         ? dims_tuple(c->discriminator_hidden, c->discriminator_n_hidden)
                         : Py_NewRef(Py_None);
    if (!disc) {
        Py_XDECREF(family);
        Py_XDECREF(K);
        Py_DECREF(state);
        return NULL;
    }
    return Py_BuildValue("(O(LNNsssKsLssNNLLNs)N)", (PyObject *)Py_TYPE(self),
                         (long long)c->n_features,
                         dims_tuple(c->latent_dims, c->n_layers),
                         dims_tuple(c->hidden_dims, c->n_hidden),
                         choice_name(CHOICE_LIKELIHOOD, c->likelihood),
                         choice_name(CHOICE_ACTIVATION, c->activation),
                         choice_name(CHOICE_DECODER_VARIANCE, c->decoder_variance), self->seed,
                         choice_name(CHOICE_INFERENCE, c->inference), (long long)c->n_conditions,
                         choice_name(CHOICE_MARKOV_KL, c->markov_kl),
                         choice_name(CHOICE_PRIOR, c->prior), family, K,
                         (long long)c->n_components, (long long)c->n_pseudo_inputs, disc,
                         choice_name(CHOICE_COVARIANCE_TYPE, c->prior_covariance), state);
}

static PyObject *Model_repr(ModelObject *self)
{
    const hvae_config *c = hvae_model_config(self->model);
    PyObject *latent = dims_tuple(c->latent_dims, c->n_layers);
    PyObject *hidden = dims_tuple(c->hidden_dims, c->n_hidden);
    PyObject *family = Model_get_config_value(self, "latent_family");
    PyObject *K = Model_get_config_value(self, "n_categories");
    PyObject *r = NULL;
    if (latent && hidden && family && K)
        r = PyUnicode_FromFormat(
            "Model(n_features=%lld, latent_dims=%R, hidden_dims=%R, "
            "likelihood='%s', activation='%s', decoder_variance='%s', seed=%llu, "
            "inference='%s', n_conditions=%lld, markov_kl='%s', prior='%s', "
            "latent_family=%R%s%R, n_components=%lld, n_pseudo_inputs=%lld, "
            "prior_covariance_type='%s')",
            (long long)c->n_features, latent, hidden,
            choice_name(CHOICE_LIKELIHOOD, c->likelihood), choice_name(CHOICE_ACTIVATION, c->activation),
            choice_name(CHOICE_DECODER_VARIANCE, c->decoder_variance), self->seed,
            choice_name(CHOICE_INFERENCE, c->inference), (long long)c->n_conditions,
            choice_name(CHOICE_MARKOV_KL, c->markov_kl), choice_name(CHOICE_PRIOR, c->prior),
            family, ", n_categories=", K, (long long)c->n_components,
            (long long)c->n_pseudo_inputs,
            choice_name(CHOICE_COVARIANCE_TYPE, c->prior_covariance));
    Py_XDECREF(latent);
    Py_XDECREF(hidden);
    Py_XDECREF(family);
    Py_XDECREF(K);
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
    {"reserve", (PyCFunction)(void (*)(void))Model_reserve, METH_VARARGS | METH_KEYWORDS,
     "reserve(rows, optimizer=None)\n--\n\n"
     "Allocates now what a fit would: a workspace of at least ``rows`` rows\n"
     "(minibatch rows times draws per row) and, when ``optimizer`` names one\n"
     "and the model has none yet, the optimizer's state. Raises MemoryError\n"
     "(saying what and how much) and leaves the model as it was when that\n"
     "fails, so a caller can allocate everything before it changes anything."},
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
     "              n_samples=1, free_bits=0.0, cond=None, temperature=1.0,\n"
     "              straight_through=False, gradient_estimator='auto',\n"
     "              score_baseline='auto', tc_weight=0.0, tcvae_weights=None,\n"
     "              n_data=0.0)\n--\n\n"
     "(loss, grad): the training loss over X and its gradient as a float32\n"
     "array aligned with ``parameters``. objective='elbo': -mean of\n"
     "(reconstruction - beta * KL) averaged over n_samples draws, each layer's\n"
     "batch-mean KL floored at free_bits when free_bits > 0; objective='iwae':\n"
     "-mean of log (1/k) sum_j p(x, z_j)/q(z_j|x), k = n_samples. With noise,\n"
     "the T arrays hold (n * n_samples, d_i) draws, row b * n_samples + s\n"
     "(a categorical layer: M*K Gumbel draws). temperature and straight_through:\n"
     "the Gumbel-softmax relaxation of categorical layers (not annealed here).\n"
     "gradient_estimator (GRADIENT_ESTIMATORS): 'auto' (reparameterisation for\n"
     "Gaussian layers, Gumbel-softmax for categorical ones) or\n"
     "'score_function' (REINFORCE on exact samples, centred by score_baseline,\n"
     "SCORE_BASELINES). Different seeds give independent estimates: see\n"
     "hvae.gradient_variance.\n"
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
     "its log-variance (zeros where the variance is fixed to 1). Z may also be\n"
     "encode's output, the list of (mu, logvar) pairs: decode(encode(X))\n"
     "decodes the posterior means of z_1."},
    {"responsibilities", (PyCFunction)(void (*)(void))Model_responsibilities,
     METH_VARARGS | METH_KEYWORDS,
     "responsibilities(X, cond=None)\n--\n\n"
     "q(c | x) of a mixture prior's components, (n, K) float64 rows summing to 1:\n"
     "p(c | z_T) at the posterior mean of z_T (deterministic; hvae_responsibilities)."},
    {"prior_log_density", (PyCFunction)(void (*)(void))Model_prior_log_density,
     METH_VARARGS | METH_KEYWORDS,
     "prior_log_density(Z)\n--\n\n"
     "log p(z_T) of the top layer's prior at rows Z (n, d_T), (n,) float64 in nats\n"
     "(hvae_prior_log_density): N(0, I), the mixture's or the VampPrior's density; for\n"
     "prior='density_ratio' log N(z; 0, I) + T(z), unnormalised. Each row alone: the\n"
     "same bits whatever the other rows and the thread count."},
    {"sample_top", (PyCFunction)(void (*)(void))Model_sample_top, METH_VARARGS | METH_KEYWORDS,
     "sample_top(Z, seed=None, observation_noise=False, cond=None)\n--\n\n"
     "Ancestral samples (n, D) below given top-layer codes Z (n, d_T): the rest as\n"
     "sample(). seed None uses (and advances) the model's generator."},
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
     "    n_global=0, shard_start=0, temperature=1.0, temperature_min=0.5,\n"
     "    temperature_decay=0.0, straight_through=False, gradient_estimator='auto',\n"
     "    score_baseline='auto', prior_lr_scale=1.0, tc_weight=0.0,\n"
     "    discriminator_learning_rate=1e-4, discriminator_betas=(0.5, 0.9),\n"
     "    tcvae_weights=None, n_data=0.0)\n--\n\n"
     "Minibatch training; the optimizer state persists across calls.\n\n"
     "prior_lr_scale: the prior's own tensors (from ``prior_offset`` on) step at\n"
     "prior_lr_scale * learning_rate (VaDE trains its mixture at another rate).\n\n"
     "objective, n_samples, beta, free_bits, straight_through, gradient_estimator,\n"
     "score_baseline, tc_weight, tcvae_weights and n_data as in loss_and_grad\n"
     "(n_data 0: the rows of X); the Gumbel-softmax temperature of\n"
     "optimizer step t is max(temperature_min, temperature *\n"
     "exp(-temperature_decay * t)) (Jang et al.'s annealing); cond holds\n"
     "the rows' conditions for a conditional model. A model with a discriminator\n"
     "also trains it, one Adam step (discriminator_learning_rate,\n"
     "discriminator_betas) after each of the model's, on that minibatch's\n"
     "top-layer samples; its records then also hold DISCRIMINATOR_RECORD_KEYS.\n"
     "A beta-TCVAE fit's records also hold TCVAE_RECORD_KEYS (the top layer's\n"
     "index-code MI, total correlation and dimension-wise KL as trained).\n"
     "With reduce (data-parallel), the discriminator's gradient and\n"
     "beta-TCVAE's gathers of the minibatch go through reduce too.\n\n"
     "Returns one record per epoch (dict: loss, objective, elbo, reconstruction, kl per\n"
     "layer, seconds, n_batches, n_rows, complete). Records are also appended\n"
     "to ``history`` (a list) as they are made, so they survive an exception.\n"
     "callback(epoch, record) runs after each epoch; returning False stops.\n"
     "progress(n_rows) runs after each minibatch (for progress bars); an\n"
     "exception from it stops training after that minibatch and propagates.\n"
     "Ctrl-C stops within the current minibatch, which is not applied\n"
     "(KeyboardInterrupt); a non-finite loss raises DivergenceError before\n"
     "the step is applied.\n\n"
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
    {"n_components", (getter)Model_get_config_value, NULL,
     "Components K of a mixture prior (the argument; priors without components "
     "ignore it)", "n_components"},
    {"prior_covariance_type", (getter)Model_get_config_value, NULL,
     "The mixture prior's component covariance (COVARIANCE_TYPES; 'diag' for the other "
     "priors)", "prior_covariance_type"},
    {"prior_offset", (getter)Model_get_config_value, NULL,
     "Where the prior's tensors start in ``parameters`` (they run to its end)",
     "prior_offset"},
    {"latent_family", (getter)Model_get_config_value, NULL,
     "The latent layers' distribution family (LATENT_FAMILIES): one name, or a tuple of "
     "one per layer when they differ", "latent_family"},
    {"n_categories", (getter)Model_get_config_value, NULL,
     "Classes per variable of each layer (0 for a Gaussian layer)", "n_categories"},
    {"latent_widths", (getter)Model_get_config_value, NULL,
     "Columns of each layer's sample (d_i; M_i * K_i for a categorical layer)",
     "latent_widths"},
    {"discriminator_hidden", (getter)Model_get_config_value, NULL,
     "The discriminator's hidden widths, None without one", "discriminator_hidden"},
    {"n_conditions", (getter)Model_get_config_value, NULL,
     "Width of the condition (0: not conditional)", "n_conditions"},
    {"n_pseudo_inputs", (getter)Model_get_config_value, NULL,
     "The VampPrior's number of pseudo-inputs K (0 for another prior)", "n_pseudo_inputs"},
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
              "prior='standard', latent_family='gaussian', n_categories=None,\n"
              "n_components=1, n_pseudo_inputs=None, discriminator_hidden=None,\n"
              "prior_covariance_type='diag')\n--\n\n"
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
              "latent layers' family (LATENT_FAMILIES), one name or one per layer.\n"
              "A 'categorical' layer i holds latent_dims[i] = M variables of K =\n"
              "n_categories classes (an int, or one per layer; None: 10); its\n"
              "samples, noise (Gumbel) and encode outputs (class probabilities and\n"
              "their logs) have M*K columns (latent_widths), column m*K + k.\n"
              "n_components: a mixture prior's ('gmm') number of components K.\n"
              "prior_covariance_type: its components' covariance (COVARIANCE_TYPES):\n"
              "'diag' (tensor 'prior.logvar' (K, d_T)) or 'full' (the precision's\n"
              "Cholesky factor: 'prior.prec_log_diag' (K, d_T), the log of its\n"
              "diagonal, and 'prior.prec_lower' (K, d_T(d_T-1)/2), its strictly-lower\n"
              "entries packed row by row; d_T <= MAX_FULL_COVARIANCE_DIM).\n"
              "n_pseudo_inputs: with prior='vamp' (the VampPrior, a mixture of the top\n"
              "layer's posteriors at K learned pseudo-inputs, tensor\n"
              "'prior.pseudo_inputs' of shape (K, n_features)), K >= 1, None for the\n"
              "paper's 500; None or 0 with any other prior. discriminator_hidden: None,\n"
              "or the hidden widths of a discriminator T(z_T) (leaky-ReLU MLP, one\n"
              "linear output; its tensors 'discriminator.*' close the parameter\n"
              "buffer), trained beside the model by fit: FactorVAE's total-correlation\n"
              "estimate (fit's tc_weight), or the 'density_ratio' prior's\n"
              "log q(z_T)/N(z_T; 0, I) (that prior always has one: (256, 256) by\n"
              "default).\n\n"
              "Threads: a model serves one call at a time (others wait; a fit's\n"
              "callback calling back into it gets a RuntimeError). Long calls stop\n"
              "for Ctrl-C within a layer's work. Fork: in a child, a model that\n"
              "another thread of the parent was using at the fork raises\n"
              "RuntimeError (its state may be mid-update); an idle one works.",
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
    if (n < 1 || n > MAX_MODEL_THREADS) {
        PyErr_Format(PyExc_ValueError, "n_threads must be in 1..%d; got %ld",
                     MAX_MODEL_THREADS, n);
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
        PyModule_AddIntConstant(m, "MAX_HIDDEN", HVAE_MAX_HIDDEN) < 0 ||
        PyModule_AddIntConstant(m, "MAX_THREADS", MAX_MODEL_THREADS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BATCH_SIZE", MAX_BATCH_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SAMPLES", MAX_SAMPLES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_COMPONENTS", HVAE_MAX_COMPONENTS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_FULL_COVARIANCE_DIM", HVAE_MAX_FULL_COVARIANCE_DIM) < 0)
        goto fail;
    for (int kind = 0; kind < N_CHOICES; kind++)
        if (module_add_new(m, choices[kind].attribute, choice_tuple((choice_kind)kind)) < 0)
            goto fail;
    for (int g = 0; g < N_RECORD_GROUPS; g++) {
        int first = record_group_start[g], count = record_group_start[g + 1] - first;
        PyObject *keys = PyTuple_New(count);
        for (int k = 0; keys && k < count; k++) {
            PyObject *key = PyUnicode_FromString(epoch_record_keys[first + k]);
            if (!key)
                Py_CLEAR(keys);
            else
                PyTuple_SET_ITEM(keys, k, key);
        }
        if (module_add_new(m, record_group_names[g], keys) < 0)
            goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
