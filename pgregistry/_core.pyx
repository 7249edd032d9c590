# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, auto_pickle=False, embedsignature=True
"""The registry table in C: the fast twin of ``pgregistry._core_py`` (contract: ``_core.pyi``).

Data layout
-----------
Nothing per row or per group is a Python object, and nothing the table owns is a
GC-tracked container: CPython's cyclic GC never traverses (or pays for) the rows, and
the memory per row is a few C words.

*Rows* are 72-byte `Row` structs in a chunked slab (`Slab`: chunks of 1024 reached
through a small table of chunk pointers; growing adds a chunk, so nothing is copied and
at most one chunk is slack), with a free list threaded through ``knext``. A row holds
owned references to the key and pid objects it was inserted with (per-row reads report
them) and to its value, the tag as an ``int64``, a ``stamp`` (see below), the indices of
its key group and pid group, and the links of two doubly linked lists: its key's rows in
key order and its pid's rows in pid order. Links are ``int32`` indices, never pointers.

*Groups* (one per distinct key, one per distinct pid) live in two `GroupTable`s. Each
is a chunked slab of 56-byte `Group` records (the object the group was created with, its
hash, the head, tail and length of its row list, and for a key its index array) plus an
open-addressing index: linear probing on a Fibonacci-mixed hash, load at most 2/3, deletion by backward shift (no
tombstones). Each slot keeps 32 bits of the mixed hash next to the group index, so a
probe past another key, and every step of a deletion, never touches a group record. A
lookup has Python's dict semantics: ``is`` first, then equal hash and ``==`` (the stored
object on the left). The records are also chained in creation order, which is the group
order of the contract: a key whose last row goes is unlinked, and comes back at the end.

Why not Python dicts of group objects? A dict entry plus a small object costs about 90
bytes per group, a dict with tuple (`Pid`) keys is GC-tracked and traversed on every
full collection, and removing an emptied group re-hashes and may compare its key. A
record plus its index slots costs about 73 bytes, and unlinking it is pure C. (Measured
at 1 000 000 rows with tracemalloc before the index order was added, when a row was 64
bytes and a group 40: 64 bytes per row when keys and pids are shared, 121 with a key per
row, 178 with a key and a pid per row. Each row now costs 8 bytes more, each group 16,
and each row of a key with several rows 4 to 8 more in its key's array.)

*Index order.* Each key group also keeps ``arr``, a C array of its rows' indices
(``Row.kpos`` is a row's place in it): an insert appends, a removal moves the array's
last row into the removed row's place (swap-remove), an update changes nothing. A group
gets its array with its second row (until then its one row, ``head``, is place 0), so a
key with a single row costs no allocation; pid groups never have one. This is
the contract's index order: `Table.at` reads place ``i`` in O(1), which is what a random
or round-robin pick of one group member needs. Row compaction rewrites the arrays; an
array shrinks by half when under a quarter of it is used.

When removals leave a big slab less than a quarter full, it is compacted (live elements
renumbered in place order, links rewritten) and the memory goes back.

*Orders.* Key order is the key list, pid order the pid list. ``stamp`` is a table-wide
counter written whenever a row is appended to its key list, so sorting a few rows of one
key by stamp gives their key order: operations on "the rows of pid P under key K" walk
the shorter of K's and P's lists and, when that is P's, sort the hits by stamp.

Match specs
-----------
`Matcher` compiles every clause once into a tree of small extension types with C-level
virtual methods: patterns (`_Pat.match`) and expressions (`_Expr.eval` for a value,
`_Expr.tri` for a guard: exactly True / exactly False / anything else). Head parts that
are a literal key or pid are compared by group (the literal is resolved to its group
once per call, and a row matches iff it belongs to that group, which is the same as
``row_key == literal`` for hashable terms but costs one integer comparison). Bindings
are a C array of owned ``PyObject*`` per call. All node methods return C error codes
and never build tracebacks, so a guard that raises on most rows stays cheap.

Re-entrancy and threads
-----------------------
Reads may run on any thread while the loop thread writes (docs/contract.md, "Threads"), and anything that
runs Python code (an ``__eq__`` of a `Pid`, a GC-triggered finalizer, an allocation)
may let another thread run or re-enter the table. Hence:

* every write first does everything that can run Python code or fail (hashing, lookups,
  allocating capacity), then mutates the structure in pure C, and only then releases
  references and builds its result, so nobody ever observes a half-done change;
* every mutation bumps ``_version``; a read that must call Python code while walking
  (a match spec) holds references to the row it is evaluating and re-checks the version
  after each row. If it changed, the read restarts; after two restarts it evaluates a
  private snapshot of the rows instead, which always completes. Plain reads copy the
  references they need in one pure-C pass before building any Python object.
"""

cimport cython
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t, INT32_MAX
from libc.string cimport memcpy, memset
from libc.stdlib cimport qsort

from .spec import (
    Clause as _Clause_t,
    OPERATORS as _OPERATORS,
    PatAny as _PatAny, PatVar as _PatVar, PatLit as _PatLit, PatTuple as _PatTuple,
    PatList as _PatList, PatDict as _PatDict,
    ExprConst as _ExprConst, ExprVar as _ExprVar, ExprWhole as _ExprWhole,
    ExprBindings as _ExprBindings, ExprTuple as _ExprTuple, ExprList as _ExprList,
    ExprDict as _ExprDict, ExprOp as _ExprOp,
)
from .terms import Pid as _Pid, short_repr

__all__ = ["Table", "Matcher"]


cdef extern from "Python.h":
    ctypedef struct PyObject
    ctypedef struct PyTypeObject
    ctypedef Py_ssize_t Py_hash_t

    enum:
        Py_LT
        Py_LE
        Py_EQ
        Py_NE
        Py_GT
        Py_GE

    PyObject* Py_None
    PyObject* Py_True
    PyObject* Py_False
    PyObject* PyExc_Exception
    PyObject* PyExc_TypeError
    PyObject* PyExc_SystemError

    void Py_INCREF(PyObject*)
    void Py_DECREF(PyObject*)
    void Py_XDECREF(PyObject*)
    PyTypeObject* Py_TYPE(PyObject*)

    void* PyMem_Malloc(size_t)
    void* PyMem_Realloc(void*, size_t)
    void PyMem_Free(void*)

    Py_hash_t PyObject_Hash(PyObject*)
    int PyObject_RichCompareBool(PyObject*, PyObject*, int)
    PyObject* PyObject_RichCompare(PyObject*, PyObject*, int)
    PyObject* PyObject_GetItem(PyObject*, PyObject*)
    Py_ssize_t PyObject_Size(PyObject*)
    PyObject* PyObject_Call(PyObject*, PyObject*, PyObject*)

    PyObject* PyNumber_Add(PyObject*, PyObject*)
    PyObject* PyNumber_Subtract(PyObject*, PyObject*)
    PyObject* PyNumber_Multiply(PyObject*, PyObject*)
    PyObject* PyNumber_TrueDivide(PyObject*, PyObject*)
    PyObject* PyNumber_FloorDivide(PyObject*, PyObject*)
    PyObject* PyNumber_Remainder(PyObject*, PyObject*)
    PyObject* PyNumber_Negative(PyObject*)

    bint PyLong_CheckExact(PyObject*)
    bint PyFloat_CheckExact(PyObject*)
    bint PyUnicode_CheckExact(PyObject*)
    bint PyBytes_CheckExact(PyObject*)
    bint PyTuple_CheckExact(PyObject*)
    bint PyList_CheckExact(PyObject*)
    bint PyDict_CheckExact(PyObject*)

    PyObject* PyLong_FromLongLong(long long)
    long long PyLong_AsLongLong(PyObject*)
    PyObject* PyNumber_Index(PyObject*)
    PyObject* PyLong_FromSsize_t(Py_ssize_t)
    PyObject* PyTuple_New(Py_ssize_t)
    PyObject* PyTuple_Pack(Py_ssize_t, ...)
    PyObject* PyTuple_GET_ITEM(PyObject*, Py_ssize_t)
    void PyTuple_SET_ITEM(PyObject*, Py_ssize_t, PyObject*)
    Py_ssize_t PyTuple_GET_SIZE(PyObject*)
    PyObject* PyList_New(Py_ssize_t)
    PyObject* PyList_GET_ITEM(PyObject*, Py_ssize_t)
    void PyList_SET_ITEM(PyObject*, Py_ssize_t, PyObject*)
    Py_ssize_t PyList_GET_SIZE(PyObject*)
    int PyList_Append(PyObject*, PyObject*)
    PyObject* PyDict_New()
    int PyDict_SetItem(PyObject*, PyObject*, PyObject*)
    PyObject* PyDict_GetItemWithError(PyObject*, PyObject*)
    int PyDict_Contains(PyObject*, PyObject*)

    PyObject* PyErr_Occurred()
    int PyErr_ExceptionMatches(PyObject*)
    void PyErr_Clear()
    void PyErr_SetString(PyObject*, const char*)
    PyObject* PyErr_NoMemory()


# ======================================================================================
# Small C helpers
# ======================================================================================

# Comparison of two scalars without a Python call: ints that fit one machine word,
# floats, strs and bytes of the exact built-in types. `pgr_fast_compare` returns 1
# (true), 0 (false) or -1 (not handled here: the caller uses rich comparison), with
# exactly Python's result for every pair it handles: a small int converts to a double
# exactly, so ``1 == 1.0`` and the ordering of an int against a float (NaN included)
# come out as Python's; NaN compares false to everything but ``!=``.
cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define pgr_prefetch(p) __builtin_prefetch((p))
    #else
    #define pgr_prefetch(p) ((void)(p))
    #endif

    static inline int pgr_small_long(PyObject* x, long long* out) {
    #if PY_VERSION_HEX >= 0x030C0000
        if (PyUnstable_Long_IsCompact((PyLongObject*)x)) {
            *out = (long long)PyUnstable_Long_CompactValue((PyLongObject*)x);
            return 1;
        }
        return 0;
    #else
        Py_ssize_t size = Py_SIZE(x);
        if (size == 0) { *out = 0; return 1; }
        if (size == 1) { *out = (long long)((PyLongObject*)x)->ob_digit[0]; return 1; }
        if (size == -1) { *out = -(long long)((PyLongObject*)x)->ob_digit[0]; return 1; }
        return 0;
    #endif
    }

    #define PGR_CMP(a, b, op) ( \
        (op) == Py_LT ? (a) < (b) : (op) == Py_LE ? (a) <= (b) : \
        (op) == Py_EQ ? (a) == (b) : (op) == Py_NE ? (a) != (b) : \
        (op) == Py_GT ? (a) > (b) : (a) >= (b))

    static inline int pgr_ord(int c, int op) {
        /* a three-way result c (<0, 0, >0) against the operator */
        return PGR_CMP(c, 0, op);
    }

    static int pgr_fast_compare(PyObject* a, PyObject* b, int op) {
        PyTypeObject* ta = Py_TYPE(a);
        PyTypeObject* tb = Py_TYPE(b);
        long long x, y;
        double dx, dy;
        if (ta == &PyLong_Type) {
            if (!pgr_small_long(a, &x)) return -1;
            if (tb == &PyLong_Type) {
                if (!pgr_small_long(b, &y)) return -1;
                return PGR_CMP(x, y, op);
            }
            if (tb == &PyFloat_Type) {
                dx = (double)x;
                dy = PyFloat_AS_DOUBLE(b);
                return PGR_CMP(dx, dy, op);
            }
            return -1;
        }
        if (ta == &PyFloat_Type) {
            dx = PyFloat_AS_DOUBLE(a);
            if (tb == &PyFloat_Type) {
                dy = PyFloat_AS_DOUBLE(b);
                return PGR_CMP(dx, dy, op);
            }
            if (tb == &PyLong_Type) {
                if (!pgr_small_long(b, &y)) return -1;
                dy = (double)y;
                return PGR_CMP(dx, dy, op);
            }
            return -1;
        }
        if (ta != tb) return -1;
        if (ta == &PyUnicode_Type) {
            Py_ssize_t n;
            int kind;
            if (op == Py_EQ || op == Py_NE) {
                int eq;
                if (a == b) eq = 1;
                else {
                    n = PyUnicode_GET_LENGTH(a);
                    kind = PyUnicode_KIND(a);
                    eq = n == PyUnicode_GET_LENGTH(b) && kind == PyUnicode_KIND(b)
                         && memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)n * kind) == 0;
                }
                return op == Py_EQ ? eq : !eq;
            }
            /* PyUnicode_Compare orders by code point, as Python does; it cannot fail on two strs */
            return pgr_ord(PyUnicode_Compare(a, b), op);
        }
        if (ta == &PyBytes_Type) {
            Py_ssize_t na = PyBytes_GET_SIZE(a), nb = PyBytes_GET_SIZE(b);
            int c = memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), (size_t)(na < nb ? na : nb));
            if (c == 0) c = na < nb ? -1 : (na > nb ? 1 : 0);
            return pgr_ord(c, op);
        }
        return -1;
    }
    """
    int pgr_fast_compare(PyObject* a, PyObject* b, int op) noexcept
    int pgr_small_long(PyObject* x, long long* out) noexcept
    void pgr_prefetch(const void* p) noexcept
    bint PGR_CMP(long long a, long long b, int op) noexcept
    bint PGR_CMP_D "PGR_CMP"(double a, double b, int op) noexcept
    double PyFloat_AS_DOUBLE(PyObject*) noexcept

cdef PyTypeObject* _PID_TYPE = <PyTypeObject*>_Pid


cdef inline int _propagate() except -1:
    """Turn an error already set by a raw C-API call into a Cython exception."""
    return -1


cdef inline object _own(PyObject* p):
    """Hand a new reference to Cython without taking another one."""
    cdef object o = <object>p
    Py_DECREF(p)
    return o


cdef inline int _caught() noexcept:
    """Classify the pending error for a guard or a body.

    An `Exception` is what a spec may raise (it makes a guard false and skips a row), so
    it is cleared and 2 is returned; anything else (KeyboardInterrupt, SystemExit...)
    must reach the caller: -1, error still set.
    """
    if PyErr_ExceptionMatches(PyExc_Exception):
        PyErr_Clear()
        return 2
    return -1


cdef inline int64_t _as_tag(object tag) except? -1:
    """A tag as a C integer: ints only (``__index__``), never a truncated float."""
    cdef PyObject* i
    cdef long long v
    if PyLong_CheckExact(<PyObject*>tag):
        return PyLong_AsLongLong(<PyObject*>tag)
    i = PyNumber_Index(<PyObject*>tag)
    if i == NULL:
        return -1
    v = PyLong_AsLongLong(i)
    Py_DECREF(i)
    return v


cdef inline uint32_t _fingerprint(Py_hash_t h) noexcept:
    # Fibonacci hashing: Python hashes of ints are the ints themselves, so the index
    # must not use their low bits raw (keys 0, 1024, 2048... would all collide). The top
    # 32 bits of the product are kept in the index slot: the home slot is their top
    # bits, and comparing them first skips the group record of every other key.
    return <uint32_t>((<uint64_t>h * <uint64_t>0x9E3779B97F4A7C15ULL) >> 32)


cdef inline uint32_t _home(uint32_t fp, int bits) noexcept:
    return fp >> (32 - bits)


# --------------------------------------------------------------------------------------
# Rows and groups
# --------------------------------------------------------------------------------------

ctypedef struct Row:
    PyObject* key       # owned; NULL marks a free row
    PyObject* pid       # owned
    PyObject* value     # owned
    int64_t tag
    int64_t stamp       # key order among rows of one key: larger is later
    int32_t kg          # key group index
    int32_t pg          # pid group index
    int32_t kprev
    int32_t knext       # also the free-list link
    int32_t pprev
    int32_t pnext
    int32_t kpos        # place in its key group's `arr`


ctypedef struct Group:
    PyObject* obj       # owned: the key (or pid) the group was created with; NULL if free
    Py_hash_t hash
    int32_t head        # first row in this group's order
    int32_t tail
    int32_t count
    int32_t prev        # creation order
    int32_t next        # creation order; also the free-list link
    uint32_t mark       # dedupe marker for `Table.keys`
    int32_t* arr        # key groups of 2 rows or more: the rows by index (see "Index order")
    int32_t acap        # capacity of `arr`


# Rows and group records live in chunked slabs: chunk k holds elements
# [k * CHUNK, (k + 1) * CHUNK). Growing adds a chunk, so nothing is copied and there is
# never more than one chunk of slack; only chunk 0 starts small (16) and is realloc'ed
# up to CHUNK, so that a small table stays small.
cdef enum:
    CHUNK_SHIFT = 10
    CHUNK = 1024
    FIRST_CHUNK = 16


ctypedef struct Slab:
    char** chunks
    int32_t nchunks
    int32_t chunks_cap
    int32_t cap         # elements addressable
    int32_t elem        # element size in bytes


cdef inline Row* _R(Slab* s, int32_t i) noexcept:
    return <Row*>s.chunks[i >> CHUNK_SHIFT] + (i & (CHUNK - 1))


cdef inline Group* _G(GroupTable* gt, int32_t i) noexcept:
    return <Group*>gt.slab.chunks[i >> CHUNK_SHIFT] + (i & (CHUNK - 1))


cdef int32_t _slab_grow(Slab* s) noexcept:
    """Add capacity; return the first new index, or -1 (nothing changed) without memory."""
    cdef int32_t old = s.cap
    cdef int32_t size
    cdef char* chunk
    cdef char** chunks
    if s.nchunks == 1 and s.cap < CHUNK:
        size = s.cap * 2 if s.cap * 2 < CHUNK else CHUNK
        chunk = <char*>PyMem_Realloc(s.chunks[0], <size_t>size * s.elem)
        if chunk == NULL:
            return -1
        s.chunks[0] = chunk
        s.cap = size
        return old
    if <int64_t>s.cap + CHUNK > INT32_MAX:
        return -1
    if s.nchunks == s.chunks_cap:
        chunks = <char**>PyMem_Realloc(s.chunks, <size_t>(s.chunks_cap * 2 + 4) * sizeof(char*))
        if chunks == NULL:
            return -1
        s.chunks = chunks
        s.chunks_cap = s.chunks_cap * 2 + 4
    size = FIRST_CHUNK if s.nchunks == 0 else CHUNK
    chunk = <char*>PyMem_Malloc(<size_t>size * s.elem)
    if chunk == NULL:
        return -1
    s.chunks[s.nchunks] = chunk
    s.nchunks += 1
    s.cap += size
    return old


cdef inline void _slab_init(Slab* s, int32_t elem) noexcept:
    s.chunks = NULL
    s.nchunks = 0
    s.chunks_cap = 0
    s.cap = 0
    s.elem = elem


cdef int _slab_reserve(Slab* s, int32_t elem, int64_t n) noexcept:
    """Grow an empty slab to hold `n` elements; -1 if out of memory (free it then)."""
    _slab_init(s, elem)
    while s.cap < n:
        if _slab_grow(s) < 0:
            return -1
    return 0


cdef void _slab_free(Slab* s) noexcept:
    cdef int32_t k
    for k in range(s.nchunks):
        PyMem_Free(s.chunks[k])
    PyMem_Free(s.chunks)
    _slab_init(s, s.elem)


cdef inline size_t _slab_bytes(Slab* s) noexcept:
    return <size_t>s.cap * s.elem + <size_t>s.chunks_cap * sizeof(char*)


ctypedef struct Slot:
    int32_t gi          # group index, -1 if the slot is empty
    uint32_t fp         # `_fingerprint` of the group's hash


ctypedef struct Index:
    Slot* index
    uint32_t size
    uint32_t mask
    int bits


ctypedef struct GroupTable:
    Slab slab           # Group records
    int32_t live
    int32_t free        # free-record list head, -1 if none
    int32_t first       # creation order
    int32_t last
    Slot* index         # open addressing, linear probing, load <= 2/3
    uint32_t size       # number of slots (0 or a power of two)
    uint32_t mask
    int bits


# --------------------------------------------------------------------------------------
# Temporary buffers: results are copied here (owned references) in pure C before any
# Python object is built, so building (which may run the GC) never meets the table.
# --------------------------------------------------------------------------------------

ctypedef struct Rec:
    PyObject* a
    PyObject* b
    PyObject* c
    int64_t tag
    int64_t stamp
    int32_t ri
    int32_t kg
    int32_t pg
    int32_t flag


ctypedef struct RecBuf:
    Rec* r
    Py_ssize_t n
    Py_ssize_t cap
    Rec small[8]


cdef inline void _rb_init(RecBuf* b) noexcept:
    b.r = b.small
    b.n = 0
    b.cap = 8


cdef int _rb_reserve(RecBuf* b, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap
    cdef Rec* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2
    if cap < need:
        cap = need
    if <size_t>cap > (<size_t>-1) // sizeof(Rec):
        raise MemoryError()
    if b.r == b.small:
        p = <Rec*>PyMem_Malloc(cap * sizeof(Rec))
        if p != NULL:
            memcpy(p, b.small, b.n * sizeof(Rec))
    else:
        p = <Rec*>PyMem_Realloc(b.r, cap * sizeof(Rec))
    if p == NULL:
        raise MemoryError()
    b.r = p
    b.cap = cap
    return 0


cdef inline Rec* _rb_push(RecBuf* b) noexcept:
    """The next record, zeroed; the caller reserved room for it."""
    cdef Rec* r = &b.r[b.n]
    b.n += 1
    r.a = NULL
    r.b = NULL
    r.c = NULL
    r.flag = 0
    return r


cdef void _rb_clear(RecBuf* b) noexcept:
    """Release the references still held and forget the records (keep the memory)."""
    cdef Py_ssize_t i
    for i in range(b.n):
        Py_XDECREF(b.r[i].a)
        Py_XDECREF(b.r[i].b)
        Py_XDECREF(b.r[i].c)
    b.n = 0


cdef void _rb_free(RecBuf* b) noexcept:
    _rb_clear(b)
    if b.r != b.small:
        PyMem_Free(b.r)
    b.r = b.small
    b.cap = 8


ctypedef struct PtrBuf:
    PyObject** p
    Py_ssize_t n
    Py_ssize_t cap
    PyObject* small[8]


cdef inline void _pb_init(PtrBuf* b) noexcept:
    b.p = b.small
    b.n = 0
    b.cap = 8


cdef int _pb_reserve(PtrBuf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.n + extra
    cdef Py_ssize_t cap
    cdef PyObject** p
    if need <= b.cap:
        return 0
    cap = b.cap * 2
    if cap < need:
        cap = need
    if <size_t>cap > (<size_t>-1) // sizeof(PyObject*):
        raise MemoryError()
    if b.p == b.small:
        p = <PyObject**>PyMem_Malloc(cap * sizeof(PyObject*))
        if p != NULL:
            memcpy(p, b.small, b.n * sizeof(PyObject*))
    else:
        p = <PyObject**>PyMem_Realloc(b.p, cap * sizeof(PyObject*))
    if p == NULL:
        raise MemoryError()
    b.p = p
    b.cap = cap
    return 0


cdef inline void _pb_push(PtrBuf* b, PyObject* o) noexcept:
    """Defer releasing `o` (the caller reserved room)."""
    b.p[b.n] = o
    b.n += 1


cdef void _pb_free(PtrBuf* b) noexcept:
    """Release the deferred references: called once the table is consistent again."""
    cdef Py_ssize_t i
    for i in range(b.n):
        Py_XDECREF(b.p[i])
    b.n = 0
    if b.p != b.small:
        PyMem_Free(b.p)
    b.p = b.small
    b.cap = 8


cdef int _cmp_stamp(const void* x, const void* y) noexcept nogil:
    cdef int64_t a = (<const Rec*>x).stamp
    cdef int64_t b = (<const Rec*>y).stamp
    return (a > b) - (a < b)


cdef void _sort_by_stamp(RecBuf* b) noexcept:
    cdef Py_ssize_t i, j
    cdef Rec tmp
    if b.n > 16:
        qsort(b.r, b.n, sizeof(Rec), _cmp_stamp)
        return
    for i in range(1, b.n):
        tmp = b.r[i]
        j = i - 1
        while j >= 0 and b.r[j].stamp > tmp.stamp:
            b.r[j + 1] = b.r[j]
            j -= 1
        b.r[j + 1] = tmp


# Slabs smaller than this are never compacted (not worth a pass).
cdef enum:
    _SHRINK_MIN = 4096


# Shapes of the items `_build_list` makes from records.
cdef enum:
    SH_A = 0        # a
    SH_AB = 1       # (a, b)
    SH_ABT = 2      # (a, b, tag)
    SH_ABCT = 3     # (a, b, c, tag)
    SH_TA = 4       # (tag, a)


cdef PyObject* _make_item(Rec* r, int shape) noexcept:
    """One result item, taking the record's references; NULL (error set) on failure."""
    cdef PyObject* t
    cdef PyObject* tag = NULL
    if shape == SH_A:
        t = r.a
        r.a = NULL
        return t
    if shape != SH_AB:
        tag = PyLong_FromLongLong(r.tag)
        if tag == NULL:
            return NULL
    if shape == SH_AB:
        t = PyTuple_New(2)
    elif shape == SH_TA:
        t = PyTuple_New(2)
    elif shape == SH_ABT:
        t = PyTuple_New(3)
    else:
        t = PyTuple_New(4)
    if t == NULL:
        Py_XDECREF(tag)
        return NULL
    if shape == SH_TA:
        PyTuple_SET_ITEM(t, 0, tag)
        PyTuple_SET_ITEM(t, 1, r.a)
        r.a = NULL
        return t
    PyTuple_SET_ITEM(t, 0, r.a)
    PyTuple_SET_ITEM(t, 1, r.b)
    r.a = NULL
    r.b = NULL
    if shape == SH_ABT:
        PyTuple_SET_ITEM(t, 2, tag)
    elif shape == SH_ABCT:
        PyTuple_SET_ITEM(t, 2, r.c)
        r.c = NULL
        PyTuple_SET_ITEM(t, 3, tag)
    return t


cdef object _build_list(RecBuf* b, int shape, Py_ssize_t start=0, int32_t flag=-1):
    """A list of one item per record (from `start`; only records with `flag` if >= 0)."""
    cdef Py_ssize_t i, n = 0, k = 0
    cdef PyObject* lst
    cdef PyObject* item
    if flag < 0:
        n = b.n - start
    else:
        for i in range(start, b.n):
            if b.r[i].flag == flag:
                n += 1
    lst = PyList_New(n)
    if lst == NULL:
        _propagate()
    for i in range(start, b.n):
        if flag >= 0 and b.r[i].flag != flag:
            continue
        item = _make_item(&b.r[i], shape)
        if item == NULL:
            Py_DECREF(lst)
            _propagate()
        PyList_SET_ITEM(lst, k, item)
        k += 1
    return _own(lst)


# ======================================================================================
# Match specs: compiled nodes
# ======================================================================================

ctypedef struct Frame:
    PyObject* key           # the row being matched (references held by the caller)
    PyObject* pid
    PyObject* value
    int32_t kg
    int32_t pg
    PyObject** slots        # owned bindings; NULL = unbound (reads as None)
    Py_ssize_t nslots       # of the clause being tried (for BINDINGS)
    int32_t* lit_kg         # per clause: the group of its literal key, -1 if none
    int32_t* lit_pg


cdef inline PyObject* _slot(Frame* f, Py_ssize_t i) noexcept:
    """Borrowed binding; an unbound slot (only in hand-built clauses) reads as None."""
    cdef PyObject* x = f.slots[i]
    return x if x != NULL else Py_None


cdef inline void _bind(Frame* f, Py_ssize_t i, PyObject* x) noexcept:
    Py_INCREF(x)
    Py_XDECREF(f.slots[i])
    f.slots[i] = x


cdef inline void _clear_slots(PyObject** slots, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    cdef PyObject* x
    for i in range(n):
        x = slots[i]
        if x != NULL:
            slots[i] = NULL
            Py_DECREF(x)


# --------------------------------------------------------------------------------------
# Patterns: match(x) -> 1 matches, 0 does not, -1 error (set)
# --------------------------------------------------------------------------------------

@cython.no_gc
cdef class _Pat:
    """A compiled pattern. Subclasses implement `match`; this base is never instantiated."""

    cdef int match(self, PyObject* x, Frame* f) noexcept:
        PyErr_SetString(PyExc_SystemError, "pgregistry: bare pattern node")
        return -1


@cython.final
@cython.no_gc
cdef class _PLit(_Pat):
    cdef object lit

    cdef int match(self, PyObject* x, Frame* f) noexcept:
        # `x is lit or x == lit`: RichCompareBool has the identity shortcut
        return PyObject_RichCompareBool(x, <PyObject*>self.lit, Py_EQ)


@cython.final
@cython.no_gc
cdef class _PBind(_Pat):
    cdef Py_ssize_t slot

    cdef int match(self, PyObject* x, Frame* f) noexcept:
        _bind(f, self.slot, x)
        return 1


cdef PyTypeObject* _PBIND_TYPE = <PyTypeObject*>_PBind


@cython.final
@cython.no_gc
cdef class _PSame(_Pat):
    """A repeated variable: compares like a literal with the bound value."""
    cdef Py_ssize_t slot

    cdef int match(self, PyObject* x, Frame* f) noexcept:
        return PyObject_RichCompareBool(x, _slot(f, self.slot), Py_EQ)


@cython.final
@cython.no_gc
cdef class _PTuple(_Pat):
    cdef tuple items        # _Pat, or None for `_`
    cdef Py_ssize_t n

    cdef int match(self, PyObject* x, Frame* f) noexcept:
        cdef Py_ssize_t i
        cdef PyObject* p
        cdef int r
        if not PyTuple_CheckExact(x) or PyTuple_GET_SIZE(x) != self.n:
            return 0
        for i in range(self.n):
            p = PyTuple_GET_ITEM(<PyObject*>self.items, i)
            if p == Py_None:
                continue
            # a tuple's items live as long as the tuple, which the caller holds
            r = (<_Pat>p).match(PyTuple_GET_ITEM(x, i), f)
            if r != 1:
                return r
        return 1


@cython.final
@cython.no_gc
cdef class _PList(_Pat):
    cdef tuple items
    cdef Py_ssize_t n

    cdef int match(self, PyObject* x, Frame* f) noexcept:
        cdef Py_ssize_t i
        cdef PyObject* p
        cdef PyObject* item
        cdef int r
        if not PyList_CheckExact(x) or PyList_GET_SIZE(x) != self.n:
            return 0
        for i in range(self.n):
            p = PyTuple_GET_ITEM(<PyObject*>self.items, i)
            if p == Py_None:
                continue
            # a comparison may run Python code that shrinks the list: re-check, and
            # hold the item while it is matched
            if PyList_GET_SIZE(x) != self.n:
                return 0
            item = PyList_GET_ITEM(x, i)
            if Py_TYPE(p) == _PBIND_TYPE:
                _bind(f, (<_PBind>p).slot, item)
                continue
            Py_INCREF(item)
            r = (<_Pat>p).match(item, f)
            Py_DECREF(item)
            if r != 1:
                return r
        return 1


@cython.final
@cython.no_gc
cdef class _PDict(_Pat):
    cdef tuple keys
    cdef tuple pats         # _Pat, or None for `_` (presence only)
    cdef Py_ssize_t n

    cdef int match(self, PyObject* x, Frame* f) noexcept:
        cdef Py_ssize_t i
        cdef PyObject* p
        cdef PyObject* item
        cdef int r
        if not PyDict_CheckExact(x):
            return 0
        for i in range(self.n):
            item = PyDict_GetItemWithError(x, PyTuple_GET_ITEM(<PyObject*>self.keys, i))
            if item == NULL:
                return -1 if PyErr_Occurred() != NULL else 0
            p = PyTuple_GET_ITEM(<PyObject*>self.pats, i)
            if p == Py_None:
                continue
            if Py_TYPE(p) == _PBIND_TYPE:
                _bind(f, (<_PBind>p).slot, item)    # the binding holds its own reference
                continue
            Py_INCREF(item)
            r = (<_Pat>p).match(item, f)
            Py_DECREF(item)
            if r != 1:
                return r
        return 1


# --------------------------------------------------------------------------------------
# Expressions: eval -> new reference or NULL (error set);
# tri -> 1 exactly True, 0 exactly False, 2 anything else or a caught Exception, -1 error
# --------------------------------------------------------------------------------------

@cython.no_gc
cdef class _Expr:
    """A compiled expression. Subclasses implement `eval`; `tri` derives from it."""

    cdef PyObject* eval(self, Frame* f) noexcept:
        PyErr_SetString(PyExc_SystemError, "pgregistry: bare expression node")
        return NULL

    cdef int tri(self, Frame* f) noexcept:
        cdef PyObject* r = self.eval(f)
        cdef int t
        if r == NULL:
            return _caught()
        t = 1 if r == Py_True else (0 if r == Py_False else 2)
        Py_DECREF(r)
        return t


@cython.final
@cython.no_gc
cdef class _EConst(_Expr):
    cdef object value

    cdef PyObject* eval(self, Frame* f) noexcept:
        Py_INCREF(<PyObject*>self.value)
        return <PyObject*>self.value


@cython.final
@cython.no_gc
cdef class _EVar(_Expr):
    cdef Py_ssize_t slot

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* x = _slot(f, self.slot)
        Py_INCREF(x)
        return x


@cython.final
@cython.no_gc
cdef class _EWhole(_Expr):
    cdef PyObject* eval(self, Frame* f) noexcept:
        return PyTuple_Pack(3, f.key, f.pid, f.value)


@cython.final
@cython.no_gc
cdef class _EBindings(_Expr):
    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* lst = PyList_New(f.nslots)
        cdef PyObject* x
        cdef Py_ssize_t i
        if lst == NULL:
            return NULL
        for i in range(f.nslots):
            x = _slot(f, i)
            Py_INCREF(x)
            PyList_SET_ITEM(lst, i, x)
        return lst


@cython.final
@cython.no_gc
cdef class _ETuple(_Expr):
    cdef tuple items
    cdef Py_ssize_t n

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* t = PyTuple_New(self.n)
        cdef PyObject* x
        cdef Py_ssize_t i
        if t == NULL:
            return NULL
        for i in range(self.n):
            x = (<_Expr>PyTuple_GET_ITEM(<PyObject*>self.items, i)).eval(f)
            if x == NULL:
                Py_DECREF(t)
                return NULL
            PyTuple_SET_ITEM(t, i, x)
        return t


@cython.final
@cython.no_gc
cdef class _EList(_Expr):
    cdef tuple items
    cdef Py_ssize_t n

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* lst = PyList_New(self.n)
        cdef PyObject* x
        cdef Py_ssize_t i
        if lst == NULL:
            return NULL
        for i in range(self.n):
            x = (<_Expr>PyTuple_GET_ITEM(<PyObject*>self.items, i)).eval(f)
            if x == NULL:
                Py_DECREF(lst)
                return NULL
            PyList_SET_ITEM(lst, i, x)
        return lst


@cython.final
@cython.no_gc
cdef class _EDict(_Expr):
    cdef tuple keys
    cdef tuple items
    cdef Py_ssize_t n

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* d = PyDict_New()
        cdef PyObject* x
        cdef Py_ssize_t i
        cdef int r
        if d == NULL:
            return NULL
        for i in range(self.n):
            x = (<_Expr>PyTuple_GET_ITEM(<PyObject*>self.items, i)).eval(f)
            if x == NULL:
                Py_DECREF(d)
                return NULL
            r = PyDict_SetItem(d, PyTuple_GET_ITEM(<PyObject*>self.keys, i), x)
            Py_DECREF(x)
            if r < 0:
                Py_DECREF(d)
                return NULL
        return d


# Operand kinds of the binary nodes: a variable or a constant is read in place, without
# a virtual call (the shapes ``V3 > 90000`` and ``V1 == V2`` dominate real guards).
cdef enum:
    OPND_SLOT = 0
    OPND_CONST = 1
    OPND_EXPR = 2


@cython.no_gc
cdef class _EBinary(_Expr):
    """Base of the two-operand nodes: operand storage and fetching."""
    cdef int op
    cdef int lkind
    cdef int rkind
    cdef Py_ssize_t lslot
    cdef Py_ssize_t rslot
    cdef object lconst
    cdef object rconst
    cdef _Expr lexpr
    cdef _Expr rexpr


cdef inline PyObject* _operand(int kind, Py_ssize_t slot, object const, _Expr sub,
                               Frame* f) noexcept:
    """An operand's value: borrowed for a variable (the slot owns it) or a constant (the
    node owns it), a new reference for a computed one; NULL (error set) on failure."""
    if kind == OPND_SLOT:
        return _slot(f, slot)
    if kind == OPND_CONST:
        return <PyObject*>const
    return sub.eval(f)


cdef inline int _operands(_EBinary e, Frame* f, PyObject** a, PyObject** b) noexcept:
    """Both operands, left first; -1 (error set, nothing held) on failure.

    Release them with `_release_operands`.
    """
    a[0] = _operand(e.lkind, e.lslot, e.lconst, e.lexpr, f)
    if a[0] == NULL:
        return -1
    b[0] = _operand(e.rkind, e.rslot, e.rconst, e.rexpr, f)
    if b[0] == NULL:
        if e.lkind == OPND_EXPR:
            Py_DECREF(a[0])
        return -1
    return 0


cdef inline void _release_operands(_EBinary e, PyObject* a, PyObject* b) noexcept:
    if e.lkind == OPND_EXPR:
        Py_DECREF(a)
    if e.rkind == OPND_EXPR:
        Py_DECREF(b)


@cython.final
@cython.no_gc
cdef class _ECompare(_EBinary):
    """``== != < <= > >=``: Python's rich comparison (no identity shortcut, like ``a == b``)."""
    # ``variable <op> int constant`` (the commonest guard): the constant as a C integer,
    # compared in place with an int variable, or with a float one when exact (|c| <= 2**53)
    cdef bint var_int
    cdef bint int_exact_double
    cdef long long ival

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* a
        cdef PyObject* b
        cdef PyObject* r
        cdef int c
        if _operands(self, f, &a, &b) < 0:
            return NULL
        c = pgr_fast_compare(a, b, self.op)
        if c < 0:
            r = PyObject_RichCompare(a, b, self.op)
        else:
            r = Py_True if c else Py_False
            Py_INCREF(r)
        _release_operands(self, a, b)
        return r

    cdef int tri(self, Frame* f) noexcept:
        # the base class's tri, with C values compared in place when both are scalars
        cdef PyObject* a
        cdef PyObject* b
        cdef PyObject* r
        cdef int t
        cdef long long x
        if self.var_int:
            a = _slot(f, self.lslot)
            if PyLong_CheckExact(a):
                if pgr_small_long(a, &x):
                    return PGR_CMP(x, self.ival, self.op)
            elif PyFloat_CheckExact(a) and self.int_exact_double:
                return PGR_CMP_D(PyFloat_AS_DOUBLE(a), <double>self.ival, self.op)
        if _operands(self, f, &a, &b) < 0:
            return _caught()
        t = pgr_fast_compare(a, b, self.op)
        if t < 0:
            r = PyObject_RichCompare(a, b, self.op)
            if r == NULL:
                t = _caught()
            else:
                t = 1 if r == Py_True else (0 if r == Py_False else 2)
                Py_DECREF(r)
        _release_operands(self, a, b)
        return t


cdef enum:
    OP_ADD = 0
    OP_SUB = 1
    OP_MUL = 2
    OP_TRUEDIV = 3
    OP_FLOORDIV = 4
    OP_MOD = 5
    OP_GETITEM = 6
    OP_HAS_KEY = 7


@cython.final
@cython.no_gc
cdef class _EArith(_EBinary):
    """Arithmetic, indexing and ``has_key``: the C calls behind Python's operators."""

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* a
        cdef PyObject* b
        cdef PyObject* r
        cdef int c
        if _operands(self, f, &a, &b) < 0:
            return NULL
        if self.op == OP_ADD:
            r = PyNumber_Add(a, b)
        elif self.op == OP_SUB:
            r = PyNumber_Subtract(a, b)
        elif self.op == OP_MUL:
            r = PyNumber_Multiply(a, b)
        elif self.op == OP_TRUEDIV:
            r = PyNumber_TrueDivide(a, b)
        elif self.op == OP_FLOORDIV:
            r = PyNumber_FloorDivide(a, b)
        elif self.op == OP_MOD:
            r = PyNumber_Remainder(a, b)
        elif self.op == OP_GETITEM:
            r = PyObject_GetItem(a, b)
        else:
            # has_key: a non-dict raises, so the guard fails as a whole (even under `not`)
            if not PyDict_CheckExact(a):
                PyErr_SetString(PyExc_TypeError, "has_key() of a non-dict")
                r = NULL
            else:
                c = PyDict_Contains(a, b)
                if c < 0:
                    r = NULL
                else:
                    r = Py_True if c else Py_False
                    Py_INCREF(r)
        _release_operands(self, a, b)
        return r


cdef enum:
    OP_NEG = 0
    OP_SIZE = 1
    OP_IS_INT = 2
    OP_IS_FLOAT = 3
    OP_IS_NUMBER = 4
    OP_IS_STR = 5
    OP_IS_BYTES = 6
    OP_IS_TUPLE = 7
    OP_IS_LIST = 8
    OP_IS_DICT = 9
    OP_IS_PID = 10


cdef inline int _type_test(int op, PyObject* x) noexcept:
    # `type(x) is T`: exact types, so a bool is not an int and a Pid is not a tuple
    if op == OP_IS_INT:
        return PyLong_CheckExact(x)
    if op == OP_IS_FLOAT:
        return PyFloat_CheckExact(x)
    if op == OP_IS_NUMBER:
        return PyLong_CheckExact(x) or PyFloat_CheckExact(x)
    if op == OP_IS_STR:
        return PyUnicode_CheckExact(x)
    if op == OP_IS_BYTES:
        return PyBytes_CheckExact(x)
    if op == OP_IS_TUPLE:
        return PyTuple_CheckExact(x)
    if op == OP_IS_LIST:
        return PyList_CheckExact(x)
    if op == OP_IS_DICT:
        return PyDict_CheckExact(x)
    return Py_TYPE(x) == _PID_TYPE


@cython.final
@cython.no_gc
cdef class _EUnary(_Expr):
    cdef int op
    cdef _Expr arg
    cdef Py_ssize_t slot     # >= 0: the argument is this variable, read in place

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* x
        cdef PyObject* r
        cdef Py_ssize_t n
        if self.slot >= 0:
            x = _slot(f, self.slot)
            Py_INCREF(x)
        else:
            x = self.arg.eval(f)
            if x == NULL:
                return NULL
        if self.op == OP_NEG:
            r = PyNumber_Negative(x)
        elif self.op == OP_SIZE:
            if (PyUnicode_CheckExact(x) or PyBytes_CheckExact(x) or PyTuple_CheckExact(x)
                    or PyList_CheckExact(x) or PyDict_CheckExact(x)):
                n = PyObject_Size(x)
                r = PyLong_FromSsize_t(n) if n >= 0 else NULL
            else:
                PyErr_SetString(PyExc_TypeError, "size() of an unsized term")
                r = NULL
        else:
            r = Py_True if _type_test(self.op, x) else Py_False
            Py_INCREF(r)
        Py_DECREF(x)
        return r


@cython.final
@cython.no_gc
cdef class _ENot(_Expr):
    """``not``: True and False only; anything else raises TypeError."""
    cdef _Expr arg

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* x = self.arg.eval(f)
        cdef PyObject* r
        if x == NULL:
            return NULL
        if x == Py_True:
            r = Py_False
        elif x == Py_False:
            r = Py_True
        else:
            Py_DECREF(x)
            PyErr_SetString(PyExc_TypeError, "not: the operand is not a bool")
            return NULL
        Py_DECREF(x)
        Py_INCREF(r)
        return r

    cdef int tri(self, Frame* f) noexcept:
        cdef int t = self.arg.tri(f)
        if t == 1:
            return 0
        if t == 0:
            return 1
        return t


@cython.final
@cython.no_gc
cdef class _EAndOr(_Expr):
    """``and`` (stop value False) and ``or`` (stop value True), left to right, on bools only."""
    cdef tuple items
    cdef Py_ssize_t n
    cdef bint is_or

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* stop = Py_True if self.is_or else Py_False
        cdef PyObject* go = Py_False if self.is_or else Py_True
        cdef PyObject* x
        cdef Py_ssize_t i
        for i in range(self.n):
            x = (<_Expr>PyTuple_GET_ITEM(<PyObject*>self.items, i)).eval(f)
            if x == NULL:
                return NULL
            if x == stop:
                return x
            if x != go:
                Py_DECREF(x)
                PyErr_SetString(PyExc_TypeError, "and/or: an operand is not a bool")
                return NULL
            Py_DECREF(x)
        Py_INCREF(go)
        return go

    cdef int tri(self, Frame* f) noexcept:
        # As a guard: an operand that is the stop value decides; a non-bool (or an
        # exception, already turned into 2 by the operand) makes the whole guard false.
        cdef int stop = 1 if self.is_or else 0
        cdef int t
        cdef Py_ssize_t i
        for i in range(self.n):
            t = (<_Expr>PyTuple_GET_ITEM(<PyObject*>self.items, i)).tri(f)
            if t == stop:
                return t
            if t != 1 - stop:
                return t
        return 1 - stop


@cython.final
@cython.no_gc
cdef class _ECall(_Expr):
    """Any other operator: ``spec.OPERATORS[op]`` applied to the evaluated arguments."""
    cdef object fn
    cdef tuple items
    cdef Py_ssize_t n

    cdef PyObject* eval(self, Frame* f) noexcept:
        cdef PyObject* args = PyTuple_New(self.n)
        cdef PyObject* x
        cdef PyObject* r
        cdef Py_ssize_t i
        if args == NULL:
            return NULL
        for i in range(self.n):
            x = (<_Expr>PyTuple_GET_ITEM(<PyObject*>self.items, i)).eval(f)
            if x == NULL:
                Py_DECREF(args)
                return NULL
            PyTuple_SET_ITEM(args, i, x)
        r = PyObject_Call(<PyObject*>self.fn, args, NULL)
        Py_DECREF(args)
        return r


# --------------------------------------------------------------------------------------
# Compiling the normalized nodes of `spec`
# --------------------------------------------------------------------------------------

_COMPARE_OPS = {"eq": Py_EQ, "ne": Py_NE, "lt": Py_LT, "le": Py_LE, "gt": Py_GT, "ge": Py_GE}
_ARITH_OPS = {"add": OP_ADD, "sub": OP_SUB, "mul": OP_MUL, "truediv": OP_TRUEDIV,
              "floordiv": OP_FLOORDIV, "mod": OP_MOD, "getitem": OP_GETITEM, "has_key": OP_HAS_KEY}
_UNARY_OPS = {"neg": OP_NEG, "size": OP_SIZE, "is_int": OP_IS_INT, "is_float": OP_IS_FLOAT,
              "is_number": OP_IS_NUMBER, "is_str": OP_IS_STR, "is_bytes": OP_IS_BYTES,
              "is_tuple": OP_IS_TUPLE, "is_list": OP_IS_LIST, "is_dict": OP_IS_DICT,
              "is_pid": OP_IS_PID}


cdef Py_ssize_t _check_slot(object slot, Py_ssize_t nslots) except -1:
    if type(slot) is not int or not 0 <= slot < nslots:
        raise ValueError(f"variable slot {short_repr(slot)} out of range for a clause of {nslots} variable(s)")
    return slot


cdef object _compile_pattern(object node, Py_ssize_t nslots):
    """The `_Pat` for a normalized pattern node; None for `PatAny` (nothing to test)."""
    cdef object t = type(node)
    cdef _PLit lit
    cdef _PBind bind
    cdef _PSame same
    cdef _PTuple tup
    cdef _PList lst
    cdef _PDict dct
    if t is _PatAny:
        return None
    if t is _PatLit:
        lit = _PLit.__new__(_PLit)
        lit.lit = node.value
        return lit
    if t is _PatVar:
        if node.bind:
            bind = _PBind.__new__(_PBind)
            bind.slot = _check_slot(node.slot, nslots)
            return bind
        same = _PSame.__new__(_PSame)
        same.slot = _check_slot(node.slot, nslots)
        return same
    if t is _PatTuple:
        tup = _PTuple.__new__(_PTuple)
        tup.items = tuple([_compile_pattern(i, nslots) for i in node.items])
        tup.n = len(tup.items)
        return tup
    if t is _PatList:
        lst = _PList.__new__(_PList)
        lst.items = tuple([_compile_pattern(i, nslots) for i in node.items])
        lst.n = len(lst.items)
        return lst
    if t is _PatDict:
        dct = _PDict.__new__(_PDict)
        dct.keys = tuple([k for k, _p in node.items])
        dct.pats = tuple([_compile_pattern(p, nslots) for _k, p in node.items])
        dct.n = len(dct.keys)
        return dct
    raise TypeError(f"not a normalized pattern node: {short_repr(node, 80)}")


cdef _Expr _compile_expr(object node, Py_ssize_t nslots):
    cdef object t = type(node)
    cdef _EConst const
    cdef _EVar var
    cdef _ETuple tup
    cdef _EList lst
    cdef _EDict dct
    if t is _ExprConst:
        const = _EConst.__new__(_EConst)
        const.value = node.value
        return const
    if t is _ExprVar:
        var = _EVar.__new__(_EVar)
        var.slot = _check_slot(node.slot, nslots)
        return var
    if t is _ExprWhole:
        return _EWhole.__new__(_EWhole)
    if t is _ExprBindings:
        return _EBindings.__new__(_EBindings)
    if t is _ExprTuple:
        tup = _ETuple.__new__(_ETuple)
        tup.items = tuple([_compile_expr(i, nslots) for i in node.items])
        tup.n = len(tup.items)
        return tup
    if t is _ExprList:
        lst = _EList.__new__(_EList)
        lst.items = tuple([_compile_expr(i, nslots) for i in node.items])
        lst.n = len(lst.items)
        return lst
    if t is _ExprDict:
        dct = _EDict.__new__(_EDict)
        dct.keys = tuple([k for k, _e in node.items])
        dct.items = tuple([_compile_expr(e, nslots) for _k, e in node.items])
        dct.n = len(dct.keys)
        return dct
    if t is _ExprOp:
        return _compile_op(node.op, tuple(node.args), nslots)
    raise TypeError(f"not a normalized expression node: {short_repr(node, 80)}")


cdef void _set_operand(_EBinary e, bint left, object node, Py_ssize_t nslots) except *:
    cdef int kind
    cdef Py_ssize_t slot = 0
    cdef object const = None
    cdef _Expr sub = None
    if type(node) is _ExprVar:
        kind = OPND_SLOT
        slot = _check_slot(node.slot, nslots)
    elif type(node) is _ExprConst:
        kind = OPND_CONST
        const = node.value
    else:
        kind = OPND_EXPR
        sub = _compile_expr(node, nslots)
    if left:
        e.lkind = kind
        e.lslot = slot
        e.lconst = const
        e.lexpr = sub
    else:
        e.rkind = kind
        e.rslot = slot
        e.rconst = const
        e.rexpr = sub


cdef _Expr _compile_op(object op, tuple args, Py_ssize_t nslots):
    cdef _EBinary bin
    cdef _EUnary un
    cdef _ENot neg
    cdef _EAndOr andor
    cdef _ECall call
    cdef Py_ssize_t n = len(args)
    if op == "and" or op == "or":
        andor = _EAndOr.__new__(_EAndOr)
        andor.items = tuple([_compile_expr(a, nslots) for a in args])
        andor.n = n
        andor.is_or = op == "or"
        return andor
    if op == "not":
        if n != 1:
            raise ValueError(f"not takes 1 argument, got {n}")
        neg = _ENot.__new__(_ENot)
        neg.arg = _compile_expr(args[0], nslots)
        return neg
    if n == 2 and (op in _COMPARE_OPS or op in _ARITH_OPS):
        if op in _COMPARE_OPS:
            bin = _ECompare.__new__(_ECompare)
            bin.op = _COMPARE_OPS[op]
        else:
            bin = _EArith.__new__(_EArith)
            bin.op = _ARITH_OPS[op]
        _set_operand(bin, True, args[0], nslots)
        _set_operand(bin, False, args[1], nslots)
        if (type(bin) is _ECompare and bin.lkind == OPND_SLOT and bin.rkind == OPND_CONST
                and type(bin.rconst) is int and -(2**62) <= bin.rconst <= 2**62):
            (<_ECompare>bin).var_int = True
            (<_ECompare>bin).ival = bin.rconst
            (<_ECompare>bin).int_exact_double = -(2**53) <= bin.rconst <= 2**53
        return bin
    if n == 1 and op in _UNARY_OPS:
        un = _EUnary.__new__(_EUnary)
        un.op = _UNARY_OPS[op]
        if type(args[0]) is _ExprVar:
            un.slot = _check_slot(args[0].slot, nslots)
        else:
            un.slot = -1
            un.arg = _compile_expr(args[0], nslots)
        return un
    # An operator this module does not know natively, or a hand-built node with an
    # unusual arity: the reference function gives the reference behaviour.
    fn = _OPERATORS.get(op)
    if fn is None:
        raise ValueError(f"unknown function {short_repr(op)}")
    call = _ECall.__new__(_ECall)
    call.fn = fn
    call.items = tuple([_compile_expr(a, nslots) for a in args])
    call.n = n
    return call


# How a head part of a clause is tested.
cdef enum:
    HEAD_ANY = 0        # `_`
    HEAD_BIND = 1       # a variable's first occurrence: bind, nothing to test
    HEAD_LIT = 2        # a literal key or pid: same group as the literal (resolved per call)
    HEAD_PAT = 3        # anything else: the compiled pattern


@cython.final
@cython.no_gc
cdef class _Clause:
    cdef int kmode
    cdef int pmode
    cdef int vmode
    cdef Py_ssize_t kslot
    cdef Py_ssize_t pslot
    cdef Py_ssize_t vslot
    cdef _Pat kpat
    cdef _Pat ppat
    cdef _Pat vpat
    cdef object klit
    cdef object plit
    cdef Py_hash_t khash
    cdef Py_hash_t phash
    cdef bint khashable
    cdef bint phashable
    cdef tuple guards
    cdef Py_ssize_t nguards
    cdef tuple body
    cdef Py_ssize_t nbody
    cdef Py_ssize_t nslots
    # head binds that lend the row's own reference to their slot (no INCREF/DECREF per
    # row): the slot is bound nowhere else in the clause (see `_borrowable`)
    cdef bint kborrow
    cdef bint pborrow
    cdef bint vborrow


cdef int _head_mode(object node, bint literal_ok) except -1:
    if type(node) is _PatAny:
        return HEAD_ANY
    if type(node) is _PatVar and node.bind:
        return HEAD_BIND
    if literal_ok and type(node) is _PatLit:
        return HEAD_LIT
    return HEAD_PAT


cdef _Clause _compile_clause(object clause):
    cdef _Clause c = _Clause.__new__(_Clause)
    if type(clause.nslots) is not int or clause.nslots < 0:
        raise ValueError(f"a clause's nslots must be a non-negative int, got {short_repr(clause.nslots)}")
    cdef Py_ssize_t nslots = clause.nslots
    c.nslots = nslots
    c.kmode = _head_mode(clause.key, True)
    if c.kmode == HEAD_BIND:
        c.kslot = _check_slot(clause.key.slot, nslots)
    elif c.kmode == HEAD_PAT:
        c.kpat = _compile_pattern(clause.key, nslots)
    elif c.kmode == HEAD_LIT:
        c.klit = clause.key.value
        try:
            c.khash = hash(c.klit)
            c.khashable = True
        except TypeError:
            c.khashable = False     # an unhashable literal (a list) equals no key
    c.pmode = _head_mode(clause.pid, True)
    if c.pmode == HEAD_BIND:
        c.pslot = _check_slot(clause.pid.slot, nslots)
    elif c.pmode == HEAD_PAT:
        c.ppat = _compile_pattern(clause.pid, nslots)
    elif c.pmode == HEAD_LIT:
        c.plit = clause.pid.value
        try:
            c.phash = hash(c.plit)
            c.phashable = True
        except TypeError:
            c.phashable = False
    c.vmode = _head_mode(clause.value, False)
    if c.vmode == HEAD_BIND:
        c.vslot = _check_slot(clause.value.slot, nslots)
    elif c.vmode == HEAD_PAT:
        c.vpat = _compile_pattern(clause.value, nslots)
    c.guards = tuple([_compile_expr(g, nslots) for g in clause.guards])
    c.nguards = len(c.guards)
    c.body = tuple([_compile_expr(b, nslots) for b in clause.body])
    c.nbody = len(c.body)
    binds = []
    for pat in (c.kpat, c.ppat, c.vpat):
        _pattern_binds(pat, binds)
    if c.kmode == HEAD_BIND:
        binds.append(c.kslot)
    if c.pmode == HEAD_BIND:
        binds.append(c.pslot)
    if c.vmode == HEAD_BIND:
        binds.append(c.vslot)
    c.kborrow = c.kmode == HEAD_BIND and binds.count(c.kslot) == 1
    c.pborrow = c.pmode == HEAD_BIND and binds.count(c.pslot) == 1
    c.vborrow = c.vmode == HEAD_BIND and binds.count(c.vslot) == 1
    return c


cdef void _pattern_binds(object pat, list out) except *:
    """Append the slot of every `_PBind` in compiled pattern `pat` (None: none) to `out`."""
    cdef object t = type(pat)
    if t is _PBind:
        out.append((<_PBind>pat).slot)
    elif t is _PTuple:
        for item in (<_PTuple>pat).items:
            _pattern_binds(item, out)
    elif t is _PList:
        for item in (<_PList>pat).items:
            _pattern_binds(item, out)
    elif t is _PDict:
        for item in (<_PDict>pat).pats:
            _pattern_binds(item, out)


# Which rows `select` visits (see the contract).
cdef enum:
    PLAN_KEYS = 0       # every clause has a literal key
    PLAN_PIDS = 1       # every clause has a literal pid
    PLAN_ALL = 2


# What a scan produces per matching row.
cdef enum:
    MODE_SELECT = 0         # the body's value, appended
    MODE_COUNT_SELECT = 1   # +1 if the body's value is True
    MODE_MATCH = 2          # (pid, value), appended
    MODE_COUNT = 3          # +1


@cython.final
cdef class Matcher:
    """A compiled match spec; build once and reuse (compiling costs microseconds)."""

    cdef readonly tuple clauses
    cdef tuple _compiled
    cdef Py_ssize_t _n
    cdef Py_ssize_t _maxslots
    cdef int _plan
    cdef bint _has_bodies

    def __init__(self, clauses):
        cdef _Clause c
        clauses = tuple(clauses)
        for clause in clauses:
            if type(clause) is not _Clause_t:
                raise TypeError(
                    f"Matcher takes spec.Clause objects (from check_spec/check_match), got {short_repr(clause, 80)}")
        compiled = tuple([_compile_clause(clause) for clause in clauses])
        self.clauses = clauses
        self._compiled = compiled
        self._n = len(compiled)
        self._maxslots = 0
        self._has_bodies = True
        for c in compiled:
            if c.nslots > self._maxslots:
                self._maxslots = c.nslots
            if c.nbody == 0:
                self._has_bodies = False
        if all([(<_Clause>c).kmode == HEAD_LIT for c in compiled]):
            self._plan = PLAN_KEYS
        elif all([(<_Clause>c).pmode == HEAD_LIT for c in compiled]):
            self._plan = PLAN_PIDS
        else:
            self._plan = PLAN_ALL

    def __repr__(self):
        return f"<Matcher of {self._n} clause(s)>"

    cdef inline int _passes(self, _Clause c, Py_ssize_t ci, Frame* f) noexcept:
        """Head and guards of clause `ci` on the frame's row: 1 pass, 0 fail, -1 error.

        Leaves its bindings in the frame either way; the caller clears them.
        """
        cdef int r
        cdef Py_ssize_t i
        if c.kmode == HEAD_LIT:
            if f.kg != f.lit_kg[ci]:
                return 0
        elif c.kborrow:
            f.slots[c.kslot] = f.key    # lent: the frame's row outlives the visit
        elif c.kmode == HEAD_BIND:
            _bind(f, c.kslot, f.key)
        elif c.kmode == HEAD_PAT:
            r = c.kpat.match(f.key, f)
            if r != 1:
                return r
        if c.pmode == HEAD_LIT:
            if f.pg != f.lit_pg[ci]:
                return 0
        elif c.pborrow:
            f.slots[c.pslot] = f.pid
        elif c.pmode == HEAD_BIND:
            _bind(f, c.pslot, f.pid)
        elif c.pmode == HEAD_PAT:
            r = c.ppat.match(f.pid, f)
            if r != 1:
                return r
        if c.vborrow:
            f.slots[c.vslot] = f.value
        elif c.vmode == HEAD_BIND:
            _bind(f, c.vslot, f.value)
        elif c.vmode == HEAD_PAT:
            r = c.vpat.match(f.value, f)
            if r != 1:
                return r
        for i in range(c.nguards):
            r = (<_Expr>PyTuple_GET_ITEM(<PyObject*>c.guards, i)).tri(f)
            if r != 1:
                return -1 if r < 0 else 0
        return 1

    cdef int _visit(self, Frame* f, int mode, PyObject* out, Py_ssize_t* count) noexcept:
        """Apply the spec to the frame's row; 0 done, -1 error (set)."""
        cdef Py_ssize_t ci
        cdef Py_ssize_t i
        cdef _Clause c = None
        cdef int r = 0
        cdef PyObject* res = NULL
        cdef PyObject* item
        for ci in range(self._n):
            c = <_Clause>PyTuple_GET_ITEM(<PyObject*>self._compiled, ci)
            f.nslots = c.nslots
            r = self._passes(c, ci, f)
            if r == 1:
                break
            _unlend(c, f)
            _clear_slots(f.slots, c.nslots)
            if r < 0:
                return -1
        if r != 1:
            return 0
        if mode == MODE_COUNT:
            count[0] += 1
        elif mode == MODE_MATCH:
            item = PyTuple_Pack(2, f.pid, f.value)
            if item == NULL:
                r = -1
            else:
                r = PyList_Append(out, item)
                Py_DECREF(item)
        else:
            # every body expression is evaluated, the last is the result; an
            # exception skips the row (no later clause is tried)
            for i in range(c.nbody):
                Py_XDECREF(res)
                res = (<_Expr>PyTuple_GET_ITEM(<PyObject*>c.body, i)).eval(f)
                if res == NULL:
                    break
            if res == NULL:
                r = 0 if _caught() == 2 else -1
            elif mode == MODE_SELECT:
                r = PyList_Append(out, res)
                Py_DECREF(res)
            else:
                if res == Py_True:
                    count[0] += 1
                Py_DECREF(res)
                r = 0
        _unlend(c, f)
        _clear_slots(f.slots, c.nslots)
        return -1 if r < 0 else 0


cdef inline void _unlend(_Clause c, Frame* f) noexcept:
    """Take back the slots a clause's head binds borrowed (before `_clear_slots`)."""
    if c.kborrow:
        f.slots[c.kslot] = NULL
    if c.pborrow:
        f.slots[c.pslot] = NULL
    if c.vborrow:
        f.slots[c.vslot] = NULL


cdef int _need_bodies(Matcher m, str what) except -1:
    if not m._has_bodies:
        raise ValueError(
            f"{what} needs a body in every clause: build the matcher with spec.check_spec; "
            "check_match clauses have none"
        )
    return 0


# Per-call scratch of a scan: bindings, resolved literals and the group plan.
ctypedef struct Scratch:
    PyObject** slots
    int32_t* lit_kg
    int32_t* lit_pg
    int32_t* plan
    Py_ssize_t nslots
    void* heap
    PyObject* small_slots[16]
    int32_t small_ints[48]


cdef int _scratch_init(Scratch* s, Matcher m) except -1:
    cdef Py_ssize_t nslots = m._maxslots
    cdef Py_ssize_t nc = m._n + 1
    cdef size_t bytes_
    cdef char* p
    s.heap = NULL
    s.nslots = nslots
    if nslots <= 16 and 3 * nc <= 48:
        s.slots = s.small_slots
        s.lit_kg = s.small_ints
    else:
        bytes_ = nslots * sizeof(PyObject*) + 3 * nc * sizeof(int32_t)
        s.heap = PyMem_Malloc(bytes_ if bytes_ > 0 else 1)
        if s.heap == NULL:
            raise MemoryError()
        p = <char*>s.heap
        s.slots = <PyObject**>p
        s.lit_kg = <int32_t*>(p + nslots * sizeof(PyObject*))
    s.lit_pg = s.lit_kg + nc
    s.plan = s.lit_pg + nc
    memset(s.slots, 0, nslots * sizeof(PyObject*))
    return 0


cdef void _scratch_free(Scratch* s) noexcept:
    _clear_slots(s.slots, s.nslots)
    if s.heap != NULL:
        PyMem_Free(s.heap)
        s.heap = NULL


cdef list _group_objects(GroupTable* gt):
    """The object of every live group of `gt`, in creation order."""
    cdef int32_t gi = gt.first
    cdef list out = []
    while gi >= 0:
        out.append(<object>_G(gt, gi).obj)
        gi = _G(gt, gi).next
    return out


# ======================================================================================
# The table
# ======================================================================================

# Rows of a sync part whose key-index slots `insert_flat` fetches ahead, together.
DEF _PREFETCH_ROWS = 16

@cython.final
cdef class Table:
    """Rows ``(key, pid, value, tag)`` indexed by key and by pid; see ``_core.pyi``."""

    cdef Slab _rs               # rows
    cdef int32_t _rfree         # free-row list (through knext), -1 if empty
    cdef Py_ssize_t _n
    cdef GroupTable _keys
    cdef GroupTable _pids
    cdef uint64_t _version      # bumped by every change, including a reallocation
    # Walks in progress (any thread) read rows' key, pid and value without holding
    # references; a change meanwhile keeps what it releases here until the last ends.
    cdef int _scans
    cdef PtrBuf _grave
    cdef int32_t _last_pg       # the pid group of the last insert (see `_last_pid_group`)
    cdef int64_t _stamp
    cdef uint32_t _epoch

    def __cinit__(self):
        self._rfree = -1
        _slab_init(&self._rs, sizeof(Row))
        _gt_init(&self._keys)
        _gt_init(&self._pids)
        _pb_init(&self._grave)
        self._last_pg = -1

    def __dealloc__(self):
        _release(&self._rs, &self._keys, &self._pids)
        _pb_free(&self._grave)

    cdef int _grave_room(self, Py_ssize_t n) except -1:
        """Room to keep `n` references alive for the walks in progress (none: nothing)."""
        if self._scans > 0:
            _pb_reserve(&self._grave, n)
        return 0

    cdef inline void _grave_keep(self, PyObject* o) noexcept:
        """While a walk is in progress, a reference to `o` until it ends (room reserved)."""
        if self._scans > 0:
            Py_INCREF(o)
            _pb_push(&self._grave, o)

    cdef void _scan_end(self) noexcept:
        cdef PtrBuf kept
        self._scans -= 1
        if self._scans == 0 and self._grave.n > 0:
            # releasing may run code that scans and changes this table again: the grave
            # is emptied first, then its former contents are released
            kept = self._grave
            if self._grave.p == self._grave.small:
                kept.p = kept.small
            _pb_init(&self._grave)
            _pb_free(&kept)

    def __len__(self):
        """Number of rows."""
        return self._n

    def __contains__(self, key):
        """Whether `key` has at least one row."""
        return self._find_obj(&self._keys, key) >= 0

    def __repr__(self):
        return (f"<pgregistry._core.Table: {self._n} rows, {self._keys.live} keys, "
                f"{self._pids.live} pids>")

    def __sizeof__(self):
        """The object plus its C arrays (not the keys, pids and values it refers to)."""
        return (object.__sizeof__(self) + _slab_bytes(&self._rs)
                + _gt_bytes(&self._keys) + _gt_bytes(&self._pids))

    # -- group tables -----------------------------------------------------------------

    cdef int32_t _find(self, GroupTable* gt, PyObject* obj, Py_hash_t h) except -2:
        """The group of `obj` (dict semantics: ``is``, then equal hash and ``==``), or -1."""
        cdef uint32_t s
        cdef uint32_t fp = _fingerprint(h)
        cdef int32_t gi
        cdef Group* g
        cdef PyObject* stored
        cdef uint64_t v
        cdef int r
        while True:
            if gt.size == 0:
                return -1
            s = _home(fp, gt.bits)
            while True:
                gi = gt.index[s].gi
                if gi < 0:
                    return -1
                if gt.index[s].fp != fp:
                    s = (s + 1) & gt.mask
                    continue
                g = _G(gt, gi)
                if g.obj == obj:
                    return gi
                if g.hash == h:
                    stored = g.obj
                    Py_INCREF(stored)
                    v = self._version
                    r = PyObject_RichCompareBool(stored, obj, Py_EQ)
                    Py_DECREF(stored)
                    if r < 0:
                        return -2
                    if self._version != v:
                        break       # the comparison changed the table: probe again
                    if r:
                        return gi
                s = (s + 1) & gt.mask

    cdef int32_t _find_obj(self, GroupTable* gt, object obj) except -2:
        cdef Py_hash_t h = PyObject_Hash(<PyObject*>obj)
        if h == -1 and PyErr_Occurred() != NULL:
            return -2
        return self._find(gt, <PyObject*>obj, h)

    cdef int _find_pair(self, object key, object pid, int32_t* kgi, int32_t* pgi) except -1:
        """Both groups, consistent with each other (a lookup may run Python code)."""
        cdef Py_hash_t kh = PyObject_Hash(<PyObject*>key)
        cdef Py_hash_t ph
        cdef uint64_t v
        if kh == -1 and PyErr_Occurred() != NULL:
            return -1
        ph = PyObject_Hash(<PyObject*>pid)
        if ph == -1 and PyErr_Occurred() != NULL:
            return -1
        while True:
            v = self._version
            kgi[0] = self._find(&self._keys, <PyObject*>key, kh)
            pgi[0] = self._find(&self._pids, <PyObject*>pid, ph)
            if self._version == v:
                return 0

    cdef int _gt_reserve(self, GroupTable* gt) except -1:
        """Room for one more group: a free record, and index load at most 2/3 after it."""
        cdef int32_t first, i
        if gt.free < 0:
            first = _slab_grow(&gt.slab)
            if first < 0:
                raise MemoryError()
            for i in range(first, gt.slab.cap):
                _G(gt, i).obj = NULL
                _G(gt, i).next = i + 1 if i + 1 < gt.slab.cap else -1
            gt.free = first
            self._version += 1
        if (<uint64_t>gt.live + 1) * 3 > <uint64_t>gt.size * 2:
            if _gt_rehash(gt, gt.live + 1) < 0:
                raise MemoryError()
            self._version += 1
        return 0

    cdef int32_t _gt_add(self, GroupTable* gt, PyObject* obj, Py_hash_t h) noexcept:
        """Create the group of `obj` (known absent; `_gt_reserve` done) at the end of the order."""
        cdef int32_t gi = gt.free
        cdef Group* g = _G(gt, gi)
        cdef uint32_t s, fp
        gt.free = g.next
        Py_INCREF(obj)
        g.obj = obj
        g.hash = h
        g.head = -1
        g.tail = -1
        g.count = 0
        g.mark = 0
        g.arr = NULL
        g.acap = 0
        g.prev = gt.last
        g.next = -1
        if gt.last >= 0:
            _G(gt, gt.last).next = gi
        else:
            gt.first = gi
        gt.last = gi
        fp = _fingerprint(h)
        s = _home(fp, gt.bits)
        while gt.index[s].gi >= 0:
            s = (s + 1) & gt.mask
        gt.index[s].gi = gi
        gt.index[s].fp = fp
        gt.live += 1
        return gi

    cdef PyObject* _gt_remove(self, GroupTable* gt, int32_t gi) noexcept:
        """Delete an empty group; return its object (the reference passes to the caller)."""
        cdef Group* g = _G(gt, gi)
        cdef uint32_t i, j, k
        cdef PyObject* obj
        i = _home(_fingerprint(g.hash), gt.bits)
        while gt.index[i].gi != gi:
            i = (i + 1) & gt.mask
        # backward-shift deletion (Knuth 6.4, algorithm R): no tombstones, and the
        # fingerprints give every home slot without touching a group record
        j = i
        while True:
            j = (j + 1) & gt.mask
            if gt.index[j].gi < 0:
                break
            k = _home(gt.index[j].fp, gt.bits)
            # the entry at j may stay if its home slot k lies cyclically in (i, j]
            if i <= j:
                if i < k <= j:
                    continue
            elif k > i or k <= j:
                continue
            gt.index[i] = gt.index[j]
            i = j
        gt.index[i].gi = -1
        if g.prev >= 0:
            _G(gt, g.prev).next = g.next
        else:
            gt.first = g.next
        if g.next >= 0:
            _G(gt, g.next).prev = g.prev
        else:
            gt.last = g.prev
        obj = g.obj
        g.obj = NULL
        PyMem_Free(g.arr)
        g.arr = NULL
        g.acap = 0
        g.next = gt.free
        gt.free = gi
        gt.live -= 1
        self._version += 1
        if gt.size > 64 and <uint64_t>gt.live * 6 < gt.size:
            # shrink below load 1/6; if memory is short the bigger index simply stays
            _gt_rehash(gt, <int64_t>gt.live * 2)
        return obj

    # -- rows -------------------------------------------------------------------------

    cdef int _reserve_rows(self, Py_ssize_t n) except -1:
        """At least `n` free rows."""
        cdef int32_t first, i
        while <int64_t>self._rs.cap - self._n < n:
            first = _slab_grow(&self._rs)
            if first < 0:
                raise MemoryError()
            # new rows go to the front of the free list, lowest index first
            for i in range(first, self._rs.cap):
                _R(&self._rs, i).key = NULL
                _R(&self._rs, i).knext = i + 1 if i + 1 < self._rs.cap else self._rfree
            self._rfree = first
            self._version += 1
        return 0

    cdef inline void _key_append(self, int32_t ri, int32_t gi) noexcept:
        cdef Row* r = _R(&self._rs, ri)
        cdef Group* g = _G(&self._keys, gi)
        r.kg = gi
        r.kprev = g.tail
        r.knext = -1
        if g.tail >= 0:
            _R(&self._rs, g.tail).knext = ri
        else:
            g.head = ri
        g.tail = ri
        g.count += 1
        self._stamp += 1
        r.stamp = self._stamp

    cdef inline void _key_unlink(self, int32_t ri) noexcept:
        cdef Row* r = _R(&self._rs, ri)
        cdef Group* g = _G(&self._keys, r.kg)
        if r.kprev >= 0:
            _R(&self._rs, r.kprev).knext = r.knext
        else:
            g.head = r.knext
        if r.knext >= 0:
            _R(&self._rs, r.knext).kprev = r.kprev
        else:
            g.tail = r.kprev
        g.count -= 1

    cdef inline void _unindex(self, int32_t ri) noexcept:
        """Take row `ri` out of its key group's `arr`: the last row of `arr` takes its place."""
        cdef Row* r = _R(&self._rs, ri)
        cdef Group* g = _G(&self._keys, r.kg)
        cdef int32_t last
        cdef int32_t* smaller
        if g.arr == NULL:  # the group's only row: the group goes with it
            return
        last = g.arr[g.count - 1]
        g.arr[r.kpos] = last
        _R(&self._rs, last).kpos = r.kpos
        if g.acap > 64 and (g.count - 1) * 4 < g.acap:
            # shrink to twice the rows left; if memory is short the bigger array stays
            smaller = <int32_t*>PyMem_Realloc(g.arr, <size_t>(g.acap // 2) * sizeof(int32_t))
            if smaller != NULL:
                g.arr = smaller
                g.acap = g.acap // 2

    cdef inline void _pid_append(self, int32_t ri, int32_t gi) noexcept:
        cdef Row* r = _R(&self._rs, ri)
        cdef Group* g = _G(&self._pids, gi)
        r.pg = gi
        r.pprev = g.tail
        r.pnext = -1
        if g.tail >= 0:
            _R(&self._rs, g.tail).pnext = ri
        else:
            g.head = ri
        g.tail = ri
        g.count += 1

    cdef inline void _pid_unlink(self, int32_t ri) noexcept:
        cdef Row* r = _R(&self._rs, ri)
        cdef Group* g = _G(&self._pids, r.pg)
        if r.pprev >= 0:
            _R(&self._rs, r.pprev).pnext = r.pnext
        else:
            g.head = r.pnext
        if r.pnext >= 0:
            _R(&self._rs, r.pnext).pprev = r.pprev
        else:
            g.tail = r.pprev
        g.count -= 1

    cdef void _take_row(self, int32_t ri, PtrBuf* dead, PyObject** key_out,
                        PyObject** value_out) noexcept:
        """Unlink and free row `ri`, deleting groups it leaves empty.

        The row's key and value references go to `*key_out`/`*value_out` when given,
        else to `dead`, as do its pid reference and the objects of deleted groups: the
        caller releases `dead` once the table is consistent (it reserved 4 slots).
        """
        cdef Row* r = _R(&self._rs, ri)
        cdef int32_t kg = r.kg
        cdef int32_t pg = r.pg
        self._grave_keep(r.key)
        self._grave_keep(r.pid)
        self._grave_keep(r.value)
        if key_out != NULL:
            key_out[0] = r.key
        else:
            _pb_push(dead, r.key)
        if value_out != NULL:
            value_out[0] = r.value
        else:
            _pb_push(dead, r.value)
        _pb_push(dead, r.pid)
        self._unindex(ri)
        self._key_unlink(ri)
        self._pid_unlink(ri)
        r.key = NULL
        r.pid = NULL
        r.value = NULL
        r.knext = self._rfree
        self._rfree = ri
        self._n -= 1
        if _G(&self._keys, kg).count == 0:
            _pb_push(dead, self._gt_remove(&self._keys, kg))
        if _G(&self._pids, pg).count == 0:
            _pb_push(dead, self._gt_remove(&self._pids, pg))
        self._version += 1

    cdef int _rows_of(self, int32_t kgi, int32_t pgi, RecBuf* out) except -1:
        """Append the rows of pid group `pgi` under key group `kgi`, in key order.

        Walks the shorter list; hits from the pid list are sorted by stamp. Only
        ``ri``, ``tag`` and ``stamp`` are filled (no references). Pure C.
        """
        cdef int32_t ri
        cdef Row* r
        cdef Rec* rec
        cdef Py_ssize_t start = out.n
        cdef bint by_key = _G(&self._keys, kgi).count <= _G(&self._pids, pgi).count
        ri = _G(&self._keys, kgi).head if by_key else _G(&self._pids, pgi).head
        while ri >= 0:
            r = _R(&self._rs, ri)
            if (r.pg == pgi) if by_key else (r.kg == kgi):
                _rb_reserve(out, out.n + 1)
                r = _R(&self._rs, ri)
                rec = _rb_push(out)
                rec.ri = ri
                rec.tag = r.tag
                rec.stamp = r.stamp
            ri = r.knext if by_key else r.pnext
        if not by_key and out.n - start > 1:
            _sort_recs(out, start)
        return 0

    cdef int32_t _find_row(self, int32_t kgi, int32_t pgi, int64_t tag) noexcept:
        """The row ``(key, pid, tag)``; the first in key order should tags repeat. -1 if none."""
        cdef int32_t ri, best = -1
        cdef Row* r
        if _G(&self._keys, kgi).count <= _G(&self._pids, pgi).count:
            ri = _G(&self._keys, kgi).head
            while ri >= 0:
                r = _R(&self._rs, ri)
                if r.tag == tag and r.pg == pgi:
                    return ri
                ri = r.knext
            return -1
        ri = _G(&self._pids, pgi).head
        while ri >= 0:
            r = _R(&self._rs, ri)
            if r.tag == tag and r.kg == kgi and (best < 0 or r.stamp < _R(&self._rs, best).stamp):
                best = ri
            ri = r.pnext
        return best

    cdef void _move_to_key_end(self, int32_t ri) noexcept:
        cdef int32_t kg = _R(&self._rs, ri).kg
        self._key_unlink(ri)
        self._key_append(ri, kg)

    cdef void _shrink(self) noexcept:
        """Give memory back once removals have emptied most of a big slab.

        Called at the end of a removal, never inside its loop (it renumbers rows). A
        slab is compacted when under a quarter of it is live, so the pass is paid for by
        the removals since it was last full. Pure C; if memory is short nothing happens.
        """
        if self._rs.cap >= _SHRINK_MIN and <int64_t>self._n * 4 < self._rs.cap:
            self._compact_rows()
        if self._keys.slab.cap >= _SHRINK_MIN and <int64_t>self._keys.live * 4 < self._keys.slab.cap:
            self._compact_groups(&self._keys, True)
        if self._pids.slab.cap >= _SHRINK_MIN and <int64_t>self._pids.live * 4 < self._pids.slab.cap:
            self._compact_groups(&self._pids, False)

    cdef void _compact_rows(self) noexcept:
        cdef Slab ns
        cdef int32_t* renum = <int32_t*>PyMem_Malloc(<size_t>self._rs.cap * sizeof(int32_t))
        cdef int32_t i, j = 0
        cdef Row* r
        if renum == NULL:
            return
        if _slab_reserve(&ns, sizeof(Row), self._n) < 0:
            _slab_free(&ns)
            PyMem_Free(renum)
            return
        # live rows keep their relative place in memory (scans stay sequential)
        for i in range(self._rs.cap):
            r = _R(&self._rs, i)
            if r.key != NULL:
                renum[i] = j
                _R(&ns, j)[0] = r[0]
                j += 1
        for i in range(j):
            r = _R(&ns, i)
            r.kprev = renum[r.kprev] if r.kprev >= 0 else -1
            r.knext = renum[r.knext] if r.knext >= 0 else -1
            r.pprev = renum[r.pprev] if r.pprev >= 0 else -1
            r.pnext = renum[r.pnext] if r.pnext >= 0 else -1
        _renumber_heads(&self._keys, renum)
        _renumber_heads(&self._pids, renum)
        _renumber_arrays(&self._keys, renum)
        for i in range(j, ns.cap):
            _R(&ns, i).key = NULL
            _R(&ns, i).knext = i + 1 if i + 1 < ns.cap else -1
        PyMem_Free(renum)
        _slab_free(&self._rs)
        self._rs = ns
        self._rfree = j if j < ns.cap else -1
        self._version += 1

    cdef void _compact_groups(self, GroupTable* gt, bint of_keys) noexcept:
        cdef GroupTable ngt
        cdef int32_t* renum = <int32_t*>PyMem_Malloc(<size_t>gt.slab.cap * sizeof(int32_t))
        cdef int32_t i, j = 0
        cdef Group* g
        self._last_pg = -1
        cdef Index idx
        cdef Row* r
        if renum == NULL:
            return
        _gt_init(&ngt)
        if _slab_reserve(&ngt.slab, sizeof(Group), gt.live) < 0:
            _slab_free(&ngt.slab)
            PyMem_Free(renum)
            return
        for i in range(gt.slab.cap):
            g = _G(gt, i)
            if g.obj != NULL:
                renum[i] = j
                _G(&ngt, j)[0] = g[0]
                j += 1
        for i in range(j):
            g = _G(&ngt, i)
            g.prev = renum[g.prev] if g.prev >= 0 else -1
            g.next = renum[g.next] if g.next >= 0 else -1
        ngt.first = renum[gt.first] if gt.first >= 0 else -1
        ngt.last = renum[gt.last] if gt.last >= 0 else -1
        ngt.live = gt.live
        # the new index is the last allocation: after it nothing can fail
        if _build_index(&ngt, <int64_t>gt.live * 2, &idx) < 0:
            _slab_free(&ngt.slab)
            PyMem_Free(renum)
            return
        for i in range(self._rs.cap):
            r = _R(&self._rs, i)
            if r.key != NULL:
                if of_keys:
                    r.kg = renum[r.kg]
                else:
                    r.pg = renum[r.pg]
        for i in range(j, ngt.slab.cap):
            _G(&ngt, i).obj = NULL
            _G(&ngt, i).next = i + 1 if i + 1 < ngt.slab.cap else -1
        ngt.free = j if j < ngt.slab.cap else -1
        _set_index(&ngt, &idx)
        PyMem_Free(renum)
        _slab_free(&gt.slab)
        PyMem_Free(gt.index)
        gt[0] = ngt
        self._version += 1

    # -- writes -----------------------------------------------------------------------

    def insert(self, key, pid, value, tag_):
        """Append a row at the end of its key order and pid order.

        Returns True if it is the first row of `pid` (the caller then watches the pid).
        """
        cdef int64_t tag = _as_tag(tag_)
        return self._insert(key, pid, -1, value, tag) == 1

    def insert_flat(self, pid, list flat not None):
        """`insert` of each ``key, value, tag`` triple of `flat` for `pid`, in order (a sync
        part's rows, without a Python call or tuple per row); True if the first was the
        first row of `pid`. A failing row raises and leaves the rows before it inserted,
        as the same `insert` calls would."""
        cdef Py_ssize_t i = 0
        cdef Py_hash_t ph
        cdef int64_t tag
        cdef int r
        cdef bint first = False
        cdef object key, value
        if PyList_GET_SIZE(<PyObject*>flat) % 3:
            raise ValueError("insert_flat takes key, value, tag triples")
        ph = PyObject_Hash(<PyObject*>pid)
        if ph == -1 and PyErr_Occurred() != NULL:
            _propagate()
        while i + 2 < PyList_GET_SIZE(<PyObject*>flat):
            if i % (3 * _PREFETCH_ROWS) == 0:
                self._prefetch_keys(flat, i)
            key = <object>PyList_GET_ITEM(<PyObject*>flat, i)
            value = <object>PyList_GET_ITEM(<PyObject*>flat, i + 1)
            tag = _as_tag(<object>PyList_GET_ITEM(<PyObject*>flat, i + 2))
            r = self._insert(key, pid, ph, value, tag)
            if i == 0:
                first = r == 1
            i += 3
        return first

    cdef void _prefetch_keys(self, list flat, Py_ssize_t i) noexcept:
        """Start fetching the key-index slots of the next `_PREFETCH_ROWS` rows of `flat`
        from row `i` on: in a large table each is a cache (and TLB) miss, and fetched
        together they overlap instead of queueing. Only str and int keys (their hash
        runs no Python code and cannot fail; a str keeps it for the insert)."""
        cdef Py_ssize_t j, end = PyList_GET_SIZE(<PyObject*>flat)
        cdef PyObject* k
        cdef Py_hash_t h
        if self._keys.index == NULL or self._keys.size < 4096:
            return
        if end > i + 3 * _PREFETCH_ROWS:
            end = i + 3 * _PREFETCH_ROWS
        j = i
        while j + 2 < end:
            k = PyList_GET_ITEM(<PyObject*>flat, j)
            if PyUnicode_CheckExact(k) or PyLong_CheckExact(k):
                h = PyObject_Hash(k)
                pgr_prefetch(&self._keys.index[_home(_fingerprint(h), self._keys.bits)])
            j += 3

    cdef inline int32_t _last_pid_group(self, object pid) noexcept:
        """The group of the pid of the last insert if `pid` is that very object, else -1.

        A group holds the object it was made with, so identity proves it is `pid`'s group
        (a process's writes pass the same pid object each time: no hash, no lookup).
        """
        cdef int32_t pg = self._last_pg
        if pg >= 0 and pg < self._pids.slab.cap and _G(&self._pids, pg).obj == <PyObject*>pid:
            return pg
        return -1

    cdef int _insert(self, object key, object pid, Py_hash_t ph, object value, int64_t tag) except -1:
        """`insert`, given the pid's hash or -1 (not computed yet): 1 if it made the pid's
        first row, else 0."""
        cdef Py_hash_t kh = PyObject_Hash(<PyObject*>key)
        cdef int32_t kgi, pgi, ri
        cdef uint64_t v
        cdef Row* r
        cdef Group* g
        cdef bint first
        cdef int32_t* arr = NULL
        if kh == -1 and PyErr_Occurred() != NULL:
            _propagate()
        while True:
            v = self._version
            kgi = self._find(&self._keys, <PyObject*>key, kh)
            pgi = self._last_pid_group(pid)
            if pgi < 0:
                if ph == -1:
                    ph = PyObject_Hash(<PyObject*>pid)
                    if ph == -1 and PyErr_Occurred() != NULL:
                        _propagate()
                pgi = self._find(&self._pids, <PyObject*>pid, ph)
            if self._version == v:
                break
        # everything that can fail happens before the first change
        self._reserve_rows(1)
        if kgi < 0:
            self._gt_reserve(&self._keys)
        if pgi < 0:
            self._gt_reserve(&self._pids)
        if kgi >= 0:
            # a group's first row needs no array (see "Index order"); a second one does
            g = _G(&self._keys, kgi)
            if g.arr == NULL:
                arr = <int32_t*>PyMem_Malloc(4 * sizeof(int32_t))
                if arr == NULL:
                    raise MemoryError()
                arr[0] = g.head  # the only row, at place 0
                g.arr = arr
                g.acap = 4
            elif g.count == g.acap:
                if g.acap >= INT32_MAX // 2:
                    raise MemoryError()
                arr = <int32_t*>PyMem_Realloc(g.arr, <size_t>g.acap * 2 * sizeof(int32_t))
                if arr == NULL:
                    raise MemoryError()
                g.arr = arr  # the realloc moved the array: nothing else has changed
                g.acap *= 2
        first = pgi < 0
        if kgi < 0:
            kgi = self._gt_add(&self._keys, <PyObject*>key, kh)
        if pgi < 0:
            pgi = self._gt_add(&self._pids, <PyObject*>pid, ph)
        ri = self._rfree
        r = _R(&self._rs, ri)
        self._rfree = r.knext
        Py_INCREF(<PyObject*>key)
        Py_INCREF(<PyObject*>pid)
        Py_INCREF(<PyObject*>value)
        r.key = <PyObject*>key
        r.pid = <PyObject*>pid
        r.value = <PyObject*>value
        r.tag = tag
        self._key_append(ri, kgi)
        g = _G(&self._keys, kgi)
        r.kpos = g.count - 1
        if g.arr != NULL:
            g.arr[r.kpos] = ri
        self._pid_append(ri, pgi)
        self._n += 1
        self._version += 1
        self._last_pg = pgi
        return 1 if first else 0

    def pop(self, key, pid, tag_, default=None):
        """Remove the row ``(key, pid, tag)``; return its value, or `default` if absent."""
        cdef int32_t kgi, pgi, ri
        cdef PyObject* value
        cdef PtrBuf dead
        cdef int64_t tag = _as_tag(tag_)
        self._find_pair(key, pid, &kgi, &pgi)
        if kgi < 0 or pgi < 0:
            return default
        ri = self._find_row(kgi, pgi, tag)
        if ri < 0:
            return default
        self._grave_room(3)
        _pb_init(&dead)
        self._take_row(ri, &dead, NULL, &value)
        self._shrink()
        _pb_free(&dead)
        return _own(value)

    def pop_latest(self, key, pid):
        """Remove the row of `pid` under `key` with the highest tag; ``(tag, value)`` or None.

        Should two such rows share a tag (the caller keeps tags unique), the first in
        key order goes.
        """
        cdef int32_t kgi, pgi, ri, best = -1
        cdef Row* r
        cdef bint by_key
        cdef PyObject* value
        cdef int64_t tag
        cdef PtrBuf dead
        self._find_pair(key, pid, &kgi, &pgi)
        if kgi < 0 or pgi < 0:
            return None
        by_key = _G(&self._keys, kgi).count <= _G(&self._pids, pgi).count
        ri = _G(&self._keys, kgi).head if by_key else _G(&self._pids, pgi).head
        while ri >= 0:
            r = _R(&self._rs, ri)
            if (r.pg == pgi) if by_key else (r.kg == kgi):
                if (best < 0 or r.tag > _R(&self._rs, best).tag
                        or (r.tag == _R(&self._rs, best).tag and r.stamp < _R(&self._rs, best).stamp)):
                    best = ri
            ri = r.knext if by_key else r.pnext
        if best < 0:
            return None
        tag = _R(&self._rs, best).tag
        self._grave_room(3)
        _pb_init(&dead)
        self._take_row(best, &dead, NULL, &value)
        self._shrink()
        _pb_free(&dead)
        return (tag, _own(value))

    def pop_pid(self, pid):
        """Remove every row of `pid`; return ``[(key, value, tag)]`` in pid order.

        Costs O(rows of pid), never O(table).
        """
        cdef int32_t pgi, ri, nxt
        cdef Py_ssize_t n
        cdef RecBuf out
        cdef PtrBuf dead
        cdef Rec* rec
        pgi = self._find_obj(&self._pids, pid)
        if pgi < 0:
            return []
        n = _G(&self._pids, pgi).count
        _rb_init(&out)
        _pb_init(&dead)
        try:
            _rb_reserve(&out, n)
            _pb_reserve(&dead, 2 * n + 2)
            self._grave_room(3 * n)
            ri = _G(&self._pids, pgi).head
            while ri >= 0:
                nxt = _R(&self._rs, ri).pnext
                rec = _rb_push(&out)
                rec.tag = _R(&self._rs, ri).tag
                self._take_row(ri, &dead, &rec.a, &rec.b)
                ri = nxt
            self._shrink()
            return _build_list(&out, SH_ABT)
        finally:
            _rb_free(&out)
            _pb_free(&dead)

    def pop_match(self, key, pid, Matcher matcher not None):
        """Remove the rows of `pid` under `key` whose row matches; ``[(tag, value)]`` in key order."""
        cdef int32_t kgi, pgi, ri
        cdef Py_ssize_t i, hits
        cdef int attempt = 0
        cdef uint64_t v
        cdef RecBuf cand
        cdef PtrBuf dead
        cdef Scratch s
        cdef Frame f
        cdef Rec* rec
        cdef Row* r
        cdef Py_ssize_t matched
        _rb_init(&cand)
        _pb_init(&dead)
        _scratch_init(&s, matcher)
        try:
            while True:
                _rb_clear(&cand)
                v = self._version
                self._find_pair(key, pid, &kgi, &pgi)
                self._resolve(matcher, &s)
                if self._version != v:
                    continue
                if kgi < 0 or pgi < 0:
                    return []
                # snapshot the candidates (pure C), then evaluate them: evaluation may
                # run Python code, and must never see the table half-changed
                self._rows_of(kgi, pgi, &cand)
                for i in range(cand.n):
                    rec = &cand.r[i]
                    r = _R(&self._rs, rec.ri)
                    rec.a = r.key
                    rec.b = r.pid
                    rec.c = r.value
                    rec.kg = r.kg
                    rec.pg = r.pg
                    Py_INCREF(rec.a)
                    Py_INCREF(rec.b)
                    Py_INCREF(rec.c)
                _frame_init(&f, &s)
                for i in range(cand.n):
                    rec = &cand.r[i]
                    _frame_row(&f, rec.a, rec.b, rec.c, rec.kg, rec.pg)
                    matched = 0
                    if matcher._visit(&f, MODE_COUNT, NULL, &matched) < 0:
                        _propagate()
                    rec.flag = <int32_t>matched
                if self._version == v or attempt >= 3:
                    break
                attempt += 1
            hits = 0
            for i in range(cand.n):
                hits += cand.r[i].flag
            if hits == 0:
                return []
            _pb_reserve(&dead, 5 * hits)
            self._grave_room(3 * hits)
            for i in range(cand.n):
                rec = &cand.r[i]
                if not rec.flag:
                    continue
                # only if the table changed under a re-entrant write can a candidate
                # be gone, renumbered (compaction) or different: then it is left alone
                if rec.ri >= self._rs.cap:
                    rec.flag = 0
                    continue
                r = _R(&self._rs, rec.ri)
                if (r.key == NULL or r.kg != rec.kg or r.pg != rec.pg or r.tag != rec.tag
                        or r.value != rec.c):
                    rec.flag = 0
                    continue
                self._take_row(rec.ri, &dead, NULL, NULL)
            self._shrink()
            for i in range(cand.n):
                # the result is (tag, value): keep only the value's reference
                rec = &cand.r[i]
                Py_XDECREF(rec.a)
                Py_XDECREF(rec.b)
                rec.a = rec.c
                rec.b = NULL
                rec.c = NULL
            return _build_list(&cand, SH_TA, 0, 1)
        finally:
            _rb_free(&cand)
            _pb_free(&dead)
            _scratch_free(&s)

    def update(self, key, pid, value):
        """Set the value of every row of `pid` under `key`; move them to the end of the key order.

        Returns ``[(tag, old_value)]`` in their former key order; empty if none.
        """
        cdef int32_t kgi, pgi, ri
        cdef Py_ssize_t i
        cdef RecBuf out
        cdef Rec* rec
        cdef Row* r
        self._find_pair(key, pid, &kgi, &pgi)
        if kgi < 0 or pgi < 0:
            return []
        _rb_init(&out)
        try:
            self._rows_of(kgi, pgi, &out)
            if out.n == 0:
                return []
            self._grave_room(out.n)
            for i in range(out.n):
                rec = &out.r[i]
                r = _R(&self._rs, rec.ri)
                self._grave_keep(r.value)
                rec.a = r.value         # the old value's reference moves to the result
                Py_INCREF(<PyObject*>value)
                r.value = <PyObject*>value
                self._move_to_key_end(rec.ri)
            self._version += 1
            return _build_list(&out, SH_TA)
        finally:
            _rb_free(&out)

    def update_row(self, key, pid, tag_, value, default=None):
        """Set the value of the row ``(key, pid, tag)`` and move it to the end of its key order.

        Returns the old value, or `default` (changing nothing) if there is no such row.
        """
        cdef int32_t kgi, pgi, ri
        cdef PyObject* old
        cdef int64_t tag = _as_tag(tag_)
        self._find_pair(key, pid, &kgi, &pgi)
        if kgi < 0 or pgi < 0:
            return default
        ri = self._find_row(kgi, pgi, tag)
        if ri < 0:
            return default
        self._grave_room(1)
        old = _R(&self._rs, ri).value
        self._grave_keep(old)
        Py_INCREF(<PyObject*>value)
        _R(&self._rs, ri).value = <PyObject*>value
        self._move_to_key_end(ri)
        self._version += 1
        return _own(old)

    def clear(self):
        """Remove every row."""
        cdef Slab rows = self._rs
        cdef GroupTable keys = self._keys
        cdef GroupTable pids = self._pids
        cdef int32_t i
        cdef Row* r
        if self._scans > 0:
            self._grave_room(3 * self._n)
            for i in range(rows.cap):
                r = _R(&rows, i)
                if r.key != NULL:
                    self._grave_keep(r.key)
                    self._grave_keep(r.pid)
                    self._grave_keep(r.value)
        # the table is empty and consistent before the first reference is released
        _slab_init(&self._rs, sizeof(Row))
        self._rfree = -1
        self._n = 0
        _gt_init(&self._keys)
        _gt_init(&self._pids)
        self._last_pg = -1
        self._version += 1
        _release(&rows, &keys, &pids)

    # -- reads ------------------------------------------------------------------------
    # Each read copies the references it needs in one pure-C pass after its lookups,
    # then builds its result from the copy.

    cdef int _collect_key(self, object key, RecBuf* out) except -1:
        """(pid, value[, tag]) of every row of `key`, in key order."""
        cdef int32_t kgi = self._find_obj(&self._keys, key)
        cdef int32_t ri
        cdef Row* r
        cdef Rec* rec
        if kgi < 0:
            return 0
        _rb_reserve(out, _G(&self._keys, kgi).count)
        ri = _G(&self._keys, kgi).head
        while ri >= 0:
            r = _R(&self._rs, ri)
            rec = _rb_push(out)
            rec.a = r.pid
            rec.b = r.value
            Py_INCREF(rec.a)
            Py_INCREF(rec.b)
            rec.tag = r.tag
            ri = r.knext
        return 0

    def lookup(self, key):
        """``[(pid, value)]`` of `key` in key order; ``[]`` if none."""
        cdef RecBuf out
        _rb_init(&out)
        try:
            self._collect_key(key, &out)
            return _build_list(&out, SH_AB)
        finally:
            _rb_free(&out)

    def pids(self, key):
        """The pid of each row of `key`, in key order (a pid repeats once per row)."""
        cdef RecBuf out
        _rb_init(&out)
        try:
            self._collect_key(key, &out)
            return _build_list(&out, SH_A)
        finally:
            _rb_free(&out)

    def entries(self, key):
        """``[(pid, value, tag)]`` of `key` in key order."""
        cdef RecBuf out
        _rb_init(&out)
        try:
            self._collect_key(key, &out)
            return _build_list(&out, SH_ABT)
        finally:
            _rb_free(&out)

    def values(self, key, pid):
        """Values of the rows of `pid` under `key`, in key order."""
        cdef int32_t kgi, pgi
        cdef Py_ssize_t i
        cdef RecBuf out
        self._find_pair(key, pid, &kgi, &pgi)
        if kgi < 0 or pgi < 0:
            return []
        _rb_init(&out)
        try:
            self._rows_of(kgi, pgi, &out)
            for i in range(out.n):
                out.r[i].a = _R(&self._rs, out.r[i].ri).value
                Py_INCREF(out.r[i].a)
            return _build_list(&out, SH_A)
        finally:
            _rb_free(&out)

    def keys(self, pid):
        """Distinct keys of `pid`'s rows, in pid order of their first row."""
        cdef int32_t pgi = self._find_obj(&self._pids, pid)
        cdef int32_t ri, i
        cdef Row* r
        cdef Rec* rec
        cdef Group* g
        cdef RecBuf out
        if pgi < 0:
            return []
        _rb_init(&out)
        try:
            _rb_reserve(&out, _G(&self._pids, pgi).count)
            # a group marked with this call's epoch has been reported already
            self._epoch += 1
            if self._epoch == 0:
                for i in range(self._keys.slab.cap):
                    _G(&self._keys, i).mark = 0
                self._epoch = 1
            ri = _G(&self._pids, pgi).head
            while ri >= 0:
                r = _R(&self._rs, ri)
                g = _G(&self._keys, r.kg)
                if g.mark != self._epoch:
                    g.mark = self._epoch
                    rec = _rb_push(&out)
                    rec.a = r.key
                    Py_INCREF(rec.a)
                ri = r.pnext
            return _build_list(&out, SH_A)
        finally:
            _rb_free(&out)

    def pid_entries(self, pid):
        """``[(key, value, tag)]`` of `pid` in pid order."""
        cdef int32_t pgi = self._find_obj(&self._pids, pid)
        cdef int32_t ri
        cdef Row* r
        cdef Rec* rec
        cdef RecBuf out
        if pgi < 0:
            return []
        _rb_init(&out)
        try:
            _rb_reserve(&out, _G(&self._pids, pgi).count)
            ri = _G(&self._pids, pgi).head
            while ri >= 0:
                r = _R(&self._rs, ri)
                rec = _rb_push(&out)
                rec.a = r.key
                rec.b = r.value
                Py_INCREF(rec.a)
                Py_INCREF(rec.b)
                rec.tag = r.tag
                ri = r.pnext
            return _build_list(&out, SH_ABT)
        finally:
            _rb_free(&out)

    def owners(self):
        """Distinct pids that have rows, in pid-group order (like `groups` for keys)."""
        return _group_objects(&self._pids)

    def pid_rows_flat(self, pid):
        """``[key, value, tag, key, value, tag, ...]`` of `pid` in pid order (no tuples)."""
        cdef int32_t pgi = self._find_obj(&self._pids, pid)
        cdef int32_t ri
        cdef Py_ssize_t i = 0
        cdef Row* r
        cdef list out
        if pgi < 0:
            return []
        out = [None] * (3 * <Py_ssize_t>_G(&self._pids, pgi).count)
        ri = _G(&self._pids, pgi).head
        while ri >= 0:
            r = _R(&self._rs, ri)
            out[i] = <object>r.key
            out[i + 1] = <object>r.value
            out[i + 2] = r.tag
            i += 3
            ri = r.pnext
        return out

    def groups(self):
        """Distinct keys, in group order."""
        return _group_objects(&self._keys)

    def count_key(self, key):
        cdef int32_t kgi = self._find_obj(&self._keys, key)
        return _G(&self._keys, kgi).count if kgi >= 0 else 0

    def count_pid(self, pid):
        cdef int32_t pgi = self._find_obj(&self._pids, pid)
        return _G(&self._pids, pgi).count if pgi >= 0 else 0

    cdef object _row_pair(self, int32_t ri):
        """``(pid, value)`` of row `ri`: both references taken before anything is allocated."""
        cdef Row* r = _R(&self._rs, ri)
        cdef object pid = <object>r.pid
        cdef object value = <object>r.value
        return (pid, value)

    def at(self, key, Py_ssize_t i):
        """``(pid, value)`` of the row at place `i` of `key`'s index order; None if out of range."""
        cdef int32_t kgi = self._find_obj(&self._keys, key)
        cdef Group* g
        if kgi < 0:
            return None
        g = _G(&self._keys, kgi)
        if i < 0 or i >= g.count:
            return None
        return self._row_pair(g.arr[i] if g.arr != NULL else g.head)

    def first(self, key):
        """``(pid, value)`` of the first row of `key` in key order (the oldest); None if none."""
        cdef int32_t kgi = self._find_obj(&self._keys, key)
        if kgi < 0:
            return None
        return self._row_pair(_G(&self._keys, kgi).head)

    def last(self, key):
        """``(pid, value)`` of the last row of `key` in key order (the newest); None if none."""
        cdef int32_t kgi = self._find_obj(&self._keys, key)
        if kgi < 0:
            return None
        return self._row_pair(_G(&self._keys, kgi).tail)

    cdef int _collect_all(self, RecBuf* out, bint headers) except -1:
        """Every row (key, pid, value, tag), keys in group order, rows in key order.

        With `headers`, each group is preceded by a record ``flag=1, a=group key,
        tag=count``.
        """
        cdef int32_t gi, ri
        cdef Row* r
        cdef Rec* rec
        _rb_reserve(out, self._n + (self._keys.live if headers else 0))
        gi = self._keys.first
        while gi >= 0:
            if headers:
                rec = _rb_push(out)
                rec.flag = 1
                rec.a = _G(&self._keys, gi).obj
                Py_INCREF(rec.a)
                rec.tag = _G(&self._keys, gi).count
            ri = _G(&self._keys, gi).head
            while ri >= 0:
                r = _R(&self._rs, ri)
                rec = _rb_push(out)
                rec.a = r.key
                rec.b = r.pid
                rec.c = r.value
                Py_INCREF(rec.a)
                Py_INCREF(rec.b)
                Py_INCREF(rec.c)
                rec.tag = r.tag
                rec.kg = r.kg
                rec.pg = r.pg
                ri = r.knext
            gi = _G(&self._keys, gi).next
        return 0

    def snapshot(self):
        """``{key: [(pid, value)]}`` in group order, lists in key order."""
        cdef RecBuf out
        cdef Py_ssize_t i, j, n
        cdef Rec* rec
        cdef PyObject* item
        cdef PyObject* lst
        cdef dict result = {}
        cdef int r
        _rb_init(&out)
        try:
            self._collect_all(&out, True)
            i = 0
            while i < out.n:
                n = out.r[i].tag
                lst = PyList_New(n)
                if lst == NULL:
                    _propagate()
                for j in range(n):
                    # a row record is (key, pid, value): the list wants (pid, value)
                    rec = &out.r[i + 1 + j]
                    Py_XDECREF(rec.a)
                    rec.a = rec.b
                    rec.b = rec.c
                    rec.c = NULL
                    item = _make_item(rec, SH_AB)
                    if item == NULL:
                        Py_DECREF(lst)
                        _propagate()
                    PyList_SET_ITEM(lst, j, item)
                r = PyDict_SetItem(<PyObject*>result, out.r[i].a, lst)
                Py_DECREF(lst)
                if r < 0:
                    _propagate()
                i += n + 1
            return result
        finally:
            _rb_free(&out)

    def rows(self):
        """Every row ``(key, pid, value, tag)``: keys in group order, rows in key order."""
        cdef RecBuf out
        _rb_init(&out)
        try:
            self._collect_all(&out, False)
            return _build_list(&out, SH_ABCT)
        finally:
            _rb_free(&out)

    # -- match specs ------------------------------------------------------------------

    cdef int _resolve(self, Matcher m, Scratch* s) except -1:
        """Find the group of every clause's literal key and pid (-1: no such group)."""
        cdef Py_ssize_t ci
        cdef _Clause c
        for ci in range(m._n):
            c = <_Clause>PyTuple_GET_ITEM(<PyObject*>m._compiled, ci)
            s.lit_kg[ci] = -1
            s.lit_pg[ci] = -1
            if c.kmode == HEAD_LIT and c.khashable:
                s.lit_kg[ci] = self._find(&self._keys, <PyObject*>c.klit, c.khash)
            if c.pmode == HEAD_LIT and c.phashable:
                s.lit_pg[ci] = self._find(&self._pids, <PyObject*>c.plit, c.phash)
        return 0

    cdef Py_ssize_t _plan_groups(self, Matcher m, Scratch* s, int plan) noexcept:
        """The distinct groups of the clauses' literals in clause order, into ``s.plan``."""
        cdef Py_ssize_t ci, j, n = 0
        cdef int32_t gi
        cdef int32_t* lits = s.lit_kg if plan == PLAN_KEYS else s.lit_pg
        for ci in range(m._n):
            gi = lits[ci]
            if gi < 0:
                continue
            for j in range(n):
                if s.plan[j] == gi:
                    break
            else:
                s.plan[n] = gi
                n += 1
        return n

    cdef int _walk(self, Matcher m, Frame* f, int mode, PyObject* out, Py_ssize_t* count,
                   int32_t* plan, Py_ssize_t nplan, int by, uint64_t v0) noexcept:
        """Evaluate rows in place: 1 done, 0 the table changed (start again), -1 error.

        `by`: PLAN_KEYS walks the key groups in `plan`, PLAN_PIDS the pid groups in
        `plan`, PLAN_ALL every key group in group order.
        """
        cdef int32_t gi, ri, nxt
        cdef Py_ssize_t p = 0
        cdef Row* r
        cdef PyObject* key
        cdef PyObject* pid
        cdef PyObject* value
        cdef int res
        if by == PLAN_ALL:
            gi = self._keys.first
        else:
            gi = plan[0] if nplan > 0 else -1
        while gi >= 0:
            ri = _G(&self._pids, gi).head if by == PLAN_PIDS else _G(&self._keys, gi).head
            while ri >= 0:
                r = _R(&self._rs, ri)
                nxt = r.pnext if by == PLAN_PIDS else r.knext
                # borrowed: a change during the visit keeps them (`_grave_keep`)
                _frame_row(f, r.key, r.pid, r.value, r.kg, r.pg)
                res = m._visit(f, mode, out, count)
                if res < 0:
                    return -1
                if self._version != v0:
                    return 0
                ri = nxt
            if by == PLAN_ALL:
                gi = _G(&self._keys, gi).next
            else:
                p += 1
                gi = plan[p] if p < nplan else -1
        return 1

    cdef int _collect_plan(self, RecBuf* out, int32_t* plan, Py_ssize_t nplan, int by) except -1:
        """The rows `_walk` would visit, with references (pure C)."""
        cdef int32_t gi, ri
        cdef Py_ssize_t p, total = 0
        cdef Row* r
        cdef Rec* rec
        if by == PLAN_ALL:
            return self._collect_all(out, False)
        for p in range(nplan):
            total += _G(&self._pids, plan[p]).count if by == PLAN_PIDS else _G(&self._keys, plan[p]).count
        _rb_reserve(out, total)
        for p in range(nplan):
            gi = plan[p]
            ri = _G(&self._pids, gi).head if by == PLAN_PIDS else _G(&self._keys, gi).head
            while ri >= 0:
                r = _R(&self._rs, ri)
                rec = _rb_push(out)
                rec.a = r.key
                rec.b = r.pid
                rec.c = r.value
                Py_INCREF(rec.a)
                Py_INCREF(rec.b)
                Py_INCREF(rec.c)
                rec.kg = r.kg
                rec.pg = r.pg
                ri = r.pnext if by == PLAN_PIDS else r.knext
        return 0

    cdef object _scan(self, Matcher m, int mode, object key, bint one_key):
        """Run `m` over the rows of `key` (`one_key`) or over what its plan visits."""
        cdef Scratch s
        cdef Frame f
        cdef RecBuf snap
        cdef Py_hash_t kh = 0
        cdef int32_t kgi
        cdef Py_ssize_t nplan, i, count = 0
        cdef int by, res, attempt = 0
        cdef uint64_t v0
        cdef list out = None
        cdef PyObject* outp = NULL
        cdef Rec* rec
        if one_key:
            kh = PyObject_Hash(<PyObject*>key)
            if kh == -1 and PyErr_Occurred() != NULL:
                _propagate()
        _scratch_init(&s, m)
        _rb_init(&snap)
        try:
            while True:
                if mode == MODE_SELECT or mode == MODE_MATCH:
                    out = []
                    outp = <PyObject*>out
                count = 0
                v0 = self._version
                self._resolve(m, &s)
                if one_key:
                    by = PLAN_KEYS
                    kgi = self._find(&self._keys, <PyObject*>key, kh)
                    nplan = 0
                    if kgi >= 0:
                        s.plan[0] = kgi
                        nplan = 1
                else:
                    by = m._plan
                    nplan = self._plan_groups(m, &s, by) if by != PLAN_ALL else 0
                if self._version != v0:
                    continue
                _frame_init(&f, &s)
                if attempt < 2:
                    self._scans += 1
                    res = self._walk(m, &f, mode, outp, &count, s.plan, nplan, by, v0)
                    self._scan_end()
                    if res < 0:
                        _propagate()
                    if res == 0:
                        attempt += 1
                        continue
                else:
                    # the table keeps changing under us: evaluate a private copy, taken
                    # in pure C right after the consistent resolution above
                    self._collect_plan(&snap, s.plan, nplan, by)
                    for i in range(snap.n):
                        rec = &snap.r[i]
                        _frame_row(&f, rec.a, rec.b, rec.c, rec.kg, rec.pg)
                        if m._visit(&f, mode, outp, &count) < 0:
                            _propagate()
                break
            if mode == MODE_SELECT or mode == MODE_MATCH:
                return out
            return count
        finally:
            _rb_free(&snap)
            _scratch_free(&s)

    def match(self, key, Matcher matcher not None):
        """``[(pid, value)]`` of the rows of `key` that match, in key order."""
        return self._scan(matcher, MODE_MATCH, key, True)

    def count_match(self, key, Matcher matcher not None):
        return self._scan(matcher, MODE_COUNT, key, True)

    def select(self, Matcher matcher not None):
        """The body result of every row that matches a clause (see the module docstring)."""
        _need_bodies(matcher, "select")
        return self._scan(matcher, MODE_SELECT, None, False)

    def count_select(self, Matcher matcher not None):
        """How many rows' body result ``is True``."""
        _need_bodies(matcher, "count_select")
        return self._scan(matcher, MODE_COUNT_SELECT, None, False)


# ======================================================================================
# Module-level helpers of the table
# ======================================================================================

cdef inline void _frame_init(Frame* f, Scratch* s) noexcept:
    f.slots = s.slots
    f.nslots = 0
    f.lit_kg = s.lit_kg
    f.lit_pg = s.lit_pg


cdef inline void _frame_row(Frame* f, PyObject* key, PyObject* pid, PyObject* value,
                            int32_t kg, int32_t pg) noexcept:
    f.key = key
    f.pid = pid
    f.value = value
    f.kg = kg
    f.pg = pg


cdef void _sort_recs(RecBuf* b, Py_ssize_t start) noexcept:
    cdef RecBuf view
    view.r = b.r + start
    view.n = b.n - start
    view.cap = view.n
    _sort_by_stamp(&view)


cdef inline void _gt_init(GroupTable* gt) noexcept:
    _slab_init(&gt.slab, sizeof(Group))
    gt.live = 0
    gt.free = -1
    gt.first = -1
    gt.last = -1
    gt.index = NULL
    gt.size = 0
    gt.mask = 0
    gt.bits = 0


cdef size_t _gt_bytes(GroupTable* gt) noexcept:
    return _slab_bytes(&gt.slab) + <size_t>gt.size * sizeof(Slot)


cdef int _build_index(GroupTable* gt, int64_t want, Index* out) noexcept:
    """An index of the groups chained from ``gt.first`` with room for `want` groups at
    load <= 2/3; -1 (nothing allocated) if out of memory.

    Growing asks for one more group than the full index holds, so the index doubles and
    starts again at load 1/3; shrinking and compaction ask for twice the live groups, so
    they restart at load <= 1/3 as well.
    """
    cdef uint64_t size = 8
    cdef int bits = 3
    cdef Slot* index
    cdef int32_t gi
    cdef uint32_t s, mask, fp
    while size * 2 < <uint64_t>want * 3:
        size <<= 1
        bits += 1
    if size > (<uint64_t>1 << 31):
        return -1
    index = <Slot*>PyMem_Malloc(<size_t>size * sizeof(Slot))
    if index == NULL:
        return -1
    for s in range(<uint32_t>size):
        index[s].gi = -1
    mask = <uint32_t>(size - 1)
    gi = gt.first
    while gi >= 0:
        fp = _fingerprint(_G(gt, gi).hash)
        s = _home(fp, bits)
        while index[s].gi >= 0:
            s = (s + 1) & mask
        index[s].gi = gi
        index[s].fp = fp
        gi = _G(gt, gi).next
    out.index = index
    out.size = <uint32_t>size
    out.mask = mask
    out.bits = bits
    return 0


cdef inline void _set_index(GroupTable* gt, Index* idx) noexcept:
    gt.index = idx.index
    gt.size = idx.size
    gt.mask = idx.mask
    gt.bits = idx.bits


cdef int _gt_rehash(GroupTable* gt, int64_t want) noexcept:
    """Rebuild the index for `want` groups; -1 (nothing changed) if out of memory."""
    cdef Index idx
    if _build_index(gt, want, &idx) < 0:
        return -1
    PyMem_Free(gt.index)
    _set_index(gt, &idx)
    return 0


cdef void _renumber_heads(GroupTable* gt, int32_t* renum) noexcept:
    cdef int32_t i
    cdef Group* g
    for i in range(gt.slab.cap):
        g = _G(gt, i)
        if g.obj != NULL:
            g.head = renum[g.head]
            g.tail = renum[g.tail]


cdef void _renumber_arrays(GroupTable* gt, int32_t* renum) noexcept:
    cdef int32_t i, k
    cdef Group* g
    for i in range(gt.slab.cap):
        g = _G(gt, i)
        if g.obj != NULL and g.arr != NULL:
            for k in range(g.count):
                g.arr[k] = renum[g.arr[k]]


cdef void _release(Slab* rows, GroupTable* keys, GroupTable* pids) noexcept:
    """Release every reference held by detached storage, then free it."""
    cdef int32_t i
    cdef Row* r
    for i in range(rows.cap):
        r = _R(rows, i)
        if r.key != NULL:
            Py_DECREF(r.key)
            Py_DECREF(r.pid)
            Py_DECREF(r.value)
    _slab_free(rows)
    _gt_release(keys)
    _gt_release(pids)


cdef void _gt_release(GroupTable* gt) noexcept:
    cdef int32_t i
    cdef Group* g
    for i in range(gt.slab.cap):
        g = _G(gt, i)
        if g.obj != NULL:
            Py_DECREF(g.obj)
            PyMem_Free(g.arr)
    _slab_free(&gt.slab)
    PyMem_Free(gt.index)
    _gt_init(gt)
