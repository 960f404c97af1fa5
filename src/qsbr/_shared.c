/* qsbr._shared: C11 atomics on a shared-memory segment, for SharedDomain.
 *
 * A SharedDomain (shared_domain.py) keeps the design's wr_seq, rd_seq and
 * every participant's seq in a segment that several processes map. Python
 * has no atomic operations on memory it shares with other processes, so the
 * words of the segment are read and written here: SharedWords views a
 * writable buffer (the mmap of the segment) as an array of int64 and offers
 * load/store/add/cas on one word, SharedSlot is one registered thread's
 * slot, whose quiescent()/attach()/detach() are the readers' hot path, and
 * CellReader is SharedCell.read().
 *
 * Invariants (shared_domain.py states the rest; docs/design.md argues them):
 *   S1. Every word is an aligned int64 accessed only through C11 atomics,
 *       which are address-free when lock-free (C11 7.17.5: required to
 *       share them between processes); SharedWords refuses a buffer that is
 *       not 8-byte aligned, and the module refuses to load where int64
 *       atomics are not always lock-free.
 *   S2. wr_seq changes only by add(+2) (a seq_cst RMW); rd_seq only by
 *       raise_to() (a CAS loop that never lowers it).
 *   S3. A slot's seq is written by its own thread (quiescent, attach,
 *       detach), except the 0 stored by whoever frees the slot: its process
 *       at unregister()/close(), or a scan that evicts a dead process.
 *       quiescent() stores seq = wr_seq with release order after loading
 *       wr_seq with acquire order (the design's I3 across processes).
 *   S4. attach() stores seq and then issues a seq_cst fence before the
 *       thread reads anything shared; scan() issues a seq_cst fence before
 *       its loads: no store-buffering outcome "the scan saw 0 (detached),
 *       the reader read the old value" (the design's I4).
 *   S5. The buffer is held (PyObject_GetBuffer) for the object's whole
 *       life, so the mapping cannot be closed under a running load: the
 *       segment is unmapped only once nothing here points into it.
 *
 * No GIL is assumed: the objects' own fields are immutable after creation
 * except SharedSlot.valid, which is atomic.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stdint.h>

#if ATOMIC_LLONG_LOCK_FREE != 2
#error "qsbr._shared needs lock-free 64-bit atomics (address-free across processes)"
#endif

typedef struct {
    PyTypeObject *SharedWords_type;
    PyTypeObject *SharedSlot_type;
    PyTypeObject *CellReader_type;
    PyTypeObject *CellBlock_type;
} shared_state;

static inline shared_state *
get_shared_state(PyObject *module)
{
    return (shared_state *)PyModule_GetState(module);
}

/* -- SharedWords ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_buffer view;               /* S5: held until dealloc */
    _Atomic int64_t *words;
    Py_ssize_t count;
} SharedWordsObject;

static PyObject *
SharedWords_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *buffer;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "SharedWords() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O:SharedWords", &buffer)) {
        return NULL;
    }
    SharedWordsObject *self = (SharedWordsObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        self->view.obj = NULL;
        Py_DECREF(self);
        return NULL;
    }
    if (((uintptr_t)self->view.buf % 8) != 0 || self->view.len % 8 != 0) {  /* S1 */
        PyErr_SetString(PyExc_ValueError,
                        "SharedWords needs an 8-byte aligned buffer whose length is a multiple of 8");
        Py_DECREF(self);
        return NULL;
    }
    self->words = (_Atomic int64_t *)self->view.buf;
    self->count = self->view.len / 8;
    return (PyObject *)self;
}

static void
SharedWords_dealloc(SharedWordsObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->view.obj != NULL) {
        PyBuffer_Release(&self->view);
    }
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *new_cell_block(PyTypeObject *type, SharedWordsObject *words, Py_ssize_t start,
                                Py_ssize_t length);

/* The word index argument `arg`, checked against the buffer. */
static int
word_index(SharedWordsObject *self, PyObject *arg, Py_ssize_t *index)
{
    Py_ssize_t i = PyNumber_AsSsize_t(arg, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (i < 0 || i >= self->count) {
        PyErr_Format(PyExc_IndexError, "word index %zd out of range (0..%zd)", i, self->count - 1);
        return -1;
    }
    *index = i;
    return 0;
}

static int
int64_arg(PyObject *arg, int64_t *value)
{
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    *value = (int64_t)v;
    return 0;
}

static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(SharedWords_load_doc, "load(i) -> int: word i, loaded with acquire order.");

static PyObject *
SharedWords_load(SharedWordsObject *self, PyObject *arg)
{
    Py_ssize_t i;
    if (word_index(self, arg, &i) < 0) {
        return NULL;
    }
    return PyLong_FromLongLong(atomic_load_explicit(&self->words[i], memory_order_acquire));
}

PyDoc_STRVAR(SharedWords_store_doc, "store(i, value): word i = value, stored with release order.");

static PyObject *
SharedWords_store(SharedWordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    int64_t v;
    if (check_nargs("store", nargs, 2) < 0 || word_index(self, args[0], &i) < 0 || int64_arg(args[1], &v) < 0) {
        return NULL;
    }
    atomic_store_explicit(&self->words[i], v, memory_order_release);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(SharedWords_add_doc, "add(i, delta) -> int: word i += delta (seq_cst RMW); the new value.");

static PyObject *
SharedWords_add(SharedWordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    int64_t d;
    if (check_nargs("add", nargs, 2) < 0 || word_index(self, args[0], &i) < 0 || int64_arg(args[1], &d) < 0) {
        return NULL;
    }
    /* S2: the RMW makes concurrent advances of all processes add up. */
    int64_t old = atomic_fetch_add_explicit(&self->words[i], d, memory_order_seq_cst);
    return PyLong_FromLongLong(old + d);
}

PyDoc_STRVAR(SharedWords_cas_doc,
             "cas(i, expected, new) -> bool: word i = new if it was expected (seq_cst).");

static PyObject *
SharedWords_cas(SharedWordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    int64_t expected, desired;
    if (check_nargs("cas", nargs, 3) < 0 || word_index(self, args[0], &i) < 0
        || int64_arg(args[1], &expected) < 0 || int64_arg(args[2], &desired) < 0) {
        return NULL;
    }
    return PyBool_FromLong(atomic_compare_exchange_strong_explicit(
        &self->words[i], &expected, desired, memory_order_seq_cst, memory_order_seq_cst));
}

PyDoc_STRVAR(SharedWords_raise_to_doc,
             "raise_to(i, value) -> int: word i = max(word i, value), never lowering it "
             "(a CAS loop); the value the word holds afterwards.");

static PyObject *
SharedWords_raise_to(SharedWordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t i;
    int64_t v;
    if (check_nargs("raise_to", nargs, 2) < 0 || word_index(self, args[0], &i) < 0 || int64_arg(args[1], &v) < 0) {
        return NULL;
    }
    /* S2: rd_seq never decreases, whichever process publishes a scan last. */
    int64_t cur = atomic_load_explicit(&self->words[i], memory_order_acquire);
    while (cur < v) {
        if (atomic_compare_exchange_weak_explicit(&self->words[i], &cur, v, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            cur = v;
            break;
        }
    }
    return PyLong_FromLongLong(cur);
}

PyDoc_STRVAR(SharedWords_scan_doc,
             "scan(first, count, stride, lowest) -> (min_seq, index): the minimum of lowest and\n"
             "the nonzero words first + k*stride for k in range(count), and the k of the first\n"
             "slot holding it (-1 when lowest is the minimum). A seq_cst fence precedes the loads.");

static PyObject *
SharedWords_scan(SharedWordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t first, count, stride;
    int64_t lowest;
    if (check_nargs("scan", nargs, 4) < 0) {
        return NULL;
    }
    first = PyLong_AsSsize_t(args[0]);
    count = PyLong_AsSsize_t(args[1]);
    stride = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred() || int64_arg(args[3], &lowest) < 0) {
        return NULL;
    }
    if (first < 0 || count < 0 || stride < 1 || (count > 0 && first + (count - 1) * stride >= self->count)) {
        PyErr_SetString(PyExc_IndexError, "scan() range is outside the buffer");
        return NULL;
    }
    /* S4: ordered after the caller's earlier stores (the advance it scans
     * for), and before the loads of the seqs. */
    atomic_thread_fence(memory_order_seq_cst);
    Py_ssize_t found = -1;
    for (Py_ssize_t k = 0; k < count; k++) {
        int64_t seq = atomic_load_explicit(&self->words[first + k * stride], memory_order_acquire);
        if (seq != 0 && seq < lowest) {
            lowest = seq;
            found = k;
        }
    }
    return Py_BuildValue("(Ln)", (long long)lowest, found);
}

PyDoc_STRVAR(SharedWords_block_doc,
             "block(start, length) -> CellBlock: a read-only buffer over those bytes.");

static PyObject *
SharedWords_block(SharedWordsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("block", nargs, 2) < 0) {
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[0]);
    Py_ssize_t length = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *module = PyType_GetModule(Py_TYPE(self));
    if (module == NULL) {
        return NULL;
    }
    return new_cell_block(get_shared_state(module)->CellBlock_type, self, start, length);
}

static PyObject *
SharedWords_len(SharedWordsObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->count);
}

static PyMethodDef SharedWords_methods[] = {
    {"load", (PyCFunction)SharedWords_load, METH_O, SharedWords_load_doc},
    {"store", (PyCFunction)(void (*)(void))SharedWords_store, METH_FASTCALL, SharedWords_store_doc},
    {"add", (PyCFunction)(void (*)(void))SharedWords_add, METH_FASTCALL, SharedWords_add_doc},
    {"cas", (PyCFunction)(void (*)(void))SharedWords_cas, METH_FASTCALL, SharedWords_cas_doc},
    {"raise_to", (PyCFunction)(void (*)(void))SharedWords_raise_to, METH_FASTCALL, SharedWords_raise_to_doc},
    {"scan", (PyCFunction)(void (*)(void))SharedWords_scan, METH_FASTCALL, SharedWords_scan_doc},
    {"block", (PyCFunction)(void (*)(void))SharedWords_block, METH_FASTCALL, SharedWords_block_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef SharedWords_getset[] = {
    {"count", (getter)SharedWords_len, NULL, "How many int64 words the buffer holds.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(SharedWords_doc,
             "SharedWords(buffer): the int64 words of a writable, 8-byte aligned buffer (a\n"
             "shared mmap), read and written with C11 atomics. Holds the buffer until freed.");

static PyType_Slot SharedWords_slots[] = {
    {Py_tp_new, SharedWords_new},
    {Py_tp_dealloc, SharedWords_dealloc},
    {Py_tp_methods, SharedWords_methods},
    {Py_tp_getset, SharedWords_getset},
    {Py_tp_doc, (void *)SharedWords_doc},
    {0, NULL},
};

static PyType_Spec SharedWords_spec = {
    .name = "qsbr._shared.SharedWords",
    .basicsize = sizeof(SharedWordsObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = SharedWords_slots,
};

/* -- SharedSlot --------------------------------------------------------------- */

/* One registered thread's slot: the index of its seq word and of wr_seq. */
typedef struct {
    PyObject_HEAD
    SharedWordsObject *words;     /* strong */
    _Atomic int64_t *seq;         /* into words' buffer (S5 keeps it mapped) */
    _Atomic int64_t *wr_seq;
    _Atomic int valid;            /* 0 once the slot was freed: calls raise */
} SharedSlotObject;

static PyObject *
SharedSlot_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *words;
    Py_ssize_t seq_index, wr_index;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "SharedSlot() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "Onn:SharedSlot", &words, &seq_index, &wr_index)) {
        return NULL;
    }
    PyObject *module = PyType_GetModule(type);
    if (module == NULL) {
        return NULL;
    }
    shared_state *st = get_shared_state(module);
    if (!PyObject_TypeCheck(words, st->SharedWords_type)) {
        PyErr_SetString(PyExc_TypeError, "SharedSlot() needs a SharedWords");
        return NULL;
    }
    SharedWordsObject *w = (SharedWordsObject *)words;
    if (seq_index < 0 || seq_index >= w->count || wr_index < 0 || wr_index >= w->count) {
        PyErr_SetString(PyExc_IndexError, "SharedSlot() word index out of range");
        return NULL;
    }
    SharedSlotObject *self = (SharedSlotObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->words = (SharedWordsObject *)Py_NewRef(words);
    self->seq = &w->words[seq_index];
    self->wr_seq = &w->words[wr_index];
    atomic_store_explicit(&self->valid, 1, memory_order_relaxed);
    return (PyObject *)self;
}

static void
SharedSlot_dealloc(SharedSlotObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    Py_XDECREF(self->words);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static int
slot_check(SharedSlotObject *self)
{
    if (!atomic_load_explicit(&self->valid, memory_order_acquire)) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this thread's slot in the SharedDomain was freed (unregister() or close()): "
                        "register() again");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(SharedSlot_quiescent_doc, "quiescent(): seq = wr_seq (S3).");

static PyObject *
SharedSlot_quiescent(SharedSlotObject *self, PyObject *Py_UNUSED(ignored))
{
    if (slot_check(self) < 0) {
        return NULL;
    }
    /* S3: acquire pairs with the writer's advance (its unlink happened
     * before); release orders every read this thread made before. */
    int64_t wr = atomic_load_explicit(self->wr_seq, memory_order_acquire);
    if (atomic_load_explicit(self->seq, memory_order_relaxed) != wr) {
        atomic_store_explicit(self->seq, wr, memory_order_release);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(SharedSlot_attach_doc, "attach(): seq = wr_seq, then a seq_cst fence (S4).");

static PyObject *
SharedSlot_attach(SharedSlotObject *self, PyObject *Py_UNUSED(ignored))
{
    if (slot_check(self) < 0) {
        return NULL;
    }
    int64_t wr = atomic_load_explicit(self->wr_seq, memory_order_acquire);
    atomic_store_explicit(self->seq, wr, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);  /* S4: before any shared read */
    Py_RETURN_NONE;
}

PyDoc_STRVAR(SharedSlot_detach_doc, "detach(): seq = 0 (release order: reads before it stay before).");

static PyObject *
SharedSlot_detach(SharedSlotObject *self, PyObject *Py_UNUSED(ignored))
{
    if (slot_check(self) < 0) {
        return NULL;
    }
    atomic_store_explicit(self->seq, 0, memory_order_release);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(SharedSlot_invalidate_doc,
             "invalidate(): later calls raise RuntimeError (the slot is being freed).");

static PyObject *
SharedSlot_invalidate(SharedSlotObject *self, PyObject *Py_UNUSED(ignored))
{
    atomic_store_explicit(&self->valid, 0, memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *
SharedSlot_get_seq(SharedSlotObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(atomic_load_explicit(self->seq, memory_order_relaxed));
}

static PyObject *
SharedSlot_get_valid(SharedSlotObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(atomic_load_explicit(&self->valid, memory_order_acquire));
}

static PyMethodDef SharedSlot_methods[] = {
    {"quiescent", (PyCFunction)SharedSlot_quiescent, METH_NOARGS, SharedSlot_quiescent_doc},
    {"attach", (PyCFunction)SharedSlot_attach, METH_NOARGS, SharedSlot_attach_doc},
    {"detach", (PyCFunction)SharedSlot_detach, METH_NOARGS, SharedSlot_detach_doc},
    {"invalidate", (PyCFunction)SharedSlot_invalidate, METH_NOARGS, SharedSlot_invalidate_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef SharedSlot_getset[] = {
    {"seq", (getter)SharedSlot_get_seq, NULL, "The slot's seq (0: detached).", NULL},
    {"valid", (getter)SharedSlot_get_valid, NULL, "False once invalidate() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(SharedSlot_doc,
             "SharedSlot(words, seq_index, wr_index): one registered thread's seq in a shared\n"
             "segment; quiescent(), attach() and detach() are its hot path.");

static PyType_Slot SharedSlot_slots[] = {
    {Py_tp_new, SharedSlot_new},
    {Py_tp_dealloc, SharedSlot_dealloc},
    {Py_tp_methods, SharedSlot_methods},
    {Py_tp_getset, SharedSlot_getset},
    {Py_tp_doc, (void *)SharedSlot_doc},
    {0, NULL},
};

static PyType_Spec SharedSlot_spec = {
    .name = "qsbr._shared.SharedSlot",
    .basicsize = sizeof(SharedSlotObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = SharedSlot_slots,
};



/* -- CellBlock ---------------------------------------------------------------------- */

/* A read-only buffer exporter over bytes [start, start + length) of a
 * SharedWords' buffer: what SharedCell.read()'s views are views of. Every
 * memoryview made from a CellBlock gets a managed buffer of its own, so
 * threads that read the same value share only the CellBlock's reference
 * count (atomic on free-threaded builds), never a memoryview's export
 * counts (which 3.13t does not update atomically: docs/guide.md). The
 * CellBlock holds its SharedWords, which holds the mapping (S5). */
typedef struct {
    PyObject_HEAD
    SharedWordsObject *words;     /* strong */
    char *data;
    Py_ssize_t length;
} CellBlockObject;

static int
CellBlock_getbuffer(CellBlockObject *self, Py_buffer *view, int flags)
{
    /* readonly=1: a request for a writable buffer fails with BufferError. */
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->length, 1, flags);
}

static int
CellBlock_traverse(CellBlockObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->words);
    return 0;
}

static void
CellBlock_dealloc(CellBlockObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->words);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *
CellBlock_get_length(CellBlockObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->length);
}

static PyGetSetDef CellBlock_getset[] = {
    {"length", (getter)CellBlock_get_length, NULL, "Bytes the block exports.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot CellBlock_slots[] = {
    {Py_bf_getbuffer, CellBlock_getbuffer},
    {Py_tp_dealloc, CellBlock_dealloc},
    {Py_tp_traverse, CellBlock_traverse},
    {Py_tp_getset, CellBlock_getset},
    {Py_tp_doc, (void *)"A read-only buffer over part of a SharedWords' buffer (SharedWords.block)."},
    {0, NULL},
};

static PyType_Spec CellBlock_spec = {
    .name = "qsbr._shared.CellBlock",
    .basicsize = sizeof(CellBlockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = CellBlock_slots,
};

/* A new CellBlock over bytes [start, start + length) of `words`. */
static PyObject *
new_cell_block(PyTypeObject *type, SharedWordsObject *words, Py_ssize_t start, Py_ssize_t length)
{
    if (start < 0 || length < 0 || start > words->count * 8 || length > words->count * 8 - start) {
        PyErr_SetString(PyExc_RuntimeError, "SharedCell: a block runs past its segment (a damaged segment)");
        return NULL;
    }
    CellBlockObject *self = PyObject_GC_New(CellBlockObject, type);
    if (self == NULL) {
        return NULL;
    }
    self->words = (SharedWordsObject *)Py_NewRef(words);
    self->data = (char *)words->words + start;
    self->length = length;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* -- CellReader ------------------------------------------------------------------ */

/* SharedCell.read(), the readers' hot path (shared_cell.py has the layout and
 * C1-C4). The words it reads: the cell's `current` (a block's byte offset in
 * the arena, -1 before the first publish) and the block's header. The
 * CellBlock of the block last read is cached per object, keyed by (offset,
 * version): while a block is current its header and data do not change (C2),
 * and a block is reused only after a grace period (C3), after which it has a
 * new version. Each call returns a new memoryview of the CellBlock: a
 * caller's release() of its view (`with cell.read() as v:`) cannot touch
 * another caller's, and threads share no export counts. Values kept in
 * segments of their own go to the Python fallback. */

#define CELL_CURRENT 8      /* word of the current block's offset */
#define BLOCK_BYTES 64
#define B_VERSION 2
#define B_LENGTH 3
#define B_KIND 4
#define KIND_INLINE 0

typedef struct {
    PyObject_HEAD
    SharedWordsObject *words;     /* strong */
    PyObject *fallback;           /* fallback(offset) -> memoryview: external values */
    PyTypeObject *block_type;     /* strong: CellBlock */
    Py_ssize_t arena_at;          /* byte offset of the arena in the segment */
    _Atomic int closed;
#ifdef Py_GIL_DISABLED
    PyMutex mutex;                /* guards the cache fields below */
#endif
    int64_t cache_offset;
    int64_t cache_version;
    PyObject *cache_block;        /* CellBlock of the block last read, or NULL */
    PyObject *empty;              /* a CellBlock of 0 bytes */
} CellReaderObject;

#ifdef Py_GIL_DISABLED
#define CACHE_LOCK(r) PyMutex_Lock(&(r)->mutex)
#define CACHE_UNLOCK(r) PyMutex_Unlock(&(r)->mutex)
#else
/* With the GIL: nothing between lock and unlock calls into Python. */
#define CACHE_LOCK(r) ((void)0)
#define CACHE_UNLOCK(r) ((void)0)
#endif

static PyObject *
CellReader_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *words, *fallback;
    Py_ssize_t arena_at;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "CellReader() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOn:CellReader", &words, &fallback, &arena_at)) {
        return NULL;
    }
    PyObject *module = PyType_GetModule(type);
    if (module == NULL) {
        return NULL;
    }
    shared_state *st = get_shared_state(module);
    if (!PyObject_TypeCheck(words, st->SharedWords_type) || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "CellReader(words, fallback callable, arena_at)");
        return NULL;
    }
    SharedWordsObject *w = (SharedWordsObject *)words;
    if (arena_at < 0 || arena_at % 8 != 0 || arena_at / 8 >= w->count || w->count <= CELL_CURRENT) {
        PyErr_SetString(PyExc_ValueError, "CellReader() arena offset out of range");
        return NULL;
    }
    PyObject *empty = new_cell_block(st->CellBlock_type, w, 0, 0);
    if (empty == NULL) {
        return NULL;
    }
    CellReaderObject *self = (CellReaderObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(empty);
        return NULL;
    }
    self->words = (SharedWordsObject *)Py_NewRef(words);
    self->fallback = Py_NewRef(fallback);
    self->block_type = (PyTypeObject *)Py_NewRef(st->CellBlock_type);
    self->arena_at = arena_at;
    self->cache_offset = -1;
    self->cache_version = -1;
    self->cache_block = NULL;
    self->empty = empty;
    atomic_store_explicit(&self->closed, 0, memory_order_relaxed);
    return (PyObject *)self;
}

static int
CellReader_traverse(CellReaderObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->words);
    Py_VISIT(self->fallback);
    Py_VISIT(self->block_type);
    Py_VISIT(self->cache_block);
    Py_VISIT(self->empty);
    return 0;
}

static int
CellReader_clear(CellReaderObject *self)
{
    Py_CLEAR(self->words);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->block_type);
    Py_CLEAR(self->cache_block);
    Py_CLEAR(self->empty);
    return 0;
}

static void
CellReader_dealloc(CellReaderObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)CellReader_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

PyDoc_STRVAR(CellReader_read_doc,
             "read() -> memoryview: the current value, read-only (SharedCell.read).");

static PyObject *
CellReader_read(CellReaderObject *self, PyObject *Py_UNUSED(ignored))
{
    if (atomic_load_explicit(&self->closed, memory_order_acquire) || self->words == NULL) {
        PyErr_SetString(PyExc_ValueError, "this SharedCell is closed in this process: open it again");
        return NULL;
    }
    _Atomic int64_t *words = self->words->words;
    Py_ssize_t count = self->words->count;
    /* C2: acquire pairs with the writer's release store of `current`: the
     * block's header and data written before it are visible. */
    int64_t offset = atomic_load_explicit(&words[CELL_CURRENT], memory_order_acquire);
    if (offset < 0) {
        return PyMemoryView_FromObject(self->empty);
    }
    Py_ssize_t at = (self->arena_at + (Py_ssize_t)offset) / 8;
    if (offset % BLOCK_BYTES != 0 || at + B_KIND >= count) {
        PyErr_SetString(PyExc_RuntimeError, "SharedCell: the current offset is outside the arena (a damaged segment)");
        return NULL;
    }
    int64_t version = atomic_load_explicit(&words[at + B_VERSION], memory_order_relaxed);
    if (atomic_load_explicit(&words[at + B_KIND], memory_order_relaxed) != KIND_INLINE) {
        PyObject *arg = PyLong_FromLongLong(offset);
        if (arg == NULL) {
            return NULL;
        }
        PyObject *result = PyObject_CallOneArg(self->fallback, arg);
        Py_DECREF(arg);
        return result;
    }
    PyObject *block = NULL;
    CACHE_LOCK(self);
    if (self->cache_block != NULL && self->cache_offset == offset && self->cache_version == version) {
        block = Py_NewRef(self->cache_block);
    }
    CACHE_UNLOCK(self);
    if (block == NULL) {
        int64_t length = atomic_load_explicit(&words[at + B_LENGTH], memory_order_relaxed);
        if (length < 0) {
            PyErr_SetString(PyExc_RuntimeError, "SharedCell: a block has a negative length (a damaged segment)");
            return NULL;
        }
        block = new_cell_block(self->block_type, self->words, self->arena_at + (Py_ssize_t)offset + BLOCK_BYTES,
                               (Py_ssize_t)length);
        if (block == NULL) {
            return NULL;
        }
        CACHE_LOCK(self);
        PyObject *old = self->cache_block;
        self->cache_block = Py_NewRef(block);
        self->cache_offset = offset;
        self->cache_version = version;
        CACHE_UNLOCK(self);
        Py_XDECREF(old);
    }
    PyObject *view = PyMemoryView_FromObject(block);  /* the caller's own view and managed buffer */
    Py_DECREF(block);
    return view;
}

PyDoc_STRVAR(CellReader_close_doc, "close(): later reads raise ValueError; the cached block is dropped.");

static PyObject *
CellReader_close(CellReaderObject *self, PyObject *Py_UNUSED(ignored))
{
    atomic_store_explicit(&self->closed, 1, memory_order_release);
    CACHE_LOCK(self);
    PyObject *old = self->cache_block;
    self->cache_block = NULL;
    CACHE_UNLOCK(self);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyMethodDef CellReader_methods[] = {
    {"read", (PyCFunction)CellReader_read, METH_NOARGS, CellReader_read_doc},
    {"close", (PyCFunction)CellReader_close, METH_NOARGS, CellReader_close_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(CellReader_doc, "CellReader(words, fallback, arena_at): SharedCell.read()'s fast path.");

static PyType_Slot CellReader_slots[] = {
    {Py_tp_new, CellReader_new},
    {Py_tp_dealloc, CellReader_dealloc},
    {Py_tp_traverse, CellReader_traverse},
    {Py_tp_clear, CellReader_clear},
    {Py_tp_methods, CellReader_methods},
    {Py_tp_doc, (void *)CellReader_doc},
    {0, NULL},
};

static PyType_Spec CellReader_spec = {
    .name = "qsbr._shared.CellReader",
    .basicsize = sizeof(CellReaderObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = CellReader_slots,
};

/* -- the module ------------------------------------------------------------------ */

static int
add_type(PyObject *module, PyType_Spec *spec, PyTypeObject **slot)
{
    PyTypeObject *type = (PyTypeObject *)PyType_FromModuleAndSpec(module, spec, NULL);
    if (type == NULL) {
        return -1;
    }
    *slot = type;
    return PyModule_AddType(module, type);
}

static int
shared_exec(PyObject *module)
{
    shared_state *st = get_shared_state(module);
    if (add_type(module, &SharedWords_spec, &st->SharedWords_type) < 0
        || add_type(module, &SharedSlot_spec, &st->SharedSlot_type) < 0
        || add_type(module, &CellReader_spec, &st->CellReader_type) < 0
        || add_type(module, &CellBlock_spec, &st->CellBlock_type) < 0) {
        return -1;
    }
    return 0;
}

static int
shared_traverse(PyObject *module, visitproc visit, void *arg)
{
    shared_state *st = get_shared_state(module);
    Py_VISIT(st->SharedWords_type);
    Py_VISIT(st->SharedSlot_type);
    Py_VISIT(st->CellReader_type);
    Py_VISIT(st->CellBlock_type);
    return 0;
}

static int
shared_clear(PyObject *module)
{
    shared_state *st = get_shared_state(module);
    Py_CLEAR(st->SharedWords_type);
    Py_CLEAR(st->SharedSlot_type);
    Py_CLEAR(st->CellReader_type);
    Py_CLEAR(st->CellBlock_type);
    return 0;
}

static void
shared_free(void *module)
{
    (void)shared_clear((PyObject *)module);
}

static PyModuleDef_Slot shared_module_slots[] = {
    {Py_mod_exec, shared_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_SUPPORTED},
#endif
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef shared_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "qsbr._shared",
    .m_doc = "C11 atomics on a shared-memory segment: the words of a SharedDomain.",
    .m_size = sizeof(shared_state),
    .m_slots = shared_module_slots,
    .m_traverse = shared_traverse,
    .m_clear = shared_clear,
    .m_free = shared_free,
};

PyMODINIT_FUNC
PyInit__shared(void)
{
    return PyModuleDef_Init(&shared_module);
}
