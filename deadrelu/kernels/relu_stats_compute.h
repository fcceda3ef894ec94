/* Per-unit statistics of one pre-activation tensor, in one read of it.
 *
 * The tensor is viewed as (outer, units, inner): the unit axis in the middle, every axis
 * before it folded into `outer`, every axis after it into `inner`. For each unit the
 * kernel writes nine float64 values, deadrelu's MASKED_ROWS, row r at out[r * units + u]:
 *
 *   count (finite values), positive (values > 0, +inf included), nan, inf,
 *   minimum, maximum (of the finite values; +inf / -inf when there are none),
 *   mean, m2 (sum of squared deviations from the mean), relu_sum (sum of the finite
 *   positive values)
 *
 * NaN and +-Inf are counted apart and kept out of min/max/moments, as in the graph's
 * masked reductions. Sums are taken of x - k, k being the unit's first value when finite
 * (the shifted-data algorithm: no cancellation for a unit far from zero), in float32 over
 * at most CHUNK / LANES values per vector lane and in float64 across chunks. Counts are
 * exact. A chunk is first reduced assuming finite values (9 vector operations per 8
 * values); when its sum comes out NaN or infinite it is reduced again value by value
 * with NaN/Inf kept apart, so the careful path costs only where such values are.
 *
 * Two loop orders: `reduce_row_block` for units whose values lie in rows of >= LANES
 * contiguous values (a convolution's (N, C, H, W)), a block of units per work item read
 * in memory order (short rows read unit by unit halved the bandwidth: each row is a new
 * stream for the prefetcher);
 * `reduce_column_block` for units that lie across rows (a dense layer's (N, F):
 * inner == 1), a block of whole units per work item, vectorised across the units.
 */
#ifndef DEADRELU_RELU_STATS_COMPUTE_H
#define DEADRELU_RELU_STATS_COMPUTE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#define STAT_ROWS 9
#define LANES 8
#define CHUNK 1024         /* values of one unit reduced in float32 before a float64 flush */
#define BLOCK_COLUMNS 128  /* columns (unit x inner positions) per column-path work item, at most */
#define ROW_GROUP 8        /* rows the column path reads per pass over a block's column vectors */
#define ROW_BLOCK_VALUES 16384 /* values per outer index that a row-path work item reads */
#define MAX_ROW_UNITS 64       /* units per row-path work item, at most */

typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));

/* Float64 totals of a unit (or of one column, before columns fold into their unit). */
typedef struct {
    double count, positive, nan, inf, minimum, maximum, s1, s2, relu;
} Totals;

/* Float32 per-lane partial sums of one chunk. */
typedef struct {
    vfloat s1, s2, relu, minimum, maximum;
    vint positive;
} Lanes;

typedef struct {
    const float *x;
    double *out;
    size_t outer, units, inner;
} Tensor;

static inline vfloat vload(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vfloat vsplat(float value) {
    vfloat v;
    for (int i = 0; i < LANES; i++) v[i] = value;
    return v;
}

static inline vfloat vselect(vint mask, vfloat a, vfloat b) {
    return (vfloat)(((vint)a & mask) | ((vint)b & ~mask));
}

#if defined(__AVX__)
static inline vfloat vmin(vfloat a, vfloat b) { return (vfloat)_mm256_min_ps((__m256)a, (__m256)b); }
static inline vfloat vmax(vfloat a, vfloat b) { return (vfloat)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vfloat vmin(vfloat a, vfloat b) { return vselect(a < b, a, b); }
static inline vfloat vmax(vfloat a, vfloat b) { return vselect(a > b, a, b); }
#endif

static inline void lanes_reset(Lanes *l) {
    memset(l, 0, sizeof *l);
    l->minimum = vsplat(INFINITY);
    l->maximum = vsplat(-INFINITY);
}

/* One vector of values into l, assuming finite values. */
static inline void lanes_add(Lanes *l, vfloat v, vfloat k) {
    const vfloat zero = vsplat(0.0f), d = v - k;
    l->s1 += d;
    l->s2 += d * d;
    l->relu += vmax(v, zero);
    l->minimum = vmin(v, l->minimum);
    l->maximum = vmax(v, l->maximum);
    l->positive -= v > zero;  /* comparison masks are -1 where true */
}

/* b's lanes into a's. */
static inline void lanes_merge(Lanes *a, const Lanes *b) {
    a->s1 += b->s1;
    a->s2 += b->s2;
    a->relu += b->relu;
    a->minimum = vmin(a->minimum, b->minimum);
    a->maximum = vmax(a->maximum, b->maximum);
    a->positive += b->positive;
}

/* `vectors` vectors at p (stride: floats between them) into l, assuming finite values;
 * two independent accumulator sets (locals, kept in registers) hide the add latency. */
static inline void lanes_add_run(Lanes *l, const float *p, size_t vectors, size_t stride, vfloat k) {
    Lanes a = *l, b;
    lanes_reset(&b);
    size_t i = 0;
    for (; i + 2 <= vectors; i += 2) {
        lanes_add(&a, vload(p + i * stride), k);
        lanes_add(&b, vload(p + (i + 1) * stride), k);
    }
    if (i < vectors) lanes_add(&a, vload(p + i * stride), k);
    lanes_merge(&a, &b);
    *l = a;
}

/* The last `tail` (< LANES) values before `end`, assuming finite values: one vector load
 * ending at `end` (at least LANES values after the row's start), its first lanes masked. */
static inline void lanes_add_tail(Lanes *l, const float *end, size_t tail, vfloat k) {
    const vfloat zero = vsplat(0.0f);
    vint lane, first_kept;
    for (int i = 0; i < LANES; i++) {
        lane[i] = i;
        first_kept[i] = (int32_t)(LANES - tail);
    }
    const vint keep = lane >= first_kept;
    const vfloat v = vload(end - LANES);
    const vfloat d = (vfloat)((vint)(v - k) & keep);  /* masked lanes add 0, even if NaN */
    l->s1 += d;
    l->s2 += d * d;
    l->relu += (vfloat)((vint)vmax(v, zero) & keep);
    l->minimum = vmin(vselect(keep, v, vsplat(INFINITY)), l->minimum);
    l->maximum = vmax(vselect(keep, v, vsplat(-INFINITY)), l->maximum);
    l->positive -= (v > zero) & keep;
}

/* Values [i0, i1) of a row into l, assuming finite values; i1 - i0 is a multiple of LANES
 * unless i1 is the row's end (>= LANES values from its start). */
static inline void lanes_add_segment(Lanes *l, const float *row, size_t i0, size_t i1, vfloat k) {
    const size_t vectors = (i1 - i0) / LANES, tail = (i1 - i0) % LANES;
    lanes_add_run(l, row + i0, vectors, LANES, k);
    if (tail) lanes_add_tail(l, row + i1, tail, k);
}

/* Two adjacent column vectors (a at p, b at p + LANES) of `rows` rows `stride` apart,
 * assuming finite values: one pass over the rows for both. */
static inline void lanes_add_run2(Lanes *a, Lanes *b, const float *p, size_t rows, size_t stride, vfloat ka,
                                  vfloat kb) {
    Lanes la = *a, lb = *b;
    for (size_t i = 0; i < rows; i++) {
        lanes_add(&la, vload(p + i * stride), ka);
        lanes_add(&lb, vload(p + i * stride + LANES), kb);
    }
    *a = la;
    *b = lb;
}

/* Did the chunk's values all turn out finite? (A NaN or +-Inf leaves s1 NaN or infinite.) */
static inline int lanes_finite(const Lanes *l) {
    for (int i = 0; i < LANES; i++)
        if (l->s1[i] - l->s1[i] != 0) return 0;
    return 1;
}

static inline void totals_reset(Totals *t) {
    memset(t, 0, sizeof *t);
    t->minimum = INFINITY;
    t->maximum = -INFINITY;
}

/* One value, NaN and +-Inf kept apart. */
static inline void totals_add_value(Totals *t, float v, float k) {
    if (v != v) {
        t->nan += 1;
        return;
    }
    if (v > 0) t->positive += 1;
    if (v - v != 0) {
        t->inf += 1;
        return;
    }
    float d = v - k;
    t->count += 1;
    t->s1 += d;
    t->s2 += (double)d * d;
    if (v > 0) t->relu += v;
    if (v < t->minimum) t->minimum = v;
    if (v > t->maximum) t->maximum = v;
}

/* Lane i of a finite chunk that gave it `values` values. */
static inline void totals_add_lane(Totals *t, const Lanes *l, int i, double values) {
    t->count += values;
    t->positive += l->positive[i];
    t->s1 += l->s1[i];
    t->s2 += l->s2[i];
    t->relu += l->relu[i];
    if (l->minimum[i] < t->minimum) t->minimum = l->minimum[i];
    if (l->maximum[i] > t->maximum) t->maximum = l->maximum[i];
}

/* Every lane of a finite chunk of `values` values (lanes may hold different numbers of them). */
static inline void totals_add_lanes(Totals *t, const Lanes *l, double values) {
    t->count += values;
    for (int i = 0; i < LANES; i++) {
        t->positive += l->positive[i];
        t->s1 += l->s1[i];
        t->s2 += l->s2[i];
        t->relu += l->relu[i];
        if (l->minimum[i] < t->minimum) t->minimum = l->minimum[i];
        if (l->maximum[i] > t->maximum) t->maximum = l->maximum[i];
    }
}

static inline void totals_merge(Totals *t, const Totals *o) {
    t->count += o->count;
    t->positive += o->positive;
    t->nan += o->nan;
    t->inf += o->inf;
    t->s1 += o->s1;
    t->s2 += o->s2;
    t->relu += o->relu;
    if (o->minimum < t->minimum) t->minimum = o->minimum;
    if (o->maximum > t->maximum) t->maximum = o->maximum;
}

/* A unit's shift: its first value (outer 0, inner 0) when finite, else 0. */
static inline float unit_shift(const Tensor *x, size_t u) {
    float k = x->x[u * x->inner];
    return (k - k == 0) ? k : 0.0f;
}

static void totals_write(const Totals *t, float k, const Tensor *x, size_t u) {
    double n = t->count, mean = 0.0, m2 = 0.0;
    if (n > 0) {
        mean = t->s1 / n;
        m2 = t->s2 - t->s1 * mean;
        if (m2 < 0) m2 = 0;
        mean += (double)k;
    }
    const double row[STAT_ROWS] = {n, t->positive, t->nan, t->inf, t->minimum, t->maximum, mean, m2, t->relu};
    for (int r = 0; r < STAT_ROWS; r++) x->out[(size_t)r * x->units + u] = row[r];
}

/* Units per row-path work item: enough whole rows that each outer index is a long
 * contiguous read, not so many that small tensors give a pool of threads too few items. */
static inline size_t row_block_units(const Tensor *x) {
    size_t n = ROW_BLOCK_VALUES / x->inner;
    if (n < 1) n = 1;
    return n < MAX_ROW_UNITS ? n : MAX_ROW_UNITS;
}

static inline const float *row_of(const Tensor *x, size_t o, size_t u) {
    return x->x + (o * x->units + u) * x->inner;
}

/* Rows [o0, o1) of unit u, values [i0, i1) of each, value by value, NaN/Inf kept apart. */
static void rows_careful(const Tensor *x, size_t u, size_t o0, size_t o1, size_t i0, size_t i1, float k, Totals *t) {
    for (size_t o = o0; o < o1; o++) {
        const float *row = row_of(x, o, u);
        for (size_t i = i0; i < i1; i++) totals_add_value(t, row[i], k);
    }
}

/* Work item b of the row path: units [b * row_block_units, ...), whose values lie in rows
 * of `inner` >= LANES contiguous values. The rows are read in memory order (outer index,
 * then unit), each unit's into its own float32 lanes, flushed to float64 every window of
 * at most CHUNK / LANES values per lane; a window that met NaN/Inf is read again, carefully. */
static void reduce_row_block(const Tensor *x, size_t b) {
    const size_t per = row_block_units(x), u0 = b * per;
    const size_t n = u0 + per < x->units ? per : x->units - u0;
    const size_t per_lane = CHUNK / LANES, row_vectors = (x->inner + LANES - 1) / LANES;
    Totals totals[MAX_ROW_UNITS];
    float shift[MAX_ROW_UNITS];
    Lanes lanes[MAX_ROW_UNITS];
    vfloat kv[MAX_ROW_UNITS];
    for (size_t j = 0; j < n; j++) {
        totals_reset(&totals[j]);
        shift[j] = unit_shift(x, u0 + j);
        kv[j] = vsplat(shift[j]);
    }
    if (row_vectors <= per_lane) {  /* windows of whole rows */
        const size_t window = per_lane / row_vectors;
        for (size_t o0 = 0; o0 < x->outer; o0 += window) {
            const size_t o1 = o0 + window < x->outer ? o0 + window : x->outer;
            for (size_t j = 0; j < n; j++) lanes_reset(&lanes[j]);
            for (size_t o = o0; o < o1; o++)
                for (size_t j = 0; j < n; j++) lanes_add_segment(&lanes[j], row_of(x, o, u0 + j), 0, x->inner, kv[j]);
            for (size_t j = 0; j < n; j++) {
                if (lanes_finite(&lanes[j]))
                    totals_add_lanes(&totals[j], &lanes[j], (double)((o1 - o0) * x->inner));
                else
                    rows_careful(x, u0 + j, o0, o1, 0, x->inner, shift[j], &totals[j]);
            }
        }
    } else {  /* long rows, in segments of CHUNK values */
        for (size_t o = 0; o < x->outer; o++)
            for (size_t j = 0; j < n; j++) {
                const float *row = row_of(x, o, u0 + j);
                for (size_t i0 = 0; i0 < x->inner; i0 += CHUNK) {
                    const size_t i1 = i0 + CHUNK < x->inner ? i0 + CHUNK : x->inner;
                    Lanes l;
                    lanes_reset(&l);
                    lanes_add_segment(&l, row, i0, i1, kv[j]);
                    if (lanes_finite(&l))
                        totals_add_lanes(&totals[j], &l, (double)(i1 - i0));
                    else
                        rows_careful(x, u0 + j, o, o + 1, i0, i1, shift[j], &totals[j]);
                }
            }
    }
    for (size_t j = 0; j < n; j++) totals_write(&totals[j], shift[j], x, u0 + j);
}

/* Units per column-path work item: whole units, at most BLOCK_COLUMNS columns, fewer where
 * that leaves under 4 work items (for the threads), but not under 16 columns. */
static inline size_t block_units(const Tensor *x) {
    const size_t width = x->units * x->inner;
    size_t columns = (width / 4 + 15) / 16 * 16;
    if (columns > BLOCK_COLUMNS) columns = BLOCK_COLUMNS;
    if (columns < 16) columns = 16;
    const size_t n = columns / x->inner;
    return n ? n : 1;
}

/* Work item b of the column path: the block of units from b * block_units, all rows, in
 * windows of CHUNK / LANES rows. Each window is read a group of ROW_GROUP rows at a time,
 * every column vector of the block down the group, so each row's part of the block is read
 * whole and in order (a block of 16 columns read down all rows, one cache line from each
 * row, was bound by the latency of those scattered reads on data just written by a matmul). */
static void reduce_column_block(const Tensor *x, size_t b) {
    const size_t per = block_units(x), u0 = b * per;
    const size_t u1 = u0 + per < x->units ? u0 + per : x->units;
    const size_t c0 = u0 * x->inner, width = (u1 - u0) * x->inner, stride = x->units * x->inner;
    const size_t vectors = width / LANES, rows_per_chunk = CHUNK / LANES;
    Totals columns[BLOCK_COLUMNS];
    float shift[BLOCK_COLUMNS];
    Lanes lanes[BLOCK_COLUMNS / LANES];
    vfloat kv[BLOCK_COLUMNS / LANES];
    for (size_t c = 0; c < width; c++) {
        totals_reset(&columns[c]);
        shift[c] = unit_shift(x, u0 + c / x->inner);
    }
    for (size_t j = 0; j < vectors; j++) kv[j] = vload(shift + j * LANES);
    for (size_t o0 = 0; o0 < x->outer; o0 += rows_per_chunk) {
        const size_t o1 = o0 + rows_per_chunk < x->outer ? o0 + rows_per_chunk : x->outer;
        for (size_t j = 0; j < vectors; j++) lanes_reset(&lanes[j]);
        const size_t group = vectors <= 2 ? o1 - o0 : ROW_GROUP;  /* two vectors stay in registers */
        for (size_t g0 = o0; g0 < o1; g0 += group) {
            const size_t rows = g0 + group < o1 ? group : o1 - g0;
            const float *first = x->x + g0 * stride + c0;
            size_t j = 0;
            for (; j + 2 <= vectors; j += 2)
                lanes_add_run2(&lanes[j], &lanes[j + 1], first + j * LANES, rows, stride, kv[j], kv[j + 1]);
            if (j < vectors) lanes_add_run(&lanes[j], first + j * LANES, rows, stride, kv[j]);
        }
        for (size_t j = 0; j < vectors; j++) {
            if (lanes_finite(&lanes[j])) {
                for (int i = 0; i < LANES; i++)
                    totals_add_lane(&columns[j * LANES + (size_t)i], &lanes[j], i, (double)(o1 - o0));
                continue;
            }
            for (size_t o = o0; o < o1; o++)
                for (size_t c = j * LANES; c < (j + 1) * LANES; c++)
                    totals_add_value(&columns[c], x->x[o * stride + c0 + c], shift[c]);
        }
        for (size_t o = o0; o < o1; o++)
            for (size_t c = vectors * LANES; c < width; c++)
                totals_add_value(&columns[c], x->x[o * stride + c0 + c], shift[c]);
    }
    for (size_t u = u0; u < u1; u++) {
        Totals t = columns[(u - u0) * x->inner];
        for (size_t p = 1; p < x->inner; p++) totals_merge(&t, &columns[(u - u0) * x->inner + p]);
        totals_write(&t, shift[(u - u0) * x->inner], x, u);
    }
}

/* The loop order for a tensor: rows when each unit has rows of >= LANES values. */
static inline int use_rows(const Tensor *x) {
    return x->inner >= LANES;
}

static inline size_t work_items(const Tensor *x) {
    const size_t per = use_rows(x) ? row_block_units(x) : block_units(x);
    return (x->units + per - 1) / per;
}

static inline void reduce_item(const Tensor *x, size_t item) {
    if (use_rows(x))
        reduce_row_block(x, item);
    else
        reduce_column_block(x, item);
}

/* A tensor with no values: zero counts and moments, min +inf, max -inf, for every unit. */
static void write_empty(const Tensor *x) {
    Totals t;
    totals_reset(&t);
    for (size_t u = 0; u < x->units; u++) totals_write(&t, 0.0f, x, u);
}

#endif
