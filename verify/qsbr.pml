/*
 * qsbr.pml: a Promela model of qsbr's QSBR protocol, as src/qsbr implements it.
 *
 * Processes: a writer, a reclaimer that polls (Domain(background=True), or any
 * other thread calling poll()), and two readers.
 *
 * The writer swaps new objects into the shared slot `cell` and retires the old
 * ones with goals. Deferred advance is included: a retirement either advances
 * wr_seq (under a lock) and takes the new value, or takes wr_seq + 2 without
 * advancing.
 *
 * A poll does four things:
 *   1. advances wr_seq when a pending goal is ahead of it (catch-up);
 *   2. scans: reads wr_seq first, then each thread's seq, one load at a time;
 *      the minimum over attached threads is capped at that first read;
 *   3. raises rd_seq monotonically, under a lock;
 *   4. takes and runs every release whose goal <= rd_seq, under a lock.
 *
 * Readers load the slot and use the object. Then they either report a
 * quiescent state (seq = wr_seq: a load, then a store), or detach around a
 * blocking call (seq = 0) and attach again (seq = wr_seq). Unregistering
 * publishes seq = 0 exactly as detach does. Reader 0 starts unregistered and
 * registers during the run. Scans read its slot first, so a scan can pass it
 * before it registers: the case that needs the scan's cap.
 *
 * A participant can die (SharedDomain, issue 14): a killer process may, at
 * any moment, SIGKILL reader 1, which then stops wherever it was, its seq
 * frozen (in or out of a read section). Its liveness lock is gone with it:
 * `alive[1]` becomes false in the same step. A scan that loads the seq of a
 * participant that is not alive evicts it (seq = 0, under the structure
 * lock, where the real code checks the lock): from then on it holds nothing
 * back.
 *
 * Checked by verify/run.sh:
 * - Safety: a reader never uses a released object, and each release runs
 *   exactly once (the asserts).
 * - Liveness (LTL released_all): with readers that keep passing quiescent
 *   states, every retired object is eventually released. This is checked with
 *   weak fairness.
 *
 * Mutants, each of which spin must reject (compile with -D...):
 *   MUTANT_GOAL_OLD     the goal is the old wr_seq, not wr_seq + 2
 *   MUTANT_NO_CAP       the scan's minimum is not capped at the wr_seq it read first
 *   MUTANT_EARLY_DETACH detach publishes 0 before the thread is done with the object
 *   MUTANT_LATE_ATTACH  attach reads the slot before publishing its seq
 *   MUTANT_EVICT_LIVE   a scan evicts reader 1 whether it is alive or not (a
 *                       liveness check that takes a live participant for dead)
 * and two that must fail the liveness check:
 *   MUTANT_NO_CATCHUP   poll never advances to a deferred goal nobody advanced to
 *   MUTANT_NO_EVICT     a dead participant is never evicted
 */

#define NR    2            /* readers */
#define NOBJ  3            /* objects 0..2: 0 is current at start; two swaps */
#define NONE  255

byte wr_seq = 1;
byte rd_seq = 1;
byte seq[NR];              /* 0 = detached or not registered */
byte cell = 0;
bool retired[NOBJ];
bool released[NOBJ];
byte releases[NOBJ];       /* times each release ran: must never exceed 1 */
byte goal[NOBJ];
bool writer_done = false;
bool alive[NR];            /* a participant's liveness lock is held (set at start) */
bool kill_now = false;     /* the killer has struck: reader 1 dies at its next step */
byte evicted = 0;

#define all_released (released[0] && released[1])

ltl released_all { <> all_released }

inline use(r) {
    assert(!released[r])
}

inline scan_slot(k) {      /* one load of a thread's seq, and local work */
    d_step {
        s = seq[k];
#ifdef MUTANT_EVICT_LIVE
        if
        :: s != 0 && (!alive[k] || k == 1) -> seq[k] = 0; s = 0; evicted++   /* BROKEN */
        :: else -> skip
        fi;
#elif !defined(MUTANT_NO_EVICT)
        if
        :: s != 0 && !alive[k] -> seq[k] = 0; s = 0; evicted++  /* a dead participant: evicted */
        :: else -> skip
        fi;
#endif
        if
        :: s != 0 && s < m -> m = s
        :: else -> skip
        fi;
        s = 0
    }
}

active proctype writer() {
    byte k, old, g;
    for (k : 1 .. NOBJ - 1) {
        old = cell;
        cell = k;                                       /* unlink */
        if
        :: atomic { wr_seq = wr_seq + 2; g = wr_seq }   /* the deferred_limit-th call advances */
#ifdef MUTANT_GOAL_OLD
        :: g = wr_seq                                   /* BROKEN: a goal already reached */
#else
        :: g = wr_seq + 2                               /* deferred: wr_seq + 2, no advance */
#endif
        fi;
        d_step { goal[old] = g; retired[old] = true; g = 0; old = 0 }
    }
    all_released;                                       /* wait for the reclaimer */
    writer_done = true
}

active proctype reclaimer() {
    byte w, m, s, j;
    do
    :: writer_done -> break
    :: else ->
        /* 1. catch-up advance when a pending goal is ahead of wr_seq */
        d_step {
            for (j : 0 .. NOBJ - 1) {
                if
                :: retired[j] && !released[j] && goal[j] > wr_seq -> m = 1
                :: else -> skip
                fi
            }
#ifndef MUTANT_NO_CATCHUP
            if
            :: m == 1 -> wr_seq = wr_seq + 2
            :: else -> skip
            fi;
#endif
            m = 0; j = 0
        }
        /* 2. scan: wr_seq first, then each thread's seq */
        w = wr_seq;
#ifdef MUTANT_NO_CAP
        m = NONE;
#else
        m = w;
#endif
        scan_slot(0);
        scan_slot(1);
        /* 3. and 4. under locks: raise rd_seq, take and run what is ready */
        d_step {
            if
            :: m == NONE -> m = w                       /* (mutant only) nobody attached */
            :: else -> skip
            fi;
            if
            :: m > rd_seq -> rd_seq = m
            :: else -> skip
            fi;
            for (j : 0 .. NOBJ - 1) {
                if
                :: retired[j] && !released[j] && goal[j] <= rd_seq ->
                    released[j] = true;
                    releases[j]++;
                    assert(releases[j] == 1)
                :: else -> skip
                fi
            }
            w = 0; m = 0; j = 0
        }
    od
}

active [NR] proctype reader() {
    byte me = _pid - 2;
    byte r, w;
    alive[me] = true;
    {
    if
    :: me == 1 -> w = wr_seq; seq[me] = w; w = 0       /* registered at start */
    :: else ->                                          /* registers during the run */
        w = wr_seq;
        seq[me] = w;
        w = 0
    fi;
    do
    :: writer_done -> break
    :: seq[me] != 0 ->                                  /* a read-side section */
        r = cell;
        use(r);
#ifdef MUTANT_EARLY_DETACH
        seq[me] = 0;                                    /* BROKEN: 0 while still using r */
        use(r);
#endif
        w = wr_seq;                                     /* quiescent(): load wr_seq ... */
        seq[me] = w;                                    /* ... store seq */
        d_step { r = 0; w = 0 }
    :: seq[me] != 0 ->                                  /* detach around a blocking call */
        seq[me] = 0;
#ifdef MUTANT_LATE_ATTACH
        r = cell;                                       /* BROKEN: reads before publishing */
        w = wr_seq;
        seq[me] = w;
        use(r);
#else
        w = wr_seq;                                     /* attach(): seq = wr_seq, then read */
        seq[me] = w;
#endif
        d_step { r = 0; w = 0 }
    od
    } unless {                                          /* SIGKILL: stop wherever it was */
        me == 1 && kill_now -> d_step { alive[me] = false; r = 0; w = 0 }
    }
}

active proctype killer() {
    kill_now = true
}
