import sys, time, torch
try:
    import tqdm, numpy, scipy
except ImportError as e:
    print("missing", e)
from diffstat.targets import nine_modes, narrow_wide
from diffstat.diffusion.sampler import run_diffusion_sampler
dev = torch.device("cuda")
for name, mix, kw in [("nine", nine_modes(log_normalizer=1.3), dict(max_rounds=2, train_steps=1500, num_proposals=6000)), ("narrow_wide", narrow_wide(10, log_normalizer=1.3), dict(num_explore=4000))]:
    t = mix.as_target(dtype=torch.float64)
    gen = torch.Generator(device=dev).manual_seed(0)
    t0 = time.time()
    res = run_diffusion_sampler(t, num_samples=10000, num_chains=None, generator=gen, progress=False, device=dev, **kw)
    x = res.draws.reshape(-1, mix.dim)
    assert x.device.type == "cuda", x.device
    est = torch.bincount(mix.assign(x.cpu()), minlength=mix.num_components).double() / x.shape[0]
    print(name, "time", round(time.time() - t0, 1), "TV", round(0.5 * float((est - mix.weights).abs().sum()), 4), "logZ err", round(res.attrs["log_normalizer"] - 1.3, 4), "se", round(res.attrs["log_normalizer_se"], 4), "modes", res.attrs["num_modes"], "ess_frac", (res.groups["diffusion"]["ess_fraction"]).tolist(), flush=True)
