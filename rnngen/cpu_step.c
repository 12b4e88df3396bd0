/* rnngen's batch-1 LSTM, GRU and plain RNN sampler for the CPU: a block of steps, each followed by its sampling,
 * in one call.
 *
 * Built by rnngen/cpu_step.py with the machine's C compiler on first use (see that file for the layout of
 * the weights). Per step, every thread computes the gates of its own blocks of UB hidden units (so the cell
 * update needs nothing from the other threads), then waits for the others at a barrier before the next
 * layer reads the new h. Each output is always summed by one thread in the same order, so the result does
 * not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define UB 32       /* hidden units per block */
#define GB (4 * UB) /* LSTM gate pre-activations per block: i, f, o, g of its UB units, in that order */
#define G3 (3 * UB) /* GRU gate pre-activations per block: r, z, n of its UB units (PyTorch's order) */
enum { LSTM = 0, GRU = 1, RNN = 2 }; /* rnngen_sample's arch */

/* exp(x) to about 1 ulp (Cephes' expf), written so that the compiler vectorises the loops that call it: no
 * branches and no library calls (floorf, fminf and copysignf stop GCC from vectorising without -ffast-math).
 * 0 below -87.3 (where exp(x) leaves the normal floats), as for -inf. */
static inline float exp_approx(float x) {
    const float y = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
    const float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(y / ln 2), 1.5 * 2^23 trick */
    const float r = y - n * 0.693359375f + n * 2.12194440e-4f;                /* y - n ln 2, in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, built in the exponent field */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.3f ? 0.0f : p * scale;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

static inline float tanh_approx(float x) {
    const float e = exp_approx(-2.0f * fabsf(x));
    const float t = (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -t : t;
}

/* out = bias + W @ [a | b] for one block of W outputs (GB for an LSTM, G3 for a GRU, UB for a plain RNN): panel
 * rows 0..ka-1 read a, rows ka..ka+kb-1 read b, W wide. Always inlined with W a constant, so that the sums stay
 * in registers and the loops are unrolled for each cell. */
static inline __attribute__((always_inline)) void block_sums(int W, const float *restrict panel,
                                                            const float *restrict bias, const float *restrict a,
                                                            int ka, const float *restrict b, int kb,
                                                            float *restrict out) {
    float acc[GB];
    for (int j = 0; j < W; j++) acc[j] = bias[j];
    for (int k = 0; k < ka; k++, panel += W) {
        const float x = a[k];
        for (int j = 0; j < W; j++) acc[j] += x * panel[j];
    }
    for (int k = 0; k < kb; k++, panel += W) {
        const float x = b[k];
        for (int j = 0; j < W; j++) acc[j] += x * panel[j];
    }
    memcpy(out, acc, sizeof(float) * (size_t)W);
}

/* The W pre-activations of block b of layer l of an LSTM (W = GB) or a plain RNN (W = UB), whose layers above
 * the first read [h_{l-1} | h_l] through one panel: layer 0 from the token's row of the input table and h_0,
 * layer l >= 1 from the new h of the layer below and its own old h. */
static inline __attribute__((always_inline)) void stacked_sums(int W, const float *const *panels, const float *table,
                                                              const float *const *biases, int64_t token, int blocks,
                                                              int b, int l, int HP, const float *h, const float *hn,
                                                              float *gates) {
    if (l == 0)
        block_sums(W, panels[0] + (size_t)b * HP * W, table + ((size_t)token * blocks + b) * W, h, HP, NULL, 0, gates);
    else
        block_sums(W, panels[l] + (size_t)b * 2 * HP * W, biases[l - 1] + (size_t)b * W, hn + (size_t)(l - 1) * HP,
                   HP, h + (size_t)l * HP, HP, gates);
}

/* r, z = sigmoid(gi + gh), n = tanh(gi_n + r * gh_n), h = n + z * (h - n) for the UB units of one block
 * (as rnngen.fastpath.Streams._gru_cell does it). */
static void block_gru_cell(const float *restrict gi, const float *restrict gh, const float *restrict h,
                           float *restrict h_new) {
    for (int u = 0; u < UB; u++) {
        float r = sigmoid(gi[u] + gh[u]), z = sigmoid(gi[UB + u] + gh[UB + u]);
        float n = tanh_approx(gi[2 * UB + u] + r * gh[2 * UB + u]);
        h_new[u] = n + z * (h[u] - n);
    }
}

/* h = tanh(pre-activation) for the UB units of one block of a plain RNN. */
static void block_tanh(const float *restrict pre, float *restrict h) {
    for (int u = 0; u < UB; u++) h[u] = tanh_approx(pre[u]);
}

/* c = f * c + i * g, h = o * tanh(c) for the UB units of one block. */
static void block_cell(const float *restrict gates, float *restrict c, float *restrict h) {
    for (int u = 0; u < UB; u++) {
        float i = sigmoid(gates[u]), f = sigmoid(gates[UB + u]), o = sigmoid(gates[2 * UB + u]);
        float g = tanh_approx(gates[3 * UB + u]);
        c[u] = f * c[u] + i * g;
        h[u] = o * tanh_approx(c[u]);
    }
}

typedef struct {
    float value;
    int32_t index;
} ranked;

static inline void swap_ranked(ranked *a, ranked *b) {
    const ranked t = *a;
    *a = *b;
    *b = t;
}

/* The k-th largest value (k >= 1) of r[0..n-1], by quickselect; r is reordered. */
static float kth_largest(ranked *r, int n, int k) {
    int lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        swap_ranked(&r[(lo + hi) / 2], &r[hi]);
        const float pivot = r[hi].value;
        int store = lo;
        for (int i = lo; i < hi; i++)
            if (r[i].value > pivot) swap_ranked(&r[i], &r[store++]);
        swap_ranked(&r[store], &r[hi]);
        if (store == want) break;
        if (store < want) lo = store + 1; else hi = store - 1;
    }
    return r[want].value;
}

static int by_value_descending(const void *a, const void *b) {
    const float x = ((const ranked *)a)->value, y = ((const ranked *)b)->value;
    return (x < y) - (x > y);
}

/* The next token from logits: argmax (greedy: temperature <= 0), or the argmax of p / q with p the
 * softmax of logits / T over the tokens top-k and top-p keep and q the step's Exp(1) draws: exactly how
 * rnngen.generate.pick_tokens and filter_logits sample. top_k <= 0 or >= V and top_p >= 1 are off.
 * scratch: (V) floats; work: (V) ranked. */
static int64_t pick(const float *logits, int V, float temperature, int top_k, float top_p, const float *q,
                    float *scratch, ranked *work) {
    int64_t best = 0;
    if (temperature <= 0.0f || q == NULL) {
        for (int v = 1; v < V; v++) if (logits[v] > logits[best]) best = v;
        return best;
    }
    float m = -INFINITY, sum = 0.0f;
    for (int v = 0; v < V; v++) {
        scratch[v] = logits[v] / temperature;
        m = scratch[v] > m ? scratch[v] : m;
    }
    float floor = -INFINITY; /* tokens below it are dropped: top-k's k-th largest value */
    if (top_k > 0 && top_k < V) {
        for (int v = 0; v < V; v++) work[v] = (ranked){scratch[v], v};
        floor = kth_largest(work, V, top_k);
    }
    for (int v = 0; v < V; v++) scratch[v] = scratch[v] < floor ? 0.0f : exp_approx(scratch[v] - m);
    for (int v = 0; v < V; v++) sum += scratch[v];
    if (top_p < 1.0f) {
        /* Drop each token whose higher-ranked tokens already hold top_p of the mass. As torch does it: the
         * running sum kept in double, rounded to float, less the token's own probability. */
        int n = 0;
        for (int v = 0; v < V; v++)
            if (scratch[v] > 0.0f) work[n++] = (ranked){scratch[v] / sum, v};
        qsort(work, (size_t)n, sizeof(ranked), by_value_descending);
        double running = 0.0;
        for (int i = 0; i < n; i++) {
            running += work[i].value;
            if ((float)running - work[i].value >= top_p) scratch[work[i].index] = 0.0f;
        }
        sum = 0.0f;
        for (int v = 0; v < V; v++) sum += scratch[v];
    }
    float inv = 1.0f / sum, top = -1.0f;
    for (int v = 0; v < V; v++) {
        float score = scratch[v] * inv / q[v];
        if (score > top) { top = score; best = v; }
    }
    return best;
}

/* After a step: its new h becomes the state, and with tracking the state and logits are kept for step s. */
static void finish_step(int s, int L, int HP, int V, float *h, const float *hn, const float *c, const float *logits,
                        float *track_h, float *track_c, float *track_logits) {
    const size_t n = (size_t)L * HP;
    memcpy(h, hn, sizeof(float) * n);
    if (track_h) {
        memcpy(track_h + (size_t)s * n, h, sizeof(float) * n);
        if (track_c) memcpy(track_c + (size_t)s * n, c, sizeof(float) * n);
        memcpy(track_logits + (size_t)s * V, logits, sizeof(float) * (size_t)V);
    }
}

/* Run `steps` steps from the state (h: (L, HP), c: (L, HP)) and the logits before the first (V): pick a
 * token, advance, and so on. tokens[s] gets step s's token; with track_h/track_c/track_logits non-NULL the
 * state and logits after each step too. h, c and logits end at the last step. hn: (L, HP) scratch for the
 * new h (the old one is still being read by the other threads); scratch: (V) floats, work: (V) ranked.
 * LSTM (arch LSTM):
 *   panels[l]: layer l's weights, (HP / UB) blocks of (K_l, GB), K_0 = HP (h_0), K_l = 2 HP (h_{l-1} | h_l);
 *   table: (V, HP / UB, GB) layer 0's input gates per token (biases included); biases[l-1]: (HP / UB, GB).
 * plain RNN (arch RNN; c unused, track_c NULL): as an LSTM's, UB wide instead of GB.
 * GRU (arch GRU; c unused, track_c NULL):
 *   panels[l]: layer l's hidden-to-hidden weights, (HP / UB) blocks of (HP, G3); biases[l]: its b_hh, (HP / UB, G3);
 *   in_panels[l-1], in_biases[l-1]: layer l's input weights and b_ih (l >= 1), shaped likewise;
 *   table: (V, HP / UB, G3) layer 0's input gates per token (b_ih included).
 * w_out: (HP, V), b_out: (V). noise: (steps, V) Exp(1) draws, NULL when greedy. top_k, top_p: as pick's. */
void rnngen_sample(int arch, const float *const *panels, const float *table, const float *const *biases,
                   const float *const *in_panels, const float *const *in_biases,
                   const float *w_out, const float *b_out, int L, int HP, int V,
                   float *h, float *hn, float *c, float *logits, float *scratch, ranked *work,
                   const float *noise, float temperature, int top_k, float top_p, int steps, int threads,
                   int64_t *tokens, float *track_h, float *track_c, float *track_logits) {
    const int blocks = HP / UB;
    int64_t token = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int t = 0, nt = 1;
        (void)threads;
#endif
        const int b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
        const int v0 = V * t / nt, v1 = V * (t + 1) / nt;
        float gates[GB], hgates[G3];
        for (int s = 0; s < steps; s++) {
#ifdef _OPENMP
#pragma omp single
#endif
            {
                if (s > 0) finish_step(s - 1, L, HP, V, h, hn, c, logits, track_h, track_c, track_logits);
                token = pick(logits, V, temperature, top_k, top_p, noise ? noise + (size_t)s * V : NULL, scratch,
                             work);
                tokens[s] = token;
            } /* (the implicit barrier: every thread sees the token and the state) */
            for (int l = 0; l < L; l++) {
                for (int b = b0; b < b1; b++) {
                    const size_t at = (size_t)l * HP + (size_t)b * UB;
                    if (arch == GRU) {
                        const float *gi = gates;
                        if (l == 0)
                            gi = table + ((size_t)token * blocks + b) * G3;
                        else
                            block_sums(G3, in_panels[l - 1] + (size_t)b * HP * G3, in_biases[l - 1] + (size_t)b * G3,
                                       hn + (size_t)(l - 1) * HP, HP, NULL, 0, gates);
                        block_sums(G3, panels[l] + (size_t)b * HP * G3, biases[l] + (size_t)b * G3, h + (size_t)l * HP,
                                   HP, NULL, 0, hgates);
                        block_gru_cell(gi, hgates, h + at, hn + at);
                    } else if (arch == RNN) {
                        stacked_sums(UB, panels, table, biases, token, blocks, b, l, HP, h, hn, gates);
                        block_tanh(gates, hn + at);
                    } else {
                        stacked_sums(GB, panels, table, biases, token, blocks, b, l, HP, h, hn, gates);
                        block_cell(gates, c + at, hn + at);
                    }
                }
#ifdef _OPENMP
#pragma omp barrier
#endif
            }
            /* logits = b_out + h_top @ w_out, each thread its share of the vocabulary */
            const float *top = hn + (size_t)(L - 1) * HP;
            for (int v = v0; v < v1; v++) logits[v] = b_out[v];
            for (int k = 0; k < HP; k++) {
                const float x = top[k];
                const float *w = w_out + (size_t)k * V;
                for (int v = v0; v < v1; v++) logits[v] += x * w[v];
            }
#ifdef _OPENMP
#pragma omp barrier
#endif
        }
    }
    if (steps > 0) finish_step(steps - 1, L, HP, V, h, hn, c, logits, track_h, track_c, track_logits);
}
