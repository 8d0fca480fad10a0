/* tcvae.c -- beta-TCVAE's decomposition of the top layer's KL term (Chen et
 * al. 2018, "Isolating Sources of Disentanglement in VAEs"), estimated on a
 * minibatch of B rows by minibatch-weighted sampling (their eq. (S6)) from a
 * data set of N rows. For row i with sample z_i ~ q(z|x_i):
 *   log q(z_i)        ~ logsumexp_j log q(z_i | x_j)           - log(N B)
 *   log q_k(z_ik)     ~ logsumexp_j log q(z_ik | x_j)          - log(N B)
 *   MI_i = log q(z_i|x_i) - log q(z_i)          (index-code mutual information)
 *   TC_i = log q(z_i) - sum_k log q_k(z_ik)     (total correlation)
 *   DW_i = sum_k log q_k(z_ik) - log p(z_i)     (dimension-wise KL)
 * so MI + TC + DW = log q(z_i|x_i) - log p(z_i), the sampled KL estimate,
 * term by term. The training term is alpha MI + beta TC + gamma DW, with
 * p = N(0, I). log q(z_i|x_i) is taken pathwise as the Gaussian layers' is
 * (-(log 2 pi + lv + eps^2)/2 per unit: its derivative flows through lv
 * only); every other density's derivative flows to z_i and to the (mu_j,
 * lv_j) of every row j. Cost B^2 d exponentials; memory 2 B d + B doubles
 * of the workspace.
 *
 * The rows i whose terms are computed and the rows j of the minibatch they
 * are estimated against are passed apart: one process passes its B rows as
 * both; a data-parallel process (train.c) its own rows i against the whole
 * minibatch's (mu_j, lv_j), gathered from every process, and the gradients
 * of the gathered rows are then summed over the processes. */
#include "internal.h"

#include <math.h>

#define LOG_2PI 1.8378770664093453

static inline double log_normal(double z, double mu, double lv, double *prec)
{
    double diff = z - mu;
    *prec = exp(-lv);
    return -0.5 * (LOG_2PI + lv + diff * diff * *prec);
}

void hvae_tcvae_forward(double *mi, double *tc, double *dw, double *lse_joint,
                        double *lse_dim, const float *z, const float *eps,
                        const float *lv_self, int64_t Bi, const float *mu, const float *lv,
                        int64_t B, int64_t d, double n_data)
{
    double log_nb = log(n_data * (double)B);
    double *sum_dim = lse_dim + Bi * d; /* the running sums */
    for (int64_t i = 0; i < Bi; i++) {
        double *mx = lse_dim + i * d, *sm = sum_dim + i * d;
        double joint_max = -INFINITY, joint_sum = 0.0;
        for (int64_t k = 0; k < d; k++) {
            mx[k] = -INFINITY;
            sm[k] = 0.0;
        }
        /* Online log-sum-exp over j, per unit and for the joint. */
        for (int64_t j = 0; j < B; j++) {
            double s = 0.0, prec;
            for (int64_t k = 0; k < d; k++) {
                double a = log_normal(z[i * d + k], mu[j * d + k], lv[j * d + k], &prec);
                s += a;
                if (a > mx[k]) {
                    sm[k] = sm[k] * exp(mx[k] - a) + 1.0;
                    mx[k] = a;
                } else {
                    sm[k] += exp(a - mx[k]);
                }
            }
            if (s > joint_max) {
                joint_sum = joint_sum * exp(joint_max - s) + 1.0;
                joint_max = s;
            } else {
                joint_sum += exp(s - joint_max);
            }
        }
        double log_qz = joint_max + log(joint_sum) - log_nb, log_marg = 0.0;
        double log_q_given = 0.0, log_p = 0.0;
        for (int64_t k = 0; k < d; k++) {
            mx[k] = mx[k] + log(sm[k]) - log_nb; /* log q_k(z_ik) from here on */
            log_marg += mx[k];
            double e = eps[i * d + k], zz = z[i * d + k];
            log_q_given += -0.5 * (LOG_2PI + lv_self[i * d + k] + e * e);
            log_p += -0.5 * (LOG_2PI + zz * zz);
        }
        lse_joint[i] = log_qz;
        mi[i] = log_q_given - log_qz;
        tc[i] = log_qz - log_marg;
        dw[i] = log_marg - log_p;
    }
}

void hvae_tcvae_backward(float *dz, float *dlv_self, float *dmu, float *dlv,
                         const double *lse_joint, const double *lse_dim, const float *z,
                         int64_t Bi, const float *mu, const float *lv, int64_t B, int64_t d,
                         double n_data, const float *weights, float scale)
{
    /* alpha MI + beta TC + gamma DW = alpha log q(z|x) + (beta - alpha) log q(z)
     *   + (gamma - beta) sum_k log q_k(z_k) - gamma log p(z). */
    double log_nb = log(n_data * (double)B);
    double a = weights[0], b = weights[1], g = weights[2];
    double c_joint = scale * (b - a), c_dim = scale * (g - b);
    for (int64_t i = 0; i < Bi; i++) {
        for (int64_t k = 0; k < d; k++) {
            dlv_self[i * d + k] += (float)(scale * a * -0.5);
            dz[i * d + k] += (float)(scale * g * z[i * d + k]);
        }
        for (int64_t j = 0; j < B; j++) {
            double s = 0.0, prec;
            for (int64_t k = 0; k < d; k++)
                s += log_normal(z[i * d + k], mu[j * d + k], lv[j * d + k], &prec);
            double w_joint = exp(s - (lse_joint[i] + log_nb));
            for (int64_t k = 0; k < d; k++) {
                double zz = z[i * d + k], diff = zz - mu[j * d + k];
                double A = log_normal(zz, mu[j * d + k], lv[j * d + k], &prec);
                double w_dim = exp(A - (lse_dim[i * d + k] + log_nb));
                double coef = c_joint * w_joint + c_dim * w_dim;
                dz[i * d + k] += (float)(coef * -diff * prec);
                dmu[j * d + k] += (float)(coef * diff * prec);
                dlv[j * d + k] += (float)(coef * (-0.5 + 0.5 * diff * diff * prec));
            }
        }
    }
}
