"""The ``synth7t`` command line: one subcommand per stage, each a thin typed wrapper over the Python API.

Heavy libraries (torch, ANTs, MONAI, Lightning) are imported inside the commands so that ``synth7t --help``
answers at once. Errors caused by the user's input are printed as one line and exit non-zero.

Why one module of ~430 lines: it is mostly the options' typed declarations and ``--help`` texts of eight commands;
one file lets a reader check that every command handles errors, logging and progress the same way.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from synth7t import __version__
from synth7t.pipeline_demo import BENCH_SUBJECTS  # stdlib-only module: --help stays fast

app = typer.Typer(
    name="synth7t",
    help="Synthetic 7T-quality brain MRI from 3T T1-weighted scans: "
    "preprocess, pack, train, predict, qc, evaluate, tune; import-thesis runs the thesis' published models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
log = logging.getLogger("synth7t")

#: ``--threads`` of the commands that take it as it is (``pack`` and ``train`` say more in their own help)
ThreadsOption = Annotated[int | None, typer.Option(
    "--threads", min=1, help="Cores to use (default: $SLURM_CPUS_PER_TASK, else the CPU affinity mask; never more "
    "than the mask allows). ITK, OpenMP/torch and BLAS get the same number.", show_default=False)]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"synth7t {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-v: debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    from synth7t.progress import setup_logging

    setup_logging(-1 if quiet else verbose)


def user_errors(fn):
    """Turn Synth7tError into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from synth7t.errors import Synth7tError

        try:
            return fn(*args, **kwargs)
        except Synth7tError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=exc.exit_code) from None
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("synth7t."):
                raise
            typer.echo(f"error: `synth7t {fn.__name__}` is not built in this version ({exc.name} is missing)", err=True)
            raise typer.Exit(code=3) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; rerun the same command to resume", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def _parse_sets(values: list[str] | None) -> dict[str, str]:
    from synth7t.errors import ConfigError

    out = {}
    for item in values or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set model.n_res=2")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------------------
# demo


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo cohort and all made from it.")] = Path(
        "synth7t-demo"),
    subjects: Annotated[int, typer.Option(help="Number of simulated subjects (>= 8 for the whole chain).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same cohort.")] = 0,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Subjects simulated and preprocessed in parallel.")] = 2,
    cohort_only: Annotated[bool, typer.Option("--cohort-only", help="Only build the simulated cohort.")] = False,
    benchmark: Annotated[bool, typer.Option("--benchmark", help=f"Proxy quality benchmark: {BENCH_SUBJECTS} "
                                            "subjects, longer training, the GAN variant, and the transfer set "
                                            "(unseen real brains and 3T physics, where shared/data/highres or "
                                            "$SYNTH7T_HIGHRES exists); writes OUT/quality.json.")] = False,
) -> None:
    """Run the whole chain on simulated 3T/7T pairs built from anatomy shipped in a dependency.

    Builds the demo cohort (SIMULATED data, see OUT/SIMULATED.txt), then preprocesses, packs, trains the `tiny`
    preset, predicts the held-out subjects and evaluates them into OUT/report/index.html. Rerunning resumes.
    """
    from synth7t.pipeline_demo import run_demo

    res = run_demo(out, n_subjects=subjects, seed=seed, jobs=jobs, cohort_only=cohort_only, benchmark=benchmark)
    for key in ("manifest", "report", "native_prediction"):
        if res.get(key) is not None:
            typer.echo(f"{key}: {res[key]}")
    if res.get("quality") is not None:
        typer.echo(f"quality: {out / 'quality.json'}")
        for name, table in (("held-out", res["quality"]), ("transfer", res["quality"].get("transfer", {}))):
            diff = table.get("model_minus_best_baseline")
            if diff:
                typer.echo(f"  {name}: model - best realizable baseline ({table['best_baseline']['name']}): "
                           f"brain PSNR {diff['brain_psnr']:+.2f} dB, brain SSIM {diff['brain_ssim']:+.3f}"
                           + (f" (without the slices QC marked corrupted: {diff['brain_psnr_valid']:+.2f} dB)"
                              if diff.get("brain_psnr_valid") is not None else ""))


# ---------------------------------------------------------------------------------------------------------
# preprocess


@app.command()
@user_errors
def preprocess(
    manifest: Annotated[Path, typer.Argument(help="Cohort manifest (CSV/TSV) or, with --bids, a BIDS folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder for the preprocessed subjects.")],
    bids: Annotated[bool, typer.Option("--bids", help="MANIFEST is a BIDS folder.")] = False,
    bids_entity: Annotated[str, typer.Option(help="BIDS entity telling 3T from 7T (ses, acq, ...).")] = "ses",
    bids_3t: Annotated[str, typer.Option(help="Entity value of 3T scans: a value, a pattern ('3T*') or a "
                                         "comma-separated list ('3Ta,3Tb'); several matches of one person are "
                                         "several 3T sessions with its one 7T.")] = "3T",
    bids_7t: Annotated[str, typer.Option(help="Entity value of 7T scans.")] = "7T",
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Subjects processed in parallel.")] = 1,
    shard: Annotated[str | None, typer.Option(help="K/N: process only the K-th (1..N) of N subsets (SLURM arrays: "
                                              "--shard $((SLURM_ARRAY_TASK_ID+1))/N).")] = None,
    skullstrip: Annotated[str, typer.Option(help="deepbet (offline, default), synthstrip (FreeSurfer) or threshold "
                                            "(brains already without skull).")] = "deepbet",
    t3_already_corrected: Annotated[bool, typer.Option(help="Skip N4 on the 3T scans.")] = False,
    preset: Annotated[str, typer.Option(help="thesis (7T N4: FWHM 0.18, Wiener 0.1, 150x4 iterations, shrink 4; "
                                        "SyN) or demo (fewer N4 and SyN iterations).")] = "thesis",
    key_file: Annotated[Path | None, typer.Option(help="Secret key for pseudonyms (created if absent).")] = None,
    mapping: Annotated[Path | None, typer.Option(
        help="Private JSON file to write subject ID -> pseudonym into (outside OUT).")] = None,
    keep_head: Annotated[Path | None, typer.Option(help="Also keep full-head images, in this PRIVATE folder.")] = None,
    threads: ThreadsOption = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Bit-identical work folders whatever the "
                                                "core count (same machine type): N4, skull stripping and "
                                                "registration at one thread per subject (ANTs' repeatable "
                                                "setting); use --jobs to fill the cores. Recorded in provenance "
                                                "and the parameter hash.")] = False,
) -> None:
    """Bias-correct, skull-strip, coregister and QC each 3T/7T pair of a cohort (resumable, parallel).

    With --bids, --bids-3t may be a pattern or a comma-separated list (e.g. '3T*' for ses-3T1, ses-3T2): each
    matching 3T session of a person is its own training pair with that person's one 7T; ages come from
    sub-*/sub-*_sessions.tsv (per session) when it has them, else from participants.tsv.
    """
    from synth7t.manifest import BidsMatch, load_cohort

    match = BidsMatch(entity=bids_entity, t3=bids_3t, t7=bids_7t) if bids else None
    subjects = load_cohort(manifest, bids=match)
    shard_kn = _parse_shard(shard)
    if preset not in ("thesis", "demo"):
        from synth7t.errors import ConfigError

        raise ConfigError(f"--preset {preset!r}: expected thesis or demo")
    from synth7t.preprocess.pipeline import preprocess as preprocess_fn

    if keep_head is not None and mapping is None:
        log.info("full heads go to the private folder %s", keep_head)
    result = preprocess_fn(subjects, out, jobs=jobs, shard=shard_kn, skullstrip=skullstrip,
                           t3_already_corrected=t3_already_corrected, fast=preset == "demo", key_file=key_file,
                           mapping_file=mapping, keep_head=keep_head is not None, private_dir=keep_head,
                           threads=threads, deterministic=deterministic)
    lines = result.summary().splitlines()
    lines[0] += f" -> {out}"
    for line in lines:
        typer.echo(line, err=line.startswith("  failed:"))
    if result.failed:
        raise typer.Exit(code=1)


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    from synth7t.errors import ConfigError

    if value is None:
        return None
    try:
        k, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {value!r}: expected K/N, e.g. 1/4") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {value!r}: need 1 <= K <= N")
    return k - 1, n  # the pipeline counts shards from 0


# ---------------------------------------------------------------------------------------------------------
# pack


def _apply_threads(value: int | None) -> int | None:
    """A --threads callback (applied while the options are parsed): the run's cores to numpy/BLAS, torch, ITK."""
    from synth7t.parallel import apply_threads, resolve_cores

    apply_threads(resolve_cores(value).n)
    return value


def _cores(value: int | None) -> str:
    from synth7t.parallel import resolve_cores

    return resolve_cores(value).describe()


@app.command()
@user_errors
def pack(
    work: Annotated[Path, typer.Argument(help="Work folder written by `synth7t preprocess`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Slice store folder.")],
    multiple: Annotated[int, typer.Option(help="Pad in-plane size to a multiple of this (2^downsamplings).")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the subject split.")] = 0,
    val: Annotated[float, typer.Option(help="Fraction of subjects for validation.")] = 0.15,
    test: Annotated[float, typer.Option(help="Fraction of subjects held out for testing.")] = 0.15,
    overwrite: Annotated[bool, typer.Option(help="Rebuild an existing store.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", min=1, callback=_apply_threads, help="Cores to use "
                                                "(default: $SLURM_CPUS_PER_TASK, "
                                                "else the CPU affinity mask; never more than the mask allows). "
                                                "ITK, OpenMP/torch and BLAS get the same number.",
                                                show_default=False)] = None,
    allow_mixed_preprocessing: Annotated[bool, typer.Option(
        help="Pack subjects preprocessed with different settings (skull strip, N4, registration, voxel size); "
             "refused by default. store.json records which subject had which.")] = False,
    like: Annotated[Path | None, typer.Option("--like", help="Pack onto the grid of this model folder (an imported "
                                              "published thesis model: its template, slice axis, normalization "
                                              "and covariates), to fine-tune it with `train --init`.")] = None,
) -> None:
    """Crop, normalize and store preprocessed subjects as float16 memory-mapped slices with splits.

    store.json records the preprocessing recipe of the subjects (from their provenance.json); training copies it
    into the model folder and predict applies it by default.
    """
    if like is not None:
        from synth7t.thesis import pack_like

        path = pack_like(work, out, like, split=(1 - val - test, val, test), seed=seed, overwrite=overwrite)
        typer.echo(f"slice store: {path}")
        return
    from synth7t.dataset.pack import pack as pack_fn

    path = pack_fn(work, out, multiple=multiple, seed=seed, split=(1 - val - test, val, test), overwrite=overwrite,
                   allow_mixed=allow_mixed_preprocessing)
    typer.echo(f"slice store: {path}\n{_cores(threads)}")


# ---------------------------------------------------------------------------------------------------------
# train


@app.command()
@user_errors
def train(
    store: Annotated[Path, typer.Argument(help="Slice store written by `synth7t pack`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (model folder + checkpoints + logs).")],
    preset: Annotated[str, typer.Option(help="unc, biofinder, gan (thesis), tiny (CPU), patch3d (3-D patches), "
                                              "tiny3d (3-D, CPU), or a YAML file.")] = "tiny",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field: model.n_res=2")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    devices: Annotated[str, typer.Option(help="Devices for DDP (one process each): GPUs with --device cuda, CPU "
                                         "processes (gloo) with --device cpu; or 'auto'.")] = "1",
    num_nodes: Annotated[int, typer.Option(help="Nodes for multi-node DDP (SLURM: srun, one task per device).")] = 1,
    perceptual: Annotated[str | None, typer.Option(help="Perceptual backbone: deepbet, radimagenet or none.")] = None,
    init: Annotated[Path | None, typer.Option("--init", help="Fine-tune: start from this model folder's weights and "
                                              "architecture (its config.json); the preset and --set give the "
                                              "training settings; a --set model.* that changes the architecture "
                                              "is refused. The new model records the source's sha256 "
                                              "(init_from).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Cores to use, per process under DDP "
                                                "(trainer.threads; default: $SLURM_CPUS_PER_TASK, "
                                                "else the CPU affinity mask; never more than the mask allows). "
                                                "ITK, OpenMP/torch and BLAS get the same number.",
                                                show_default=False)] = None,
) -> None:
    """Train the attention residual U-net (or the WGAN-GP variant) and write a self-describing model folder.

    With --init MODEL_DIR, fine-tune a trained model on this store instead of starting from random weights.
    """
    overrides = _parse_sets(set_)
    from synth7t.training import is_global_zero
    from synth7t.training import train as train_fn

    if perceptual is not None:
        overrides["loss.perceptual"] = perceptual
    if threads is not None:
        overrides["trainer.threads"] = str(threads)
    model_dir = train_fn(store, out, preset=preset, overrides=overrides, resume=resume, device=device,
                         devices=devices, num_nodes=num_nodes, init=init)
    if is_global_zero():  # DDP: every rank runs this command; rank 0 wrote the model folder
        typer.echo(f"model folder: {model_dir}\n{_cores(threads)}")


# ---------------------------------------------------------------------------------------------------------
# import-thesis


@app.command("import-thesis")
@user_errors
def import_thesis(
    checkpoint: Annotated[Path, typer.Argument(help="The authors' checkpoint, e.g. my_unet_no_diag.pt or "
                                                   "my_unetGanNoDiag.pt (read as tensors; no pickled code runs).")],
    params: Annotated[Path, typer.Option("--params", help="Its settings file, e.g. params_no_diag.txt (a Python "
                                                          "dict literal, read with ast.literal_eval).")],
    template: Annotated[Path, typer.Option("--template", help="The 7T template the model works on "
                                                              "(template_7T.nii.gz).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    template_3t: Annotated[Path | None, typer.Option("--template-3t", help="The 3T template (template_3T.nii.gz): "
                                                     "scans are registered rigidly to it, as the authors did.")] = None,
    template_affine: Annotated[Path | None, typer.Option("--template-affine", help="The ITK affine from the 3T to "
                                                         "the 7T template (template_3T_to_7T.mat).")] = None,
    slice_dim: Annotated[int | None, typer.Option("--slice-dim", help="Template axis the model slices along "
                                                  "(default: the settings' slice_dim, 1).")] = None,
) -> None:
    """Import the thesis authors' published BioFINDER-2 networks (DeMONLab-BioFINDER/SuperResolutionMalo, CC BY-NC
    4.0, downloaded by you) into a synth7t model folder that `synth7t predict` runs on CPU or GPU.

    The model card records the source file's sha256 (and whether it is one of the published files), the licence,
    the citation and where synth7t's prediction differs from the authors' scripts.
    """
    from synth7t.thesis import import_thesis as import_fn

    path = import_fn(checkpoint, params, template, out, template_3t=template_3t, template_affine=template_affine,
                     slice_dim=slice_dim)
    typer.echo(f"model folder: {path}")


# ---------------------------------------------------------------------------------------------------------
# predict


@app.command()
@user_errors
def predict(
    model: Annotated[Path, typer.Argument(help="Model folder written by `synth7t train` or `synth7t import-thesis`.")],
    inputs: Annotated[list[Path] | None, typer.Argument(help="3T scans (files), folders of scans, or a manifest "
                                                     "CSV/TSV (or none, with --bids).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: one sub-folder per input; with --bids, "
                                      "a BIDS derivatives dataset (e.g. BIDS_DIR/derivatives/synth7t).")] = ...,
    bids: Annotated[Path | None, typer.Option("--bids", help="Predict every T1w (*_T1w.nii or .nii.gz in "
                                              "sub-*/anat or sub-*/ses-*/anat) "
                                              "of this BIDS dataset; covariates from its participants.tsv; outputs "
                                              "named as BIDS derivatives (desc-synth7T_T1w, desc-brain_mask).",
                                              show_default=False)] = None,
    participant_label: Annotated[list[str] | None, typer.Option(help="With --bids: only this participant (01 or "
                                                                "sub-01); repeatable.", show_default=False)] = None,
    session: Annotated[list[str] | None, typer.Option(help="With --bids: only this session (1 or ses-1); "
                                                      "repeatable.", show_default=False)] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: predict only the K-th (1..N) of N disjoint subsets of the "
                                              "scans sorted by name (SLURM: --array=1-N, --shard "
                                              "${SLURM_ARRAY_TASK_ID}/N).", show_default=False)] = None,
    workers: Annotated[int | None, typer.Option(help="Processes preprocessing the next scans while the network "
                                                "predicts the current one (0: all in this process; default: 1 on "
                                                "CPU, up to 4 on a GPU, 0 for a single scan).",
                                                show_default=False)] = None,
    preprocessed: Annotated[bool, typer.Option(help="Inputs are bias-corrected, skull-stripped brains.")] = False,
    age: Annotated[float | None, typer.Option(help="Age in years (for all inputs; a manifest gives its own). The "
                                              "published thesis models require age and sex.")] = None,
    sex: Annotated[str | None, typer.Option(help="F or M.")] = None,
    diagnosis: Annotated[str | None, typer.Option(help="normal, scd, mci, dementia (or healthy/ill).")] = None,
    tta: Annotated[bool, typer.Option(help="Flip test-time augmentation + an uncertainty map.")] = False,
    rescale: Annotated[bool, typer.Option(help="Rescale output to the input's clipped intensity range.")] = False,
    resample_to_input: Annotated[bool, typer.Option(help="Also write the prediction on the input's grid.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Redo inputs whose outputs exist.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Slices per forward pass (default: adapts to memory).")] = None,
    skullstrip: Annotated[str | None, typer.Option(help="deepbet, synthstrip or threshold (default: the method the "
                                                  "model's training data were stripped with; deepbet if the model "
                                                  "folder does not say).")] = None,
    n4: Annotated[str | None, typer.Option(help="3T bias correction: N4 preset 3t, 7t or demo, or none (default: as "
                                           "the model's training 3T scans; 3t if the model folder does not "
                                           "say).")] = None,
    voxel_size: Annotated[float | None, typer.Option(help="Voxel size (mm) of the grid the model runs on (default: "
                                                     "its training grid).")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 on a capable GPU; on a CPU fp32, except for the published "
                                           "thesis models: the faster of fp32 and bf16, measured), 32 or bf16 (on a "
                                           "CPU: bf16 weights, half the memory).")] = "auto",
    qc: Annotated[bool, typer.Option("--qc", help="Then write the cohort QC page OUT/qc.html (`synth7t qc`).")] = False,
    threads: ThreadsOption = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Preprocess each scan at one thread in a "
                                                "worker process (N4, skull stripping, registration repeat bit for "
                                                "bit whatever the core count); the network's own float order is "
                                                "not forced.")] = False,
    fusion: Annotated[str | None, typer.Option(help="A multi-view model's fusion of its views: mean, median or "
                                               "learned (default: the model folder's).", show_default=False)] = None,
) -> None:
    """Turn raw 3T T1w scans into synthetic 7T brains, in the input's own world space.

    Unless --preprocessed, inputs are bias-corrected, skull-stripped and resampled as the model's training data
    were (config.json "preprocessing"); --skullstrip, --n4 and --voxel-size override that with a warning when
    they differ. provenance.json records each step and where its setting came from.

    With --bids BIDS_DIR, every T1w of a BIDS dataset is predicted into the BIDS derivatives dataset OUT
    (sub-X/anat or sub-X/ses-Y/anat: ..._desc-synth7T_T1w.nii.gz, a brain mask and JSON sidecars).
    --shard K/N splits a cohort for a cluster array; finished scans are skipped on reruns (redone when their input
    or settings changed). Each scan's files are staged in OUT/.synth7t-staging and installed whole, its record
    last. Exit status: 0 all done, 1 some failed (listed in OUT/logs/predict*.json), 2 bad usage.
    """
    from synth7t.errors import ConfigError
    from synth7t.inference import PredictOptions
    from synth7t.inference import predict as predict_fn

    if bool(inputs) == (bids is not None):
        raise ConfigError("give input scans/folders/manifests or --bids BIDS_DIR (one of the two)")
    if bids is None and (participant_label or session):
        raise ConfigError("--participant-label and --session need --bids")
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers {workers}: expected 0 or more")
    query = None
    if bids is not None:
        from synth7t.inference.bids import BidsQuery

        query = BidsQuery(bids, participant_label or [], session or [])
    opts = PredictOptions(preprocessed=preprocessed, age=age, sex=sex, diagnosis=diagnosis, tta=tta,
                          rescale=rescale, resample_to_input=resample_to_input, overwrite=overwrite,
                          device=device, batch_size=batch_size, skullstrip=skullstrip, precision=precision,
                          n4=n4, voxel_size_mm=voxel_size, shard=_parse_shard(shard), workers=workers,
                          threads=threads, deterministic=deterministic, fusion=_check_fusion(fusion))
    result = predict_fn(model, inputs, out, opts, bids=query)
    typer.echo(result.summary())
    if qc:
        qc_page(out, threads=threads)
    if result.failed:
        raise typer.Exit(code=1)


# ---------------------------------------------------------------------------------------------------------
# qc


@app.command("qc")
@user_errors
def qc_page(
    out: Annotated[Path, typer.Argument(help="Folder of prediction outputs (`synth7t predict -o OUT`, or a BIDS "
                                        "derivatives folder).")],
    page: Annotated[Path | None, typer.Option("--page", "-o", help="The HTML page to write (default OUT/qc.html); "
                                              "its .csv and .json tables go next to it.")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Outputs summarised in parallel processes (default: "
                                             "one per core, at most 8, from 16 outputs on); the page is the "
                                             "same.",
                                             show_default=False)] = None,
    threads: ThreadsOption = None,
) -> None:
    """Cohort QC page: a row per prediction output, with thumbnails, brain volume, uncertainty and flags.

    Finds OUT/<name>/syn7t.nii.gz and BIDS derivatives (sub-*/anat or sub-*/ses-*/anat: *_desc-synth7T_T1w), flags
    failed outputs (provenance missing, unreadable image, NaN, empty mask), suspicious ones (signal outside the
    mask, robust z > 3.5 across the cohort) and writes a sortable page that works offline, plus .csv/.json tables.
    Per-output summaries and thumbnails are cached next to each output: a rerun reads only new or changed ones.
    """
    from synth7t.cohortqc import build_qc

    result = build_qc(out, page, jobs=jobs, threads=threads)
    typer.echo(result.line())


# ---------------------------------------------------------------------------------------------------------
# evaluate


@app.command()
@user_errors
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model folder.")],
    data: Annotated[Path, typer.Argument(help="Slice store (its split is used) or a preprocessed work folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (index.html, CSV, figures).")],
    split: Annotated[str, typer.Option(help="Which split of the store to evaluate.")] = "test",
    segmentation: Annotated[str, typer.Option(help="auto (SynthSeg if on PATH, else Atropos), synthseg, atropos "
                                              "or none.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    reference: Annotated[Path | None, typer.Option(help="Slice store whose training split gives the population 7T "
                                                    "histogram of the histmatch_population baseline (default: "
                                                    "DATA's own).")] = None,
    tta: Annotated[bool, typer.Option(help="Predict as `synth7t predict --tta` does: the mean of each stack's "
                                      "prediction and of its left-right mirror's.")] = False,
    fusion: Annotated[str | None, typer.Option(help="A multi-view model's fusion of its views: mean, median or "
                                               "learned (default: the model folder's).", show_default=False)] = None,
) -> None:
    """Metrics (PSNR, SSIM, HFEN, DICE) of the model and of the baselines on held-out subjects.

    Baselines: the 3T input, trilinear and cubic B-spline interpolation from 1 mm, B-spline + histogram matching
    to the training split's mean 7T histogram (histmatch_population) and, as a labelled upper bound of any global
    intensity mapping, to the subject's own 7T (histmatch_oracle).
    """
    from synth7t.evaluation.evaluate import evaluate as evaluate_fn

    index = evaluate_fn(model, data, out, split=split, segmentation=segmentation, device=device, reference=reference,
                        tta=tta, fusion=_check_fusion(fusion))
    typer.echo(f"report: {index}")


def _check_fusion(value: str | None) -> str | None:
    if value is None:
        return None
    from synth7t.inference.fusion import check_fusion

    return check_fusion(value)


# ---------------------------------------------------------------------------------------------------------
# train-fusion


@app.command("train-fusion")
@user_errors
def train_fusion(
    model: Annotated[Path, typer.Argument(help="A multi-view model folder (trained with data.views).")],
    store: Annotated[Path, typer.Argument(help="Slice store whose validation split (--split) the fusion learns "
                                         "from: the model's training store.")],
    split: Annotated[str, typer.Option(help="Split whose per-view predictions train the fusion (val: the training "
                                       "split's are overfit).")] = "val",
    steps: Annotated[int, typer.Option(help="Adam steps of the fusion network.")] = 300,
    cube: Annotated[int, typer.Option(help="Side (voxels) of the random training cubes.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    single_view: Annotated[bool, typer.Option("--single-view", help="Accept a model of one view: the network "
                                              "is then a learned 3-D refinement of its prediction.")] = False,
) -> None:
    """Learn how to fuse a multi-view model's views: a small 3-D CNN on the per-view predictions of the validation
    split, written into the model folder (fusion.safetensors) and made its default fusion. With --single-view, the
    same network refines a one-view model's prediction.
    """
    from synth7t.inference.fusion_fit import train_fusion as train_fusion_fn

    path = train_fusion_fn(model, store, split=split, steps=steps, cube=cube, device=device, single_view=single_view)
    typer.echo(f"model folder: {path} (fusion: learned)")


# ---------------------------------------------------------------------------------------------------------
# tune


@app.command()
@user_errors
def tune(
    store: Annotated[Path, typer.Argument(help="Slice store.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Study folder (SQLite study, trial runs, Pareto front).")],
    trials: Annotated[int, typer.Option(help="Number of trials (in total, counting finished ones).")] = 20,
    budget_minutes: Annotated[float, typer.Option(help="Training minutes per trial.")] = 10.0,
    preset: Annotated[str, typer.Option(help="Base preset the search starts from.")] = "tiny",
    objective: Annotated[str, typer.Option(help="multi (PSNR and SSIM), psnr or ssim.")] = "multi",
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Fix a setting for all trials: data.patch=64")] = None,
) -> None:
    """Optuna search over the thesis' training settings; resumable; writes the Pareto front."""
    overrides = _parse_sets(set_)
    from synth7t.tuning import tune as tune_fn

    path = tune_fn(store, out, trials=trials, budget_minutes=budget_minutes, preset=preset, objective=objective,
                   seed=seed, overrides=overrides)
    typer.echo(f"study: {path}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # e.g. `synth7t --help | head`
        sys.exit(0)


if __name__ == "__main__":
    main()
