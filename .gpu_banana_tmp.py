import sys, time, torch
from diffstat.targets import banana_mixture
from diffstat.diffusion.sampler import run_diffusion_sampler
dev = torch.device("cuda")
dims = [int(v) for v in sys.argv[1].split(",")]; seeds = [int(v) for v in sys.argv[2].split(",")]
extra = eval(sys.argv[3]) if len(sys.argv) > 3 else {}
for d in dims:
    for seed in seeds:
        out = {}
        for method in ("gaussian_is", "diffusion"):
            mix = banana_mixture(d, log_normalizer=1.3); t = mix.as_target(dtype=torch.float64)
            gen = torch.Generator(device=dev).manual_seed(seed)
            kw = dict(max_rounds=3, gaussian_rounds=1, target_ess=1.0, num_proposals=4096, refresh_chains=1024, refresh_steps=40)
            if method == "diffusion": kw.update(train_steps=4000, refit_steps=2000); kw.update(extra)
            t0 = time.time()
            res = run_diffusion_sampler(t, num_samples=10000, num_chains=None, generator=gen, progress=False, device=dev, use_diffusion=method == "diffusion", **kw)
            x = res.draws.reshape(-1, d).cpu()
            heavy = float((mix.assign(x) == 0).double().mean())
            ess = res.groups["diffusion"]["ess_fraction"]
            out[method] = float(ess[-1])
            print(f"d={d} seed={seed} {method:12s} evals={t.num_target_evals} ess_frac_by_round={[round(float(v),3) for v in ess]} heavy={heavy:.4f} logZerr={res.attrs['log_normalizer']-1.3:+.4f} se={res.attrs['log_normalizer_se']:.4f} time={time.time()-t0:.1f}", flush=True)
        print(f"d={d} seed={seed} ratio last-round ESS diffusion/gaussian = {out['diffusion']/out['gaussian_is']:.2f}", flush=True)
