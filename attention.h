// attention.h: causal grouped-query attention (Qwen2's self-attention after the projections and
// RoPE): query head h uses key/value head h / (NH / NKV), scores scaled by 1 / sqrt(HS), row i
// sees keys 0..pos0+i. Shapes use model.h's letters; P(n) is n rounded up to a multiple of 16.
//
// attention_forward / attention_backward run the textbook version in the reference build
// (make debug, make test-ref) and the tiled one otherwise; both are public for the tests.
#ifndef ATTENTION_H
#define ATTENTION_H

// out[T, NH*HS], lse[NH, T] (or NULL) <- q[T, NH*HS] at positions pos0.., k, v [pos0+T, NKV*HS];
// work[NKV*HS*P(pos0+T)] is scratch
void attention_forward(float *out, float *lse, float *work, const float *q, const float *k, const float *v, int T,
                       int pos0, int NH, int NKV, int HS);
// dq[T, NH*HS] +=, dk, dv [pos0+T, NKV*HS] +=, dsum[NH, T] <- dout, out, q (at positions pos0..),
// k, v [pos0+T, NKV*HS], lse; work[4*P(pos0+T)*NKV*HS] is scratch
void attention_backward(float *dq, float *dk, float *dv, float *dsum, float *work, const float *dout, const float *out,
                        const float *q, const float *k, const float *v, const float *lse, int T, int pos0, int NH,
                        int NKV, int HS);

// The two versions behind them, same arguments.
void attention_forward_ref(float *out, float *lse, float *work, const float *q, const float *k, const float *v, int T,
                           int pos0, int NH, int NKV, int HS);
void attention_backward_ref(float *dq, float *dk, float *dv, float *dsum, float *work, const float *dout,
                            const float *out, const float *q, const float *k, const float *v, const float *lse, int T,
                            int pos0, int NH, int NKV, int HS);
void attention_forward_tiled(float *out, float *lse, float *work, const float *q, const float *k, const float *v,
                             int T, int pos0, int NH, int NKV, int HS);
void attention_backward_tiled(float *dq, float *dk, float *dv, float *dsum, float *work, const float *dout,
                              const float *out, const float *q, const float *k, const float *v, const float *lse,
                              int T, int pos0, int NH, int NKV, int HS);

#endif
