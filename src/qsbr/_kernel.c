/* qsbr._kernel: the native twin of qsbr/_pykernel.py.
 *
 * The kernel is the part of qsbr that readers run on every request: the
 * design's wr_seq, each thread's seq, quiescent(), attach/detach and the
 * read sections, and the loads of the rd_seq scan. Everything else (the
 * registry, the deferred lists, caps, stalls, stats) is Python and does not
 * know which twin it runs on: qsbr/kernel.py picks this module when it was
 * built and QSBR_PURE_PYTHON is not set, else _pykernel.py. The two twins
 * behave the same, errors included; the suite runs on both.
 *
 * Types (each a base class the Python package subclasses):
 *   DomainCore       wr_seq (atomic int64) and a per-process serial; the
 *                    base of qsbr.Domain: quiescent(), attached(), detached()
 *   ThreadCore       one registered thread's seq (atomic int64) and whether
 *                    it is registered; the base of ThreadState
 *   ThreadHandle     a thread's own handle (domain, state): quiescent(),
 *                    attach(), detach(), ...; qsbr.ThreadHandle itself, not
 *                    subclassed on the hot path (CPython's call of a C
 *                    method specializes only for the method's exact type)
 *   ReadSection      `with domain.attached():` (levels as bits of a uint64)
 *   DetachedSection  `with domain.detached():`
 *   GraceTiming      the times of the advances rd_seq has not reached (I8),
 *                    and the last rd_seq published (B5)
 *   PoolCore         one BufferPool's hot path: free stacks and goal FIFOs
 *                    per size class, in shards (B1-B7, below with the type)
 *   PoolLease        what exports each view a PoolCore hands out
 * and scan_slots(), the loads of one step of the rd_seq scan, and
 * run_entries(), the loop that runs a batch's releases (deferred.py).
 *
 * Invariants (the design's, kept here):
 *   I1. wr_seq starts at 1 and only advance() changes it, by +2 (an
 *       atomic RMW): it is odd and never decreases.
 *   I2. A ThreadCore's seq is written by its own thread (quiescent, attach,
 *       detach, the sections), except the 0 stored when it is unregistered
 *       (its own thread, or, after fork or at thread exit, whoever repairs).
 *       seq == 0 means detached: scans leave it out.
 *   I3. A thread's quiescent() / section exit stores seq = wr_seq with
 *       release order after loading wr_seq with acquire order: every shared
 *       read the thread made before is ordered before the store, and every
 *       read after it sees the unlinks that preceded the advance it loaded.
 *   I4. attach (entering a section from detached) stores seq and then issues
 *       a seq_cst fence, before the thread reads anything shared. With the
 *       scan's seq_cst fence before its loads (scan_slots) this rules out
 *       the store-buffering outcome "the scan saw 0, the reader read the
 *       old pointer" (see docs/design.md, "Memory ordering").
 *   I5. The per-thread cache (tl_cache) maps a domain's serial to the
 *       calling thread's ThreadCore, borrowed. Serials are never reused, so
 *       an entry can only be used on the live domain it was made for. A
 *       thread's state is freed only after it is unregistered, which the
 *       thread does itself (unregister(), or its exit sentinel, which runs in
 *       the exiting thread) and which clears the entry; an entry that
 *       outlives that (another thread unregistered the state: fork repair)
 *       still points to a live state, whose `registered` flag is 0, so the
 *       slow path runs. ThreadCore's dealloc clears the entry too.
 *   I6. retire()'s fast path does what Domain._retire_python does, in the same
 *       order, for the common case only (a registered, listed thread, a
 *       plain domain: no cap, no debug mode, the standard goal rule); every
 *       other case, and every error, goes to _retire_python. The four items
 *       of an entry are appended by append_entry(), atomically with respect
 *       to pollers on both builds (they take prefixes of whole entries), and
 *       the bytes are counted before the append (pending bytes never < 0).
 *   I7. retire() skips the poll of its advance (counting it as a failed
 *       poll) when it cannot find anything: the caller is attached, its seq
 *       is the pinned_seq its last poll from retire() recorded, and so
 *       seq <= rd_seq. rd_seq is a minimum over attached threads, the
 *       caller among them, so no scan can move it until the caller's next
 *       quiescent state, and every entry with goal <= rd_seq was taken by
 *       the poll that published it. A full poll still runs once poll_due
 *       has passed (1 ms: stall checks, releases a KeyboardInterrupt put
 *       back). Domain._after_advance holds the Python twin of the test.
 *   I8. advance() adds 2 to wr_seq and records (new wr_seq, time) in the
 *       domain's GraceTiming in one critical section (the timing's mutex on
 *       free-threaded builds; the GIL otherwise, as nothing in it calls
 *       Python), so the records are in advance order: ascending.
 *
 * No GIL is assumed: on free-threaded builds every field shared between
 * threads is a C11 atomic, and the module declares Py_MOD_GIL_NOT_USED.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

/* -- module state ------------------------------------------------------ */

typedef struct {
    PyTypeObject *DomainCore_type;
    PyTypeObject *ThreadCore_type;
    PyTypeObject *ThreadHandle_type;
    PyTypeObject *ReadSection_type;
    PyTypeObject *DetachedSection_type;
    PyTypeObject *GraceTiming_type;
    PyTypeObject *PoolLease_type;
    PyTypeObject *PoolCore_type;
    PyObject *unregistered_handle_error;  /* qsbr.errors.unregistered_handle_error */
    /* Interned names of the Python methods the slow paths call: made once,
     * so that no call allocates a name. */
    PyObject *str_thread_core;
    PyObject *str_state;
    PyObject *str_after_advance;
    PyObject *str_retire_python;
} kernel_state;

static struct PyModuleDef kernel_module;

static inline kernel_state *
get_kernel_state(PyObject *module)
{
    return (kernel_state *)PyModule_GetState(module);
}

/* -- objects ------------------------------------------------------------ */

/* The times of the advances rd_seq has not reached (qsbr/timing.py says what
 * they answer). I8: seqs[start:end] is ascending and every record is made
 * together with its advance: on free-threaded builds under `mutex`, with the
 * GIL by holding it (nothing in a critical section calls into Python or
 * releases it). At most KEPT records: later advances are not timed. */
typedef struct {
    PyObject_HEAD
#ifdef Py_GIL_DISABLED
    PyMutex mutex;
#endif
    int64_t *seqs;           /* wr_seq values */
    double *times;           /* time.monotonic() of each */
    Py_ssize_t start, end, cap;
    double longest;          /* seconds: the longest grace period that has ended */
    /* B5: the largest rd_seq covered() was told of (Reclamation publishes
     * every rd_seq it reaches, under its lock): never ahead of the domain's
     * rd_seq. Stored with release order, loaded with acquire order by the
     * pool's fast path (PoolCore) before it reuses a block. */
    _Atomic int64_t rd_seq;
} GraceTiming;

#define TIMING_KEPT 4096

#ifdef Py_GIL_DISABLED
#define TIMING_LOCK(t) PyMutex_Lock(&(t)->mutex)
#define TIMING_UNLOCK(t) PyMutex_Unlock(&(t)->mutex)
#else
#define TIMING_LOCK(t) ((void)(t))
#define TIMING_UNLOCK(t) ((void)(t))
#endif

typedef struct {
    PyObject_HEAD
    _Atomic int64_t wr_seq;  /* I1 */
    uint64_t serial;         /* unique in the process, never 0 (I5) */
    PyObject *tls;           /* the domain's threading.local (Python's) */
    /* retire()'s fast path (I6), set once by Domain.__init__ through
     * _configure(): */
    int retire_fast;         /* 0: every retire() takes the Python path */
    int64_t deferred_limit;
    int64_t deferred_bytes;
    PyObject *sizers;        /* sizes.SIZERS: type -> sizer */
    _Atomic int64_t skipped_polls;  /* I7: polls retire() skipped (a statistic: relaxed) */
    _Atomic int64_t advances;       /* advance() calls (a statistic: relaxed) */
    GraceTiming *timing;     /* advance() records into it (I8); set once by _configure */
} DomainCore;

typedef struct {
    PyObject_HEAD
    _Atomic int64_t seq;     /* I2: wr_seq at the last quiescent state; 0 = detached */
    _Atomic int registered;  /* 1 from creation until _mark_unregistered() */
    PyObject *read_section;
    PyObject *detached_section;
    /* The writer's side (I6). Written by the owning thread while it is
     * registered (and, after it left, under the domain's work lock); read by
     * pollers: retired_bytes and listed are atomics for that. */
    int64_t deferrals;
    int64_t bytes_at_advance;
    _Atomic int64_t retired_bytes;
    _Atomic int listed;
    PyObject *deferred;      /* the flat deferred-free list [goal, fn, arg, size, ...] */
    /* I7, written and read by the owning thread only (Domain._after_advance
     * and the fast path): the seq with which its last poll from retire()
     * found rd_seq held where that seq holds it (0: none), and when
     * (monotonic ns) a poll is due however pinned rd_seq looks. */
    long long pinned_seq;
    long long poll_due;
    /* The goal retire() handed out last, as an int object, and its value:
     * many retirements share a goal (wr_seq + 2 until the next advance), so
     * the fast path hands out one object for them. Owner thread only. */
    PyObject *goal_obj;
    int64_t goal_val;
} ThreadCore;

typedef struct {
    PyObject_HEAD
    DomainCore *domain;
    ThreadCore *state;
    PyObject *weakreflist;
} ThreadHandle;

/* A read or detached section: per nesting level, whether the thread was
 * attached when the level began, as bits of `levels` below a leading 1. */
typedef struct {
    PyObject_HEAD
    ThreadCore *state;
    DomainCore *domain;
    uint64_t levels;
} Section;

#define MAX_DEPTH 62  /* levels holds the leading 1 and one bit per level */

static _Atomic uint64_t next_serial = 1;

typedef struct {
    uint64_t serial;
    ThreadCore *state;  /* borrowed (I5) */
} cache_entry;

static _Thread_local cache_entry tl_cache;

/* -- the design's operations on seq ------------------------------------ */

static inline int64_t
load_wr_seq(DomainCore *d)
{
    /* I3: acquire, so that reads after it see what preceded the advance. */
    return atomic_load_explicit(&d->wr_seq, memory_order_acquire);
}

static inline void
store_quiescent(ThreadCore *st, int64_t wr)
{
    /* I3: release, after every shared read the thread made before. */
    atomic_store_explicit(&st->seq, wr, memory_order_release);
}

static inline void
store_attach(ThreadCore *st, int64_t wr)
{
    /* I4: the store, then a full fence before any shared read: a scan that
     * misses this store (sees 0) ran its fence before ours, so it only
     * frees what was unlinked before the reads that follow here. */
    atomic_store_explicit(&st->seq, wr, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
}

static inline void
store_detach(ThreadCore *st)
{
    /* Release: after the last shared read of the attached stretch. */
    atomic_store_explicit(&st->seq, 0, memory_order_release);
}

static inline int64_t
load_seq(ThreadCore *st)
{
    return atomic_load_explicit(&st->seq, memory_order_acquire);
}

static inline int
is_registered(ThreadCore *st)
{
    return atomic_load_explicit(&st->registered, memory_order_relaxed);
}

static int
set_int64(PyObject *value, int64_t *out, const char *name)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "%s cannot be deleted", name);
        return -1;
    }
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", name, Py_TYPE(value)->tp_name);
        return -1;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

/* time.monotonic_ns(): the same clock. INT64_MAX if it cannot be read (then
 * nothing is skipped). */
static inline int64_t
monotonic_ns(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    if (PyTime_MonotonicRaw(&t) < 0) {
        PyErr_Clear();
        return INT64_MAX;
    }
    return (int64_t)t;
#else
    return (int64_t)_PyTime_GetMonotonicClock();
#endif
}

static int
check_seq_value(PyObject *value, int64_t *out)
{
    int64_t v;
    if (set_int64(value, &v, "seq") < 0) {
        return -1;
    }
    if (v < 0) {
        PyErr_SetString(PyExc_ValueError, "seq must be >= 0");
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

/* -- the per-thread cache (I5) ----------------------------------------- */

/* The calling thread's state in `d`, or NULL (no exception set) when the
 * cache has no live entry for it. */
static inline ThreadCore *
cached_state(DomainCore *d)
{
    ThreadCore *st = tl_cache.state;
    if (tl_cache.serial == d->serial && st != NULL && is_registered(st)) {
        return st;
    }
    return NULL;
}

static inline void
forget_cached(ThreadCore *st)
{
    if (tl_cache.state == st) {
        tl_cache.state = NULL;
        tl_cache.serial = 0;
    }
}

/* Remember `st` as the calling thread's state in `d` (I5): borrowed, kept
 * alive by the thread's registration (tls.state) while it is registered. */
static inline void
remember_state(DomainCore *d, ThreadCore *st)
{
    if (is_registered(st)) {
        tl_cache.serial = d->serial;
        tl_cache.state = st;
    }
}

/* The slow path: ask the domain (Python) for the calling thread's state,
 * `what` naming the call for its NotRegisteredError; cache it. Returns a
 * borrowed pointer kept alive by the thread's registration, or NULL with an
 * exception set. */
static kernel_state *
state_of(PyObject *obj)
{
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(obj), &kernel_module);
    return module == NULL ? NULL : get_kernel_state(module);
}

static ThreadCore *
lookup_state(DomainCore *d, const char *what)
{
    kernel_state *ks = state_of((PyObject *)d);
    if (ks == NULL) {
        return NULL;
    }
    PyObject *arg = PyUnicode_InternFromString(what);
    if (arg == NULL) {
        return NULL;
    }
    PyObject *st = PyObject_CallMethodOneArg((PyObject *)d, ks->str_thread_core, arg);
    Py_DECREF(arg);
    if (st == NULL) {
        return NULL;
    }
    if (!PyObject_TypeCheck(st, ks->ThreadCore_type)) {
        PyErr_Format(PyExc_TypeError, "_thread_core() returned a %.100s, not a thread state",
                     Py_TYPE(st)->tp_name);
        Py_DECREF(st);
        return NULL;
    }
    ThreadCore *core = (ThreadCore *)st;
    remember_state(d, core);
    Py_DECREF(st);
    return core;
}

/* The calling thread's state through the domain's thread-local, cached, or
 * NULL with no exception set when it has none (not registered). For
 * retire(), whose unregistered case the Python path handles. */
static ThreadCore *
peek_state(DomainCore *d)
{
    if (d->tls == NULL) {
        return NULL;
    }
    kernel_state *ks = state_of((PyObject *)d);
    if (ks == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *st = PyObject_GetAttr(d->tls, ks->str_state);
    if (st == NULL) {
        PyErr_Clear();
        return NULL;
    }
    ThreadCore *core = NULL;
    if (PyObject_TypeCheck(st, ks->ThreadCore_type) && is_registered((ThreadCore *)st)) {
        core = (ThreadCore *)st;
        remember_state(d, core);
    }
    Py_DECREF(st);
    return core;
}

/* -- GraceTiming ---------------------------------------------------------- */

static inline double
monotonic_seconds(void)
{
    return (double)monotonic_ns() / 1e9;
}

/* Record (seq, now); the caller holds the timing's lock (I8). A record that
 * does not fit (KEPT reached, or no memory) is not made: that advance is not
 * timed, as the Python twin's KEPT rule says. */
static void
timing_record_locked(GraceTiming *t, int64_t seq, double now)
{
    if (t->end - t->start >= TIMING_KEPT) {
        return;
    }
    if (t->end == t->cap) {
        if (t->start > 0) {  /* slide the live records down */
            Py_ssize_t n = t->end - t->start;
            memmove(t->seqs, t->seqs + t->start, (size_t)n * sizeof(int64_t));
            memmove(t->times, t->times + t->start, (size_t)n * sizeof(double));
            t->start = 0;
            t->end = n;
        }
        else {
            Py_ssize_t cap = t->cap == 0 ? 16 : t->cap * 2;
            if (cap > TIMING_KEPT) {
                cap = TIMING_KEPT;
            }
            int64_t *seqs = PyMem_RawRealloc(t->seqs, (size_t)cap * sizeof(int64_t));
            if (seqs == NULL) {
                return;
            }
            t->seqs = seqs;
            double *times = PyMem_RawRealloc(t->times, (size_t)cap * sizeof(double));
            if (times == NULL) {
                return;
            }
            t->times = times;
            t->cap = cap;
        }
    }
    t->seqs[t->end] = seq;
    t->times[t->end] = now;
    t->end++;
}

/* The index of the first record with seq > value (bisect_right). */
static Py_ssize_t
timing_bisect_locked(GraceTiming *t, int64_t value)
{
    Py_ssize_t lo = t->start, hi = t->end;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (t->seqs[mid] <= value) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo;
}

static PyObject *
GraceTiming_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "GraceTiming() takes no arguments");
        return NULL;
    }
    GraceTiming *self = (GraceTiming *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->seqs = NULL;
    self->times = NULL;
    self->start = self->end = self->cap = 0;
    self->longest = 0.0;
    atomic_init(&self->rd_seq, 1);
    return (PyObject *)self;
}

static void
GraceTiming_dealloc(GraceTiming *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyMem_RawFree(self->seqs);
    PyMem_RawFree(self->times);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
GraceTiming_advanced(GraceTiming *self, PyObject *arg)
{
    int64_t seq;
    if (check_seq_value(arg, &seq) < 0) {
        return NULL;
    }
    TIMING_LOCK(self);
    timing_record_locked(self, seq, monotonic_seconds());  /* in advance order (I8) */
    TIMING_UNLOCK(self);
    Py_RETURN_NONE;
}

static PyObject *
GraceTiming_covered(GraceTiming *self, PyObject *arg)
{
    int64_t rd;
    if (check_seq_value(arg, &rd) < 0) {
        return NULL;
    }
    double now = monotonic_seconds();
    TIMING_LOCK(self);
    if (self->start < self->end && self->seqs[self->start] <= rd) {
        double took = now - self->times[self->start];  /* the oldest took longest */
        if (took > self->longest) {
            self->longest = took;
        }
        self->start = timing_bisect_locked(self, rd);
        if (self->start == self->end) {
            self->start = self->end = 0;
        }
    }
    /* B5: release, after the scan that certified rd (its loads came first
     * in this thread); only ever forward. */
    if (rd > atomic_load_explicit(&self->rd_seq, memory_order_relaxed)) {
        atomic_store_explicit(&self->rd_seq, rd, memory_order_release);
    }
    TIMING_UNLOCK(self);
    Py_RETURN_NONE;
}

static PyObject *
GraceTiming_advanced_past(GraceTiming *self, PyObject *arg)
{
    int64_t seq;
    if (check_seq_value(arg, &seq) < 0) {
        return NULL;
    }
    TIMING_LOCK(self);
    Py_ssize_t i = timing_bisect_locked(self, seq);
    int found = i < self->end;
    double when = found ? self->times[i] : 0.0;
    TIMING_UNLOCK(self);
    if (!found) {
        Py_RETURN_NONE;
    }
    return PyFloat_FromDouble(when);
}

static PyObject *
GraceTiming_current(GraceTiming *self, PyObject *arg)
{
    int64_t rd;
    if (check_seq_value(arg, &rd) < 0) {
        return NULL;
    }
    double now = monotonic_seconds();
    TIMING_LOCK(self);
    double age = self->start < self->end && self->seqs[self->start] > rd ? now - self->times[self->start] : 0.0;
    TIMING_UNLOCK(self);
    return PyFloat_FromDouble(age);
}

static PyObject *
GraceTiming_new_locks(GraceTiming *self, PyObject *Py_UNUSED(factory))
{
    (void)self;  /* this twin's lock is not a Python lock: nothing to replace */
    Py_RETURN_NONE;
}

static PyObject *
GraceTiming_after_fork_in_child(GraceTiming *self, PyObject *Py_UNUSED(ignored))
{
#ifdef Py_GIL_DISABLED
    /* Only the forking thread survives; whoever held the lock is gone. */
    memset(&self->mutex, 0, sizeof(self->mutex));
#endif
    (void)self;
    Py_RETURN_NONE;
}

static PyObject *
GraceTiming_get_longest(GraceTiming *self, void *Py_UNUSED(closure))
{
    TIMING_LOCK(self);
    double v = self->longest;
    TIMING_UNLOCK(self);
    return PyFloat_FromDouble(v);
}

static PyObject *
GraceTiming_get_rd_seq(GraceTiming *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(atomic_load_explicit(&self->rd_seq, memory_order_acquire));
}

static PyObject *
GraceTiming_len(GraceTiming *self, void *Py_UNUSED(closure))
{
    TIMING_LOCK(self);
    Py_ssize_t n = self->end - self->start;
    TIMING_UNLOCK(self);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef GraceTiming_methods[] = {
    {"advanced", (PyCFunction)GraceTiming_advanced, METH_O,
     "advanced($self, wr_seq, /)\n--\n\n"
     "wr_seq was just advanced to `wr_seq` (called in advance order)."},
    {"covered", (PyCFunction)GraceTiming_covered, METH_O,
     "covered($self, rd_seq, /)\n--\n\n"
     "rd_seq moved forward to `rd_seq`: the advances up to it have ended."},
    {"advanced_past", (PyCFunction)GraceTiming_advanced_past, METH_O,
     "advanced_past($self, seq, /)\n--\n\n"
     "When wr_seq first advanced past `seq` (None: not remembered)."},
    {"current", (PyCFunction)GraceTiming_current, METH_O,
     "current($self, rd_seq, /)\n--\n\n"
     "Seconds since the oldest advance rd_seq has not reached (0 if none)."},
    {"new_locks", (PyCFunction)GraceTiming_new_locks, METH_O,
     "new_locks($self, factory, /)\n--\n\nNothing to do: this twin's lock is C's."},
    {"after_fork_in_child", (PyCFunction)GraceTiming_after_fork_in_child, METH_NOARGS,
     "after_fork_in_child($self, /)\n--\n\nThe lock, fresh."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef GraceTiming_getset[] = {
    {"longest", (getter)GraceTiming_get_longest, NULL, "seconds: the longest grace period that has ended",
     NULL},
    {"outstanding", (getter)GraceTiming_len, NULL, "how many advances are remembered", NULL},
    {"rd_seq", (getter)GraceTiming_get_rd_seq, NULL, "the largest rd_seq covered() was told of", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot GraceTiming_slots[] = {
    {Py_tp_doc, "The times of the advances rd_seq has not reached yet (qsbr/timing.py)."},
    {Py_tp_new, GraceTiming_new},
    {Py_tp_dealloc, GraceTiming_dealloc},
    {Py_tp_methods, GraceTiming_methods},
    {Py_tp_getset, GraceTiming_getset},
    {0, NULL},
};

static PyType_Spec GraceTiming_spec = {
    .name = "qsbr._kernel.GraceTiming",
    .basicsize = sizeof(GraceTiming),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = GraceTiming_slots,
};

/* advance(): wr_seq += 2 and its record, together (I1, I8). */
static int64_t
advance_and_record(DomainCore *d)
{
    GraceTiming *t = d->timing;
    TIMING_LOCK(t);
    /* I1: an atomic RMW, seq_cst: concurrent advances add up, and the new
     * value is ordered after the caller's unlinks. Under the timing's lock
     * so that records are made in advance order (I8). */
    int64_t new = atomic_fetch_add_explicit(&d->wr_seq, 2, memory_order_seq_cst) + 2;
    atomic_fetch_add_explicit(&d->advances, 1, memory_order_relaxed);
    timing_record_locked(t, new, monotonic_seconds());
    TIMING_UNLOCK(t);
    return new;
}

/* -- DomainCore ---------------------------------------------------------- */

static PyObject *
DomainCore_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    DomainCore *self = (DomainCore *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    atomic_init(&self->wr_seq, 1);
    atomic_init(&self->skipped_polls, 0);
    atomic_init(&self->advances, 0);
    self->timing = NULL;
    self->serial = atomic_fetch_add_explicit(&next_serial, 1, memory_order_relaxed);
    self->tls = NULL;
    self->retire_fast = 0;
    self->deferred_limit = 10;
    self->deferred_bytes = 0;
    self->sizers = NULL;
    return (PyObject *)self;
}

static int
DomainCore_traverse(DomainCore *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->tls);
    Py_VISIT(self->sizers);
    Py_VISIT(self->timing);
    return 0;
}

static int
DomainCore_clear(DomainCore *self)
{
    Py_CLEAR(self->tls);
    Py_CLEAR(self->sizers);
    Py_CLEAR(self->timing);
    return 0;
}

static void
DomainCore_dealloc(DomainCore *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)DomainCore_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
DomainCore_quiescent(DomainCore *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = cached_state(self);
    if (st == NULL && (st = lookup_state(self, "quiescent")) == NULL) {
        return NULL;
    }
    /* Detached (seq 0): nothing to report, and quiescent() must not attach.
     * (st is registered: cached_state checks it, and _thread_core returns
     * only the thread's current, registered state.) */
    if (load_seq(st) != 0) {
        store_quiescent(st, load_wr_seq(self));
    }
    Py_RETURN_NONE;
}

static PyObject *
DomainCore_attach(DomainCore *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = cached_state(self);
    if (st == NULL && (st = lookup_state(self, "attach")) == NULL) {
        return NULL;
    }
    store_attach(st, load_wr_seq(self));  /* I4 */
    Py_RETURN_NONE;
}

static PyObject *
DomainCore_detach(DomainCore *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = cached_state(self);
    if (st == NULL && (st = lookup_state(self, "detach")) == NULL) {
        return NULL;
    }
    store_detach(st);
    Py_RETURN_NONE;
}

static PyObject *
DomainCore_attached(DomainCore *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = cached_state(self);
    if (st == NULL && (st = lookup_state(self, "attached")) == NULL) {
        return NULL;
    }
    return Py_NewRef(st->read_section);
}

static PyObject *
DomainCore_detached(DomainCore *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = cached_state(self);
    if (st == NULL && (st = lookup_state(self, "detached")) == NULL) {
        return NULL;
    }
    return Py_NewRef(st->detached_section);
}

static PyObject *
DomainCore_advance(DomainCore *self, PyObject *Py_UNUSED(ignored))
{
    if (self->timing == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "advance() before _configure() (Domain.__init__)");
        return NULL;
    }
    return PyLong_FromLongLong(advance_and_record(self));
}

static PyObject *
DomainCore_get_advances(DomainCore *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(atomic_load_explicit(&self->advances, memory_order_relaxed));
}

static PyObject *
DomainCore_count_skipped_poll(DomainCore *self, PyObject *Py_UNUSED(ignored))
{
    atomic_fetch_add_explicit(&self->skipped_polls, 1, memory_order_relaxed);
    Py_RETURN_NONE;
}

static PyObject *
DomainCore_get_skipped_polls(DomainCore *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(atomic_load_explicit(&self->skipped_polls, memory_order_relaxed));
}

static PyObject *
DomainCore_configure(DomainCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    kernel_state *ks = state_of((PyObject *)self);
    if (ks == NULL) {
        return NULL;
    }
    if (nargs != 5 || !PyDict_CheckExact(args[3]) || !Py_IS_TYPE(args[4], ks->GraceTiming_type)) {
        PyErr_SetString(PyExc_TypeError,
                        "_configure(fast, deferred_limit, deferred_bytes, sizers: dict, timing: GraceTiming)");
        return NULL;
    }
    int fast = PyObject_IsTrue(args[0]);
    if (fast < 0) {
        return NULL;
    }
    long long limit = PyLong_AsLongLong(args[1]);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long long nbytes = PyLong_AsLongLong(args[2]);
    if (nbytes == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (self->timing != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_configure() runs once (Domain.__init__)");
        return NULL;
    }
    self->deferred_limit = limit;
    self->deferred_bytes = nbytes;
    Py_XSETREF(self->sizers, Py_NewRef(args[3]));
    self->timing = (GraceTiming *)Py_NewRef(args[4]);
    self->retire_fast = fast;
    Py_RETURN_NONE;
}

/* retire(obj, release, *, size=None): the fast path (I6), else
 * self._retire_python(obj, release, size=size). */
static PyObject *
retire_python(DomainCore *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    kernel_state *ks = state_of((PyObject *)self);
    if (ks == NULL) {
        return NULL;
    }
    PyObject *method = PyObject_GetAttr((PyObject *)self, ks->str_retire_python);
    if (method == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(method, args, nargs, kwnames);
    Py_DECREF(method);
    return result;
}

/* Append the four items of an entry to a deferred-free list, atomically
 * with respect to every other thread (I6): pollers must see whole entries.
 * With the GIL, four appends: nothing in them releases it or runs Python
 * code, and a failure removes what was appended. On free-threaded builds,
 * one slice assignment, which holds the list's own lock throughout. */
static int
append_entry(PyObject *list, PyObject *goal, PyObject *release, PyObject *obj, PyObject *size)
{
#ifdef Py_GIL_DISABLED
    PyObject *entry = PyTuple_Pack(4, goal, release, obj, size);
    if (entry == NULL) {
        return -1;
    }
    int rc = PyList_SetSlice(list, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, entry);
    Py_DECREF(entry);
    return rc;
#else
    Py_ssize_t before = PyList_GET_SIZE(list);
    if (PyList_Append(list, goal) < 0 || PyList_Append(list, release) < 0 || PyList_Append(list, obj) < 0
        || PyList_Append(list, size) < 0) {
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *exc = PyErr_GetRaisedException();
        (void)PyList_SetSlice(list, before, PY_SSIZE_T_MAX, NULL);  /* whole entries only */
        PyErr_SetRaisedException(exc);
#else
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        (void)PyList_SetSlice(list, before, PY_SSIZE_T_MAX, NULL);  /* whole entries only */
        PyErr_Restore(type, value, tb);
#endif
        return -1;
    }
    return 0;
#endif
}

/* `goal` as an int object, the one handed out last when it is the same. */
static PyObject *
goal_object(ThreadCore *st, int64_t goal)
{
    if (st->goal_obj != NULL && st->goal_val == goal) {
        return Py_NewRef(st->goal_obj);
    }
    PyObject *g = PyLong_FromLongLong(goal);
    if (g == NULL) {
        return NULL;
    }
    Py_XSETREF(st->goal_obj, Py_NewRef(g));
    st->goal_val = goal;
    return g;
}

/* I7: whether the poll after this thread's advance cannot find anything. */
static inline int
poll_is_pinned(ThreadCore *st)
{
    int64_t seq = load_seq(st);
    return seq != 0 && seq == st->pinned_seq && monotonic_ns() < st->poll_due;
}

static PyObject *
DomainCore_retire(DomainCore *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *size_obj = Py_None;
    if (!self->retire_fast || nargs != 2) {
        return retire_python(self, args, nargs, kwnames);
    }
    if (kwnames != NULL) {
        if (PyTuple_GET_SIZE(kwnames) != 1
            || !PyUnicode_Check(PyTuple_GET_ITEM(kwnames, 0))
            || PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "size") != 0) {
            return retire_python(self, args, nargs, kwnames);
        }
        size_obj = args[2];
    }
    PyObject *obj = args[0], *release = args[1];
    if (!PyCallable_Check(release)) {
        return retire_python(self, args, nargs, kwnames);  /* raises, with a hint */
    }
    ThreadCore *st = cached_state(self);
    if (st == NULL) {
        st = peek_state(self);  /* the thread's state if it is registered, cached */
    }
    if (st == NULL || st->deferred == NULL || !atomic_load_explicit(&st->listed, memory_order_relaxed)) {
        /* Not registered (or not cached yet), or its first retire: the
         * Python path lists the writer and starts the watchdog. */
        return retire_python(self, args, nargs, kwnames);
    }
    int64_t size;
    if (size_obj == Py_None) {
        /* estimate_size() without its call: the type's cached sizer, or
         * its instances' one size (an exact int: sizes.py). A strong
         * reference: on 3.13t another thread may replace the entry (a
         * first sighting stores the function, then the int) meanwhile. */
        PyObject *sizer;
#if PY_VERSION_HEX >= 0x030D0000
        if (PyDict_GetItemRef(self->sizers, (PyObject *)Py_TYPE(obj), &sizer) < 0) {
            return NULL;
        }
#else
        /* With the GIL, nothing runs between the lookup and the incref. */
        sizer = PyDict_GetItemWithError(self->sizers, (PyObject *)Py_TYPE(obj));
        if (sizer == NULL && PyErr_Occurred()) {
            return NULL;
        }
        Py_XINCREF(sizer);
#endif
        if (sizer == NULL) {
            return retire_python(self, args, nargs, kwnames);  /* a type not seen yet */
        }
        PyObject *n;
        if (PyLong_CheckExact(sizer)) {
            n = sizer;  /* our reference becomes n's */
        }
        else {
            n = PyObject_CallOneArg(sizer, obj);
            Py_DECREF(sizer);
        }
        if (n == NULL) {
            return NULL;
        }
        long long v = PyLong_Check(n) ? PyLong_AsLongLong(n) : -1;
        Py_DECREF(n);
        if (v < 0) {
            PyErr_Clear();
            return retire_python(self, args, nargs, kwnames);
        }
        size = (int64_t)v;
    }
    else {
        if (!PyLong_CheckExact(size_obj)) {
            return retire_python(self, args, nargs, kwnames);  /* checks, raises */
        }
        long long v = PyLong_AsLongLong(size_obj);
        if (v < 0) {
            PyErr_Clear();
            return retire_python(self, args, nargs, kwnames);
        }
        size = (int64_t)v;
    }
    /* Counted before the append, so the pending bytes are never negative. */
    int64_t retired = atomic_load_explicit(&st->retired_bytes, memory_order_relaxed) + size;
    atomic_store_explicit(&st->retired_bytes, retired, memory_order_relaxed);
    /* The deferred advance (Domain._take_goal's rule, the design's words):
     * wr_seq + 2 without advancing, except on the deferred_limit-th
     * retirement since the thread's last advance, or past deferred_bytes. */
    PyObject *goal;
    int advanced = 0;
    int64_t n = st->deferrals + 1;
    if (n < self->deferred_limit && retired - st->bytes_at_advance <= self->deferred_bytes) {
        st->deferrals = n;
        /* I3: the caller's unlink precedes this acquire load in program order. */
        goal = goal_object(st, load_wr_seq(self) + 2);
    }
    else {
        st->deferrals = 0;
        st->bytes_at_advance = retired;
        goal = goal_object(st, advance_and_record(self));  /* retire_fast: advance() is ours */
        advanced = 1;
    }
    if (goal == NULL) {
        return NULL;
    }
    PyObject *size_long = PyLong_FromLongLong(size);
    if (size_long == NULL) {
        Py_DECREF(goal);
        return NULL;
    }
    /* One atomic append of the whole entry (I6). */
    PyObject *deferred = Py_NewRef(st->deferred);
    int rc = append_entry(deferred, goal, release, obj, size_long);
    Py_DECREF(deferred);
    Py_DECREF(size_long);
    if (rc < 0) {
        Py_DECREF(goal);
        return NULL;
    }
    if (advanced && poll_is_pinned(st)) {  /* I7 */
        atomic_fetch_add_explicit(&self->skipped_polls, 1, memory_order_relaxed);
    }
    else if (advanced) {  /* every deferred_limit-th retirement: process now */
        kernel_state *ks = state_of((PyObject *)self);
        PyObject *r = ks == NULL ? NULL
                                 : PyObject_CallMethodOneArg((PyObject *)self, ks->str_after_advance,
                                                             (PyObject *)st);
        if (r == NULL) {
            Py_DECREF(goal);
            return NULL;
        }
        Py_DECREF(r);
    }
    return goal;
}

static PyObject *
DomainCore_get_wr_seq(DomainCore *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(load_wr_seq(self));
}

static PyObject *
DomainCore_get_tls(DomainCore *self, void *Py_UNUSED(closure))
{
    if (self->tls == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_tls");
        return NULL;
    }
    return Py_NewRef(self->tls);
}

static int
DomainCore_set_tls(DomainCore *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_tls cannot be deleted");
        return -1;
    }
    Py_XSETREF(self->tls, Py_NewRef(value));
    return 0;
}

static PyMethodDef DomainCore_methods[] = {
    {"quiescent", (PyCFunction)DomainCore_quiescent, METH_NOARGS,
     "quiescent($self, /)\n--\n\n"
     "Report a quiescent state: the calling thread holds no reference to\n"
     "anything it read from shared structures. Takes no lock."},
    {"attach", (PyCFunction)DomainCore_attach, METH_NOARGS,
     "attach($self, /)\n--\n\n"
     "Rejoin after detach(): seq = wr_seq, before any shared read."},
    {"detach", (PyCFunction)DomainCore_detach, METH_NOARGS,
     "detach($self, /)\n--\n\n"
     "Leave rd_seq while blocking (I/O, sleep, waiting for work): the\n"
     "thread must hold no shared references until attach()."},
    {"attached", (PyCFunction)DomainCore_attached, METH_NOARGS,
     "attached($self, /)\n--\n\n"
     "``with domain.attached():`` a read section (see qsbr/section.py)."},
    {"detached", (PyCFunction)DomainCore_detached, METH_NOARGS,
     "detached($self, /)\n--\n\n"
     "``with domain.detached(): blocking_call()``: detached for the block."},
    {"retire", (PyCFunction)(void (*)(void))DomainCore_retire, METH_FASTCALL | METH_KEYWORDS,
     "retire($self, obj, release, *, size=None)\n--\n\n"
     "Schedule release(obj) for when no thread can still hold obj. Call it after\n"
     "obj is unlinked. Returns the goal (see docs/api.md)."},
    {"_configure", (PyCFunction)(void (*)(void))DomainCore_configure, METH_FASTCALL,
     "_configure($self, fast, deferred_limit, deferred_bytes, sizers, timing, /)\n--\n\n"
     "Set advance() and retire()'s fast path up (Domain.__init__, once)."},
    {"advance", (PyCFunction)DomainCore_advance, METH_NOARGS,
     "advance($self, /)\n--\n\n"
     "wr_seq += 2; returns the new wr_seq (recorded with its time: timing.py)."},
    {"_count_skipped_poll", (PyCFunction)DomainCore_count_skipped_poll, METH_NOARGS,
     "_count_skipped_poll($self, /)\n--\n\n"
     "Count a poll that retire() skipped (I7)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef DomainCore_getset[] = {
    {"_wr_seq", (getter)DomainCore_get_wr_seq, NULL, "wr_seq, loaded with acquire order", NULL},
    {"_tls", (getter)DomainCore_get_tls, (setter)DomainCore_set_tls, "the domain's threading.local", NULL},
    {"_advances", (getter)DomainCore_get_advances, NULL, "advance() calls so far", NULL},
    {"_skipped_polls", (getter)DomainCore_get_skipped_polls, NULL,
     "polls retire() skipped because they could find nothing (I7)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot DomainCore_slots[] = {
    {Py_tp_doc, "The kernel part of a qsbr.Domain: wr_seq and the readers' calls."},
    {Py_tp_new, DomainCore_new},
    {Py_tp_dealloc, DomainCore_dealloc},
    {Py_tp_traverse, DomainCore_traverse},
    {Py_tp_clear, DomainCore_clear},
    {Py_tp_methods, DomainCore_methods},
    {Py_tp_getset, DomainCore_getset},
    {0, NULL},
};

static PyType_Spec DomainCore_spec = {
    .name = "qsbr._kernel.DomainCore",
    .basicsize = sizeof(DomainCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = DomainCore_slots,
};

/* -- ThreadCore ----------------------------------------------------------- */

static PyObject *
ThreadCore_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    ThreadCore *self = (ThreadCore *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    atomic_init(&self->seq, 0);
    atomic_init(&self->registered, 1);
    self->read_section = NULL;
    self->detached_section = NULL;
    self->deferrals = 0;
    self->bytes_at_advance = 0;
    self->pinned_seq = 0;
    self->poll_due = 0;
    self->goal_obj = NULL;
    self->goal_val = 0;
    atomic_init(&self->retired_bytes, 0);
    atomic_init(&self->listed, 0);
    self->deferred = NULL;  /* ThreadState.__init__ sets it, as for the pure twin */
    return (PyObject *)self;
}

static int
ThreadCore_traverse(ThreadCore *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->read_section);
    Py_VISIT(self->detached_section);
    Py_VISIT(self->deferred);
    return 0;
}

static int
ThreadCore_clear(ThreadCore *self)
{
    Py_CLEAR(self->read_section);
    Py_CLEAR(self->detached_section);
    Py_CLEAR(self->deferred);
    Py_CLEAR(self->goal_obj);
    return 0;
}

static void
ThreadCore_dealloc(ThreadCore *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    forget_cached(self);  /* I5 */
    (void)ThreadCore_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
ThreadCore_get_seq(ThreadCore *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(load_seq(self));
}

static int
ThreadCore_set_seq(ThreadCore *self, PyObject *value, void *Py_UNUSED(closure))
{
    int64_t v;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "seq cannot be deleted");
        return -1;
    }
    if (check_seq_value(value, &v) < 0) {
        return -1;
    }
    /* A store from Python code (registration, a waiter counted as
     * quiescent, unregistering): as attach when it attaches (I4), a release
     * store otherwise (I3). */
    if (v != 0 && load_seq(self) == 0) {
        store_attach(self, v);
    }
    else {
        store_quiescent(self, v);
    }
    return 0;
}

static PyObject *
ThreadCore_attach(ThreadCore *self, PyObject *arg)
{
    int64_t wr;
    if (check_seq_value(arg, &wr) < 0) {
        return NULL;
    }
    store_attach(self, wr);
    Py_RETURN_NONE;
}

static PyObject *
ThreadCore_detach(ThreadCore *self, PyObject *Py_UNUSED(ignored))
{
    store_detach(self);
    Py_RETURN_NONE;
}

static PyObject *
ThreadCore_mark_unregistered(ThreadCore *self, PyObject *Py_UNUSED(ignored))
{
    /* Detached first, then not registered: a scan that still holds this
     * state leaves it out; the thread's own calls take the slow path. */
    store_detach(self);
    atomic_store_explicit(&self->registered, 0, memory_order_release);
    forget_cached(self);  /* I5: the calling thread's entry, if it is its own */
    Py_RETURN_NONE;
}

static PyObject *
ThreadCore_get_registered(ThreadCore *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(is_registered(self));
}

static PyObject *
ThreadCore_get_deferrals(ThreadCore *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(self->deferrals);
}

static int
ThreadCore_set_deferrals(ThreadCore *self, PyObject *value, void *Py_UNUSED(closure))
{
    return set_int64(value, &self->deferrals, "deferrals");
}

static PyObject *
ThreadCore_get_bytes_at_advance(ThreadCore *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(self->bytes_at_advance);
}

static int
ThreadCore_set_bytes_at_advance(ThreadCore *self, PyObject *value, void *Py_UNUSED(closure))
{
    return set_int64(value, &self->bytes_at_advance, "bytes_at_advance");
}

static PyObject *
ThreadCore_get_retired_bytes(ThreadCore *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(atomic_load_explicit(&self->retired_bytes, memory_order_relaxed));
}

static int
ThreadCore_set_retired_bytes(ThreadCore *self, PyObject *value, void *Py_UNUSED(closure))
{
    int64_t v;
    if (set_int64(value, &v, "retired_bytes") < 0) {
        return -1;
    }
    atomic_store_explicit(&self->retired_bytes, v, memory_order_relaxed);
    return 0;
}

static PyObject *
ThreadCore_get_listed(ThreadCore *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(atomic_load_explicit(&self->listed, memory_order_relaxed));
}

static int
ThreadCore_set_listed(ThreadCore *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "listed cannot be deleted");
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    if (truth < 0) {
        return -1;
    }
    atomic_store_explicit(&self->listed, truth, memory_order_relaxed);
    return 0;
}

static PyObject *
ThreadCore_get_deferred(ThreadCore *self, void *Py_UNUSED(closure))
{
    if (self->deferred == NULL) {
        PyErr_SetString(PyExc_AttributeError, "deferred");
        return NULL;
    }
    return Py_NewRef(self->deferred);
}

static int
ThreadCore_set_deferred(ThreadCore *self, PyObject *value, void *Py_UNUSED(closure))
{
    /* Replaced only by the owner while registered, or under the domain's
     * work lock after it left (deferred.py, adopt): never while the owner
     * retires (I6). */
    if (value == NULL || !PyList_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "deferred must be a list");
        return -1;
    }
    Py_XSETREF(self->deferred, Py_NewRef(value));
    return 0;
}

static PyMethodDef ThreadCore_methods[] = {
    {"attach", (PyCFunction)ThreadCore_attach, METH_O,
     "attach($self, wr_seq, /)\n--\n\n"
     "Attached again: seq = wr_seq, then a full fence, before any shared read."},
    {"detach", (PyCFunction)ThreadCore_detach, METH_NOARGS,
     "detach($self, /)\n--\n\n"
     "Detached: seq = 0, stored after every shared read the thread made."},
    {"_mark_unregistered", (PyCFunction)ThreadCore_mark_unregistered, METH_NOARGS,
     "_mark_unregistered($self, /)\n--\n\n"
     "The thread left: seq = 0, and its handle's calls raise NotRegisteredError."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef ThreadCore_getset[] = {
    {"seq", (getter)ThreadCore_get_seq, (setter)ThreadCore_set_seq,
     "wr_seq as of this thread's last quiescent state; 0 = detached.", NULL},
    {"registered", (getter)ThreadCore_get_registered, NULL, "whether the thread is still registered", NULL},
    {"deferrals", (getter)ThreadCore_get_deferrals, (setter)ThreadCore_set_deferrals,
     "retirements since this thread last advanced wr_seq", NULL},
    {"bytes_at_advance", (getter)ThreadCore_get_bytes_at_advance, (setter)ThreadCore_set_bytes_at_advance,
     "retired_bytes as of this thread's last advance", NULL},
    {"retired_bytes", (getter)ThreadCore_get_retired_bytes, (setter)ThreadCore_set_retired_bytes,
     "bytes this thread ever retired", NULL},
    {"listed", (getter)ThreadCore_get_listed, (setter)ThreadCore_set_listed,
     "whether pollers visit this thread's list", NULL},
    {"deferred", (getter)ThreadCore_get_deferred, (setter)ThreadCore_set_deferred,
     "this thread's deferred-free list, flat: [goal, fn, arg, size, ...]", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef ThreadCore_members[] = {
    {"read_section", T_OBJECT_EX, offsetof(ThreadCore, read_section), 0, "the thread's ReadSection"},
    {"detached_section", T_OBJECT_EX, offsetof(ThreadCore, detached_section), 0,
     "the thread's DetachedSection"},
    {"pinned_seq", T_LONGLONG, offsetof(ThreadCore, pinned_seq), 0,
     "the seq with which this thread's last poll from retire() found rd_seq pinned (I7)"},
    {"poll_due", T_LONGLONG, offsetof(ThreadCore, poll_due), 0,
     "time.monotonic_ns() past which retire() polls however pinned rd_seq looks (I7)"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot ThreadCore_slots[] = {
    {Py_tp_doc, "The kernel part of a registered thread's state: its seq."},
    {Py_tp_new, ThreadCore_new},
    {Py_tp_dealloc, ThreadCore_dealloc},
    {Py_tp_traverse, ThreadCore_traverse},
    {Py_tp_clear, ThreadCore_clear},
    {Py_tp_methods, ThreadCore_methods},
    {Py_tp_getset, ThreadCore_getset},
    {Py_tp_members, ThreadCore_members},
    {0, NULL},
};

static PyType_Spec ThreadCore_spec = {
    .name = "qsbr._kernel.ThreadCore",
    .basicsize = sizeof(ThreadCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = ThreadCore_slots,
};

/* -- ThreadHandle ------------------------------------------------------------- */

static int
check_instance(PyObject *obj, PyTypeObject *type, const char *what)
{
    if (!PyObject_TypeCheck(obj, type)) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s, not %.100s", what, type->tp_name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    return 0;
}

static int
ThreadHandle_init(ThreadHandle *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"domain", "state", NULL};
    PyObject *domain, *state;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:ThreadHandle", kwlist, &domain, &state)) {
        return -1;
    }
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(self), &kernel_module);
    if (module == NULL) {
        return -1;
    }
    kernel_state *ks = get_kernel_state(module);
    if (check_instance(domain, ks->DomainCore_type, "domain") < 0
        || check_instance(state, ks->ThreadCore_type, "state") < 0) {
        return -1;
    }
    if (self->domain != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a ThreadHandle is initialised once");
        return -1;
    }
    self->domain = (DomainCore *)Py_NewRef(domain);
    self->state = (ThreadCore *)Py_NewRef(state);
    return 0;
}

static int
ThreadHandle_traverse(ThreadHandle *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->domain);
    Py_VISIT(self->state);
    return 0;
}

static int
ThreadHandle_clear(ThreadHandle *self)
{
    Py_CLEAR(self->domain);
    Py_CLEAR(self->state);
    return 0;
}

static void
ThreadHandle_dealloc(ThreadHandle *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakreflist != NULL) {
        PyObject_ClearWeakRefs((PyObject *)self);
    }
    (void)ThreadHandle_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* The handle's state if its thread is registered; else NULL with the
 * handle's NotRegisteredError (its Python method words it). */
static ThreadCore *
handle_state(ThreadHandle *self)
{
    ThreadCore *st = self->state;
    if (st == NULL || self->domain == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ThreadHandle.__init__ was not called");
        return NULL;
    }
    if (!is_registered(st)) {
        /* The Python twin's error, made by the same function (errors.py). */
        PyObject *module = PyType_GetModuleByDef(Py_TYPE(self), &kernel_module);
        if (module == NULL) {
            return NULL;
        }
        PyObject *exc = PyObject_CallNoArgs(get_kernel_state(module)->unregistered_handle_error);
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return NULL;
    }
    return st;
}

static PyObject *
ThreadHandle_quiescent(ThreadHandle *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = handle_state(self);
    if (st == NULL) {
        return NULL;
    }
    if (load_seq(st) != 0) {  /* detached: does nothing */
        store_quiescent(st, load_wr_seq(self->domain));
    }
    Py_RETURN_NONE;
}

static PyObject *
ThreadHandle_attach(ThreadHandle *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = handle_state(self);
    if (st == NULL) {
        return NULL;
    }
    store_attach(st, load_wr_seq(self->domain));
    Py_RETURN_NONE;
}

static PyObject *
ThreadHandle_detach(ThreadHandle *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = handle_state(self);
    if (st == NULL) {
        return NULL;
    }
    store_detach(st);
    Py_RETURN_NONE;
}

static PyObject *
ThreadHandle_attached(ThreadHandle *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = handle_state(self);
    return st == NULL ? NULL : Py_NewRef(st->read_section);
}

static PyObject *
ThreadHandle_detached(ThreadHandle *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = handle_state(self);
    return st == NULL ? NULL : Py_NewRef(st->detached_section);
}

static PyMethodDef ThreadHandle_methods[] = {
    {"quiescent", (PyCFunction)ThreadHandle_quiescent, METH_NOARGS,
     "quiescent($self, /)\n--\n\n"
     "Report a quiescent state for this thread. Takes no lock."},
    {"attach", (PyCFunction)ThreadHandle_attach, METH_NOARGS,
     "attach($self, /)\n--\n\n"
     "Rejoin after detach(): seq = wr_seq, before any shared read."},
    {"detach", (PyCFunction)ThreadHandle_detach, METH_NOARGS,
     "detach($self, /)\n--\n\n"
     "Leave rd_seq while blocking; hold no shared reference until attach()."},
    {"attached", (PyCFunction)ThreadHandle_attached, METH_NOARGS,
     "attached($self, /)\n--\n\n"
     "``with handle.attached():`` a read section."},
    {"detached", (PyCFunction)ThreadHandle_detached, METH_NOARGS,
     "detached($self, /)\n--\n\n"
     "``with handle.detached():`` around a blocking call."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
ThreadHandle_repr(ThreadHandle *self)
{
    ThreadCore *st = self->state;
    if (st == NULL) {
        return PyUnicode_FromString("<qsbr.ThreadHandle (not initialised)>");
    }
    if (!is_registered(st)) {
        return PyUnicode_FromString("<qsbr.ThreadHandle unregistered>");
    }
    return PyUnicode_FromFormat("<qsbr.ThreadHandle seq=%lld>", (long long)load_seq(st));
}

static PyObject *
ThreadHandle_get_domain(ThreadHandle *self, void *Py_UNUSED(closure))
{
    if (self->domain == NULL) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(self->domain);
}

static PyGetSetDef ThreadHandle_getset[] = {
    {"domain", (getter)ThreadHandle_get_domain, NULL, "The domain this handle reports to.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef ThreadHandle_members[] = {
    {"_domain", T_OBJECT, offsetof(ThreadHandle, domain), READONLY, NULL},
    {"_state", T_OBJECT, offsetof(ThreadHandle, state), READONLY, NULL},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(ThreadHandle, weakreflist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot ThreadHandle_slots[] = {
    {Py_tp_doc,
     "The calling thread's own handle on a domain, for hot read loops (see\n"
     "qsbr/thread_state.py and docs/api.md). It belongs to the thread that\n"
     "registered: never pass it to another thread."},
    {Py_tp_repr, ThreadHandle_repr},
    {Py_tp_getset, ThreadHandle_getset},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, ThreadHandle_init},
    {Py_tp_dealloc, ThreadHandle_dealloc},
    {Py_tp_traverse, ThreadHandle_traverse},
    {Py_tp_clear, ThreadHandle_clear},
    {Py_tp_methods, ThreadHandle_methods},
    {Py_tp_members, ThreadHandle_members},
    {0, NULL},
};

static PyType_Spec ThreadHandle_spec = {
    .name = "qsbr.ThreadHandle",
    .basicsize = sizeof(ThreadHandle),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = ThreadHandle_slots,
};

/* -- ReadSection and DetachedSection ----------------------------------------- */

static int
Section_init(Section *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"state", "domain", NULL};
    PyObject *state, *domain;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:Section", kwlist, &state, &domain)) {
        return -1;
    }
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(self), &kernel_module);
    if (module == NULL) {
        return -1;
    }
    kernel_state *ks = get_kernel_state(module);
    if (check_instance(state, ks->ThreadCore_type, "state") < 0
        || check_instance(domain, ks->DomainCore_type, "domain") < 0) {
        return -1;
    }
    if (self->state != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a section is initialised once");
        return -1;
    }
    self->state = (ThreadCore *)Py_NewRef(state);
    self->domain = (DomainCore *)Py_NewRef(domain);
    self->levels = 1;  /* no level open */
    return 0;
}

static int
Section_traverse(Section *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->state);
    Py_VISIT(self->domain);
    return 0;
}

static int
Section_clear(Section *self)
{
    Py_CLEAR(self->state);
    Py_CLEAR(self->domain);
    return 0;
}

static void
Section_dealloc(Section *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)Section_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* Push a level (`was_attached`) or raise; the errors are the Python twin's. */
static int
push_level(Section *self, int was_attached)
{
    if (self->state == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "section.__init__ was not called");
        return -1;
    }
    if (self->levels >> MAX_DEPTH) {
        PyErr_Format(PyExc_RuntimeError,
                     "sections nest at most %d deep: leave a block before entering another", MAX_DEPTH);
        return -1;
    }
    self->levels = self->levels << 1 | (uint64_t)(was_attached != 0);
    return 0;
}

/* Pop a level into *levels (the value before the pop), or raise. */
static int
pop_level(Section *self, uint64_t *levels)
{
    if (self->state == NULL || self->levels <= 1) {
        PyErr_SetString(PyExc_RuntimeError, "__exit__ without a matching __enter__");
        return -1;
    }
    *levels = self->levels;
    self->levels >>= 1;
    return 0;
}

static PyObject *
ReadSection_enter(Section *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = self->state;
    int attached = st != NULL && load_seq(st) != 0;
    if (push_level(self, attached) < 0) {
        return NULL;
    }
    if (!attached) {
        store_attach(st, load_wr_seq(self->domain));  /* I4: before the block reads anything */
    }
    return Py_NewRef(self);
}

static PyObject *
ReadSection_exit(Section *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t levels;
    (void)args;
    (void)nargs;
    if (pop_level(self, &levels) < 0) {
        return NULL;
    }
    ThreadCore *st = self->state;
    if (!(levels & 1)) {  /* this level found the thread detached: it leaves it so */
        if (load_seq(st) != 0) {
            store_detach(st);  /* after the block's last shared read */
        }
    }
    else if (levels == 3) {  /* the outermost block, entered attached: a quiescent state */
        int64_t wr = load_wr_seq(self->domain);
        if (load_seq(st) != 0) {
            store_quiescent(st, wr);
        }
        else {  /* detached inside the block: attached again, as it was */
            store_attach(st, wr);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
DetachedSection_enter(Section *self, PyObject *Py_UNUSED(ignored))
{
    ThreadCore *st = self->state;
    int attached = st != NULL && load_seq(st) != 0;
    if (push_level(self, attached) < 0) {
        return NULL;
    }
    if (attached) {
        store_detach(st);
    }
    return Py_NewRef(self);
}

static PyObject *
DetachedSection_exit(Section *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t levels;
    (void)args;
    (void)nargs;
    if (pop_level(self, &levels) < 0) {
        return NULL;
    }
    if (levels & 1) {  /* attached when the block began: attached again, before any shared read */
        store_attach(self->state, load_wr_seq(self->domain));
    }
    Py_RETURN_NONE;
}

static PyObject *
Section_get_depth(Section *self, void *Py_UNUSED(closure))
{
    int depth = 0;
    for (uint64_t l = self->levels; l > 1; l >>= 1) {
        depth++;
    }
    return PyLong_FromLong(depth);
}

static PyGetSetDef Section_getset[] = {
    {"depth", (getter)Section_get_depth, NULL, "How many blocks of this thread are open.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef ReadSection_methods[] = {
    {"__enter__", (PyCFunction)ReadSection_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))ReadSection_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef DetachedSection_methods[] = {
    {"__enter__", (PyCFunction)DetachedSection_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))DetachedSection_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot ReadSection_slots[] = {
    {Py_tp_doc, "One thread's ``with domain.attached():`` (see qsbr/section.py)."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Section_init},
    {Py_tp_dealloc, Section_dealloc},
    {Py_tp_traverse, Section_traverse},
    {Py_tp_clear, Section_clear},
    {Py_tp_methods, ReadSection_methods},
    {Py_tp_getset, Section_getset},
    {0, NULL},
};

static PyType_Slot DetachedSection_slots[] = {
    {Py_tp_doc, "One thread's ``with domain.detached():``."},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, Section_init},
    {Py_tp_dealloc, Section_dealloc},
    {Py_tp_traverse, Section_traverse},
    {Py_tp_clear, Section_clear},
    {Py_tp_methods, DetachedSection_methods},
    {Py_tp_getset, Section_getset},
    {0, NULL},
};

static PyType_Spec ReadSection_spec = {
    .name = "qsbr._kernel.ReadSection",
    .basicsize = sizeof(Section),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = ReadSection_slots,
};

static PyType_Spec DetachedSection_spec = {
    .name = "qsbr._kernel.DetachedSection",
    .basicsize = sizeof(Section),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = DetachedSection_slots,
};

/* -- the rd_seq scan's loads ------------------------------------------------- */

PyDoc_STRVAR(scan_slots_doc,
"scan_slots(slots, start, end, lowest) -> (lowest, lowest_state, attached)\n\n"
"One step of an rd_seq pass over slots[start:end]: the minimum of `lowest`\n"
"and the seq of every attached state (None slots and detached states are\n"
"left out), the state that holds it (None if `lowest` stood), and how many\n"
"attached states the step saw. A seq_cst fence comes before the loads (I4).");

static PyObject *
scan_slots(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "scan_slots() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *slots = args[0];
    if (!PyList_Check(slots)) {
        PyErr_Format(PyExc_TypeError, "slots must be a list, not %.100s", Py_TYPE(slots)->tp_name);
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    if (end == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int64_t lowest;
    if (check_seq_value(args[3], &lowest) < 0) {
        return NULL;
    }
    kernel_state *ks = get_kernel_state(module);
    /* One copy of the step's slots (atomic with respect to the list's
     * writers on every build), then loads from a list this thread owns. */
    PyObject *copy = PyList_GetSlice(slots, start, end);
    if (copy == NULL) {
        return NULL;
    }
    /* I4, the scanner's side: the loads below come after this fence. */
    atomic_thread_fence(memory_order_seq_cst);
    PyObject *lowest_state = Py_None;
    Py_ssize_t attached = 0;
    Py_ssize_t n = PyList_GET_SIZE(copy);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(copy, i);
        if (item == Py_None) {
            continue;
        }
        if (!PyObject_TypeCheck(item, ks->ThreadCore_type)) {
            PyErr_Format(PyExc_TypeError, "slot %zd holds a %.100s, not a thread state", start + i,
                         Py_TYPE(item)->tp_name);
            Py_DECREF(copy);
            return NULL;
        }
        int64_t seq = load_seq((ThreadCore *)item);
        if (seq != 0) {
            attached++;
            if (seq < lowest) {
                lowest = seq;
                lowest_state = item;
            }
        }
    }
    PyObject *result = Py_BuildValue("(LOn)", (long long)lowest, lowest_state, attached);
    Py_DECREF(copy);
    return result;
}

/* -- running a batch's releases --------------------------------------------- */

PyDoc_STRVAR(run_entries_doc,
"run_entries(chunk, on_error) -> (ran, freed, errors, stopped)\n\n"
"Run release(arg) for each entry [goal, release, arg, size] of `chunk`, in\n"
"order. A release that raises an Exception is passed to on_error(exc, arg)\n"
"and the rest still run. A BaseException (or an exception from on_error)\n"
"stops the loop and is returned as `stopped`, not raised: the entries after\n"
"the first `ran` did not run. `ran` and `freed` count the entry that raised.");

/* The exception being raised, as an object with its traceback (3.11 has no
 * PyErr_GetRaisedException). */
static PyObject *
take_raised_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

static PyObject *
run_entries(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "run_entries() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *chunk = args[0], *on_error = args[1];
    /* The chunk is a batch's own list (deferred.py: taken under the lock,
     * run by exactly one thread), so nobody resizes it while we index it;
     * the length is read once all the same, and each item is held. */
    if (!PyList_CheckExact(chunk) || PyList_GET_SIZE(chunk) % 4 != 0) {
        PyErr_SetString(PyExc_TypeError, "run_entries() needs a list of whole entries");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(chunk) / 4;
    Py_ssize_t ran = 0, errors = 0;
    int64_t freed = 0;
    PyObject *freed_big = NULL;  /* sizes past int64, added as Python ints */
    PyObject *stopped = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *fn = Py_NewRef(PyList_GET_ITEM(chunk, 4 * i + 1));
        PyObject *arg = Py_NewRef(PyList_GET_ITEM(chunk, 4 * i + 2));
        PyObject *size = PyList_GET_ITEM(chunk, 4 * i + 3);
        ran++;
        int overflow = 0;
        long long v = PyLong_Check(size) ? PyLong_AsLongLongAndOverflow(size, &overflow) : -1;
        if (v >= 0 && overflow == 0 && freed <= INT64_MAX - v) {
            freed += v;
        }
        else {
            PyErr_Clear();
            if (freed_big == NULL) {
                freed_big = PyLong_FromLong(0);
            }
            PyObject *sum = freed_big == NULL ? NULL : PyNumber_Add(freed_big, size);
            if (sum == NULL) {
                stopped = take_raised_exception();
                Py_DECREF(fn);
                Py_DECREF(arg);
                break;
            }
            Py_XSETREF(freed_big, sum);
        }
        PyObject *r = PyObject_CallOneArg(fn, arg);
        Py_DECREF(fn);
        if (r != NULL) {
            Py_DECREF(r);
            Py_DECREF(arg);
            continue;
        }
        PyObject *exc = take_raised_exception();
        if (exc != NULL && PyObject_TypeCheck(exc, (PyTypeObject *)PyExc_Exception)) {
            errors++;
            PyObject *hr = PyObject_CallFunctionObjArgs(on_error, exc, arg, NULL);
            Py_DECREF(exc);
            Py_DECREF(arg);
            if (hr != NULL) {
                Py_DECREF(hr);
                continue;
            }
            stopped = take_raised_exception();
            break;
        }
        Py_DECREF(arg);
        stopped = exc;  /* a BaseException: the caller puts the rest back */
        break;
    }
    PyObject *freed_obj = PyLong_FromLongLong(freed);
    if (freed_obj != NULL && freed_big != NULL) {
        Py_SETREF(freed_obj, PyNumber_Add(freed_obj, freed_big));
    }
    Py_XDECREF(freed_big);
    if (freed_obj == NULL) {
        Py_XDECREF(stopped);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(nNnO)", ran, freed_obj, errors, stopped != NULL ? stopped : Py_None);
    Py_XDECREF(stopped);
    return result;
}

/* -- specialize(): the readers' calls as methods of the subclass itself ---------- */

/* -- BufferPool's hot path: PoolCore and PoolLease ---------------------------
 *
 * A PoolCore sits in front of one BufferPool's PageSet (buffer_pool.py, "The
 * C fast path") and serves acquire(), slice() and release() of blocks of the
 * size classes without Python: per class, a stack of free blocks, which the
 * pool's Python slow path stocks, and a FIFO of released blocks tagged with
 * their goals, which the slow path takes back (spill) and lets PageSet
 * collect under the design's rule. Every view it hands out is exported by a
 * PoolLease: the view's `obj`, so release() finds its block from the view
 * itself (no table of views), and the lease keeps the block's page alive.
 *
 * Invariants (the pool's others are in buffer_pool.py):
 *   B1. A block the core owns is in exactly one place: its class's free
 *       stack, its class's FIFO, or out (a root lease with tokens > 0).
 *       PageSet counts each as taken (page.out includes it), so no page
 *       holding one is recarved or trimmed: the pool spills the core before
 *       anything that reads PageSet's free or waiting blocks.
 *   B2. Goals in a FIFO never decrease: each is wr_seq + 2 loaded under its
 *       shard's lock after the block's last view came back (the design's
 *       deferred advance, as PageSet.retire). spill() empties the FIFOs
 *       under their locks, inside the pool's lock; the pool sorts what
 *       they held by goal into PageSet.waiting, which only spills feed
 *       while the core is on: that queue stays ascending too.
 *   B3. A root lease's tokens = its block's views that are out (its own and
 *       its slices'); the release that takes tokens to 0 alone queues the
 *       block. A view is out while its lease's `view` is that view: release
 *       and slice test `view is lease->view` under the block's shard's
 *       lock, so a copy
 *       (memoryview(view), view[a:b]) or a view released already is refused
 *       (the Python path then raises its error).
 *   B4. Nothing under a shard's lock calls into Python, allocates a Python
 *       object or frees one: a PyMutex on free-threaded builds, the GIL
 *       otherwise.
 *       The free stack and the FIFO of a class each have room for every
 *       block the class owns (reserved when a block joins the core), so no
 *       push under the lock can fail and nothing is lost.
 *   B5. The fast path reuses a block once its goal <= the rd_seq the
 *       domain's GraceTiming last published (GraceTiming.rd_seq, I8's
 *       object): a value the domain's rd_seq reached, stored with release
 *       order after the scan that certified it and loaded here with acquire
 *       order, so the readers' quiescent states that made it safe happen
 *       before the block's reuse.
 *   B6. Once ADVANCE_AFTER blocks in a row were queued in a FIFO with the
 *       same goal (no advance since the first of them came back), the
 *       release that queued the last one advances wr_seq (after the lock):
 *       the grace period of the waiting blocks starts before the free stack
 *       runs out, and polls need not advance.
 *       Left to the poll at that moment (the design's deferred advance),
 *       the first poll of every refill failed and the pool carved fresh
 *       blocks, and a plain acquire/release loop grew the pool for good.
 *   B7. The core's tables are in shards (4 on free-threaded builds, 1 with
 *       the GIL), each with its own lock: a thread acquires from its own
 *       shard first (threads are dealt shards in turn), then from the
 *       others, so threads that each use their own buffers do not share a
 *       lock, and no block waits in one shard while another thread misses.
 *       A block belongs to one shard from the stock() or hand_out() that
 *       brought it in until a spill: its leases' tokens and views are
 *       guarded by that shard's lock, and its releases queue it there.
 *       No code path holds two shard locks at once.
 */

struct PoolLease;

typedef struct {
    struct PoolLease *lease;  /* the block's root lease, strong: it holds the Block and its address */
    int64_t goal;             /* in a FIFO: when it may be reused (B2) */
} pool_slot;

typedef struct {
    Py_ssize_t size;   /* the class's block size */
    Py_ssize_t owned;  /* blocks of the class the core owns (B1) */
    pool_slot *free;
    Py_ssize_t nfree;
    pool_slot *wait;
    Py_ssize_t wait_head, wait_end;
    Py_ssize_t cap;    /* of `free` and of `wait`: >= owned (B4) */
    Py_ssize_t run;    /* B6: blocks queued with the newest goal, in a row */
} pool_class;

/* B7's shards. With the GIL one thread runs at a time: one shard. */
#ifdef Py_GIL_DISABLED
#define POOL_SHARDS 4
#else
#define POOL_SHARDS 1
#endif

typedef union {
    struct {
#ifdef Py_GIL_DISABLED
        PyMutex mutex;
#endif
        pool_class *classes;  /* nclasses of them */
    } s;
    char line[64];  /* one cache line each: shards used by different threads do not share one */
} pool_shard;

typedef struct {
    PyObject_HEAD
    _Atomic int closed;      /* set once, by close(), before the shards are emptied */
    DomainCore *domain;
    GraceTiming *timing;     /* the domain's: its rd_seq (B5); NULL: none */
    PyTypeObject *lease_type;
    /* The pool's Python paths, each held through a weak reference to the
     * pool (buffer_pool._python_path): the core serves what it can and
     * passes every other call, with its arguments, to these. */
    PyObject *slow_acquire, *slow_release, *slow_slice;
    PyObject *every_256th_give_back;   /* or None */
    PyObject *advance;       /* the domain's advance() */
    int advance_in_c;        /* it is DomainCore.advance: call advance_and_record() */
    Py_ssize_t nclasses;
    Py_ssize_t *sizes;       /* the classes' block sizes, ascending */
    pool_shard *shards;      /* POOL_SHARDS of them */
    _Atomic int64_t given_back;  /* blocks queued in a FIFO by a release (a statistic: relaxed) */
} PoolCore;

/* A block has one root lease while the core holds it: it exports the view
 * acquire() hands out, each time the block goes out (len is that view's),
 * and stays with the block in the free stack and the FIFO, so that a hit
 * allocates no lease. A slice gets a lease of its own. A view released
 * already keeps its lease alive, and may see it reused: `view` tells its
 * current view from every earlier one (B3). */
typedef struct PoolLease {
    PyObject_HEAD
    PoolCore *core;
    struct PoolLease *root;  /* a slice's: the lease of its block's acquired view */
    PyObject *block;         /* a root's: the Block (keeps its page alive) */
    char *buf;
    Py_ssize_t len;          /* a root's: set under its shard's lock while not out */
    Py_ssize_t start;        /* where the view starts in its block */
    /* Strong, while the view is out (B3). Atomic: acquire() stores a root's
     * new view without its shard's lock (release() of one of its earlier
     * views may be testing it then, under the lock, and can only find it
     * different); every other write is under the lock. */
    _Atomic(PyObject *) view;
    Py_ssize_t tokens;       /* a root's (B3) */
    Py_ssize_t cls;          /* a root's class index */
    int shard;               /* a root's: the shard its block belongs to (B7); never changes */
} PoolLease;

#ifdef Py_GIL_DISABLED
#define SHARD_LOCK(sh) PyMutex_Lock(&(sh)->s.mutex)
#define SHARD_UNLOCK(sh) PyMutex_Unlock(&(sh)->s.mutex)
#else
#define SHARD_LOCK(sh) ((void)(sh))
#define SHARD_UNLOCK(sh) ((void)(sh))
#endif

#if POOL_SHARDS > 1
static _Atomic unsigned int next_pool_shard;
static _Thread_local int tl_pool_shard = -1;
#endif

/* The calling thread's shard (B7). */
static inline int
thread_shard(void)
{
#if POOL_SHARDS > 1
    if (tl_pool_shard < 0) {
        tl_pool_shard = (int)(atomic_fetch_add_explicit(&next_pool_shard, 1, memory_order_relaxed) % POOL_SHARDS);
    }
    return tl_pool_shard;
#else
    return 0;
#endif
}

static inline int
is_closed(PoolCore *self)
{
    return atomic_load_explicit(&self->closed, memory_order_relaxed);
}

/* -- PoolLease: the exporter of one view -- */

static int
PoolLease_getbuffer(PoolLease *self, Py_buffer *view, int flags)
{
    /* buf and len never change: no lock. Writable, format "B", as the
     * Python path's views of a page. */
    return PyBuffer_FillInfo(view, (PyObject *)self, self->buf, self->len, 0, flags);
}

static int
PoolLease_traverse(PoolLease *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->core);
    Py_VISIT(self->root);
    Py_VISIT(self->block);
    PyObject *view = atomic_load_explicit(&self->view, memory_order_relaxed);
    Py_VISIT(view);
    return 0;
}

static int
PoolLease_clear(PoolLease *self)
{
    /* A view dropped while out (never released) makes a cycle view ->
     * lease -> view that only the collector frees: its block stays out, as
     * on the Python path (debug mode reports it). */
    Py_XDECREF(atomic_exchange_explicit(&self->view, NULL, memory_order_relaxed));
    Py_CLEAR(self->root);
    Py_CLEAR(self->block);
    Py_CLEAR(self->core);
    return 0;
}

static void
PoolLease_dealloc(PoolLease *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)PoolLease_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyType_Slot PoolLease_slots[] = {
    {Py_tp_doc, "What a BufferPool view made by the C kernel exports: its block's bytes."},
    {Py_bf_getbuffer, PoolLease_getbuffer},
    {Py_tp_dealloc, PoolLease_dealloc},
    {Py_tp_traverse, PoolLease_traverse},
    {Py_tp_clear, PoolLease_clear},
    {0, NULL},
};

static PyType_Spec PoolLease_spec = {
    .name = "qsbr._kernel.PoolLease",
    .basicsize = sizeof(PoolLease),
    .flags = (Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE
              | Py_TPFLAGS_DISALLOW_INSTANTIATION),
    .slots = PoolLease_slots,
};

/* -- PoolCore -- */

/* The lease behind `view` if it is a live view this core made; else NULL
 * (not a memoryview, released with memoryview.release(), or another
 * exporter's). A view's `obj` is held by its managed buffer until the view
 * is released, so reading it is safe unless another thread releases the
 * memoryview during this call, a race of the caller's own. */
static PoolLease *
lease_of(PoolCore *self, PyObject *view)
{
    if (!PyMemoryView_Check(view)) {
        return NULL;
    }
    PyMemoryViewObject *mv = (PyMemoryViewObject *)view;
    if (mv->flags & _Py_MEMORYVIEW_RELEASED) {
        return NULL;
    }
    PyObject *obj = mv->view.obj;
    if (obj == NULL || Py_TYPE(obj) != self->lease_type || ((PoolLease *)obj)->core != self) {
        return NULL;
    }
    return (PoolLease *)obj;
}

/* The smallest class >= n, or -1 (n < 1 or above the largest). */
static Py_ssize_t
class_of(PoolCore *self, Py_ssize_t n)
{
    if (n < 1 || n > self->sizes[self->nclasses - 1]) {
        return -1;
    }
    Py_ssize_t lo = 0, hi = self->nclasses - 1;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (self->sizes[mid] < n) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo;
}

/* Room in `free` and `wait` for one more owned block (B4). Outside the
 * lock's critical section only in the sense that it may fail: called under
 * it, it calls no Python (raw allocator). Returns -1 on no memory (no
 * exception set: the caller sets it after unlocking). */
static int
reserve_one_locked(pool_class *pc)
{
    if (pc->owned < pc->cap) {
        return 0;
    }
    Py_ssize_t cap = pc->cap ? pc->cap * 2 : 16;
    pool_slot *free = PyMem_RawRealloc(pc->free, (size_t)cap * sizeof(pool_slot));
    if (free == NULL) {
        return -1;
    }
    pc->free = free;
    pool_slot *wait = PyMem_RawMalloc((size_t)cap * sizeof(pool_slot));
    if (wait == NULL) {
        return -1;
    }
    Py_ssize_t n = pc->wait_end - pc->wait_head;
    if (n) {
        memcpy(wait, pc->wait + pc->wait_head, (size_t)n * sizeof(pool_slot));
    }
    PyMem_RawFree(pc->wait);
    pc->wait = wait;
    pc->wait_head = 0;
    pc->wait_end = n;
    pc->cap = cap;
    return 0;
}

/* Queue a root lease's block (its last view is back: tokens == 0), in its
 * shard `sh` (locked). Returns QUEUED_ADVANCE when the caller must advance
 * wr_seq after the lock (B6), and QUEUED_TRIM every 256th block. */
#define ADVANCE_AFTER 32  /* buffer_pool.py's POLL_AFTER */
#define QUEUED_ADVANCE 1
#define QUEUED_TRIM 2
static int
queue_block_locked(PoolCore *self, pool_shard *sh, PoolLease *root)
{
    if (is_closed(self)) {
        return 0;  /* the pool dropped its pages: the lease keeps the block until it goes */
    }
    pool_class *pc = &sh->s.classes[root->cls];
    if (pc->wait_end == pc->cap) {  /* compact: the FIFO holds < cap (B4) */
        Py_ssize_t n = pc->wait_end - pc->wait_head;
        memmove(pc->wait, pc->wait + pc->wait_head, (size_t)n * sizeof(pool_slot));
        pc->wait_head = 0;
        pc->wait_end = n;
    }
    /* B2: the goal is loaded (acquire) after every view of the block came
     * back, under the lock that orders the FIFO. */
    int64_t wr = load_wr_seq(self->domain);
    pool_slot slot = {(PoolLease *)Py_NewRef(root), wr + 2};
    int same = pc->wait_end > pc->wait_head && pc->wait[pc->wait_end - 1].goal == wr + 2;
    pc->run = same ? pc->run + 1 : 1;
    pc->wait[pc->wait_end++] = slot;
    int64_t given = atomic_fetch_add_explicit(&self->given_back, 1, memory_order_relaxed) + 1;
    int advance = pc->run >= ADVANCE_AFTER;
    return (advance ? QUEUED_ADVANCE : 0) | ((given & 255) == 0 ? QUEUED_TRIM : 0);
}

/* The advance queue_block_locked() asked for (outside the core's lock). */
static int
start_grace_period(PoolCore *self)
{
    if (self->advance_in_c) {
        (void)advance_and_record(self->domain);
        return 0;
    }
    PyObject *r = PyObject_CallNoArgs(self->advance);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* A new lease: a root (root == NULL: of `block`, not out yet, tokens 0)
 * or a slice's (of `len` bytes at `buf`). */
static PoolLease *
new_lease(PoolCore *self, PoolLease *root, PyObject *block, Py_ssize_t cls, char *buf, Py_ssize_t len,
          Py_ssize_t start, int shard)
{
    PoolLease *lease = PyObject_GC_New(PoolLease, self->lease_type);
    if (lease == NULL) {
        return NULL;
    }
    lease->core = (PoolCore *)Py_NewRef(self);
    lease->root = root ? (PoolLease *)Py_NewRef(root) : NULL;
    lease->block = block ? Py_NewRef(block) : NULL;
    lease->buf = buf;
    lease->len = len;
    lease->start = start;
    atomic_init(&lease->view, NULL);
    lease->tokens = 0;
    lease->cls = cls;
    lease->shard = shard;
    PyObject_GC_Track(lease);
    return lease;
}

/* A slice's view: a new lease (its root already counted its token). */
static PyObject *
slice_view(PoolCore *self, PoolLease *root, char *buf, Py_ssize_t len, Py_ssize_t start)
{
    PoolLease *lease = new_lease(self, root, NULL, root->cls, buf, len, start, root->shard);
    if (lease == NULL) {
        return NULL;
    }
    PyObject *view = PyMemoryView_FromObject((PyObject *)lease);
    if (view != NULL) {
        /* Out from here (B3). Nobody else has the new lease yet: no lock. */
        atomic_store_explicit(&lease->view, Py_NewRef(view), memory_order_relaxed);
    }
    Py_DECREF(lease);  /* the view's buffer holds it */
    return view;
}

/* The view of a root lease the caller took out of the core (free -> out,
 * B1), whose len and tokens (1) it set under the lock. NULL on error: the
 * lease is not out, and still the caller's. */
static PyObject *
root_view(PoolCore *self, PoolLease *root)
{
    PyObject *view = PyMemoryView_FromObject((PyObject *)root);
    if (view == NULL) {
        return NULL;
    }
    /* Out from here (B3). No lock: a release of one of the lease's earlier
     * views may be testing `view` now, and finds NULL or this view, never
     * its own; nothing else can reach this view yet. */
    (void)self;
    atomic_store_explicit(&root->view, Py_NewRef(view), memory_order_release);
    return view;
}

static PyObject *
PoolCore_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"domain", "sizes", "slow_acquire", "slow_release", "slow_slice",
                             "every_256th_give_back", "advance", "advance_in_c", NULL};
    PyObject *domain, *sizes, *acq, *rel, *sli, *trim, *advance;
    int advance_in_c;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!OOOOOp:PoolCore", kwlist, &domain, &PyTuple_Type,
                                     &sizes, &acq, &rel, &sli, &trim, &advance, &advance_in_c)) {
        return NULL;
    }
    PyObject *module = PyType_GetModuleByDef(type, &kernel_module);
    if (module == NULL) {
        return NULL;
    }
    kernel_state *ks = get_kernel_state(module);
    if (check_instance(domain, ks->DomainCore_type, "domain") < 0) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(sizes);
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "PoolCore needs at least one size class");
        return NULL;
    }
    Py_ssize_t *size_of = PyMem_RawCalloc((size_t)n, sizeof(Py_ssize_t));
    pool_shard *shards = PyMem_RawCalloc(POOL_SHARDS, sizeof(pool_shard));
    pool_class *classes = PyMem_RawCalloc((size_t)n * POOL_SHARDS, sizeof(pool_class));
    if (size_of == NULL || shards == NULL || classes == NULL) {
        PyMem_RawFree(size_of);
        PyMem_RawFree(shards);
        PyMem_RawFree(classes);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t size = PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes, i));
        if (size == -1 && PyErr_Occurred()) {
            break;
        }
        if (size < 1 || (i && size <= size_of[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "PoolCore: sizes must be ascending and >= 1");
            break;
        }
        size_of[i] = size;
        for (int k = 0; k < POOL_SHARDS; k++) {
            classes[k * n + i].size = size;
        }
    }
    PoolCore *self = PyErr_Occurred() ? NULL : (PoolCore *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyMem_RawFree(size_of);
        PyMem_RawFree(shards);
        PyMem_RawFree(classes);
        return NULL;
    }
    for (int k = 0; k < POOL_SHARDS; k++) {
        shards[k].s.classes = classes + k * n;  /* one allocation: freed through shard 0 */
    }
    atomic_init(&self->closed, 0);
    atomic_init(&self->given_back, 0);
    self->domain = (DomainCore *)Py_NewRef(domain);
    self->timing = (GraceTiming *)Py_XNewRef(self->domain->timing);
    self->lease_type = (PyTypeObject *)Py_NewRef(ks->PoolLease_type);
    self->slow_acquire = Py_NewRef(acq);
    self->slow_release = Py_NewRef(rel);
    self->slow_slice = Py_NewRef(sli);
    self->every_256th_give_back = Py_NewRef(trim);
    self->advance = Py_NewRef(advance);
    self->advance_in_c = advance_in_c && self->timing != NULL;
    self->nclasses = n;
    self->sizes = size_of;
    self->shards = shards;
    return (PyObject *)self;
}

static int
PoolCore_traverse(PoolCore *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->domain);
    Py_VISIT(self->timing);
    Py_VISIT(self->lease_type);
    Py_VISIT(self->slow_acquire);
    Py_VISIT(self->slow_release);
    Py_VISIT(self->slow_slice);
    Py_VISIT(self->every_256th_give_back);
    Py_VISIT(self->advance);
    for (int k = 0; self->shards && k < POOL_SHARDS; k++) {
        for (Py_ssize_t i = 0; i < self->nclasses; i++) {
            pool_class *pc = &self->shards[k].s.classes[i];
            for (Py_ssize_t j = 0; j < pc->nfree; j++) {
                Py_VISIT(pc->free[j].lease);
            }
            for (Py_ssize_t j = pc->wait_head; j < pc->wait_end; j++) {
                Py_VISIT(pc->wait[j].lease);
            }
        }
    }
    return 0;
}

static void
drop_shard(PoolCore *self, pool_shard *sh)
{
    Py_ssize_t n = self->nclasses;
    pool_class *classes = PyMem_RawMalloc((size_t)n * sizeof(pool_class));
    if (classes == NULL) {
        return;  /* out of memory: the blocks stay (the core's dealloc tries again) */
    }
    SHARD_LOCK(sh);
    /* Move the tables out under the lock; decref after it (B4). */
    memcpy(classes, sh->s.classes, (size_t)n * sizeof(pool_class));
    for (Py_ssize_t i = 0; i < n; i++) {
        pool_class *pc = &sh->s.classes[i];
        pc->owned -= pc->nfree + (pc->wait_end - pc->wait_head);
        pc->free = pc->wait = NULL;
        pc->nfree = pc->wait_head = pc->wait_end = pc->cap = 0;
    }
    SHARD_UNLOCK(sh);
    for (Py_ssize_t i = 0; i < n; i++) {
        pool_class *pc = &classes[i];
        for (Py_ssize_t j = 0; j < pc->nfree; j++) {
            Py_DECREF(pc->free[j].lease);
        }
        for (Py_ssize_t j = pc->wait_head; j < pc->wait_end; j++) {
            Py_DECREF(pc->wait[j].lease);
        }
        PyMem_RawFree(pc->free);
        PyMem_RawFree(pc->wait);
    }
    PyMem_RawFree(classes);
}

/* Drop every free and waiting block of every shard (close(), or clearing). */
static void
drop_blocks(PoolCore *self)
{
    for (int k = 0; self->shards && k < POOL_SHARDS; k++) {
        drop_shard(self, &self->shards[k]);
    }
}

static int
PoolCore_clear(PoolCore *self)
{
    drop_blocks(self);
    Py_CLEAR(self->domain);
    Py_CLEAR(self->timing);
    Py_CLEAR(self->lease_type);
    Py_CLEAR(self->slow_acquire);
    Py_CLEAR(self->slow_release);
    Py_CLEAR(self->slow_slice);
    Py_CLEAR(self->every_256th_give_back);
    Py_CLEAR(self->advance);
    return 0;
}

static void
PoolCore_dealloc(PoolCore *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)PoolCore_clear(self);
    if (self->shards != NULL) {
        PyMem_RawFree(self->shards[0].s.classes);
    }
    PyMem_RawFree(self->shards);
    PyMem_RawFree(self->sizes);
    self->shards = NULL;
    self->sizes = NULL;
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* A block of the class, free -> out (B1): from the free stack, after moving
 * the FIFO's heads whose goal rd_seq has reached onto it (the design's
 * rule: reused once goal <= rd_seq; B2 lets the test stop at the first head
 * not reached, B5 says where rd_seq comes from). */
static int
take_locked(PoolCore *self, pool_class *pc, pool_slot *out)
{
    if (is_closed(self)) {
        return 0;
    }
    if (pc->nfree == 0 && pc->wait_head < pc->wait_end && self->timing != NULL) {
        int64_t rd = atomic_load_explicit(&self->timing->rd_seq, memory_order_acquire);
        while (pc->wait_head < pc->wait_end && pc->wait[pc->wait_head].goal <= rd) {
            pc->free[pc->nfree++] = pc->wait[pc->wait_head++];  /* room: B4 */
        }
        if (pc->wait_head == pc->wait_end) {
            pc->wait_head = pc->wait_end = 0;
        }
    }
    if (pc->nfree == 0) {
        return 0;
    }
    *out = pc->free[--pc->nfree];
    return 1;
}

/* acquire() served by the core: a view, NULL on error, or NULL with
 * *missed set (nothing for it here: n fits no class, or no block is ready). */
static PyObject *
fast_acquire(PoolCore *self, PyObject *nbytes, int *missed)
{
    *missed = 1;
    if (PyLong_CheckExact(nbytes)) {
        int overflow;
        long long n = PyLong_AsLongLongAndOverflow(nbytes, &overflow);
        Py_ssize_t cls = overflow || n > PY_SSIZE_T_MAX ? -1 : class_of(self, (Py_ssize_t)n);
        if (cls >= 0) {
            /* Its own shard first, then the others (B7). */
            int own = thread_shard(), got = 0;
            pool_shard *sh = NULL;
            pool_class *pc = NULL;
            pool_slot slot = {NULL, 0};
            for (int k = 0; k < POOL_SHARDS && !got; k++) {
                sh = &self->shards[(own + k) % POOL_SHARDS];
                pc = &sh->s.classes[cls];
                SHARD_LOCK(sh);
                got = take_locked(self, pc, &slot);
                if (got) {
                    slot.lease->len = (Py_ssize_t)n;
                    slot.lease->tokens = 1;
                }
                SHARD_UNLOCK(sh);
            }
            if (got) {
                *missed = 0;
                PyObject *view = root_view(self, slot.lease);
                if (view == NULL) {
                    SHARD_LOCK(sh);
                    slot.lease->tokens = 0;
                    int back = !is_closed(self);
                    if (back) {
                        pc->free[pc->nfree++] = slot;  /* never out (room: B4) */
                    }
                    SHARD_UNLOCK(sh);
                    if (!back) {
                        Py_DECREF(slot.lease);
                    }
                    return NULL;
                }
                Py_DECREF(slot.lease);  /* the view's buffer holds it */
                return view;
            }
        }
    }
    return NULL;
}

static PyObject *
PoolCore_acquire(PoolCore *self, PyObject *const *args, Py_ssize_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs == 1 && kwnames == NULL) {
        int missed;
        PyObject *view = fast_acquire(self, args[0], &missed);
        if (!missed) {
            return view;
        }
    }
    /* Everything else: the Python path (a miss, other sizes, errors). */
    return PyObject_Vectorcall(self->slow_acquire, args, nargs, kwnames);
}

static PyObject *
PoolCore_try_acquire(PoolCore *self, PyObject *nbytes)
{
    int missed;
    PyObject *view = fast_acquire(self, nbytes, &missed);
    if (missed) {
        Py_RETURN_NONE;
    }
    return view;
}

/* waiting(cls): (how many blocks of class cls wait in the FIFOs, the oldest
 * one's goal); the goal is 0 when none waits. */
static PyObject *
PoolCore_waiting(PoolCore *self, PyObject *arg)
{
    Py_ssize_t cls = PyLong_AsSsize_t(arg);
    if (cls == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (cls < 0 || cls >= self->nclasses) {
        PyErr_SetString(PyExc_ValueError, "waiting(): no such class");
        return NULL;
    }
    int64_t head = 0;
    Py_ssize_t total = 0;
    for (int k = 0; k < POOL_SHARDS; k++) {
        pool_shard *sh = &self->shards[k];
        pool_class *pc = &sh->s.classes[cls];
        SHARD_LOCK(sh);
        Py_ssize_t n = pc->wait_end - pc->wait_head;
        if (n) {
            int64_t h = pc->wait[pc->wait_head].goal;
            head = total && head < h ? head : h;
            total += n;
        }
        SHARD_UNLOCK(sh);
    }
    return Py_BuildValue("(nL)", total, (long long)head);
}

/* goals(): (class index, oldest goal) of every class with blocks waiting,
 * over its FIFOs in every shard. */
static PyObject *
PoolCore_goals(PoolCore *self, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t n = self->nclasses, k = 0;
    int64_t *goals = PyMem_RawMalloc((size_t)n * 2 * sizeof(int64_t));
    if (goals == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int found = 0;
        for (int s = 0; s < POOL_SHARDS; s++) {
            pool_shard *sh = &self->shards[s];
            pool_class *pc = &sh->s.classes[i];
            SHARD_LOCK(sh);
            if (pc->wait_head < pc->wait_end) {
                int64_t h = pc->wait[pc->wait_head].goal;
                goals[2 * k] = i;
                goals[2 * k + 1] = found && goals[2 * k + 1] < h ? goals[2 * k + 1] : h;
                found = 1;
            }
            SHARD_UNLOCK(sh);
        }
        k += found;
    }
    PyObject *list = PyList_New(k);
    for (Py_ssize_t i = 0; list != NULL && i < k; i++) {
        PyObject *g = Py_BuildValue("(LL)", (long long)goals[2 * i], (long long)goals[2 * i + 1]);
        if (g == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, g);
    }
    PyMem_RawFree(goals);
    return list;
}

static PyObject *
PoolCore_release(PoolCore *self, PyObject *view)
{
    PoolLease *lease = lease_of(self, view);
    if (lease != NULL) {
        PyObject *was = NULL;
        int queued = 0;
        /* The block's shard guards the tokens and views of all its leases. */
        PoolLease *root = lease->root ? lease->root : lease;
        pool_shard *sh = &self->shards[root->shard];
        SHARD_LOCK(sh);
        if (!is_closed(self) && atomic_load_explicit(&lease->view, memory_order_acquire) == view) {
            was = view;  /* B3: of two racing releases, one finds it */
            atomic_store_explicit(&lease->view, NULL, memory_order_relaxed);
            if (--root->tokens == 0) {
                queued = queue_block_locked(self, sh, root);
            }
        }
        SHARD_UNLOCK(sh);
        if (was != NULL) {
            Py_DECREF(was);
            if ((queued & QUEUED_ADVANCE) && start_grace_period(self) < 0) {
                return NULL;
            }
            if ((queued & QUEUED_TRIM) && self->every_256th_give_back != Py_None) {
                return PyObject_CallNoArgs(self->every_256th_give_back);
            }
            Py_RETURN_NONE;
        }
    }
    /* Not a view out of this core: the Python path, which raises the error
     * that fits (or releases a view it made itself). */
    return PyObject_CallOneArg(self->slow_release, view);
}

static PyObject *
PoolCore_slice(PoolCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs == 3 && PyLong_CheckExact(args[1]) && PyLong_CheckExact(args[2])) {
        PoolLease *lease = lease_of(self, args[0]);
        if (lease != NULL) {
            int o1, o2;
            long long start = PyLong_AsLongLongAndOverflow(args[1], &o1);
            long long stop = PyLong_AsLongLongAndOverflow(args[2], &o2);
            PoolLease *root = NULL;
            int out_of_range = 0;
            Py_ssize_t len = 0;
            PoolLease *its_root = lease->root ? lease->root : lease;
            pool_shard *sh = &self->shards[its_root->shard];
            SHARD_LOCK(sh);
            if (!is_closed(self) && atomic_load_explicit(&lease->view, memory_order_acquire) == args[0]) {
                len = lease->len;
                if (o1 || o2 || start < 0 || start > stop || stop > len) {
                    out_of_range = 1;
                }
                else {
                    root = lease->root ? lease->root : lease;
                    root->tokens++;  /* first: the block cannot go back before the slice does */
                }
            }
            SHARD_UNLOCK(sh);
            if (out_of_range) {
                PyErr_Format(PyExc_ValueError, "slice(): need 0 <= start <= stop <= %zd, got %S, %S", len,
                             args[1], args[2]);
                return NULL;
            }
            if (root != NULL) {
                PyObject *view = slice_view(self, root, lease->buf + start, (Py_ssize_t)(stop - start),
                                            lease->start + (Py_ssize_t)start);
                if (view == NULL) {
                    SHARD_LOCK(sh);
                    if (--root->tokens == 0) {  /* `view` was released meanwhile */
                        (void)queue_block_locked(self, sh, root);  /* (the next release advances) */
                    }
                    SHARD_UNLOCK(sh);
                }
                return view;
            }
        }
    }
    return PyObject_Vectorcall(self->slow_slice, args, nargs, NULL);
}

/* hand_out(cls, block, addr, nbytes): the slow path's block, out through a
 * lease (so that its release takes the fast path). */
static PyObject *
PoolCore_hand_out(PoolCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "hand_out(cls, block, addr, nbytes)");
        return NULL;
    }
    Py_ssize_t cls = PyLong_AsSsize_t(args[0]);
    void *addr = PyLong_AsVoidPtr(args[2]);
    Py_ssize_t n = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (cls < 0 || cls >= self->nclasses || n < 1 || n > self->sizes[cls]) {
        PyErr_SetString(PyExc_ValueError, "hand_out(): no such class, or nbytes does not fit it");
        return NULL;
    }
    int shard = thread_shard();  /* the block joins the caller's shard (B7) */
    pool_shard *sh = &self->shards[shard];
    pool_class *pc = &sh->s.classes[cls];
    PoolLease *root = new_lease(self, NULL, args[1], cls, (char *)addr, 0, 0, shard);
    if (root == NULL) {
        return NULL;
    }
    SHARD_LOCK(sh);
    int closed = is_closed(self);
    int ok = !closed && reserve_one_locked(pc) == 0;
    if (ok) {
        pc->owned++;  /* B1: out; queued at its last release */
        root->len = n;
        root->tokens = 1;
    }
    SHARD_UNLOCK(sh);
    PyObject *view = NULL;
    if (!ok) {
        if (closed) {
            PyErr_SetString(PyExc_ValueError, "this BufferPool is closed");
        }
        else {
            PyErr_NoMemory();
        }
    }
    else if ((view = root_view(self, root)) == NULL) {
        SHARD_LOCK(sh);
        pc->owned--;
        root->tokens = 0;
        SHARD_UNLOCK(sh);
    }
    Py_DECREF(root);  /* the view's buffer holds it */
    return view;
}

/* stock(cls, block, addr): a free block for the fast path. */
static PyObject *
PoolCore_stock(PoolCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "stock(cls, block, addr)");
        return NULL;
    }
    Py_ssize_t cls = PyLong_AsSsize_t(args[0]);
    void *addr = PyLong_AsVoidPtr(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (cls < 0 || cls >= self->nclasses) {
        PyErr_SetString(PyExc_ValueError, "stock(): no such class");
        return NULL;
    }
    int shard = thread_shard();  /* the block joins the caller's shard (B7) */
    pool_shard *sh = &self->shards[shard];
    pool_class *pc = &sh->s.classes[cls];
    PoolLease *root = new_lease(self, NULL, args[1], cls, (char *)addr, 0, 0, shard);
    if (root == NULL) {
        return NULL;
    }
    pool_slot slot = {root, 0};
    SHARD_LOCK(sh);
    int closed = is_closed(self);
    int ok = !closed && reserve_one_locked(pc) == 0;
    if (ok) {
        pc->owned++;
        pc->free[pc->nfree++] = slot;
    }
    SHARD_UNLOCK(sh);
    if (!ok) {
        Py_DECREF(slot.lease);
        if (closed) {
            PyErr_SetString(PyExc_ValueError, "this BufferPool is closed");
            return NULL;
        }
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

/* spill(cls): ([free blocks], [(block, goal), ...]) of class `cls` (-1:
 * every class), taken out of the core (B1). The waiting blocks come shard
 * by shard, each shard's oldest first: the caller sorts them by goal (B2). */
static PyObject *
PoolCore_spill(PoolCore *self, PyObject *arg)
{
    Py_ssize_t which = PyLong_AsSsize_t(arg);
    if (which == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (which < -1 || which >= self->nclasses) {
        PyErr_SetString(PyExc_ValueError, "spill(): no such class");
        return NULL;
    }
    Py_ssize_t lo = which < 0 ? 0 : which, hi = which < 0 ? self->nclasses : which + 1;
    PyObject *freed = PyList_New(0), *waiting = PyList_New(0);
    if (freed == NULL || waiting == NULL) {
        goto error;
    }
    for (Py_ssize_t q = lo * POOL_SHARDS; q < hi * POOL_SHARDS; q++) {
        pool_shard *sh = &self->shards[q % POOL_SHARDS];
        pool_class *pc = &sh->s.classes[q / POOL_SHARDS];
        /* Copy the class's slots out under the lock, then build the lists
         * (which allocates) outside it (B4). */
        Py_ssize_t nf, nw;
        pool_slot *f = NULL, *w = NULL;
        SHARD_LOCK(sh);
        nf = pc->nfree;
        nw = pc->wait_end - pc->wait_head;
        if (nf + nw) {
            f = PyMem_RawMalloc((size_t)(nf + nw) * sizeof(pool_slot));
            if (f != NULL) {
                w = f + nf;
                memcpy(f, pc->free, (size_t)nf * sizeof(pool_slot));
                memcpy(w, pc->wait + pc->wait_head, (size_t)nw * sizeof(pool_slot));
                pc->owned -= nf + nw;
                pc->nfree = pc->wait_head = pc->wait_end = 0;
            }
        }
        SHARD_UNLOCK(sh);
        if (nf + nw && f == NULL) {
            PyErr_NoMemory();
            goto error;
        }
        int failed = 0;
        for (Py_ssize_t j = 0; j < nf; j++) {
            failed = failed || PyList_Append(freed, f[j].lease->block) < 0;
            Py_DECREF(f[j].lease);
        }
        for (Py_ssize_t j = 0; j < nw; j++) {
            PyObject *t = failed ? NULL : Py_BuildValue("(OL)", w[j].lease->block, (long long)w[j].goal);
            failed = failed || t == NULL || PyList_Append(waiting, t) < 0;
            Py_XDECREF(t);
            Py_DECREF(w[j].lease);
        }
        PyMem_RawFree(f);
        if (failed) {
            /* Out of memory while handing blocks back: they are lost to
             * the pool (counted out), never reused early. */
            goto error;
        }
    }
    PyObject *result = PyTuple_Pack(2, freed, waiting);
    Py_DECREF(freed);
    Py_DECREF(waiting);
    return result;
error:
    Py_XDECREF(freed);
    Py_XDECREF(waiting);
    return NULL;
}

/* location(view): (block, start in the block) of a view out of this core,
 * else None. */
static PyObject *
PoolCore_location(PoolCore *self, PyObject *view)
{
    PoolLease *lease = lease_of(self, view);
    PyObject *block = NULL;
    Py_ssize_t start = 0;
    if (lease != NULL) {
        PoolLease *root = lease->root ? lease->root : lease;
        pool_shard *sh = &self->shards[root->shard];
        SHARD_LOCK(sh);
        if (atomic_load_explicit(&lease->view, memory_order_acquire) == view) {
            block = Py_NewRef(root->block);  /* an incref only: no Python code runs */
            start = lease->start;
        }
        SHARD_UNLOCK(sh);
    }
    if (block == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *result = Py_BuildValue("(Nn)", block, start);
    return result;
}

static PyObject *
PoolCore_close(PoolCore *self, PyObject *Py_UNUSED(ignored))
{
    /* Before the shards are emptied: each shard's critical sections test
     * it, so none queues into a shard after drop_blocks() emptied it. */
    atomic_store_explicit(&self->closed, 1, memory_order_relaxed);
    drop_blocks(self);
    Py_RETURN_NONE;
}

static PyObject *
PoolCore_after_fork_in_child(PoolCore *self, PyObject *Py_UNUSED(ignored))
{
#ifdef Py_GIL_DISABLED
    /* Only the forking thread survives; whoever held the lock is gone, and
     * nothing under it is left half done that the child could see: each
     * critical section's writes are plain stores of whole slots. */
    for (int k = 0; k < POOL_SHARDS; k++) {
        memset(&self->shards[k].s.mutex, 0, sizeof(self->shards[k].s.mutex));
    }
#endif
    (void)self;
    Py_RETURN_NONE;
}

static PyObject *
PoolCore_get_given_back(PoolCore *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(atomic_load_explicit(&self->given_back, memory_order_relaxed));
}

static PyObject *
PoolCore_get_held(PoolCore *self, void *Py_UNUSED(closure))
{
    /* {class size: (owned, free, waiting)}: built from a copy taken under
     * the lock. */
    Py_ssize_t n = self->nclasses;
    Py_ssize_t *counts = PyMem_RawMalloc((size_t)n * 4 * sizeof(Py_ssize_t));
    if (counts == NULL) {
        return PyErr_NoMemory();
    }
    memset(counts, 0, (size_t)n * 4 * sizeof(Py_ssize_t));
    for (int k = 0; k < POOL_SHARDS; k++) {
        pool_shard *sh = &self->shards[k];
        SHARD_LOCK(sh);
        for (Py_ssize_t i = 0; i < n; i++) {
            pool_class *pc = &sh->s.classes[i];
            counts[4 * i] = pc->size;
            counts[4 * i + 1] += pc->owned;
            counts[4 * i + 2] += pc->nfree;
            counts[4 * i + 3] += pc->wait_end - pc->wait_head;
        }
        SHARD_UNLOCK(sh);
    }
    PyObject *d = PyDict_New();
    for (Py_ssize_t i = 0; d != NULL && i < n; i++) {
        PyObject *k = PyLong_FromSsize_t(counts[4 * i]);
        PyObject *v = Py_BuildValue("(nnn)", counts[4 * i + 1], counts[4 * i + 2], counts[4 * i + 3]);
        if (k == NULL || v == NULL || PyDict_SetItem(d, k, v) < 0) {
            Py_CLEAR(d);
        }
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    PyMem_RawFree(counts);
    return d;
}

static PyMethodDef PoolCore_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))PoolCore_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire($self, nbytes, /, *, timeout=None)\n--\n\n"
     "BufferPool.acquire(): a free block of the class from C, else the Python path."},
    {"try_acquire", (PyCFunction)PoolCore_try_acquire, METH_O,
     "try_acquire($self, nbytes, /)\n--\n\n"
     "A view of a block the core has ready (rd_seq as now published), or None."},
    {"waiting", (PyCFunction)PoolCore_waiting, METH_O,
     "waiting($self, cls, /)\n--\n\n(count, oldest goal) of the blocks of class cls waiting in the core."},
    {"goals", (PyCFunction)PoolCore_goals, METH_NOARGS,
     "goals($self, /)\n--\n\n(class index, oldest goal) of every class with blocks waiting in the core."},
    {"release", (PyCFunction)PoolCore_release, METH_O,
     "release($self, view, /)\n--\n\n"
     "BufferPool.release(): a view this core made, else the Python path."},
    {"slice", (PyCFunction)(void (*)(void))PoolCore_slice, METH_FASTCALL,
     "slice($self, view, start, stop, /)\n--\n\n"
     "BufferPool.slice(): of a view this core made, else the Python path."},
    {"hand_out", (PyCFunction)(void (*)(void))PoolCore_hand_out, METH_FASTCALL,
     "hand_out($self, cls, block, addr, nbytes, /)\n--\n\n"
     "(The pool's lock held.) A view of the block the slow path took, out through a lease."},
    {"stock", (PyCFunction)(void (*)(void))PoolCore_stock, METH_FASTCALL,
     "stock($self, cls, block, addr, /)\n--\n\n"
     "(The pool's lock held.) A free block for the fast path (PageSet counts it taken)."},
    {"spill", (PyCFunction)PoolCore_spill, METH_O,
     "spill($self, cls, /)\n--\n\n"
     "(The pool's lock held.) Take class cls's free and waiting blocks out (-1: every class)."},
    {"location", (PyCFunction)PoolCore_location, METH_O,
     "location($self, view, /)\n--\n\n(block, start) of a view out of this core, or None."},
    {"close", (PyCFunction)PoolCore_close, METH_NOARGS,
     "close($self, /)\n--\n\nServe nothing more; drop the free and waiting blocks."},
    {"after_fork_in_child", (PyCFunction)PoolCore_after_fork_in_child, METH_NOARGS,
     "after_fork_in_child($self, /)\n--\n\nThe lock, fresh."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef PoolCore_getset[] = {
    {"given_back", (getter)PoolCore_get_given_back, NULL,
     "blocks whose last view came back through the core", NULL},
    {"held", (getter)PoolCore_get_held, NULL, "{class size: (owned, free, waiting)}", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot PoolCore_slots[] = {
    {Py_tp_doc, "The C fast path of one BufferPool (buffer_pool.py, \"The C fast path\")."},
    {Py_tp_new, PoolCore_new},
    {Py_tp_dealloc, PoolCore_dealloc},
    {Py_tp_traverse, PoolCore_traverse},
    {Py_tp_clear, PoolCore_clear},
    {Py_tp_methods, PoolCore_methods},
    {Py_tp_getset, PoolCore_getset},
    {0, NULL},
};

static PyType_Spec PoolCore_spec = {
    .name = "qsbr._kernel.PoolCore",
    .basicsize = sizeof(PoolCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = PoolCore_slots,
};

PyDoc_STRVAR(specialize_doc,
"specialize(cls)\n--\n\n"
"Give `cls`, a subclass of DomainCore (qsbr.Domain), its own method\n"
"descriptors for quiescent(), attach(), detach(), attached() and detached().\n"
"CPython specializes\n"
"the call of a C method only for instances of the type the method was made\n"
"for; DomainCore's own descriptors would take the generic path (about 20 ns\n"
"more on 3.11) for every Domain instance. The functions are the same C code.");

static const char *const SPECIALIZED[] = {"quiescent", "attach", "detach", "attached", "detached", "retire",
                                          NULL};

static PyObject *
specialize(PyObject *module, PyObject *cls)
{
    kernel_state *ks = get_kernel_state(module);
    if (!PyType_Check(cls) || !PyType_IsSubtype((PyTypeObject *)cls, ks->DomainCore_type)) {
        PyErr_SetString(PyExc_TypeError, "specialize() needs a subclass of DomainCore");
        return NULL;
    }
    for (PyMethodDef *def = DomainCore_methods; def->ml_name != NULL; def++) {
        int wanted = 0;
        for (const char *const *name = SPECIALIZED; *name != NULL; name++) {
            wanted |= strcmp(def->ml_name, *name) == 0;
        }
        if (!wanted) {
            continue;
        }
        PyObject *descr = PyDescr_NewMethod((PyTypeObject *)cls, def);
        if (descr == NULL) {
            return NULL;
        }
        int rc = PyObject_SetAttrString(cls, def->ml_name, descr);
        Py_DECREF(descr);
        if (rc < 0) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

/* -- the module ---------------------------------------------------------------- */

static PyMethodDef kernel_methods[] = {
    {"specialize", (PyCFunction)specialize, METH_O, specialize_doc},
    {"scan_slots", (PyCFunction)(void (*)(void))scan_slots, METH_FASTCALL, scan_slots_doc},
    {"run_entries", (PyCFunction)(void (*)(void))run_entries, METH_FASTCALL, run_entries_doc},
    {NULL, NULL, 0, NULL},
};

static int
add_type(PyObject *module, PyType_Spec *spec, PyObject *base, PyTypeObject **slot)
{
    PyTypeObject *type = (PyTypeObject *)PyType_FromModuleAndSpec(module, spec, base);
    if (type == NULL) {
        return -1;
    }
    *slot = type;  /* the module state's reference */
    return PyModule_AddType(module, type);
}

static int
kernel_exec(PyObject *module)
{
    kernel_state *ks = get_kernel_state(module);
    if (add_type(module, &DomainCore_spec, NULL, &ks->DomainCore_type) < 0
        || add_type(module, &ThreadCore_spec, NULL, &ks->ThreadCore_type) < 0
        || add_type(module, &ThreadHandle_spec, NULL, &ks->ThreadHandle_type) < 0
        || add_type(module, &ReadSection_spec, NULL, &ks->ReadSection_type) < 0
        || add_type(module, &DetachedSection_spec, NULL, &ks->DetachedSection_type) < 0
        || add_type(module, &GraceTiming_spec, NULL, &ks->GraceTiming_type) < 0
        || add_type(module, &PoolLease_spec, NULL, &ks->PoolLease_type) < 0
        || add_type(module, &PoolCore_spec, NULL, &ks->PoolCore_type) < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "MAX_DEPTH", MAX_DEPTH) < 0) {
        return -1;
    }
    PyObject *errors = PyImport_ImportModule("qsbr.errors");
    if (errors == NULL) {
        return -1;
    }
    ks->unregistered_handle_error = PyObject_GetAttrString(errors, "unregistered_handle_error");
    Py_DECREF(errors);
    if (ks->unregistered_handle_error == NULL) {
        return -1;
    }
    if ((ks->str_thread_core = PyUnicode_InternFromString("_thread_core")) == NULL
        || (ks->str_state = PyUnicode_InternFromString("state")) == NULL
        || (ks->str_after_advance = PyUnicode_InternFromString("_after_advance")) == NULL
        || (ks->str_retire_python = PyUnicode_InternFromString("_retire_python")) == NULL) {
        return -1;
    }
    return 0;
}

static int
kernel_traverse(PyObject *module, visitproc visit, void *arg)
{
    kernel_state *ks = get_kernel_state(module);
    Py_VISIT(ks->DomainCore_type);
    Py_VISIT(ks->ThreadCore_type);
    Py_VISIT(ks->ThreadHandle_type);
    Py_VISIT(ks->ReadSection_type);
    Py_VISIT(ks->DetachedSection_type);
    Py_VISIT(ks->GraceTiming_type);
    Py_VISIT(ks->PoolLease_type);
    Py_VISIT(ks->PoolCore_type);
    Py_VISIT(ks->unregistered_handle_error);
    Py_VISIT(ks->str_thread_core);
    Py_VISIT(ks->str_state);
    Py_VISIT(ks->str_after_advance);
    Py_VISIT(ks->str_retire_python);
    return 0;
}

static int
kernel_clear(PyObject *module)
{
    kernel_state *ks = get_kernel_state(module);
    Py_CLEAR(ks->DomainCore_type);
    Py_CLEAR(ks->ThreadCore_type);
    Py_CLEAR(ks->ThreadHandle_type);
    Py_CLEAR(ks->ReadSection_type);
    Py_CLEAR(ks->DetachedSection_type);
    Py_CLEAR(ks->GraceTiming_type);
    Py_CLEAR(ks->PoolLease_type);
    Py_CLEAR(ks->PoolCore_type);
    Py_CLEAR(ks->unregistered_handle_error);
    Py_CLEAR(ks->str_thread_core);
    Py_CLEAR(ks->str_state);
    Py_CLEAR(ks->str_after_advance);
    Py_CLEAR(ks->str_retire_python);
    return 0;
}

static void
kernel_free(void *module)
{
    (void)kernel_clear((PyObject *)module);
}

static PyModuleDef_Slot kernel_module_slots[] = {
    {Py_mod_exec, kernel_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_SUPPORTED},
#endif
#ifdef Py_GIL_DISABLED
    /* No GIL assumed: every field shared between threads is atomic. */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef kernel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "qsbr._kernel",
    .m_doc = "The native kernel of qsbr: wr_seq, seqs, quiescent states and read sections.",
    .m_size = sizeof(kernel_state),
    .m_methods = kernel_methods,
    .m_slots = kernel_module_slots,
    .m_traverse = kernel_traverse,
    .m_clear = kernel_clear,
    .m_free = kernel_free,
};

PyMODINIT_FUNC
PyInit__kernel(void)
{
    return PyModuleDef_Init(&kernel_module);
}
