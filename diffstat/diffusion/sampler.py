r"""``method="diffusion"``: a diffusion sampler trained from the log-density, corrected by
importance weights; and ``method="gaussian_is"``, its per-mode Gaussian baseline.

The pipeline, in rounds (REFERENCES.md, "Diffusion samplers from a log-density"; the measurements
behind each default are in ``docs/diffusion_sampler.md`` beside the benchmarks that reproduce them):

1. **Explore and bank the modes** (:func:`~diffstat.diffusion.modes.explore_modes`): many short
   MALA chains from the reference at several start scales, grouped by mode only where
   :math:`\log p` has a barrier between their climbed end points.
2. **Balance** (:func:`~diffstat.diffusion.modes.balance_modes`): restock every mode with local
   MALA chains, so each mode has the same number of training particles, with their gradients
   (training on the raw explored particles, a handful in a narrow mode, fails).
3. **Importance round with the per-mode Gaussians** (``gaussian_rounds``, default 1): the
   moment-matched Gaussians :math:`q_{\mathrm{gauss}} = \sum_k \pi_k \mathcal N(\mu_k, c^2\Sigma_k)`
   alone; its weighted particles are resampled (``refresh_chains`` per mode) and moved by
   ``refresh_steps`` local MALA steps, a training set that covers each mode's shape.
4. **Fit** score models (:class:`~diffstat.diffusion.networks.ScoreMLP`, VP process with horizon
   ``t_max`` = 0.6, beyond which the linear schedule is pure noise for whitened data) by the mixed
   TSM/DSM loss with the gradients already computed, on whitened particles
   :math:`y = L^{-1}(x - m)`, :math:`\nabla_y \log p = L^\top \nabla_x \log p`: one model per mode
   when there are at most ``max_mode_models`` modes, each whitened by its mode's full covariance.
   The output layer starts at zero and the preconditioned output is the residual to the exact
   score :math:`-y` of the noised :math:`\mathcal N(0, I)`, so every model starts as its mode's
   Gaussian and learns only the departure from it. The banks keep every MALA state of the second
   half of each chain, and with ``train_on_restarts`` the distinct (not repeated) resampled
   importance particles the chains start from: the fits are data-limited.
   **Check** (``gaussian_fallback``): ``held_out`` weighted particles of the last round per mode
   compare each mode's defensive mixture with its Gaussian alone by the held-out cross-entropy
   :math:`\frac1m\sum_i[\log p(x_i) - \log q(x_i)]`
   (:func:`~diffstat.diffusion.proposals.held_out_cross_entropy`, no target evaluations); a mode
   whose model loses proposes from its Gaussian (``model_choice`` = -1). It catches a failed fit,
   not a slightly worse one.
5. **Propose and correct**: the defensive mixture
   :math:`q = w_d q_{\mathrm{diff}} + (1 - w_d) q_{\mathrm{gauss}}`
   (:class:`~diffstat.diffusion.proposals.DefensiveMixture`, :math:`w_d` = ``diffusion_weight``,
   0.9: the weights stay below 10 times the Gaussian importance weights, while the Gaussian draws
   cost 10% of the proposals), :math:`q_{\mathrm{diff}}` the probability-flow pushforward with its
   exact log-density. Self-normalised weights :math:`w_i = p(x_i)/q(x_i)` give mode weights,
   :math:`\log\hat Z = \log \frac1n\sum_i w_i` with a delta-method standard error, the Kish ESS
   overall and per mode, and the Pareto :math:`\hat k` of the weights
   (:func:`~diffstat._util.pareto_smooth`). While the ESS fraction is below ``target_ess``,
   restock from the weighted particles, refit the Gaussians with :math:`\pi` = half the estimated
   mode weights plus half uniform (so no mode is starved), warm-start the score models, and
   propose again; ``final_proposals`` sets the size of the last round.

A round **missed** when its weights say so: Pareto :math:`\hat k > 0.7` (``MAX_PARETO_K``: the
weights' tail is too heavy for the estimate's error to fall at a usable rate, Vehtari et al.
2024), a Kish ESS below 20 (``MIN_ROUND_ESS``: too few points to fit the Pareto tail or to
estimate a variance to within 30%), or a weight of :math:`+\infty`. Every estimate is taken from
the rounds that did not miss, called *used*, on log scales only (real posteriors have
:math:`|\log Z|` in the thousands, beyond the 709 nats a float exponent holds):

* :math:`\log\hat Z = \log\sum_{r\ \mathrm{used}} \lambda_r \hat Z_r` by ``logsumexp``, with
  :math:`\lambda_r \propto` the round's Kish ESS and the delta-method standard error
  :math:`\sqrt{\sum_r \lambda_r^2 \hat Z_r^2 \mathrm{se}_r^2}/\hat Z`. Each :math:`\hat Z_r` is
  unbiased given its proposal, so any convex combination is too; a missed round is left out,
  because its :math:`\hat Z_r` is typically far below :math:`Z` and its standard error is no
  error bar.
* The returned draws are a multinomial resample in which a particle of a used round :math:`r`
  carries :math:`\mu_r` times its Pareto-smoothed normalised weight, :math:`\mu_r \propto` the
  round's smoothed ESS: smoothing caps the few largest weights of a heavy tail at a small bias
  (Vehtari et al. 2024); :math:`\hat Z` keeps the raw weights, whose mean is unbiased.

If every round missed, the draws and :math:`\log\hat Z` are those of the round with the largest
Kish ESS alone, ``attrs["reliable"]`` is 0 (else 1), and a ``RuntimeWarning`` gives every round's
:math:`\hat k` and ESS and what to change; the draws and ``log_weight`` are never NaN. The
per-round ``used`` flags are in the ``diffusion`` group.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch

from diffstat._util import (
    check_positive_int,
    check_probability,
    ess_from_log_weights,
    log_normalizer_estimate,
    pareto_smooth,
    progress_bar,
)
from diffstat.diffusion.modes import ModeBank, balance_modes, explore_modes
from diffstat.diffusion.proposals import (
    DefensiveMixture,
    DiffusionMixture,
    DiffusionProposal,
    GaussianComponent,
    Whitening,
    fit_mode_gaussians,
    held_out_cross_entropy,
)
from diffstat.sampling import SamplerResult, register_sampler

__all__ = [
    "run_diffusion_sampler",
    "importance_summary",
    "round_missed",
    "pool_rounds",
    "MAX_PARETO_K",
    "MIN_ROUND_ESS",
]

#: Above this Pareto k a round's weights are too heavy-tailed to trust (Vehtari et al. 2024).
MAX_PARETO_K = 0.7
#: Below this Kish ESS a round rests on a handful of points: fewer than the 20 weights the Pareto
#: tail fit needs, and a variance estimated from them is off by about sqrt(2/19) = 30%.
MIN_ROUND_ESS = 20.0


def importance_summary(
    log_w: torch.Tensor, modes: torch.Tensor, num_modes: int
) -> dict[str, torch.Tensor | float]:
    r"""Summary of one round's log weights ``(n,)`` with mode assignments ``(n,)``: log Z and its
    standard error, the Kish ESS of the weights and of their Pareto-smoothed version with its
    :math:`\hat k` (:func:`~diffstat._util.pareto_smooth`; the smoothed log weights as ``log_w_psis``), the
    mode weights :math:`\sum_{i \in k} \bar w_i` and the ESS of the weights within each mode ``(K,)``.

    A NaN weight counts as zero (a log-density undefined there); a weight of :math:`+\infty` counts
    as zero too but is reported in ``num_infinite``, which makes the round missed
    (:func:`round_missed`). A round without a finite weight has log Z :math:`-\infty`, an infinite
    standard error, zero ESS and zero mode weights, and never a NaN."""
    log_w = log_w.double()
    num_infinite = int((log_w == math.inf).sum())
    log_w = torch.nan_to_num(log_w, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    zeros = torch.zeros(num_modes, dtype=log_w.dtype, device=log_w.device)
    if not bool(torch.isfinite(log_w).any()):
        return {
            "log_z": -math.inf,
            "se": math.inf,
            "ess": 0.0,
            "ess_psis": 0.0,
            "pareto_k": math.nan,
            "log_w_psis": log_w,
            "mode_weights": zeros,
            "ess_per_mode": zeros,
            "num_infinite": num_infinite,
        }
    log_z, se = log_normalizer_estimate(log_w)
    w = torch.softmax(log_w, 0)
    mode_weights = zeros.index_add(0, modes, w)
    ess_mode = torch.stack(
        [
            ess_from_log_weights(log_w[modes == k]) if bool((modes == k).any()) else log_w.new_zeros(())
            for k in range(num_modes)
        ]
    )
    smoothed, k = pareto_smooth(log_w)
    return {
        "log_z": log_z,
        "se": se if math.isfinite(se) else math.inf,
        "ess": float(ess_from_log_weights(log_w)),
        "ess_psis": float(ess_from_log_weights(smoothed)),
        "pareto_k": k,
        "log_w_psis": smoothed,
        "mode_weights": mode_weights,
        "ess_per_mode": torch.nan_to_num(ess_mode),
        "num_infinite": num_infinite,
    }


def round_missed(summary: dict) -> bool:
    r"""Whether a round (an :func:`importance_summary`) missed the target: Pareto :math:`\hat k`
    above ``MAX_PARETO_K``, a Kish ESS below ``MIN_ROUND_ESS``, or an infinite weight. A NaN
    :math:`\hat k` (no tail to fit) decides nothing by itself: with fewer than 20 positive weights
    the ESS rule already applies, and with equal weights the round is perfect."""
    heavy = bool(summary["pareto_k"] > MAX_PARETO_K)
    return heavy or not summary["ess"] >= MIN_ROUND_ESS or summary.get("num_infinite", 0) > 0


def _convex(weights: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Log of ``weights (R,)`` restricted to ``used`` and normalised; equal over ``used`` where they
    sum to zero there (never NaN)."""
    w = torch.where(used, weights.clamp_min(0.0), torch.zeros_like(weights))
    w = w if float(w.sum()) > 0 else used.double()
    return torch.log(w / w.sum())


def pool_rounds(rounds: list[dict]) -> dict:
    r"""Pool the rounds' summaries (:func:`importance_summary`) by the rule of the module
    docstring, in log space. Returns ``used (R,)`` bool, ``reliable`` (False when every round
    missed and the round of largest Kish ESS stands in alone), ``log_z`` and ``log_z_se`` of the
    pool, and ``log_mu (R,)``, the log share of each round in the returned draws (:math:`-\infty`
    for a round left out)."""
    missed = torch.tensor([round_missed(s) for s in rounds])
    reliable = not bool(missed.all())
    used = ~missed
    if not reliable:
        best = max(range(len(rounds)), key=lambda r: (rounds[r]["ess"], r))  # the later round on a tie
        used = torch.arange(len(rounds)) == best
    ess = torch.tensor([s["ess"] for s in rounds], dtype=torch.float64)
    log_lam = _convex(ess, used)
    log_zr = torch.tensor([s["log_z"] for s in rounds], dtype=torch.float64)
    terms = torch.where(used, log_lam + log_zr, torch.full_like(log_zr, -math.inf))
    log_z = float(torch.logsumexp(terms, 0))
    se_r = torch.tensor([s["se"] for s in rounds], dtype=torch.float64)
    if math.isfinite(log_z):  # se(log Z) = sqrt(sum_r (lambda_r Z_r / Z)^2 se_r^2), every ratio at most 1
        share = torch.exp(terms - log_z)
        log_z_se = float(torch.sqrt((torch.where(used, share * se_r, torch.zeros_like(se_r)) ** 2).sum()))
    else:
        log_z_se = math.inf
    ess_psis = torch.tensor([s["ess_psis"] for s in rounds], dtype=torch.float64)
    log_z_se = log_z_se if math.isfinite(log_z_se) else math.inf
    log_mu = _convex(ess_psis, used)
    return {"used": used, "reliable": reliable, "log_z": log_z, "log_z_se": log_z_se, "log_mu": log_mu}


def _missed_warning(rounds: list[dict], pool: dict) -> str:
    """The text of the warning when every round missed."""
    ks = ", ".join(f"{s['pareto_k']:.2f}" for s in rounds)
    ess = ", ".join(f"{s['ess']:.1f}" for s in rounds)
    sizes = ", ".join(str(s["num_proposals"]) for s in rounds)
    best = int(torch.nonzero(pool["used"]).flatten()[0])
    return (
        f"diffusion: every round missed the target (Pareto k = {ks} against the limit {MAX_PARETO_K}; "
        f"Kish ESS = {ess} of {sizes} proposals against the minimum {MIN_ROUND_ESS:.0f}): the proposals did "
        f"not cover the posterior, and the draws and log Z come from round {best} alone and are unreliable "
        "(attrs reliable = 0). Give the mode search and the restocking more work (num_explore, "
        "explore_steps, restock_steps, chains_per_mode, refresh_chains), more rounds (max_rounds), or use "
        "MCMC ('nuts') or SMC ('smc')."
    )


def _resample_per_mode(
    log_w: torch.Tensor, modes: torch.Tensor, num_modes: int, per_mode: int, generator
) -> torch.Tensor:
    """Indices ``(<= K per_mode,)`` of ``per_mode`` draws per mode from the self-normalised weights
    within that mode (modes without finite weight are skipped)."""
    picks = []
    for k in range(num_modes):  # a loop over modes (few), not over particles
        rows = torch.nonzero((modes == k) & torch.isfinite(log_w)).flatten()
        if rows.numel() == 0:
            continue
        p = torch.softmax(log_w[rows].double(), 0)
        picks.append(
            rows[
                torch.multinomial(p.to(generator.device), per_mode, replacement=True, generator=generator).to(
                    rows.device
                )
            ]
        )
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long, device=log_w.device)


def _unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of ``x: (n, dim)`` and the index of one occurrence of each."""
    uniq, inverse = torch.unique(x, dim=0, return_inverse=True)
    first = torch.full((uniq.shape[0],), x.shape[0], dtype=torch.long, device=x.device).scatter_reduce(
        0, inverse, torch.arange(x.shape[0], device=x.device), reduce="amin"
    )
    return uniq, first


def _resample_bank(target, bank: ModeBank, x, log_w, modes, per_mode: int, generator) -> ModeBank:
    """A bank of ``per_mode`` points per mode drawn from the weighted particles of that mode (the
    bank's own particles where a mode received no weight), with fresh gradients."""
    idx = _resample_per_mode(log_w, modes, bank.num_modes, per_mode, generator)
    lp, grad = target.log_prob_and_grad(x[idx])
    new = ModeBank(x[idx], lp, grad, modes[idx], bank.centers, bank.center_log_prob, 0)
    missing = [k for k in range(bank.num_modes) if not bool((new.label == k).any())]
    for k in missing:
        rows = bank.label == k
        new = ModeBank(
            torch.cat([new.x, bank.x[rows]]),
            torch.cat([new.log_prob, bank.log_prob[rows]]),
            torch.cat([new.grad, bank.grad[rows]]),
            torch.cat([new.label, bank.label[rows]]),
            bank.centers,
            bank.center_log_prob,
            0,
        )
    return new


def run_diffusion_sampler(
    target,
    *,
    num_samples: int,
    num_chains: int | None,
    generator: torch.Generator,
    progress: bool,
    device,
    use_diffusion: bool = True,
    num_explore: int = 2000,
    explore_steps: int = 20,
    start_scales=(0.5, 1.0, 2.0, 4.0),
    chains_per_mode: int = 128,
    restock_steps: int = 40,
    num_proposals: int = 4096,
    final_proposals: int | None = None,
    diffusion_weight: float = 0.9,
    inflate: float = 1.2,
    ode_steps: int = 50,
    hidden: int = 128,
    depth: int = 3,
    train_steps: int = 2000,
    refit_steps: int = 500,
    batch_size: int = 256,
    lr: float = 1e-3,
    refresh_chains: int = 256,
    refresh_steps: int = 20,
    gaussian_rounds: int = 1,
    max_rounds: int = 3,
    target_ess: float = 0.3,
    per_mode_models: bool | None = None,
    max_mode_models: int = 4,
    gaussian_fallback: bool = True,
    held_out: int = 512,
    t_max: float = 0.6,
    whiten: str | None = None,
    refresh_keep_every: int = 1,
    train_on_restarts: bool = True,
    reference: torch.distributions.Distribution | None = None,
    prior_scale: float = 1.0,
) -> SamplerResult:
    r"""Run the pipeline of the module docstring; see :func:`diffusion` for the options."""
    from diffstat.diffusion.networks import ScoreMLP
    from diffstat.diffusion.processes import VP
    from diffstat.diffusion.training import TrainConfig, train_score_model

    num_chains = 1 if num_chains is None else num_chains
    for name, value in (
        ("num_proposals", num_proposals),
        ("max_rounds", max_rounds),
        ("ode_steps", ode_steps),
        ("train_steps", train_steps),
        ("held_out", held_out),
    ):
        check_positive_int(value, name)
    target_ess = check_probability(target_ess, "target_ess", open_interval=False)
    if whiten not in (None, "full", "diag"):
        raise ValueError(f"whiten must be None, 'full' or 'diag', got {whiten!r}")
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
    check_positive_int(refresh_keep_every, "refresh_keep_every")
    final_proposals = (
        num_proposals if final_proposals is None else check_positive_int(final_proposals, "final_proposals")
    )
    if use_diffusion:
        check_probability(diffusion_weight, "diffusion_weight")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    evals0 = target.num_target_evals

    bank = explore_modes(
        target,
        generator,
        num_chains=num_explore,
        num_steps=explore_steps,
        start_scales=start_scales,
        device=dev,
        progress=progress,
        reference=reference,
    )
    num_modes = bank.num_modes
    bank = balance_modes(target, bank, generator, chains_per_mode=chains_per_mode, num_steps=restock_steps)
    gaussians = fit_mode_gaussians(bank, inflate=inflate)
    uniform = torch.full((num_modes,), 1.0 / num_modes, dtype=bank.x.dtype, device=dev)

    process = VP(t_max=t_max)
    per_mode = use_diffusion and (
        num_modes <= max_mode_models if per_mode_models is None else bool(per_mode_models)
    )
    whiten = ("full" if per_mode else "diag") if whiten is None else whiten
    models: list | None = None  # one per unit
    whitenings: list[Whitening] = []
    initial, refreshed = bank, []

    def fit_diffusion(pi: torch.Tensor, held: tuple | None):
        """Fit (or warm-start) the score model of every unit (a mode, or all modes for one pooled
        model) on the training banks; with ``gaussian_fallback`` keep it only where its defensive
        mixture beats the unit's Gaussian in held-out cross-entropy on the particles ``held``.
        Return the proposal, the mean training loss and the choice per unit (0: model, -1: Gaussian)."""
        nonlocal models
        train = refreshed or [initial]  # the banks restocked from importance particles, once there are any
        x = torch.cat([b.x for b in train])
        g = torch.cat([b.grad for b in train])
        label = torch.cat([b.label for b in train])
        groups = (
            [label == k for k in range(num_modes)] if per_mode else [torch.ones_like(label, dtype=torch.bool)]
        )
        first = models is None
        if first:
            models = []
            for rows in groups:
                whitenings.append(Whitening.fit(x[rows], kind=whiten))
                seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
                models.append(ScoreMLP(target.dim, hidden, depth, process=process, seed=seed).to(dev))
        config = TrainConfig(
            num_steps=train_steps if first else refit_steps,
            batch_size=batch_size,
            lr=lr,
            loss="mixed",
            lr_schedule="cosine",
        )
        losses, comps, choice = [], [], []
        lw, lg = math.log(diffusion_weight), math.log1p(-diffusion_weight)
        for k, rows in enumerate(groups):  # a loop over units (few modes)
            fit = train_score_model(
                models[k],
                process,
                whitenings[k].to_white(x[rows]),
                whitenings[k].grad_to_white(g[rows]),
                config=config,
                generator=generator,
                progress=progress,
            )
            models[k] = fit.model
            losses.append(fit.history["train_loss"][-1] if fit.history["train_loss"] else math.nan)
            model_proposal = DiffusionProposal(
                lambda y, t, m=fit.model: m(y, t),
                process,
                whitenings[k],
                num_steps=ode_steps,
                prior_scale=prior_scale,
            )
            pick = 0
            if held is not None and gaussian_fallback:
                xh, lph, mode_h = held
                sel = mode_h == k if per_mode else torch.ones_like(mode_h, dtype=torch.bool)
                # the unit's Gaussian (its own component, normalised, for a per-mode unit)
                log_g = (
                    gaussians.component_log_prob(xh[sel])[:, k] - torch.log(gaussians.weights[k])
                    if per_mode
                    else gaussians.log_prob(xh[sel])
                )
                model_score = held_out_cross_entropy(
                    lph[sel], torch.logaddexp(lw + model_proposal.log_prob(xh[sel]), lg + log_g)
                )
                pick = -1 if held_out_cross_entropy(lph[sel], log_g) < model_score else 0
            choice.append(pick)
            if per_mode:
                comps.append(
                    model_proposal if pick == 0 else GaussianComponent(gaussians.means[k], gaussians.chols[k])
                )
            elif pick == 0:
                comps.append(model_proposal)
        mean_loss = float(sum(losses) / len(losses))
        if not comps:  # the pooled model lost to the Gaussians: this round is Gaussian IS
            return None, mean_loss, choice
        proposal = DiffusionMixture(comps, pi) if per_mode else comps[0]
        return proposal, mean_loss, choice

    rounds: list[dict] = []
    pool_x, pool_lw, pool_lp = [], [], []
    pi, held = uniform, None
    with progress_bar(max_rounds, "diffusion rounds", progress) as bar:
        for r in range(max_rounds):
            loss, diffusion_now, diffusion = math.nan, use_diffusion and r >= gaussian_rounds, None
            choice = [-2] * (num_modes if per_mode else 1)  # -2: no diffusion this round
            if diffusion_now:
                diffusion, loss, choice = fit_diffusion(pi, held)
            proposal = DefensiveMixture(diffusion, gaussians, diffusion_weight)
            n_round = final_proposals if r + 1 == max_rounds else num_proposals
            x, log_q, from_diffusion = proposal.sample(n_round, generator)
            with torch.no_grad():
                lp = target.log_prob(x)
            log_w = torch.nan_to_num(lp - log_q, nan=-math.inf, neginf=-math.inf)  # keep -inf as -inf
            modes = (gaussians.component_log_prob(x) - torch.log(gaussians.weights)).argmax(-1)
            summary = importance_summary(log_w, modes, num_modes)
            summary.update(
                round=r,
                num_proposals=n_round,
                train_loss=loss,
                num_target_evals=target.num_target_evals - evals0,
                diffusion_share=float(from_diffusion.double().mean()),
                choice=choice,
            )
            rounds.append(summary)
            pool_x.append(x), pool_lw.append(log_w), pool_lp.append(lp)
            bar.update()
            enough = summary["ess"] >= target_ess * n_round and not round_missed(summary)
            if r + 1 == max_rounds or (enough and (models is not None or not use_diffusion)):
                break
            if (
                use_diffusion
            ):  # held-out particles for the model check: a weighted resample per unit (no target evaluations)
                unit = (
                    modes if per_mode else torch.zeros_like(modes)
                )  # one pooled model: held_out in all, not per mode
                idx = _resample_per_mode(log_w, unit, num_modes if per_mode else 1, held_out, generator)
                held = (x[idx], lp[idx], modes[idx])
            # restock the modes from the weighted particles (balanced again), refit the Gaussians
            restart = _resample_bank(target, bank, x, log_w, modes, refresh_chains, generator)
            bank = balance_modes(
                target,
                restart,
                generator,
                chains_per_mode=refresh_chains,
                num_steps=refresh_steps,
                keep_every=refresh_keep_every,
            )
            pi = 0.5 * summary["mode_weights"].to(bank.x.dtype) + 0.5 * uniform
            pi = pi / pi.sum()  # the mode weights are all zero where a round had no finite weight
            gaussians = fit_mode_gaussians(bank, inflate=inflate, weights=pi)
            refreshed.append(bank)
            if (
                train_on_restarts
            ):  # the distinct resampled importance particles (their gradients are already paid for)
                _, first_rows = _unique_rows(restart.x)
                refreshed.append(
                    ModeBank(
                        restart.x[first_rows],
                        restart.log_prob[first_rows],
                        restart.grad[first_rows],
                        restart.label[first_rows],
                        restart.centers,
                        restart.center_log_prob,
                        0,
                    )
                )

    pool = pool_rounds(rounds)
    if not pool["reliable"]:
        warnings.warn(_missed_warning(rounds, pool), RuntimeWarning, stacklevel=2)
    ess = torch.tensor([s["ess"] for s in rounds], dtype=torch.float64)
    sizes = torch.tensor([s["num_proposals"] for s in rounds])
    se_rel = torch.tensor([s["se"] for s in rounds], dtype=torch.float64)
    # the draws: each used round's Pareto-smoothed weights, scaled by its share mu_r
    mu = pool["log_mu"]
    log_pool = torch.cat(
        [mu[r].to(w) + s["log_w_psis"].to(w) for r, (s, w) in enumerate(zip(rounds, pool_lw))]
    )
    if not bool(torch.isfinite(log_pool).any()):  # no finite weight anywhere: the stand-in round, uniformly
        log_pool = torch.cat(
            [torch.full_like(w, 0.0 if bool(pool["used"][r]) else -math.inf) for r, w in enumerate(pool_lw)]
        )
    all_x, all_lw, all_lp = torch.cat(pool_x), torch.cat(pool_lw), torch.cat(pool_lp)
    n_out = num_samples * num_chains
    p = torch.softmax(log_pool.double(), 0)
    idx = torch.multinomial(p.to(generator.device), n_out, replacement=True, generator=generator).to(
        all_x.device
    )
    draws = all_x[idx].reshape(num_chains, num_samples, target.dim)
    sample_stats = {
        "lp": all_lp[idx].reshape(num_chains, num_samples),
        "log_weight": all_lw[idx].reshape(num_chains, num_samples),
    }

    pooled_modes = (gaussians.component_log_prob(all_x) - torch.log(gaussians.weights)).argmax(-1)
    mode_weights = torch.zeros(num_modes, dtype=torch.float64, device=all_x.device).index_add_(
        0, pooled_modes, p.to(all_x.device)
    )
    groups = {
        "diffusion": {
            "round": torch.tensor([s["round"] for s in rounds]),
            "ess": ess,
            "ess_fraction": ess / sizes,
            "num_proposals": sizes,
            "pareto_k": torch.tensor([s["pareto_k"] for s in rounds], dtype=torch.float64),
            "ess_psis": torch.tensor([s["ess_psis"] for s in rounds], dtype=torch.float64),
            "log_normalizer": torch.tensor([s["log_z"] for s in rounds], dtype=torch.float64),
            "log_normalizer_se": se_rel,
            "used": pool["used"],
            "num_modes": torch.full((len(rounds),), num_modes),
            "num_target_evals": torch.tensor([s["num_target_evals"] for s in rounds]),
            "train_loss": torch.tensor([s["train_loss"] for s in rounds], dtype=torch.float64),
            "diffusion_share": torch.tensor([s["diffusion_share"] for s in rounds], dtype=torch.float64),
            "model_choice": torch.tensor([s["choice"] for s in rounds]),
            "mode_weights": torch.stack([s["mode_weights"].cpu() for s in rounds]),
            "ess_per_mode": torch.stack([s["ess_per_mode"].cpu() for s in rounds]),
            "mode_centers": bank.centers.cpu().unsqueeze(0).expand(len(rounds), -1, -1),
        }
    }
    attrs = {
        "log_normalizer": pool["log_z"],
        "log_normalizer_se": pool["log_z_se"],
        "reliable": int(pool["reliable"]),
        "num_modes": num_modes,
        "num_rounds": len(rounds),
        "ess": float(ess[pool["used"]].sum()),  # of the rounds the draws come from
        "num_proposals": int(sizes.sum()),
        "pareto_k": float(rounds[-1]["pareto_k"]),
        "mode_weights": mode_weights.cpu().numpy(),
    }
    return SamplerResult(draws, sample_stats, groups, attrs)


#: Options of the diffusion and gaussian_is methods: run_diffusion_sampler's keywords.
_RUN_OPTIONS = frozenset(inspect.signature(run_diffusion_sampler).parameters) - {
    "target",
    "num_samples",
    "num_chains",
    "generator",
    "progress",
    "device",
    "use_diffusion",
}


@register_sampler("diffusion", options=_RUN_OPTIONS)
def diffusion(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    r"""Diffusion sampler from the log-density with importance correction (module docstring).

    Options (defaults): exploration ``num_explore`` chains (2000) of ``explore_steps`` MALA steps
    (20) from ``reference`` (the target's, else N(0, I)) scaled by each of ``start_scales``
    ((0.5, 1, 2, 4)); restocking ``chains_per_mode`` chains (128) of ``restock_steps`` steps
    (40); ``gaussian_rounds`` (1) rounds of per-mode Gaussian importance sampling first; after
    each round, ``refresh_chains`` (256) particles per mode resampled and moved by
    ``refresh_steps`` (20) MALA steps; score models ``hidden`` (128) x ``depth`` (3), one per mode
    if ``per_mode_models`` (None: when at most ``max_mode_models`` (4) modes), ``train_steps``
    (2000) Adam steps of the mixed loss (cosine learning rate from ``lr``, 1e-3; ``batch_size``
    256), ``refit_steps`` (500) in later rounds; ``num_proposals`` (4096) per round
    (``final_proposals`` in the last of ``max_rounds``; None: the same; the rounds before it only
    adapt, so a larger last round buys a better answer at one target evaluation per draw),
    ``diffusion_weight`` (0.9) of them by the probability-flow ODE with ``ode_steps`` (50) RK4
    steps, the rest from the per-mode Gaussians with covariances inflated by ``inflate`` (1.2);
    at most ``max_rounds`` (3) rounds, stopping once a diffusion round's ESS fraction reaches
    ``target_ess`` (0.3). ``num_chains`` (default 1) times ``num_samples`` draws are resampled
    from the pooled rounds. Model details (module notes): VP horizon ``t_max`` (0.6); ``whiten``
    (None: "full" per mode, "diag" for one pooled model); restocked banks keep every
    ``refresh_keep_every`` (1) state; ``gaussian_fallback`` (True) on ``held_out`` (512)
    particles per mode; the flow's base widened by ``prior_scale`` (1). A round that missed
    (Pareto k above 0.7, Kish ESS below 20) gives no draws and no log Z; if every round missed, a
    ``RuntimeWarning`` says so and ``attrs['reliable']`` is 0 (module docstring).
    """
    return run_diffusion_sampler(
        target,
        num_samples=num_samples,
        num_chains=num_chains,
        generator=generator,
        progress=progress,
        device=device,
        use_diffusion=True,
        **options,
    )


@register_sampler("gaussian_is", options=_RUN_OPTIONS)
def gaussian_is(target, *, num_samples, num_chains, generator, progress, device, **options) -> SamplerResult:
    r"""Per-mode Gaussian importance sampling: the same exploration, banking and restocking as
    ``"diffusion"``, then moment-matched Gaussians per mode (no score model). The baseline the
    diffusion sampler must beat where modes are not Gaussian."""
    for key in (
        "diffusion_weight",
        "ode_steps",
        "hidden",
        "depth",
        "train_steps",
        "refit_steps",
        "batch_size",
        "lr",
        "gaussian_fallback",
        "held_out",
        "t_max",
        "whiten",
        "prior_scale",
        "train_on_restarts",
    ):
        if key in options:
            raise ValueError(f"option {key!r} does not apply to gaussian_is")
    return run_diffusion_sampler(
        target,
        num_samples=num_samples,
        num_chains=num_chains,
        generator=generator,
        progress=progress,
        device=device,
        use_diffusion=False,
        **options,
    )
