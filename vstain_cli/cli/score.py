"""``vstain score``: FID / FSD / L1 / L2 / PSNR / SSIM of stained tiles vs real H&E."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vstain_cli.cli.common import RichProgress, console, handles_errors, out


def _model_names(sources: list[Path], names: list[str] | None) -> list[str]:
    """One display name per --fake/--model source (given, else the file/folder name)."""
    from vstain_cli.errors import InputError

    if names:
        if len(names) != len(sources):
            raise InputError(
                f"{len(names)} --name for {len(sources)} --fake/--model; give one name per "
                "--fake then per --model (or none)"
            )
        chosen = list(names)
    else:
        chosen = [p.stem if p.suffix.lower() == ".npy" else p.name for p in sources]
    seen: dict[str, int] = {}
    for i, n in enumerate(chosen):  # make duplicates unique: runs/A/out, runs/B/out -> out, out-2
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            chosen[i] = f"{n}-{seen[n]}"
    return chosen


def _print_table(results: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from vstain_cli.scoring import DIGITS, HIGHER_IS_BETTER, METRIC_ORDER, format_interval

    models = results["models"]
    cols = [m for m in METRIC_ORDER if any(m in r["metrics"] for r in models.values())]
    t = Table(title=f"vstain score: {results['n_real']} real tiles, 95% bootstrap intervals", title_justify="left")
    t.add_column("model")
    for c in cols:
        t.add_column(f"{c} {'↑' if HIGHER_IS_BETTER[c] else '↓'}", justify="right")
    t.add_column("tiles", justify="right")
    for name, r in models.items():
        cells = []
        for c in cols:
            val, _, ci = format_interval(r["metrics"].get(c), DIGITS[c]).partition(" ")
            cells.append(f"{val}\n[dim]{escape(ci)}[/]" if ci else val)
        t.add_row(escape(name), *cells, f"{r['n']}{'' if r['paired'] else ' unpaired'}")
    out.print(t)


def _grid_columns(real_set, fake_sets: dict, paired: dict, rows: int, seed: int) -> tuple[dict, list[str]]:
    """Fig. 2-style columns: AF false colour (dataset input) | target | each model."""
    import numpy as np

    from vstain_cli import viz

    k = min(rows, len(real_set))
    pick = np.sort(np.random.default_rng(seed + 1).choice(len(real_set), size=k, replace=False))
    cols: dict = {}
    if real_set.af is not None:
        cols["AF (false colour)"] = viz.af_false_colour(real_set.af_norm([int(i) for i in pick]))
    cols["target H&E"] = real_set.images[pick]
    for name, fs in fake_sets.items():
        if paired[name]:
            cols[name] = fs.images[pick]
        else:
            cols[f"{name} (unpaired)"] = fs.images[:k]
    return cols, [real_set.names[i] for i in pick]


@handles_errors
def score(
    real: Optional[Path] = typer.Option(None, "--real", help="Real H&E tiles: a folder of PNG/JPEG/TIFF, a .npy (N,3,H,W)/(N,H,W,3) uint8, or a dataset folder (uses --split). Default: --data."),
    fake: Optional[List[Path]] = typer.Option(None, "--fake", help="Stained tiles of one model (same forms as --real); repeat for several models. Tiles pair with --real by file name."),
    model: Optional[List[Path]] = typer.Option(None, "--model", help="A trained run folder (runs/NAME): stains the AF of --data's --split tiles (same tiles and seeds for every model); repeatable."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dataset folder whose --split gives the AF for --model (and the real tiles when --real is not given)."),
    name: Optional[List[str]] = typer.Option(None, "--name", help="Display names: one per --fake, then one per --model (default: file/folder name)."),
    stainnet: Optional[Path] = typer.Option(None, "--stainnet", help="Trained StainNet run folder (runs/stainnet): enables FSD."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or .safetensors): enables FID. Nothing is downloaded."),
    n: Optional[int] = typer.Option(None, "--n", min=2, help="Score a seeded random subset of N tiles (the same tiles for every model)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the tile subset, the diffusion noise and the bootstrap."),
    split: str = typer.Option("test", "--split", help="Split to read from dataset folders."),
    sampler: str = typer.Option("ddim", "--sampler", help="Sampler for diffusion --model runs: ddpm, ddim, dpmpp-2m."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Sampler steps (default: the sampler's)."),
    eta: float = typer.Option(0.0, "--eta", min=0.0, help="DDIM eta (0 = deterministic)."),
    n_boot: int = typer.Option(1000, "--boot", min=10, help="Bootstrap resamples for the mean metrics (L1, L2, PSNR, SSIM)."),
    fd_boot: int = typer.Option(100, "--fd-boot", min=10, help="Bootstrap resamples for FID/FSD (each costs two covariances and an eigendecomposition)."),
    unpaired: bool = typer.Option(False, "--unpaired", help="Do not pair --fake sets with real tiles: FD only, no L1/L2/PSNR/SSIM."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Tiles per network batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    grid_rows: int = typer.Option(6, "--grid-rows", min=0, help="Example tiles shown in the report."),
    out_dir: Path = typer.Option(..., "--out", help="Output folder: score.json, report.html, per_image.csv (+ samples-NAME.npy for --model)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
) -> None:
    """Score stained tiles against real H&E: FID, FSD, L1, L2, PSNR, SSIM with 95% intervals."""
    import numpy as np

    from vstain_cli import provenance, scoring
    from vstain_cli.errors import InputError

    fakes, models = list(fake or []), list(model or [])
    if not fakes and not models:
        raise InputError("give at least one --fake image set or --model run to score")
    if real is None and data is None:
        raise InputError("give the real tiles with --real (or a dataset with --data)")
    if models and data is None:
        if real is not None and (real / "dataset.json").is_file():
            data = real
        else:
            raise InputError("--model needs the dataset whose AF it stains: give --data dataset/")
    real = real if real is not None else data
    names = _model_names(fakes + models, name)
    for p in [real, *fakes, *([data] if data else [])]:
        if not p.exists():
            raise InputError("image set not found (a folder of tiles, a .npy array or a dataset folder)", p)
    for p in models:
        if not p.is_dir():
            raise InputError("run folder not found (train one with `vstain train`)", p)
    if inception_weights is not None and not inception_weights.is_file():
        raise InputError("Inception weights file not found (FID needs pytorch-fid's pt_inception-2015-12-05-6726825d.pth)", inception_weights)
    if stainnet is not None and not stainnet.is_dir():
        raise InputError("StainNet run folder not found (train one with `vstain train --preset stainnet`)", stainnet)
    if models:
        from vstain_cli.diffusion.samplers import SAMPLERS

        if sampler not in SAMPLERS:
            raise InputError(f"unknown --sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    outputs = ["score.json", "report.html", "per_image.csv"] + [f"samples-{nm}.npy" for nm in names[len(fakes):]]
    paths = {k: out_dir / k for k in outputs}
    for p in paths.values():
        provenance.check_output_file(p, force, inputs=[real, *fakes])

    dev = scoring.resolve_device(device) if (inception_weights or stainnet or models) else "cpu"
    notes = []
    with RichProgress() as prog:
        extractors = {}
        if inception_weights is not None:
            extractors["FID"] = scoring.inception_extractor(inception_weights, dev)
        else:
            notes.append("FID skipped: no --inception-weights file given")
        if stainnet is not None:
            extractors["FSD"] = scoring.stainnet_extractor(stainnet, dev)
        else:
            notes.append("FSD skipped: no --stainnet run given")
        real_full = scoring.load_images(real, split, prog)
        idx = scoring.select_tiles(len(real_full), n, seed)
        real_set = real_full.take(idx)
        fake_sets, paired = {}, {}
        for nm, p in zip(names, fakes):
            fs = scoring.load_images(p, split, prog)
            ok = False
            if not unpaired:
                fs, ok = scoring.pair_with_real(real_full, fs, prog)
            fake_sets[nm] = fs.take(idx) if ok else fs.take(scoring.select_tiles(len(fs), n, seed))
            paired[nm] = ok
        if models:
            src = real_set
            if Path(data).resolve() != Path(real).resolve():
                data_full = scoring.load_images(data, split, prog)
                if data_full.names != real_full.names:
                    raise InputError(
                        f"--real tiles are not named like --data's {split} tiles (slide_row); "
                        "omit --real to score against --data",
                        real,
                    )
                src = data_full.take(idx)
            for nm, run_dir in zip(names[len(fakes):], models):
                tiles = scoring.sample_run_tiles(run_dir, src, dev, sampler, steps, eta, seed, batch_size, prog)
                with provenance.atomic_output(paths[f"samples-{nm}.npy"]) as tmp, open(tmp, "wb") as f:
                    np.save(f, tiles)
                fake_sets[nm] = scoring.ImageSet(tiles, list(real_set.names), str(run_dir))
                paired[nm] = True
        results = scoring.score_image_sets(
            real_set.images,
            {k: v.images for k, v in fake_sets.items()},
            extractors,
            n_boot=n_boot,
            seed=seed,
            fd_boot=fd_boot,
            paired=paired,
            batch_size=batch_size,
            progress=prog,
            fd_device=dev if dev.startswith("cuda") else None,
        )
    results["notes"] = notes
    config = {
        "real": str(real), "fake": [str(p) for p in fakes], "model": [str(p) for p in models],
        "data": str(data) if data else None, "names": names,
        "stainnet": str(stainnet) if stainnet else None,
        "inception_weights": str(inception_weights) if inception_weights else None, "n": n, "seed": seed,
        "split": split, "sampler": sampler, "steps": steps, "eta": eta, "n_boot": n_boot, "fd_boot": fd_boot,
        "unpaired": unpaired, "device": dev,
    }
    inputs = {"inception_weights": provenance.fingerprint(inception_weights)} if inception_weights else {}
    results["provenance"] = provenance.record(config, inputs)
    grids, row_names = (None, None)
    if grid_rows > 0:
        grids, row_names = _grid_columns(real_set, fake_sets, paired, grid_rows, seed)
    provenance.write_json(paths["score.json"], scoring.json_ready({**results, "tiles": real_set.names}))
    scoring.write_per_image_csv(paths["per_image.csv"], results, real_set.names)
    scoring.write_report(paths["report.html"], results, grids, row_names=row_names)
    _print_table(results)
    for msg in notes:
        console.print(f"[dim]{msg}[/]", highlight=False)
    console.print(f"wrote {paths['score.json']}, {paths['report.html']}", highlight=False)
