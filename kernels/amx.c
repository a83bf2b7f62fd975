// kernels/amx.c: the bf16 products on AMX tiles (Intel Sapphire Rapids and later), forward
// (matmul_amx) and backward (matmul_backward_amx), and the run-time decision whether they run
// (amx_on). Same arithmetic as the AVX512-BF16 tiles (ROUTE_AMX, bounds in test/test_quant.c).
#define _DEFAULT_SOURCE  // syscall(), for the AMX permission
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "../threads.h"
#include "kernels.h"

#if HAVE_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

// Intel's AMX (Sapphire Rapids and later) multiplies whole tiles: one tdpbf16ps adds the product
// of a 16 x 32 bf16 tile and a 32 x 16 bf16 tile into a 16 x 16 fp32 tile, 8192 products an
// instruction, the same rounding as vdpbf16ps (bf16 factors, fp32 sums). The CPU may have it and
// the kernel may refuse it: amx_ready() asks both once per process (cpuid, then Linux's
// arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)); SFT_NO_AMX=1 in the environment turns it off.
// The tile configuration belongs to a thread: every chunk of work loads it and releases it.
//
// Eight tiles of 16 rows x 64 bytes: C0-C3 (tiles 0-3) a 32 x 32 block of fp32 results, A0, A1
// (4, 5) two 16-row blocks of the left factor, B0, B1 (6, 7) two 16-column blocks of the right
// one, whose rows are pairs of k (two bf16 in each 32-bit word, as vdpbf16ps reads them).
//   forward   out[T, OUT] = x[T, IN] W^T: A = tokens x pairs of IN; B = pairs of IN x 16 rows of W
//   backward  dinp[T, IN] += dout[T, OUT] W: A = tokens x pairs of OUT (pack_d's words);
//             B = pairs of rows of W x 16 columns (matmul_backward_tiles_range's interleaved words)
// C tiles are rows of the output itself (stride OUT or IN floats), through a 16 x 16 staging tile
// where a block is cut by the last token or column.
//
// Built with -DSFT_AMX_EMULATE, the tile instructions are C functions on this thread's own eight
// tiles (any CPU with AVX512-BF16), so that CI tests this code where no CPU has AMX.

#define AMX_PAIRS 16  // pairs of k in a tile row (64 bytes of bf16)

// LDTILECFG's 64 bytes: palette 1; per tile, bytes per row and rows.
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} AmxConfig;
static_assert(sizeof(AmxConfig) == 64, "AMX tile configuration");

#if defined(SFT_AMX_EMULATE)
static _Thread_local uint32_t emu_tiles[8][16][16];  // the tiles of this thread: 16 rows x 16 words

static void tile_config(void) {}
static void tile_release(void) {}
static void tile_load(int t, const void *p, size_t stride) {
    for (int r = 0; r < 16; r++) memcpy(emu_tiles[t][r], (const char *)p + r * stride, 64);
}
static void tile_store(int t, void *p, size_t stride) {
    for (int r = 0; r < 16; r++) memcpy((char *)p + r * stride, emu_tiles[t][r], 64);
}
static void tile_zero(int t) { memset(emu_tiles[t], 0, sizeof emu_tiles[t]); }
// C[m][n] += sum_k A[m].bf16[2k] * B[k].bf16[2n] + A[m].bf16[2k+1] * B[k].bf16[2n+1]
static void tile_dp(int c, int a, int b) {
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float acc = f32_from_bits(emu_tiles[c][m][n]);
            for (int k = 0; k < 16; k++) {
                uint32_t x = emu_tiles[a][m][k], w = emu_tiles[b][k][n];
                acc += f32_from_bits(x << 16) * f32_from_bits(w << 16);
                acc += f32_from_bits(x & 0xffff0000u) * f32_from_bits(w & 0xffff0000u);
            }
            emu_tiles[c][m][n] = f32_bits(acc);
        }
}
#define AMX_TARGET
#else
// The tile number of an AMX instruction is part of its encoding: one case per tile, folded away
// when the functions are inlined with a constant.
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))
static inline __attribute__((always_inline)) AMX_TARGET void tile_config(void) {
    AmxConfig cfg = {.palette = 1};
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}
static inline __attribute__((always_inline)) AMX_TARGET void tile_release(void) { _tile_release(); }
static inline __attribute__((always_inline)) AMX_TARGET void tile_load(int t, const void *p, size_t stride) {
    switch (t) {
    case 0: _tile_loadd(0, p, stride); break;
    case 1: _tile_loadd(1, p, stride); break;
    case 2: _tile_loadd(2, p, stride); break;
    case 3: _tile_loadd(3, p, stride); break;
    case 4: _tile_loadd(4, p, stride); break;
    case 5: _tile_loadd(5, p, stride); break;
    case 6: _tile_loadd(6, p, stride); break;
    default: _tile_loadd(7, p, stride); break;
    }
}
static inline __attribute__((always_inline)) AMX_TARGET void tile_store(int t, void *p, size_t stride) {
    switch (t) {
    case 0: _tile_stored(0, p, stride); break;
    case 1: _tile_stored(1, p, stride); break;
    case 2: _tile_stored(2, p, stride); break;
    default: _tile_stored(3, p, stride); break;
    }
}
static inline __attribute__((always_inline)) AMX_TARGET void tile_zero(int t) {
    switch (t) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    default: _tile_zero(3); break;
    }
}
// C_c += A_a B_b for the four products of a 32 x 32 block: (0, 4, 6), (1, 4, 7), (2, 5, 6), (3, 5, 7).
static inline __attribute__((always_inline)) AMX_TARGET void tile_dp(int c, int a, int b) {
    (void)a, (void)b;
    switch (c) {
    case 0: _tile_dpbf16ps(0, 4, 6); break;
    case 1: _tile_dpbf16ps(1, 4, 7); break;
    case 2: _tile_dpbf16ps(2, 5, 6); break;
    default: _tile_dpbf16ps(3, 5, 7); break;
    }
}
#endif

// The C tile of token block tb (0, 1) and column block cb (0, 1) of a 32 x 32 block; its A and B.
static inline int tile_c(int tb, int cb) { return 2 * tb + cb; }

// Loads (load = 1) or stores C tile c from / to the rows t0.. and columns n0.. of y (row stride
// ld floats), nt <= 16 rows and nc <= 16 columns of which exist: whole tiles directly, cut ones
// through stage[16 x 16].
static inline __attribute__((always_inline)) AMX_TARGET void tile_c_io(int c, float *y, size_t ld, int nt, int nc,
                                                                        float *stage, int load) {
    if (nt == 16 && nc == 16) {
        if (load) tile_load(c, y, ld * sizeof(float));
        else tile_store(c, y, ld * sizeof(float));
        return;
    }
    if (load) {
        memset(stage, 0, 256 * sizeof(float));
        for (int r = 0; r < nt; r++) memcpy(stage + 16 * r, y + r * ld, (size_t)nc * sizeof(float));
        tile_load(c, stage, 64);
    } else {
        tile_store(c, stage, 64);
        for (int r = 0; r < nt; r++) memcpy(y + r * ld, stage + 16 * r, (size_t)nc * sizeof(float));
    }
}

typedef struct {
    float *out;            // (T, OUT)
    const float *bias;     // (OUT) or NULL
    const QMatrix *W;      // (OUT, IN)
    int T, KP;             // tokens; pairs of IN rounded up to AMX_PAIRS
    const uint32_t *x;     // [round_up(T, 32), KP] inp as bf16 pairs, token-major, zeros past T and IN
} AmxFwd;

// Rows [r0, r1) of the output (r0 a multiple of 32), every token: per block of 32 rows of W, its
// bf16 pairs as two B operands [KP, 16] (one per 16 rows), then every block of 32 tokens through
// the whole of IN with the four C tiles in registers.
static AMX_TARGET void matmul_amx_range(void *ctx, int r0, int r1) {
    const AmxFwd *f = ctx;
    const QMatrix *W = f->W;
    int IN = W->cols, OUT = W->rows, KP = f->KP;
    float *tmp = scratch_local((size_t)IN * sizeof(float) + 16 * (size_t)KP * 4 * 3 + 256 * sizeof(float));
    uint32_t *rows16 = (uint32_t *)(tmp + IN), *B = rows16 + 16 * (size_t)KP;  // B: [2][KP][16]
    float *stage = (float *)(B + 32 * (size_t)KP);
    tile_config();
    for (int o0 = r0; o0 < r1; o0 += 32) {
        for (int g = 0; g < 2; g++) {
            for (int j = 0; j < 16; j++) {
                uint32_t *words = rows16 + (size_t)j * KP;
                int o = o0 + 16 * g + j;
                memset(words, 0, (size_t)KP * sizeof(uint32_t));
                if (o >= r1) continue;
                dequantize_span(W->type, tmp, qmatrix_row_data(W, o), 0, IN);
                to_bf16_pairs(words, tmp, IN);
            }
            transpose_words16(B + (size_t)g * KP * 16, 16, rows16, (size_t)KP, KP);
        }
        int nrows = r1 - o0 < 32 ? r1 - o0 : 32;
        for (int t0 = 0; t0 < f->T; t0 += 32) {
            for (int c = 0; c < 4; c++) tile_zero(c);
            for (int k = 0; k < KP; k += AMX_PAIRS) {
                tile_load(4, f->x + (size_t)t0 * KP + k, (size_t)KP * 4);
                tile_load(5, f->x + (size_t)(t0 + 16) * KP + k, (size_t)KP * 4);
                tile_load(6, B + (size_t)k * 16, 64);
                tile_load(7, B + (size_t)KP * 16 + (size_t)k * 16, 64);
                tile_dp(0, 4, 6), tile_dp(1, 4, 7), tile_dp(2, 5, 6), tile_dp(3, 5, 7);
            }
            for (int tb = 0; tb < 2; tb++)
                for (int cb = 0; cb < 2; cb++) {
                    int nt = f->T - (t0 + 16 * tb), nc = nrows - 16 * cb;
                    if (nt <= 0 || nc <= 0) continue;
                    tile_c_io(tile_c(tb, cb), f->out + (size_t)(t0 + 16 * tb) * OUT + o0 + 16 * cb, (size_t)OUT,
                              nt < 16 ? nt : 16, nc < 16 ? nc : 16, stage, 0);
                }
        }
        if (f->bias)
            for (int t = 0; t < f->T; t++)
                for (int n = 0; n < nrows; n++) f->out[(size_t)t * OUT + o0 + n] += f->bias[o0 + n];
    }
    tile_release();
}

// The left operands of the AMX products: rows [t0, t1) of src[T, n] as rows of `words` bf16 pairs
// in dst[round_up(T, 32), words] (zeros past n, and for the rows past T).
typedef struct {
    uint32_t *dst;
    const float *src;
    int T, n, words;
} AmxRows;

static void amx_pack_rows(void *ctx, int t0, int t1) {
    const AmxRows *p = ctx;
    for (int t = t0; t < t1; t++) {
        uint32_t *row = p->dst + (size_t)t * p->words;
        memset(row, 0, (size_t)p->words * sizeof(uint32_t));
        if (t < p->T) to_bf16_pairs(row, p->src + (size_t)t * p->n, p->n);
    }
}

void matmul_amx(float *out, const float *inp, const QMatrix *W, const float *bias, int T) {
    int TP = (int)round_up((size_t)T, 32), KP = (int)round_up((size_t)(W->cols + 1) / 2, AMX_PAIRS);
    uint32_t *x = scratch_shared((size_t)TP * KP * sizeof(uint32_t));
    AmxFwd f = {out, bias, W, T, KP, x};
    AmxRows p = {x, inp, T, W->cols, KP};
    parallel_for(amx_pack_rows, &p, TP, 16);
    parallel_for(matmul_amx_range, &f, W->rows, 32);
}

typedef struct {
    float *dinp;           // (T, IN)
    const QMatrix *W;      // (OUT, IN)
    int T, QP;             // tokens; pairs of rows of W rounded up to AMX_PAIRS
    const uint32_t *d;     // [round_up(T, 32), QP] dout as bf16 pairs along OUT, zeros past T and OUT
} AmxBwd;

#define AMX_BWD_QC 512  // pairs of rows of W whose B operands are made at one time

// Columns [c0, c1) of dinp (c0 a multiple of 32 and of the block size), every token: per block of
// CB columns and AMX_BWD_QC pairs of rows, their words interleaved in pairs of rows as B operands
// [QC, 16] per 16 columns, then every block of 32 tokens x 32 columns, the C tiles loaded from dinp
// and stored back after the chunk's pairs.
static AMX_TARGET void matmul_backward_amx_range(void *ctx, int c0, int c1) {
    const AmxBwd *b = ctx;
    const QMatrix *W = b->W;
    int OUT = W->rows, IN = W->cols, bs = type_info(W->type)->block, CB = bs > 64 ? bs : 64;
    float *tmp = scratch_local(2 * (size_t)CB * sizeof(float) + (size_t)AMX_BWD_QC * CB * 4 + 256 * sizeof(float));
    float *wa = tmp, *wb = tmp + CB, *stage = wb + CB;
    uint32_t *B = (uint32_t *)(stage + 256);  // [CB / 16][QC][16]
    tile_config();
    for (int cb0 = c0; cb0 < c1; cb0 += CB) {
        int ncols = c1 - cb0 < CB ? c1 - cb0 : CB;
        for (int q0 = 0; q0 < b->QP; q0 += AMX_BWD_QC) {
            int nq = b->QP - q0 < AMX_BWD_QC ? b->QP - q0 : AMX_BWD_QC;
            for (int q = 0; q < nq; q++) {
                int oa = 2 * (q0 + q);
                if (oa < OUT) dequantize_span(W->type, wa, qmatrix_row_data(W, oa), cb0, ncols);
                else memset(wa, 0, (size_t)ncols * sizeof(float));
                if (oa + 1 < OUT) dequantize_span(W->type, wb, qmatrix_row_data(W, oa + 1), cb0, ncols);
                else memset(wb, 0, (size_t)ncols * sizeof(float));
                for (int g = 0; g < ncols / 16; g++)
                    to_bf16_interleaved(B + ((size_t)g * AMX_BWD_QC + q) * 16, wa + 16 * g, wb + 16 * g, 16);
            }
            for (int t0 = 0; t0 < b->T; t0 += 32) {
                for (int g = 0; g < ncols / 16; g += 2) {  // ncols: a multiple of 32
                    for (int tb = 0; tb < 2; tb++)
                        for (int cb = 0; cb < 2; cb++) {
                            int nt = b->T - (t0 + 16 * tb);
                            if (nt <= 0) tile_zero(tile_c(tb, cb));
                            else tile_c_io(tile_c(tb, cb), b->dinp + (size_t)(t0 + 16 * tb) * IN + cb0 + 16 * (g + cb),
                                           (size_t)IN, nt < 16 ? nt : 16, 16, stage, 1);
                        }
                    for (int k = 0; k < nq; k += AMX_PAIRS) {
                        tile_load(4, b->d + (size_t)t0 * b->QP + q0 + k, (size_t)b->QP * 4);
                        tile_load(5, b->d + (size_t)(t0 + 16) * b->QP + q0 + k, (size_t)b->QP * 4);
                        tile_load(6, B + ((size_t)g * AMX_BWD_QC + k) * 16, 64);
                        tile_load(7, B + ((size_t)(g + 1) * AMX_BWD_QC + k) * 16, 64);
                        tile_dp(0, 4, 6), tile_dp(1, 4, 7), tile_dp(2, 5, 6), tile_dp(3, 5, 7);
                    }
                    for (int tb = 0; tb < 2; tb++)
                        for (int cb = 0; cb < 2; cb++) {
                            int nt = b->T - (t0 + 16 * tb);
                            if (nt > 0)
                                tile_c_io(tile_c(tb, cb), b->dinp + (size_t)(t0 + 16 * tb) * IN + cb0 + 16 * (g + cb),
                                          (size_t)IN, nt < 16 ? nt : 16, 16, stage, 0);
                        }
                }
            }
        }
    }
    tile_release();
}

void matmul_backward_amx(float *dinp, const float *dout, const QMatrix *W, int T) {
    int TP = (int)round_up((size_t)T, 32), QP = (int)round_up((size_t)(W->rows + 1) / 2, AMX_PAIRS);
    int bs = type_info(W->type)->block;
    uint32_t *d = scratch_shared((size_t)TP * QP * sizeof(uint32_t));
    AmxBwd b = {dinp, W, T, QP, d};
    AmxRows p = {d, dout, T, W->rows, QP};
    parallel_for(amx_pack_rows, &p, TP, 16);
    parallel_for(matmul_backward_amx_range, &b, W->cols, bs > 64 ? bs : 64);
}
// Whether the AMX route runs, decided once per process (Linux grants the tile state to a whole
// process): the one mutable state of the kernels, written once under pthread_once.
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_state;                  // 1: AMX runs
static const char *amx_reason = "";    // why it does or does not, for kernel_path

static void amx_decide(void) {
    const char *no = getenv("SFT_NO_AMX");
    if (no && *no && strcmp(no, "0") != 0) {
        amx_reason = "AMX off: SFT_NO_AMX is set";
        return;
    }
#if defined(SFT_AMX_EMULATE)
    amx_state = 1, amx_reason = "AMX tiles emulated in C (SFT_AMX_EMULATE build)";
#else
    unsigned a, b, c, d;
    uint32_t xcr0, xcr0_hi;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) {
        amx_reason = "no AMX on this CPU";  // cpuid.7.0: EDX bit 24 AMX-TILE, bit 22 AMX-BF16
        return;
    }
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) {
        amx_reason = "AMX refused by the kernel (arch_prctl)";
        return;
    }
    __asm__ volatile("xgetbv" : "=a"(xcr0), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0 & (3u << 17)) != (3u << 17)) {  // XTILECFG, XTILEDATA enabled by the OS
        amx_reason = "AMX not enabled by the kernel (XCR0)";
        return;
    }
    amx_state = 1, amx_reason = "AMX tiles, tdpbf16ps";
#endif
}

int amx_on(void) {
    pthread_once(&amx_once, amx_decide);
    return amx_state;
}

const char *amx_why(void) {
    pthread_once(&amx_once, amx_decide);
    return amx_reason;
}

#endif  // HAVE_AMX
