"""The Gradio page of ``codsr app``: :func:`build_app` returns the ``gr.Blocks``; launching is the caller's.

Events that use the model (tagging, one image, a batch) share one queue slot per device
(``concurrency_id="device"``, limit 1), so jobs run one at a time in arrival order. A job that
fails or asks for too large an output raises ``gr.Error``: its message shows in the page and the
app keeps serving. The run button's event is the API endpoint ``upscale`` (inputs: image, scale,
timestep, seed, ...; first output: the result image), for ``gradio_client`` scripts.
"""

from __future__ import annotations

import functools
import secrets
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from codsr.app.jobs import JobError, prune_jobs, restore_image, restore_many, tag_image
from codsr.app.loader import PipelineLoader, precision_name
from codsr.app.progress import STAGE_LABEL, STAGE_START, progress_fraction
from codsr.app.region import BRUSH_MODES, control_map_from_editor
from codsr.app.settings import (
    COLOR_FIXES,
    PRECISIONS,
    AppConfig,
    JobSettings,
    OutputTooLargeError,
    default_max_output_pixels,
    upscale_command,
)

TIMESTEP_LABEL = "Timestep t — fidelity ↔ realism"
TIMESTEP_INFO = (
    "Strength of the region-adaptive noise (paper §3.1, Fig. 6): low t keeps close to the input "
    "(higher PSNR), high t releases more generative detail (higher MUSIQ). The paper uses 100."
)
LAMBDA_INFO = (
    "Weight of the stage-2 text-matching LoRA (paper §3.3): 0 = the stage-1 model, 1 = the method. "
    "Changing it reloads the model."
)
ERROR_SECONDS = None  # error toasts stay until closed


def _user_error(message: str) -> gr.Error:
    """An error shown in the page (and raised to API clients) without a server traceback."""
    return gr.Error(message, duration=ERROR_SECONDS, print_exception=False)


def _reported(fn):
    """Any unexpected error of a job becomes a ``gr.Error`` naming it (the page shows it; the
    server log keeps the traceback); the app goes on serving the next job."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged with its traceback
            raise gr.Error(f"The job failed: {type(exc).__name__}: {exc}", duration=ERROR_SECONDS) from exc

    return wrapper


def _gb(n: int) -> str:
    return f"{n / 1024**3:.2f} GB"


def build_app(
    pipe: Any,
    *,
    config: AppConfig | None = None,
    loader: PipelineLoader | None = None,
    max_output_pixels: int | None = None,
    work_dir: str | Path | None = None,
    keep_jobs: int = 16,
    title: str = "CODSR super-resolution",
) -> gr.Blocks:
    """The CODSR web page around ``pipe`` (a :class:`codsr.CODSRPipeline`).

    Args:
        config: how ``pipe`` was loaded (base model, checkpoint, device, tagger): shown in the
            ``codsr upscale`` command line of each result.
        loader: reloads the pipeline for another λ_sem or precision; without it those two
            controls show the loaded values and cannot be changed.
        max_output_pixels: the largest output a job may ask for (default: sized to the device,
            :func:`~codsr.app.settings.default_max_output_pixels`).
        work_dir: where job folders go (default: a new folder in the system temp directory,
            which Gradio serves from); only the newest ``keep_jobs`` are kept.
    """
    config = config or AppConfig(device=str(pipe.device), precision=precision_name(pipe.dtype))
    limit = int(max_output_pixels or default_max_output_pixels(pipe.device))
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="codsr-app-"))
    work.mkdir(parents=True, exist_ok=True)
    state = {"pipe": pipe}
    has_alignment = True  # λ_sem only matters for stage-2 checkpoints; the loader knows best

    def current_pipe(alignment_scale: float, precision: str | None) -> Any:
        if loader is not None:
            state["pipe"] = loader.get(alignment_scale, precision)
        return state["pipe"]

    def settings_from(scale, timestep, seed, color_fix, alignment_scale, precision, tags, prompt,
                      random_seed, max_memory, tile, tile_overlap) -> JobSettings:  # fmt: skip
        seed = -1 if seed is None else int(seed)
        if random_seed or seed < 0:
            seed = secrets.randbelow(2**31)
        try:
            return JobSettings(
                scale=float(scale),
                timestep=None if timestep is None else int(timestep),
                seed=seed,
                color_fix=str(color_fix),
                alignment_scale=float(alignment_scale),
                precision=precision or None,
                tags=tags,
                prompt=prompt or "",
                tile=int(tile or 0),
                tile_overlap=int(400 if tile_overlap is None else tile_overlap),
                max_memory=(str(max_memory).strip() or None) if max_memory is not None else None,
            )
        except ValueError as exc:
            raise _user_error(str(exc)) from None

    @_reported
    def upscale(image, scale, timestep, seed, color_fix="adain", alignment_scale=1.0, precision=None,
                tags=None, prompt=None, random_seed=False, max_memory=None, tile=0, tile_overlap=400,
                auto_tags=None, region_brush=None, region_mode=BRUSH_MODES[0], region_map=None, noise_scale=1.0,
                progress=gr.Progress()):  # noqa: B008  # fmt: skip
        """Restore one image. Returns (result PNG, (bicubic, result), PNG file, report, command, seed)."""
        if not image:
            raise _user_error("No image: upload, paste or drop one first.")
        p = current_pipe(float(alignment_scale), precision or None)
        tags = (tags or "").strip()
        tagger_tags = p.tagger is not None and (not tags or tags == (auto_tags or "").strip())
        job_tags = None if (p.tagger is not None and not tags) else tags
        s = settings_from(scale, timestep, seed, color_fix, alignment_scale, precision, job_tags, prompt,
                          random_seed, max_memory, tile, tile_overlap)  # fmt: skip
        progress(STAGE_START["tags"], desc=STAGE_LABEL["tags"] if job_tags is None else "starting")

        def on_event(stage: str, count: int) -> None:
            progress(progress_fraction(stage, count), desc=f"{STAGE_LABEL[stage]} {count}")

        prune_jobs(work, keep_jobs)
        try:
            cmap = control_map_from_editor(region_brush, region_mode, region_map)
            ns = 1.0 if noise_scale is None else float(noise_scale)
            result = restore_image(p, image, s, work, max_output_pixels=limit, on_event=on_event, control_map=cmap,
                                   noise_scale=ns)  # fmt: skip
        except (OutputTooLargeError, JobError, ValueError) as exc:
            raise _user_error(str(exc)) from None
        progress(STAGE_START["finish"], desc=STAGE_LABEL["finish"])
        name = Path(image).name
        command = upscale_command(name, s, config, tagger_tags=tagger_tags or (not tags and p.tagger is None))
        if cmap is not None or ns != 1.0:
            command = ("# region control from the page: add --control-map MAP.png (black = faithful) / "
                       f"--noise-scale {ns:g} (docs/region-control.md)\n" + command)  # fmt: skip
        if tags and not tagger_tags:
            command = ("# the tags were edited in the page; `codsr upscale` takes the tagger's tags, so its "
                       "result can differ\n" + command)  # fmt: skip
        report = (
            f"**Done** in {result.seconds:.2f} s · peak memory {_gb(result.peak_bytes)} "
            f"({'device' if p.device.type == 'cuda' else 'process'}) · output {result.size[0]}×{result.size[1]} px · "
            f"seed {s.seed} (this image's generator seed {result.seed})  \n"
            f"Plan used: {result.plan}"
            + "".join(f"  \n{note}" for note in result.notes)
        )
        return (str(result.output), (str(result.preview), str(result.output)), str(result.output),
                report, command, s.seed)  # fmt: skip

    @_reported
    def batch(files, scale, timestep, seed, color_fix="adain", alignment_scale=1.0, precision=None, prompt=None,
              random_seed=False, max_memory=None, tile=0, tile_overlap=400, progress=gr.Progress()):  # noqa: B008  # fmt: skip
        """Restore several images or zips; returns (zip of results, report)."""
        if not files:
            raise _user_error("No files: add images or zip archives first.")
        p = current_pipe(float(alignment_scale), precision or None)
        s = settings_from(scale, timestep, seed, color_fix, alignment_scale, precision, None, prompt,
                          random_seed, max_memory, tile, tile_overlap)  # fmt: skip

        def on_image(done: int, total: int, name: str) -> None:
            progress(done / max(1, total), desc=f"{name} ({done + 1}/{total})")

        prune_jobs(work, keep_jobs)
        paths = [f if isinstance(f, str) else f.name for f in files]
        try:
            result = restore_many(p, paths, s, work, max_output_pixels=limit, on_image=on_image)
        except JobError as exc:
            raise _user_error(str(exc)) from None
        r = result.report
        lines = [f"**{len(r.done)} done, {len(r.failed) + len(result.refused)} failed** in {result.seconds:.1f} s "
                 f"(base seed {s.seed})"]  # fmt: skip
        problems = [(str(Path(i.input).name), i.reason) for i in r.failed] + result.refused
        if problems:
            lines += ["", "| file | error |", "| --- | --- |"]
            lines += [f"| {name} | {reason.replace('|', '/')} |" for name, reason in problems]
        return (None if result.archive is None else str(result.archive)), "\n".join(lines)

    def retag(image, scale, tags, auto_tags):
        """Fill the tags field with the tagger's tags, unless the user edited it."""
        p = state["pipe"]
        if not image or p.tagger is None or ((tags or "").strip() and tags != auto_tags):
            return gr.update(), auto_tags
        try:
            found = tag_image(p, image, float(scale))
        except Exception as exc:  # noqa: BLE001 - a bad upload is reported by the run itself
            gr.Warning(f"tagging failed: {exc}")
            return gr.update(), auto_tags
        return found, found

    has_tagger = pipe.tagger is not None
    loaded_precision = precision_name(pipe.dtype)
    with gr.Blocks(title=title, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(
            f"# {title}\nOne-step diffusion super-resolution (CODSR, CVPR 2026). Upload, paste or drop an "
            f"image, set the knobs, press **Upscale**. Outputs up to {limit / 1e6:.3g} MP on this device "
            f"({pipe.device.type})."
        )
        with gr.Tab("Image"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Input image", sources=["upload", "clipboard"], image_mode=None,
                                     elem_id="codsr-input")  # fmt: skip
                    with gr.Row():
                        scale = gr.Slider(1, 8, value=4, step=0.5, label="Scale", elem_id="codsr-scale")
                        timestep = gr.Slider(1, 999, value=pipe.default_timestep, step=1, label=TIMESTEP_LABEL,
                                             info=TIMESTEP_INFO)  # fmt: skip
                    with gr.Row():
                        seed = gr.Number(42, label="Seed", precision=0, minimum=-1, info="-1 = random")
                        random_seed = gr.Checkbox(False, label="New random seed each run")
                    with gr.Row():
                        color_fix = gr.Radio(list(COLOR_FIXES), value="adain", label="Colour fix")
                        precision = gr.Radio(list(PRECISIONS), value=loaded_precision, label="Precision",
                                             interactive=loader is not None)  # fmt: skip
                    alignment = gr.Slider(0, 2, value=float(config.alignment_scale), step=0.05, label="λ_sem",
                                          info=LAMBDA_INFO, interactive=loader is not None and has_alignment)  # fmt: skip
                    tags = gr.Textbox(label="Tags (filled by the tagger, editable)" if has_tagger else
                                      "Tags (no tagger loaded: start with --tagger dape to fill them)",
                                      placeholder="e.g. cat, grass, tree")  # fmt: skip
                    prompt = gr.Textbox(label="Your prompt (appended to the tags)", placeholder="optional")
                    with gr.Accordion("Memory and tiling", open=False):
                        gr.Markdown("Tiling is automatic. Set a memory budget or a tile size to override it "
                                    f"(docs/memory.md). Output limit: {limit / 1e6:.3g} MP.")  # fmt: skip
                        max_memory = gr.Textbox("", label="Max memory (GB, or 'auto'; empty = automatic tiles)")
                        with gr.Row():
                            tile = gr.Number(0, label="Tile size (output px, 0 = automatic)", precision=0, minimum=0)
                            tile_overlap = gr.Number(400, label="UNet tile overlap (output px, ≤ a third of the tile)", precision=0,
                                                     minimum=0)  # fmt: skip
                    with gr.Accordion("Region control (protect faces, text, ...)", open=False):
                        gr.Markdown("Paint over regions to keep faithful (no generated detail), or upload a "
                                    "grayscale map (black = faithful, white = normal). docs/region-control.md")  # fmt: skip
                        region_brush = gr.ImageEditor(type="pil", label="Brush", sources=(), layers=False,
                                                      elem_id="codsr-region-brush")  # fmt: skip
                        region_mode = gr.Radio(list(BRUSH_MODES), value=BRUSH_MODES[0], label="Painted area")
                        region_map = gr.Image(type="filepath", label="…or a control map (grayscale)", image_mode=None,
                                              sources=["upload"], elem_id="codsr-region-map")  # fmt: skip
                        noise_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Noise scale",
                                                info="multiplies the RGPA noise everywhere; 1 = the method")  # fmt: skip
                    run = gr.Button("Upscale", variant="primary", elem_id="codsr-run")
                with gr.Column():
                    slider = gr.ImageSlider(type="filepath", label="Bicubic ⟷ CODSR", image_mode=None,
                                    elem_id="codsr-slider")  # fmt: skip
                    download = gr.File(label="Full-resolution PNG", elem_id="codsr-download")
                    report = gr.Markdown(elem_id="codsr-report")
                    command = gr.Code(label="Reproduce with", language="shell", wrap_lines=True, lines=3, max_lines=8,
                                      elem_id="codsr-command")  # fmt: skip
                    with gr.Accordion("Result image only", open=False):
                        result = gr.Image(type="filepath", label="Result", format="png", image_mode=None,
                                          elem_id="codsr-result")  # fmt: skip
            auto_tags = gr.State(None)
            run.click(
                upscale,
                inputs=[image, scale, timestep, seed, color_fix, alignment, precision, tags, prompt, random_seed,
                        max_memory, tile, tile_overlap, auto_tags, region_brush, region_mode, region_map,
                        noise_scale],  # fmt: skip
                outputs=[result, slider, download, report, command, seed],
                api_name="upscale",
                concurrency_limit=1,
                concurrency_id="device",
            )
            # the brush paints over the input image
            image.change(lambda path: path, inputs=[image], outputs=[region_brush], api_visibility="private")
            if has_tagger:
                for trigger in (image.change, scale.release):
                    trigger(retag, inputs=[image, scale, tags, auto_tags], outputs=[tags, auto_tags],
                            api_visibility="private", concurrency_limit=1, concurrency_id="device")  # fmt: skip
        with gr.Tab("Batch"):
            gr.Markdown("Several images, or zip archives of images, in; a zip of the results out (formats "
                        "kept as `codsr upscale --ext auto` keeps them). Uses the settings of the Image tab; "
                        "the tags come from the tagger. One bad file is listed and the others go on.")  # fmt: skip
            files = gr.File(file_count="multiple", label="Images or zip archives", type="filepath")
            run_batch = gr.Button("Upscale all", variant="primary")
            archive = gr.File(label="Results (zip)")
            batch_report = gr.Markdown()
            run_batch.click(
                batch,
                inputs=[files, scale, timestep, seed, color_fix, alignment, precision, prompt, random_seed,
                        max_memory, tile, tile_overlap],  # fmt: skip
                outputs=[archive, batch_report],
                api_name="upscale_batch",
                concurrency_limit=1,
                concurrency_id="device",
            )
    demo.queue(default_concurrency_limit=1)
    return demo
