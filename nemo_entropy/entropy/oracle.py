"""Float64 oracle and the stated tolerances of the entropy kernels: used by the tests (tests/, tests/gpu/)
and by ``nemo-entropy check-kernels`` on an installed package, so both hold the kernels to the same bar.

The oracle is independent of the code under test: plain ``torch.log_softmax`` in float64 on the *same*
(already rounded) input values, over the valid (unpadded, finite) columns only, and autograd for the
gradients. Comparing low-precision inputs against float64 math on the rounded values keeps the
tolerances tight: the only error left is the kernels' fp32 arithmetic (and the final rounding of the
gradient to the input dtype). It runs on the device of its inputs; pass CPU tensors for GPU results
(float64 is slow on most GPUs).
"""

from __future__ import annotations

import torch

# Stated tolerances, |ours - oracle| <= ATOL + RTOL * |oracle|:
# * entropy / log-prob (fp32 outputs whatever the input dtype): fp32 accumulation over up to 50k terms in
#   blocks; the measured error is ~1e-6 at |H| ~ 10.
VALUE_RTOL, VALUE_ATOL = 1e-5, 2e-5
# * gradients: fp32 math (p has relative error ~ |z - lse| * 2^-24), then one rounding to the input
#   dtype: 2^-9 relative for bfloat16 (8 significant bits, we allow 2^-8: one ulp), 2^-12 for float16
#   (we allow 2^-10, plus subnormals), exact for float32.
GRAD_TOL = {
    torch.float32: (1e-5, 2e-6),
    torch.bfloat16: (2.0**-8, 2e-6),
    torch.float16: (2.0**-10, 2e-6),
}


def oracle(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, g_entropy=None, g_logprob=None):
    """Float64 ``(entropy, logprob, grad)`` of full (unsharded) logits ``[rows, V_padded]``.

    Columns ``>= vocab_size`` and ``-inf`` entries are left out of the distribution (zero gradient).
    ``grad`` is the gradient of ``sum(g_entropy * H + g_logprob * logp)`` (None if both are None).
    """
    rows, width = logits.shape
    z = logits.detach()[:, :vocab_size].double()
    z = z.clone().requires_grad_(True)
    finite = torch.isfinite(z) | torch.isnan(z)
    masked = z.masked_fill(~finite, float("-inf"))
    logp_all = torch.log_softmax(masked, dim=-1)
    p = logp_all.exp()
    # p * log p with p = 0 is 0 (the limit), not 0 * -inf.
    plogp = torch.where(finite, p * logp_all.masked_fill(~finite, 0.0), torch.zeros_like(p))
    entropy = -plogp.sum(-1)
    logprob = logp_all.gather(1, targets.reshape(-1, 1).long()).squeeze(1)
    grad = None
    if g_entropy is not None or g_logprob is not None:
        zeros = torch.zeros(rows, dtype=torch.float64, device=z.device)
        ge = zeros if g_entropy is None else g_entropy.double()
        gl = zeros if g_logprob is None else g_logprob.double()
        (gz,) = torch.autograd.grad((entropy * ge + logprob * gl).sum(), z)
        grad = torch.zeros(rows, width, dtype=torch.float64, device=z.device)
        grad[:, :vocab_size] = torch.where(finite, gz, torch.zeros_like(gz))
    return entropy.detach(), logprob.detach(), grad


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    """Elementwise ``|ours - ref| <= atol + rtol |ref|`` with a message naming the worst entry."""
    ours64, ref64 = ours.detach().double(), ref.detach().double()
    both_nan = torch.isnan(ours64) & torch.isnan(ref64)
    same_inf = torch.isinf(ours64) & (ours64 == ref64)
    err = (ours64 - ref64).abs()
    bound = atol + rtol * ref64.abs()
    bad = ~(both_nan | same_inf | (err <= bound))
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} entries out of tolerance (rtol={rtol}, atol={atol}); "
            f"first at {idx}: ours={ours64[tuple(idx)].item()!r} ref={ref64[tuple(idx)].item()!r} "
            f"max err={err[~(both_nan | same_inf)].max().item() if (~(both_nan | same_inf)).any() else 0.0:.3g}"
        )
