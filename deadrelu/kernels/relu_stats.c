/* ai.deadrelu::ReluStats, an ONNX Runtime custom operator (CPU).
 *
 *   ReluStats(x: float32 tensor) -> stats: float64 [9, units]    attribute: axis (int, may be < 0)
 *
 * The nine per-unit statistics of x along `axis` (see relu_stats_compute.h), computed in
 * one read of x on ONNX Runtime's intra-op threads. Loaded by deadrelu with
 * SessionOptions.register_custom_ops_library; built and checked by deadrelu/probe/kernel.py.
 *
 * The ONNX Runtime C API is reached through its ABI, declared below from its documentation:
 * OrtApiBase is {GetApi, GetVersionString}; OrtApi is a table of function pointers whose
 * order never changes (new functions are appended), so each function is its slot number;
 * OrtCustomOp is a `version` followed by function pointers in a fixed order. Version 17 of
 * the API (onnxruntime 1.17, this project's oldest supported release) has every slot used here.
 */
#include "relu_stats_compute.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define API_VERSION 17

typedef struct OrtStatus OrtStatus;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef void *const *OrtApiTable; /* the OrtApi struct, as its slots */

typedef struct {
    OrtApiTable (*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

/* OrtApi slots (zero-based) of the functions this file calls. */
enum {
    SLOT_CREATE_STATUS = 0,
    SLOT_CREATE_CUSTOM_OP_DOMAIN = 26,
    SLOT_CUSTOM_OP_DOMAIN_ADD = 27,
    SLOT_ADD_CUSTOM_OP_DOMAIN = 28,
    SLOT_GET_TENSOR_MUTABLE_DATA = 51,
    SLOT_GET_TENSOR_ELEMENT_TYPE = 60,
    SLOT_GET_DIMENSIONS_COUNT = 61,
    SLOT_GET_DIMENSIONS = 62,
    SLOT_GET_TENSOR_TYPE_AND_SHAPE = 65,
    SLOT_KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
    SLOT_KERNEL_CONTEXT_GET_INPUT = 90,
    SLOT_KERNEL_CONTEXT_GET_OUTPUT = 91,
    SLOT_RELEASE_STATUS = 93,
    SLOT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
    SLOT_KERNEL_CONTEXT_PARALLEL_FOR = 274,
};

#define ORT_FAIL 1
#define ORT_INVALID_ARGUMENT 2
#define ELEMENT_FLOAT 1
#define ELEMENT_DOUBLE 11
#define MAX_RANK 64

typedef OrtStatus *(*CreateStatusFn)(int code, const char *message);
typedef OrtStatus *(*CreateCustomOpDomainFn)(const char *domain, OrtCustomOpDomain **out);
typedef OrtStatus *(*CustomOpDomainAddFn)(OrtCustomOpDomain *domain, const void *op);
typedef OrtStatus *(*AddCustomOpDomainFn)(OrtSessionOptions *options, OrtCustomOpDomain *domain);
typedef OrtStatus *(*GetTensorMutableDataFn)(OrtValue *value, void **out);
typedef OrtStatus *(*GetTensorElementTypeFn)(const OrtTensorTypeAndShapeInfo *info, int *out);
typedef OrtStatus *(*GetDimensionsCountFn)(const OrtTensorTypeAndShapeInfo *info, size_t *out);
typedef OrtStatus *(*GetDimensionsFn)(const OrtTensorTypeAndShapeInfo *info, int64_t *dims, size_t length);
typedef OrtStatus *(*GetTensorTypeAndShapeFn)(const OrtValue *value, OrtTensorTypeAndShapeInfo **out);
typedef OrtStatus *(*KernelInfoGetAttributeInt64Fn)(const OrtKernelInfo *info, const char *name, int64_t *out);
typedef OrtStatus *(*KernelContextGetInputFn)(const OrtKernelContext *context, size_t index, const OrtValue **out);
typedef OrtStatus *(*KernelContextGetOutputFn)(OrtKernelContext *context, size_t index, const int64_t *dims,
                                               size_t count, OrtValue **out);
typedef void (*ReleaseStatusFn)(OrtStatus *status);
typedef void (*ReleaseTensorTypeAndShapeInfoFn)(OrtTensorTypeAndShapeInfo *info);
typedef OrtStatus *(*KernelContextParallelForFn)(const OrtKernelContext *context, void (*fn)(void *, size_t),
                                                 size_t total, size_t num_batch, void *user_data);

#define CALL(api, slot, type) ((type)(api)[slot])

/* OrtCustomOp, through the members of version 17 and the four after them (left NULL). */
typedef struct CustomOp CustomOp;
struct CustomOp {
    uint32_t version;
    void *(*CreateKernel)(const CustomOp *op, OrtApiTable api, const OrtKernelInfo *info);
    const char *(*GetName)(const CustomOp *op);
    const char *(*GetExecutionProviderType)(const CustomOp *op);
    int (*GetInputType)(const CustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const CustomOp *op);
    int (*GetOutputType)(const CustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const CustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const CustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const CustomOp *op, size_t index);
    int (*GetInputMemoryType)(const CustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const CustomOp *op);
    int (*GetVariadicInputHomogeneity)(const CustomOp *op);
    int (*GetVariadicOutputMinArity)(const CustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const CustomOp *op);
    OrtStatus *(*CreateKernelV2)(const CustomOp *op, OrtApiTable api, const OrtKernelInfo *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
    OrtStatus *(*InferOutputShapeFn)(const CustomOp *op, void *context);
    int (*GetStartVersion)(const CustomOp *op);
    int (*GetEndVersion)(const CustomOp *op);
    void *unused[4]; /* GetMayInplace, ReleaseMayInplace, GetAliasMap, ReleaseAliasMap (version >= 18) */
};

typedef struct {
    OrtApiTable api;
    int64_t axis;
} Kernel;

/* --- the operator's description ------------------------------------------------------------ */

static const char *op_name(const CustomOp *op) { (void)op; return "ReluStats"; }
static const char *op_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int op_input_type(const CustomOp *op, size_t i) { (void)op; (void)i; return ELEMENT_FLOAT; }
static int op_output_type(const CustomOp *op, size_t i) { (void)op; (void)i; return ELEMENT_DOUBLE; }
static size_t op_one(const CustomOp *op) { (void)op; return 1; }
static int op_required(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int op_default_memory(const CustomOp *op, size_t i) { (void)op; (void)i; return 0; }
static int op_start_version(const CustomOp *op) { (void)op; return 1; }
static int op_end_version(const CustomOp *op) { (void)op; return 2147483647; }

static OrtStatus *fail(OrtApiTable api, int code, const char *message) {
    return CALL(api, SLOT_CREATE_STATUS, CreateStatusFn)(code, message);
}

static OrtStatus *create_kernel(const CustomOp *op, OrtApiTable api, const OrtKernelInfo *info, void **out) {
    (void)op;
    int64_t axis = 0;
    OrtStatus *status = CALL(api, SLOT_KERNEL_INFO_GET_ATTRIBUTE_INT64, KernelInfoGetAttributeInt64Fn)(info, "axis", &axis);
    if (status) CALL(api, SLOT_RELEASE_STATUS, ReleaseStatusFn)(status);  /* no attribute: axis 0 */
    Kernel *kernel = malloc(sizeof *kernel);
    if (!kernel) return fail(api, ORT_FAIL, "ReluStats: out of memory");
    kernel->api = api;
    kernel->axis = axis;
    *out = kernel;
    return NULL;
}

static void destroy_kernel(void *kernel) { free(kernel); }

/* --- running it ------------------------------------------------------------------------------ */

static void reduce_one_item(void *tensor, size_t item) { reduce_item((const Tensor *)tensor, item); }

/* The input's shape; NULL or an error status. */
static OrtStatus *input_shape(OrtApiTable api, const OrtValue *input, int64_t *dims, size_t *rank, int *type) {
    OrtTensorTypeAndShapeInfo *info = NULL;
    OrtStatus *status = CALL(api, SLOT_GET_TENSOR_TYPE_AND_SHAPE, GetTensorTypeAndShapeFn)(input, &info);
    if (status) return status;
    status = CALL(api, SLOT_GET_TENSOR_ELEMENT_TYPE, GetTensorElementTypeFn)(info, type);
    if (!status) status = CALL(api, SLOT_GET_DIMENSIONS_COUNT, GetDimensionsCountFn)(info, rank);
    if (!status && *rank > MAX_RANK) status = fail(api, ORT_INVALID_ARGUMENT, "ReluStats: input rank over 64");
    if (!status) status = CALL(api, SLOT_GET_DIMENSIONS, GetDimensionsFn)(info, dims, *rank);
    CALL(api, SLOT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseTensorTypeAndShapeInfoFn)(info);
    return status;
}

static OrtStatus *compute(void *opaque, OrtKernelContext *context) {
    const Kernel *kernel = opaque;
    OrtApiTable api = kernel->api;
    const OrtValue *input = NULL;
    OrtStatus *status = CALL(api, SLOT_KERNEL_CONTEXT_GET_INPUT, KernelContextGetInputFn)(context, 0, &input);
    if (status) return status;
    int64_t dims[MAX_RANK];
    size_t rank = 0;
    int type = 0;
    if ((status = input_shape(api, input, dims, &rank, &type))) return status;
    if (type != ELEMENT_FLOAT) return fail(api, ORT_INVALID_ARGUMENT, "ReluStats: the input must be float32");
    int64_t axis = kernel->axis < 0 ? kernel->axis + (int64_t)rank : kernel->axis;
    if (rank > 0 && (axis < 0 || axis >= (int64_t)rank)) {
        char message[96];
        snprintf(message, sizeof message, "ReluStats: axis %lld is out of range for rank %zu",
                 (long long)kernel->axis, rank);
        return fail(api, ORT_INVALID_ARGUMENT, message);
    }
    Tensor x = {NULL, NULL, 1, 1, 1};
    for (size_t d = 0; d < rank; d++) {
        if ((int64_t)d < axis) x.outer *= (size_t)dims[d];
        else if ((int64_t)d == axis) x.units = (size_t)dims[d];
        else x.inner *= (size_t)dims[d];
    }
    void *data = NULL;
    if ((status = CALL(api, SLOT_GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)((OrtValue *)input, &data))) return status;
    x.x = data;
    const int64_t out_dims[2] = {STAT_ROWS, (int64_t)x.units};
    OrtValue *output = NULL;
    status = CALL(api, SLOT_KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn)(context, 0, out_dims, 2, &output);
    if (status) return status;
    if ((status = CALL(api, SLOT_GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(output, &data))) return status;
    x.out = data;
    if (x.units == 0) return NULL;
    if (x.outer == 0 || x.inner == 0) {
        write_empty(&x);
        return NULL;
    }
    /* num_batch 0: the pool hands out work items as threads free up. (Fixed batches of
     * >= 16K values each were slower inside a ResNet-50 scan: 16-17 ms against 10-13 ms
     * per batch of 8, while equal on the kernel alone.) */
    return CALL(api, SLOT_KERNEL_CONTEXT_PARALLEL_FOR, KernelContextParallelForFn)(
        context, reduce_one_item, work_items(&x), 0, &x);
}

static CustomOp relu_stats_op = {
    .version = API_VERSION,
    .GetName = op_name,
    .GetExecutionProviderType = op_provider,
    .GetInputType = op_input_type,
    .GetInputTypeCount = op_one,
    .GetOutputType = op_output_type,
    .GetOutputTypeCount = op_one,
    .KernelDestroy = destroy_kernel,
    .GetInputCharacteristic = op_required,
    .GetOutputCharacteristic = op_required,
    .GetInputMemoryType = op_default_memory,
    .CreateKernelV2 = create_kernel,
    .KernelComputeV2 = compute,
    .GetStartVersion = op_start_version,
    .GetEndVersion = op_end_version,
};

/* The entry point ONNX Runtime looks up in a custom-op library. The domain lives as long
 * as the process: sessions built from these options keep using it. */
__attribute__((visibility("default"))) OrtStatus *RegisterCustomOps(OrtSessionOptions *options,
                                                                    const OrtApiBase *base) {
    OrtApiTable api = base->GetApi(API_VERSION);
    if (!api) return NULL; /* cannot even make a status: onnxruntime older than 1.17 */
    OrtCustomOpDomain *domain = NULL;
    OrtStatus *status = CALL(api, SLOT_CREATE_CUSTOM_OP_DOMAIN, CreateCustomOpDomainFn)("ai.deadrelu", &domain);
    if (status) return status;
    if ((status = CALL(api, SLOT_CUSTOM_OP_DOMAIN_ADD, CustomOpDomainAddFn)(domain, &relu_stats_op))) return status;
    return CALL(api, SLOT_ADD_CUSTOM_OP_DOMAIN, AddCustomOpDomainFn)(options, domain);
}

/* --- the same statistics for callers outside ONNX Runtime (deadrelu's PyTorch CPU path) ---- */

/* libgomp's entry for `#pragma omp parallel` (its ABI since GCC 4.9): fn(data) runs on a team
 * of num_threads threads (0: the process's default), the caller's thread among them. */
typedef void (*GompParallelFn)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);

typedef struct {
    const Tensor *x;
    atomic_size_t next; /* the next work item to hand out */
    size_t items;
} WorkQueue;

static void drain(void *queue) {
    WorkQueue *q = queue;
    for (size_t item; (item = atomic_fetch_add(&q->next, 1)) < q->items;) reduce_item(q->x, item);
}

/* The nine statistics of a contiguous float32 tensor viewed as (outer, units, inner), into
 * out[9 * units]. With `parallel` (the GOMP_parallel of the OpenMP runtime the caller's
 * other work already runs on), the work items go to that runtime's team of `threads`
 * threads, whichever is free; without it, to the calling thread alone. (Threads of our own
 * would compete with that runtime's, which spin for a while after each parallel region.) */
__attribute__((visibility("default"))) void deadrelu_relu_stats(const float *data, double *out, size_t outer,
                                                                size_t units, size_t inner, unsigned threads,
                                                                GompParallelFn parallel) {
    Tensor x = {data, out, outer, units, inner};
    if (units == 0) return;
    if (outer == 0 || inner == 0) {
        write_empty(&x);
        return;
    }
    WorkQueue queue = {&x, 0, work_items(&x)};
    if (parallel && threads > 1 && queue.items > 1)
        parallel(drain, &queue, threads < queue.items ? threads : (unsigned)queue.items, 0);
    else
        drain(&queue);
}

/* acc += batch, both 9 x units in the order above (count, positive, nan, inf, minimum,
 * maximum, mean, m2, relu_sum): counts and sums add, extremes combine, mean and m2 by
 * Chan's parallel formula -- the arithmetic of deadrelu.reductions.chan_merge, for the
 * running statistics of a site whose batches the kernel reduces. */
__attribute__((visibility("default"))) void deadrelu_fold_rows(double *acc, const double *batch, size_t units) {
    double *count = acc, *positive = acc + units, *nan = acc + 2 * units, *inf = acc + 3 * units;
    double *minimum = acc + 4 * units, *maximum = acc + 5 * units, *mean = acc + 6 * units;
    double *m2 = acc + 7 * units, *relu = acc + 8 * units;
    const double *b = batch;
    for (size_t u = 0; u < units; u++) {
        const double na = count[u], nb = b[u], total = na + nb, safe = total > 1.0 ? total : 1.0;
        const double delta = b[6 * units + u] - mean[u];
        mean[u] = mean[u] + delta * (nb / safe);
        m2[u] = m2[u] + b[7 * units + u] + delta * delta * (na * nb / safe);
        count[u] = total;
        positive[u] += b[units + u];
        nan[u] += b[2 * units + u];
        inf[u] += b[3 * units + u];
        if (b[4 * units + u] < minimum[u]) minimum[u] = b[4 * units + u];
        if (b[5 * units + u] > maximum[u]) maximum[u] = b[5 * units + u];
        relu[u] += b[8 * units + u];
    }
}
