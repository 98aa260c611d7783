"""Print abar at t = 250/500/750 (and the last step) of every noise schedule (a markdown table).

Usage: python bench/schedules.py [--timesteps 1000]

t is the 0-based timestep of vstain_cli/diffusion/schedule.py (abar_t =
prod_{s<=t} (1 - beta_s)). Each row names the words of the paper (Sridhar et al.
2023: "a cosine schedule from beta_1 = 1e-4 to beta_T = 0.02, in accordance with
Nichol & Dhariwal") that the schedule reads.
"""

from __future__ import annotations

import argparse

from vstain_cli.diffusion.schedule import SCHEDULES, Schedule

READS = {
    "cosine": '"cosine schedule ... in accordance with Nichol & Dhariwal": their eq. 17 '
    "(no beta range; the paper presets)",
    "linear": '"from beta_1 = 1e-4 to beta_T = 0.02": the linear schedule of Ho et al. 2020, '
    "whose end points these are",
    "cosine-beta": '"cosine schedule from beta_1 = 1e-4 to beta_T = 0.02" read literally: '
    "betas rising from 1e-4 to 0.02 along a half cosine",
}


def rows(timesteps: int, at: tuple[int, ...]) -> list[list[str]]:
    """One row per schedule: name, abar at each t of ``at``, abar at T-1, what it reads."""
    out = []
    missing = sorted(set(SCHEDULES) - set(READS))
    if missing:
        raise SystemExit(f"say which words of the paper schedule(s) {missing} read (READS)")
    for name in READS:
        ac = Schedule.make(name, timesteps).alphas_cumprod
        out.append([f"`{name}`", *(f"{ac[t]:.3g}" for t in at), f"{ac[-1]:.1e}", READS[name]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timesteps", type=int, default=1000, help="T (paper: 1000)")
    args = ap.parse_args()
    T = args.timesteps
    at = (T // 4, T // 2, 3 * T // 4)
    print(f"T = {T}\n")
    print("| schedule | " + " | ".join(f"abar at t={t}" for t in at) + f" | t={T - 1} | reads the paper's |")
    print("|---|" + "---|" * (len(at) + 2))
    for r in rows(T, at):
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
