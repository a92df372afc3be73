/* plan.h: the generator's sparsity-aware tree planner and draft gate (plan.c), the C form of runtime/planner.py's
 * TreePlanner and DraftGate (their docstrings give the reasoning; the rules are the same).
 *
 * Shape legend: N = candidate nodes proposed, n = nodes kept, T = n + 1 tokens verified, B = expert weight bytes a
 * verification reads, W = SP_PLAN_WINDOW observations, TM = the largest T (K + 1).
 *
 * Planner: node i's key is the sibling ranks on its path from the root; q(key) = P(accepted | parent accepted) =
 * (hits + w q0) / (trials + w), q0 = 0.5 / (rank + 1); p(i) = p(parent) q(key(i)). Cost t(T) = c0 + c1 T + c2 B(T),
 * fitted by non-negative least squares over the last W steps, B(T) the mean bytes measured per size. Each step keeps
 * the prefix (in order of p, ties to the earlier node: every prefix is a subtree) maximising (1 + sum p) / t(n + 1);
 * while warming up it verifies sizes 1, 0, 2, 4 in turn, and every explore_every-th step a size near its choice.
 *
 * Gate: each step falls into an arm by how long a suffix of the text occurred earlier in it (0: under 2 tokens,
 * 1: under 4, 2: 4 or more); an arm drafts while its weighted mean tokens per drafting step exceeds margin x its mean
 * cost in plain steps' time, else runs plain steps and probes again after a wait that doubles (to max_probe_every)
 * after each episode of drafting that did not pay. */
#ifndef SP_PLAN_H
#define SP_PLAN_H

#include "common.h"

#include <stdbool.h>
#include <stdint.h>

enum { SP_PLAN_WINDOW = 256, SP_PLAN_MAX_KEYS = 4096, SP_GATE_WINDOW = 32 };

typedef struct sp_planner {
    int32_t TM;                  /* the largest verification size */
    /* acceptance: keys interned as (parent key, rank) -> id, 0 = the root's empty path */
    int32_t n_keys;
    int32_t *key_parent, *key_rank;     /* [SP_PLAN_MAX_KEYS] */
    int32_t *slots;                     /* [2 SP_PLAN_MAX_KEYS] open addressing: key id + 1, 0 = empty */
    int64_t *trials, *hits;             /* [SP_PLAN_MAX_KEYS] */
    /* cost */
    int32_t obs_T[SP_PLAN_WINDOW];
    double obs_B[SP_PLAN_WINDOW], obs_s[SP_PLAN_WINDOW];
    int32_t n_obs, obs_next;
    double coef[3];                     /* c0 [s], c1 [s/token], c2 [s/byte] */
    double *union_B;                    /* [TM + 1] mean bytes per size as of the last fit */
    int32_t *union_T, n_union;          /* [TM + 1] the sizes seen (ascending) as of the last fit */
    double *sum_B;                      /* [TM + 1] fit scratch */
    int32_t *cnt;                       /* [TM + 1] fit scratch */
    int64_t steps, kept, candidates;
    int32_t sched, around, last_choice;
    /* the current plan */
    int32_t *key;                       /* [TM] each candidate's key (-1: out of key space) */
    double *p;                          /* [TM] */
    int32_t *order;                     /* [TM] */
    int32_t *keep_key;                  /* [TM] the kept nodes' keys, in kept order */
    int32_t *new_index;                 /* [TM + 1] candidate batch index -> kept batch index, -1 = dropped */
    int32_t n_kept;
    bool explored;
} sp_planner;

sp_status sp_planner_init(sp_planner *pl, int32_t max_tokens);
void sp_planner_free(sp_planner *pl);
/* Prune the draft tok/par[0..*n) in place to the part worth verifying (renumbered, a subtree). */
void sp_planner_plan(sp_planner *pl, int32_t *tok, int32_t *par, int32_t *n);
/* The verification of the last plan: accepted[i] for kept node i (batch index i + 1), the tokens verified, expert
 * bytes read, and the step's wall time. */
void sp_planner_observe(sp_planner *pl, const int32_t *par, const bool *accepted, int32_t T, double bytes,
                        double seconds);

typedef struct sp_gate {
    int32_t probe_every, max_probe_every;
    double plain_s[SP_GATE_WINDOW];
    int32_t n_plain, plain_next;
    bool on[3];
    int32_t wait[3], interval[3];
    bool have_tok[3];
    double tok[3], cost[3];
    double ep_tok[3], ep_cost[3];
    int64_t probes[3], paid[3];
    int32_t arm, unjudged;
    /* the suffix match: bigram (a, b) -> index of the token after its latest occurrence */
    int64_t *bkey;              /* [cap] (a << 32 | b) + 1, 0 = empty */
    int32_t *bval;              /* [cap] */
    int32_t cap;                /* a power of 2 >= 2 (C + 2) */
    int32_t run, next;
} sp_gate;

sp_status sp_gate_init(sp_gate *g, int32_t n_ctx, int32_t probe_every, int32_t max_probe_every);
void sp_gate_free(sp_gate *g);
void sp_gate_begin(sp_gate *g, const int32_t *ctx, int32_t L); /* a new generation over ctx[0..L) */
void sp_gate_push(sp_gate *g, const int32_t *ctx, int32_t L);  /* ctx grew by one token to L */
bool sp_gate_drafts(const sp_gate *g);
void sp_gate_plain(sp_gate *g, double seconds);
void sp_gate_observe(sp_gate *g, int32_t arm, int32_t tokens, double seconds, bool explored);

#endif
