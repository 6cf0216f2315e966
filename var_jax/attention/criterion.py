"""When is the polynomial method provably good and cheaper than exact attention? (`plan`)

The rule, for logits in [-b, b] (VAR: q, k L2-normalised, q times the temperature s, so b = s),
head dim D, L tokens and a target relative entrywise error eps of the attention weights:

1. Degree. For even g = 2, 4, ... take the smaller of the two rigorous Lagrange-remainder bounds of
   the relative error of a Taylor polynomial of exp on [-b, b] (`poly.taylor_error_bound`):
   centred at 0:   eps_0(g)  = e^b b^(g+1) / (g+1)!,
   centred at -b:  eps_-(g)  = (2b)^(g+1) / (g+1)!.
   g is the smallest even degree with min(eps_0, eps_-) <= eps (even: the polynomial is positive
   on the whole line, so the normaliser cannot vanish). Asymptotically this is Alman & Song's
   g = Theta(max(b, log(1/eps) / log(log(1/eps) / b))) (Aggarwal & Alman 2022 for the optimal
   degree of e^x), with b = B^2 in their notation of entries bounded by B.
2. Rank. r = binom(D + g, g), the number of monomials of degree <= g in D variables (the tight
   count; Alman & Song state the looser binom(2(g + D), 2g)).
3. Output error. If every weight has relative error eps, the attention output is within
   2 eps / (1 - eps) * max|v| of exact (normalisation lemma of Alman & Song); this is
   `predicted_error`, relative to max|v|.
4. Cost (multiply-adds per head). Exact block-causal attention: 2 D P, P the number of visible
   (query, key) pairs (sum_k l_k (l_1 + ... + l_k) for a schedule, L^2 / 2 when only L is known,
   which under-counts and so errs toward exact). Polynomial: L r (2 D + 2) for key sums and query
   reads plus L r g to build the features of q and k.
5. Backend: "poly" when the degree is certified (bound <= eps within ``max_degree``) and the
   polynomial cost is lower; otherwise "flash" (exact, fused kernels). FAVOR+ is never chosen
   automatically: its error is random, not certified.

With eps = 1/L (the paper's 1/poly(n) regime) the certified degree stays small while b^2 << log L
and the rank binom(D + g, g) stays L^o(1); at b = Theta(log L) it is L^Theta(1): the phase
transition of the paper, seen in this rule's output.
"""

from __future__ import annotations

import dataclasses
import math

from var_jax import scales
from var_jax.attention import _checks, poly


@dataclasses.dataclass(frozen=True)
class Plan:
    backend: str            # "poly" or "flash"
    degree: int             # certified degree (or the largest tried, when none is)
    rank: int               # binom(D + g, g)
    certified: bool         # entry error bound <= eps at this degree
    cheaper: bool           # polynomial cost below exact cost at this seq_len
    predicted_error: float  # bound on max|out - exact| / max|v|
    entry_error: float      # bound on the relative error of each attention weight
    center: float           # Taylor centre to pass as the poly option
    poly_cost: float        # multiply-adds per (batch, head)
    exact_cost: float

    @property
    def poly_options(self) -> dict:
        """The poly backend's options at this plan's degree, whichever backend it chose."""
        return {"degree": self.degree, "approximation": "taylor", "center": self.center}

    @property
    def options(self) -> dict:
        """Options for block_causal_attention(..., backend=plan.backend, **plan.options)."""
        return self.poly_options if self.backend == "poly" else {}


def block_causal_pairs(patch_nums) -> int:
    layout = scales.token_layout(patch_nums)
    return sum((e - b) * e for b, e in layout.begin_ends)


def plan(logit_bound, head_dim, seq_len, eps, *, patch_nums=None, max_degree=20) -> Plan:
    """The degree/rank the polynomial method needs and whether to use it (module docstring)."""
    _checks.check_positive_number("logit_bound", logit_bound)
    _checks.check_positive_int("head_dim", head_dim)
    _checks.check_positive_int("seq_len", seq_len)
    _checks.check_positive_number("eps", eps)
    if eps >= 1:
        raise ValueError(f"eps must be below 1 (a relative error), got {eps!r}")
    if patch_nums is not None:
        layout = scales.token_layout(patch_nums)
        if layout.seq_len != seq_len:
            raise ValueError(f"seq_len {seq_len} differs from the token count {layout.seq_len} "
                             f"of patch_nums {layout.patch_nums}")
        pairs = block_causal_pairs(patch_nums)
    else:
        pairs = seq_len * seq_len / 2
    b = float(logit_bound)
    best = None
    for g in range(2, max_degree + 1, 2):
        bounds = {0.0: poly.taylor_error_bound(g, b, 0.0), -b: poly.taylor_error_bound(g, b, -b)}
        center = min(bounds, key=bounds.get)
        best = (g, bounds[center], center)
        if bounds[center] <= eps:
            break
    degree, entry_error, center = best
    certified = entry_error <= eps
    rank = poly.rank(head_dim, degree)
    poly_cost = seq_len * rank * (2 * head_dim + 2 + degree)
    exact_cost = 2 * head_dim * pairs
    cheaper = poly_cost < exact_cost
    predicted = 2 * entry_error / (1 - entry_error) if entry_error < 1 else math.inf
    backend = "poly" if certified and cheaper else "flash"
    return Plan(backend, degree, rank, certified, cheaper, predicted, entry_error, center,
                float(poly_cost), float(exact_cost))
