"""Step outputs of diffusers' DPMSolverMultistepScheduler, for the parity check of our
DPM-Solver++ (2M) (crates/ddpm-schedule/src/sampler/dpm_solver.rs).

Run with the benchmark environment's Python:

    target/bench-venv/bin/python bench/parity/dpm_solver.py --out FILE.json

For each case (a schedule, a timestep spacing, a model objective and a number of steps) it builds
the scheduler with its defaults (dpmsolver++, order 2, midpoint, lower_order_final, final sigma
zero, no thresholding) over our exact betas (`trained_betas`), starts from a fixed x_T and runs
every step with an analytic "model" whose output depends on x and on the step:

    out[k] = a * x[k] + 0.3 * sin(1.3 k + 0.7 i + 0.5)     (a = 0.5 eps, 0.2 sample, 0.4 v)

and records the timesteps and x after every step. The Rust side (the test
crates/ddpm-schedule/tests/dpm_solver_parity.rs and `cargo xtask parity dpm-solver`) runs the same
model through our sampler and compares. The betas are computed here in float64 by the formulas of
crates/ddpm-schedule/src/config.rs (linear: linspace(1e-4, 0.02, T); cosine: Nichol & Dhariwal
with s = 0.008, betas clipped to [1e-4, 0.9999], our default), so both sides start from the same
numbers (`--betas FILE`, which `cargo xtask parity dpm-solver` writes from our ScheduleConfig,
takes them from the Rust side instead); diffusers then rounds them to float32, as it does any
`trained_betas`.
"""

import argparse
import json
import math

import diffusers
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

T = 1000
SHAPE = (2, 2)
GAIN = {"epsilon": 0.5, "sample": 0.2, "v_prediction": 0.4}
OBJECTIVE = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def linear_betas(t, start=1e-4, end=0.02):
    step = (end - start) / (t - 1)
    return [start + i * step for i in range(t - 1)] + [end]


def cosine_betas(t, s=0.008):
    def f(u):
        c = math.cos((u / t + s) / (1.0 + s) * (math.pi / 2))
        return c * c

    f0 = f(0.0)
    return [min(max(1.0 - (f(i + 1.0) / f0) / (f(float(i)) / f0), 1e-4), 0.9999) for i in range(t)]


def f32(v):
    """A float32 value as the shortest decimal that reads back to it (9 significant digits)."""
    return float("%.9g" % float(v))


def model_output(x, i, prediction_type):
    k = np.arange(x.numel(), dtype=np.float64).reshape(x.shape)
    wave = torch.from_numpy(0.3 * np.sin(1.3 * k + 0.7 * i + 0.5)).to(torch.float32)
    return GAIN[prediction_type] * x + wave


def run_case(betas, spacing, prediction_type, steps, x_start, exact_abar):
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=betas,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
    )
    if exact_abar:
        # diffusers' float32 cumprod leaves 1 - abar_t, hence sigma_t, with relative errors up
        # to ~1e-4 at small t (cancellation); its float32 betas in float64 avoid that. Its
        # sigmas are still rounded to float32 and every step is still computed in float32.
        b64 = torch.tensor(betas, dtype=torch.float32).to(torch.float64)
        sched.alphas_cumprod = torch.cumprod(1.0 - b64, dim=0)
    sched.set_timesteps(steps)
    x = x_start.clone()
    states = []
    for i, t in enumerate(sched.timesteps):
        out = model_output(x, i, prediction_type)
        x = sched.step(out, t, x).prev_sample
        states.append([f32(v) for v in x.flatten()])
    return [int(t) for t in sched.timesteps], states


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument(
        "--exact-abar",
        action="store_true",
        help="give diffusers float64 alphas_cumprod (of its float32 betas) instead of its float32 cumprod",
    )
    ap.add_argument("--betas", help='JSON {"linear": [...], "cosine": [...]} of our betas')
    args = ap.parse_args()
    if args.betas:
        with open(args.betas) as f:
            given = json.load(f)
    else:
        given = {"linear": linear_betas(T), "cosine": cosine_betas(T)}
    rng = np.random.default_rng(0)
    x_start = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
    cases = []
    grid = [
        (sched, "linspace", pred)
        for sched in ("linear", "cosine")
        for pred in ("epsilon", "sample", "v_prediction")
    ] + [("linear", spacing, "epsilon") for spacing in ("leading", "trailing")]
    for sched_name, spacing, pred in grid:
        betas = given[sched_name]
        assert len(betas) == T, f"{sched_name}: {len(betas)} betas, expected {T}"
        for steps in (10, 20, 50):
            timesteps, states = run_case(betas, spacing, pred, steps, x_start, args.exact_abar)
            cases.append(
                {
                    "schedule": sched_name,
                    "spacing": spacing,
                    "objective": OBJECTIVE[pred],
                    "gain": GAIN[pred],
                    "steps": steps,
                    "timesteps": timesteps,
                    "states": states,
                }
            )
    doc = {
        "about": "diffusers DPMSolverMultistepScheduler step outputs, by bench/parity/dpm_solver.py",
        "betas_from": args.betas or "the script's formulas",
        "alphas_cumprod": "float64 (--exact-abar)" if args.exact_abar else "diffusers' float32",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "timesteps": T,
        "shape": list(SHAPE),
        "wave": "out[k] = gain * x[k] + 0.3 * sin(1.3 k + 0.7 i + 0.5)",
        "x_start": [f32(v) for v in x_start.flatten()],
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
