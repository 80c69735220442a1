"""The Gradio explorer: load a model, calibrate methods (each a run), slide the sparsity over every
run, compare their allocations and masks, generate, measure, export, save the session.

`build_app(model=...)` builds a Blocks app: `layout()` makes the components, `wire()` connects
them to the handlers, which live one module per tab in explorer/tabs/ as functions of (session,
inputs). Nothing is loaded until a session asks (the page's load event, or the first handler
that needs a model). Every handler has an api_name, so the whole app can be driven by
gradio_client (the tests do).
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import gradio as gr
import torch

from core.bundled import BUNDLED, DEFAULT_MODEL
from core.data import DEFAULT_SOURCE
from core.offload import OFFLOAD_CHOICES

from . import figures, limits
from .common import (ASSETS, DELETE_CACHE, HEAVY, PATTERNS, SESSION_TTL_S, Number, Slider, example_prompts, kw,
                     touching, unload)
from .state import Session, release_session
from .tabs import calibrate as calibrate_tab
from .tabs import export as export_tab
from .tabs import generate as generate_tab
from .tabs import live as live_tab
from .tabs import masks as masks_tab
from .tabs import model as model_tab
from .tabs import perplexity as perplexity_tab
from .tabs.calibrate import DEFAULT_SEQLEN, DEFAULT_WINDOWS, calibration_limits  # noqa: F401  (public here too)

# Gradio's queue rebuilds a pandas summary of every recorded event (up to 10,000) after each
# event, for its monitoring page: 15-35 ms of CPU (and the GIL) after every slider move, growing
# with the session. Once per 500 events is plenty; read when the queue is made (demo.queue()).
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "500")

HOW_TO_READ = """
**Runs**: every Calibrate (or imported mask file, or reopened session) adds a run. Tick the runs to
show: the sparsity slider re-cuts every shown run that can be cut (a fixed mask from a file stays
as it is), and the allocation chart overlays them. The active run is the one the heatmap, the
histogram, the status line and the exports show.

**Allocation chart**: with one run shown, one group of bars per transformer block, one bar per
matrix type (q, k, v, o attention projections; gate, up, down MLP projections). The height is the
fraction of that matrix's weights pruned. The dashed line is the target sparsity; methods such as
OWL give some blocks more and others less while keeping the total on target, and UniPruning spends
one budget over all matrices, so its bars show where the method itself put the sparsity. With
several runs shown, one line per run (per block, or per matrix type within each block), each
run's total in the legend; a structured run's points are the attention units and MLP channels it
removes, on the same axes.

**Saliency heatmap**: the importance score of every weight of one matrix (rows = outputs,
columns = inputs), on a log scale (for UniPruning: its learned |Gamma|). Big matrices are shrunk
to at most 256x256 cells by *max* pooling whole tiles of rows x columns, so a bright pixel means
at least one important weight in that tile; hovering names the rows and columns a tile covers.
The second panel is the mask: the percentage of weights kept in each tile (white = all pruned).

**Score histogram**: how the scores spread. Red weights are pruned, blue kept; the dashed line is
the largest pruned score. Row-wise methods (Wanda, RIA) cut each output row separately, so the
red and blue overlap a little.

**Compare masks**: two runs, A and B. The agreement map colours each weight (each pooled tile: its
most common case) as kept by both, kept only by A, kept only by B, or pruned by both, beside the
percentage on which they agree. The heatmap below is the Jaccard overlap of the kept weights of
every matrix (1 = the same weights kept, 0 = none in common), blocks x matrix type, with one
number for the whole model.

**Generate**: the same prompt, settings and seed on the dense model and on one or two pruned runs.
Greedy decoding makes them directly comparable. Perplexity is exp(mean next-token loss) over the
evaluation windows named beside it: lower is better; compare only numbers with the same protocol.

**Perplexity vs sparsity**: every perplexity measured in this session, one line per run; a
sweep cuts several sparsities from each calibration and measures each (a structured method is
pruned again at each sparsity: minutes per point, with progress and Cancel, which keeps the
points already measured).
"""


# ---------------------------------------------------------------- the app

def build_app(model: str = DEFAULT_MODEL, autoload: bool = True, dtype: str = "auto", device: str = "cpu",
              offload: str = "none") -> gr.Blocks:
    """Build the explorer. `model` is the default model spec (bundled name, folder, .gguf, hub id);
    dtype, device and offload are the Model panel's starting values (core.loading.load_model)."""
    default_spec = str(model)
    with gr.Blocks(title="Pruning explorer", delete_cache=DELETE_CACHE) as demo:
        # Released (release_session) when the tab closes (demo.unload below) or after SESSION_TTL_S
        # without an event (every handler that takes the session also returns it: see touching).
        session = gr.State(lambda: Session(default_spec=default_spec), time_to_live=SESSION_TTL_S,
                           delete_callback=release_session)
        ui = layout(default_spec, {"dtype": dtype, "device": device, "offload": offload})
        wire(demo, ui, session, autoload)
    return demo


def layout(default_spec: str, placement: dict) -> SimpleNamespace:
    """Every component of the page, in place; returned by name for wire(). `placement`: the
    starting dtype, device and offload of the Model panel."""
    method = calibrate_tab.default_method()
    max_windows, max_seqlen = calibration_limits(default_spec, method)
    pool = calibrate_tab.pool_size()
    devices = list(dict.fromkeys(["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + [placement["device"]]))
    model_choices = list(BUNDLED) + ([default_spec] if default_spec not in BUNDLED else [])
    prompts = example_prompts()
    ui = SimpleNamespace()
    gr.Markdown("# Pruning explorer\nCalibrate once per method, then slide the sparsity and compare what goes.")
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            with gr.Accordion("Model", open=True):
                ui.model = gr.Dropdown(model_choices, value=default_spec, allow_custom_value=True,
                                       label="Model", info="bundled name, local folder or .gguf, or hub id")
                with gr.Row():
                    ui.dtype = gr.Dropdown(["auto", "float32", "bfloat16", "float16"], value=placement["dtype"],
                                           label="dtype", info="auto: the checkpoint's own if 16-bit")
                    ui.device = gr.Dropdown(devices, value=placement["device"], label="device")
                    ui.offload = gr.Dropdown(list(OFFLOAD_CHOICES), value=placement["offload"], label="offload",
                                             info="blocks kept off the device: disk for models bigger than RAM")
                ui.load = gr.Button("Load", variant="secondary")
                ui.facts = gr.JSON(label="Model facts")
            with gr.Accordion("Calibration", open=True):
                ui.method = gr.Dropdown(calibrate_tab.method_choices(), value=method, label="Method")
                ui.method_md = gr.Markdown(calibrate_tab.method_info(method), elem_classes="method-info")
                ui.pool = []
                init = calibrate_tab.param_updates(method, pool)
                for i in range(pool):
                    u_num, u_choice, u_flag = init[3 * i: 3 * i + 3]
                    ui.pool += [Number(**kw(u_num)), gr.Dropdown(**kw(u_choice)), gr.Checkbox(**kw(u_flag))]
                ui.pool_for = gr.Textbox(method, visible=False)  # the method the widgets show
                ui.params = gr.Textbox("", visible=False)  # API: JSON of method parameters
                ui.source = gr.Textbox(DEFAULT_SOURCE, label="Calibration text",
                                       info="python-docs (offline), wikitext2, c4, or a .txt/.jsonl/.json/.parquet path")
                with gr.Row():
                    # maxima from this machine's memory and the model's context (calibration_limits)
                    ui.windows = Number(min(DEFAULT_WINDOWS, max_windows), precision=0, minimum=1,
                                        maximum=max_windows, label="windows")
                    ui.seqlen = Number(min(DEFAULT_SEQLEN, max_seqlen), precision=0, minimum=8,
                                       maximum=max_seqlen, label="seqlen")
                with gr.Row():
                    ui.calibrate = gr.Button("Calibrate", variant="primary")
                    ui.cancel = gr.Button("Cancel", variant="stop")
                gr.Markdown("Each Calibrate adds a run: calibrate several methods to compare them.",
                            elem_classes="method-info")
        with gr.Column(scale=3):
            ui.status = gr.Markdown("Load a model, then calibrate.", elem_classes="status")
            with gr.Tabs():
                with gr.Tab("Live view"):
                    with gr.Row():
                        ui.sparsity = Slider(0.0, 0.95, value=0.5, step=0.01, label="Target sparsity")
                        ui.pattern = gr.Radio(PATTERNS, value="unstructured", label="Pattern")
                    with gr.Row():
                        ui.shown = gr.CheckboxGroup([], value=[], label="Runs shown (overlaid; the slider re-cuts them)",
                                                    elem_id="shown-runs", scale=3)
                        ui.active = gr.Dropdown([], value=None, label="Active run (heatmap, status, exports)", allow_custom_value=True,
                                                elem_id="active-run", scale=2)
                        ui.alloc_mode = gr.Radio(live_tab.ALLOC_MODES, value=live_tab.ALLOC_MODES[0],
                                                 label="Several runs: sparsity", elem_id="alloc-mode", scale=2)
                    with gr.Accordion("Runs: settings, rename, delete", open=False):
                        ui.runs_df = gr.Dataframe(headers=live_tab.RUN_HEADERS, value=[], interactive=False,
                                                  label="Runs of this session", elem_id="runs-table")
                        with gr.Row():
                            ui.rename_tb = gr.Textbox("", label="New name for the active run", scale=2)
                            ui.rename = gr.Button("Rename", scale=1)
                            ui.delete = gr.Button("Delete the active run", variant="stop", scale=1)
                    ui.alloc = gr.Plot(label="Allocation", elem_id="alloc-plot")
                    with gr.Row():
                        ui.block = Slider(0, 1, value=0, step=1, label="Block")
                        ui.mtype = gr.Dropdown(["q", "k", "v", "o", "gate", "up", "down"], value="q",
                                               label="Matrix type")
                    ui.heat = gr.Plot(label="Saliency and mask", elem_id="heat-plot")
                    ui.hist = gr.Plot(label="Scores", elem_id="hist-plot")
                    ui.summary = gr.JSON(label="Cut summary")
                with gr.Tab("Compare masks") as ui.compare_tab:
                    gr.Markdown("Do two runs prune the same weights? Choose runs A and B, a block and a matrix.")
                    with gr.Row():
                        ui.cmp_a = gr.Dropdown([], value=None, label="Run A", elem_id="compare-a", allow_custom_value=True)
                        ui.cmp_b = gr.Dropdown([], value=None, label="Run B", elem_id="compare-b", allow_custom_value=True)
                        ui.compare = gr.Button("Compare", variant="primary")
                    with gr.Row():
                        ui.cmp_block = Slider(0, 1, value=0, step=1, label="Block ", elem_id="compare-block")
                        ui.cmp_mtype = gr.Dropdown(["q", "k", "v", "o", "gate", "up", "down"], value="q",
                                                   label="Matrix type ", elem_id="compare-matrix")
                    ui.cmp_md = gr.Markdown(elem_id="compare-summary")
                    ui.agree = gr.Plot(label="Agreement map", elem_id="agree-plot")
                    ui.jaccard = gr.Plot(label="Overlap per matrix", elem_id="jaccard-plot")
                    ui.cmp_js = gr.JSON(label="Numbers", visible=False)
                with gr.Tab("Generate"):
                    ui.prompt = gr.Textbox(prompts[0], lines=3, label="Prompt")
                    gr.Examples([[p] for p in prompts], inputs=[ui.prompt])
                    with gr.Row():
                        ui.max_new = Number(48, precision=0, minimum=1, maximum=generate_tab.MAX_NEW_TOKENS,
                                        label="max new tokens")
                        ui.sample = gr.Checkbox(False, label="sample (else greedy)")
                        ui.temp = Number(0.8, minimum=generate_tab.TEMPERATURES[0],
                                         maximum=generate_tab.TEMPERATURES[1], label="temperature")
                        ui.seed = Number(0, precision=0, minimum=0, maximum=2**32 - 1, label="seed")
                        ui.chat = gr.Checkbox(False, label="chat template")
                    with gr.Row():
                        ui.gen_a = gr.Dropdown([], value=None, label="Pruned run A", allow_custom_value=True)
                        ui.gen_b = gr.Dropdown([("(none)", "")], value="", label="Pruned run B (optional)", allow_custom_value=True)
                    ui.generate = gr.Button("Generate", variant="primary")
                    ui.generate_pair = gr.Button("Generate: dense and the active run", visible=False)  # API
                    with gr.Row():
                        ui.dense_out = gr.Textbox(label="Dense", lines=8, interactive=False)
                        ui.pruned_out = gr.Textbox(label="Pruned A", lines=8, interactive=False)
                        ui.pruned_b_out = gr.Textbox(label="Pruned B", lines=8, interactive=False)
                    ui.rates = gr.Markdown()
                    with gr.Row():
                        ui.eval_src = gr.Textbox(DEFAULT_SOURCE, label="Evaluation text")
                        ui.eval_seqlen = Number(256, precision=0, minimum=8, label="seqlen")
                        ui.eval_windows = Number(8, precision=0, minimum=1, maximum=limits.MAX_EVAL_WINDOWS,
                                                 label="max windows")
                    ui.ppl = gr.Button("Perplexity: dense vs the active run")
                    ui.ppl_md = gr.Markdown()
                    ui.ppl_js = gr.JSON(label="Perplexity", visible=False)
                with gr.Tab("Perplexity vs sparsity"):
                    gr.Markdown("Every perplexity measured in this session (the Generate tab's button or a "
                                "sweep) lands here, one line per run, on the evaluation text set in the "
                                "Generate tab. Sweep every shown run in one click; Cancel keeps the points "
                                "measured. Structured methods are pruned again at every sparsity (slower).")
                    gr.Markdown(limits.describe())
                    with gr.Row():
                        ui.sweep_tb = gr.Textbox("0.3, 0.4, 0.5, 0.6, 0.7", label="sparsities to cut and measure",
                                                 scale=3)
                        ui.sweep_all = gr.Button("Sweep every shown run", variant="primary", scale=1)
                        ui.sweep = gr.Button("Sweep the active run", scale=1)
                    ui.sweep_md = gr.Markdown()
                    ui.ppl_plot = gr.Plot(figures.to_plot(figures.perplexity_figure([])),
                                          label="Perplexity against sparsity")
                    ui.points = gr.JSON(label="Measured points", value=[])
                with gr.Tab("Export"):
                    with gr.Row():
                        ui.exp_masks = gr.Button("Mask file (.safetensors)")
                        ui.exp_alloc = gr.Button("Allocation (JSON + CSV)")
                        ui.exp_model = gr.Button("Pruned model (.zip)")
                    ui.masks_file = gr.File(label="Masks", interactive=False)
                    ui.alloc_files = gr.File(label="Allocation", file_count="multiple", interactive=False)
                    ui.model_file = gr.File(label="Pruned model", interactive=False)
                    gr.Markdown("The exports are the **active run**'s. **Import** a mask file made for the "
                                "loaded model as a run:")
                    ui.import_file = gr.File(label="Mask file to import", file_types=[".safetensors"],
                                             type="filepath")
                    ui.import_ = gr.Button("Import masks")
                    gr.Markdown("**Session**: every run (calibration artifacts, or masks where a run has none), "
                                "its settings and the perplexities, in one safetensors file. Reopen it on the "
                                "same model to get them back without calibrating (a workshop prepared at home, "
                                "shown offline).")
                    with gr.Row():
                        ui.save = gr.Button("Save session")
                        ui.open = gr.Button("Open session")
                    ui.session_out = gr.File(label="Session file", interactive=False)
                    ui.session_md = gr.Markdown()
                    ui.session_in = gr.File(label="Session file to open", file_types=[".safetensors"],
                                            type="filepath", elem_id="session-in")
            with gr.Accordion("How to read this", open=False):
                gr.Markdown(HOW_TO_READ)
    ui.runs_js = gr.JSON(value=[], visible=False)  # the runs as data (API, tests)
    ui.refresh = gr.Button("Refresh runs", visible=False)  # API: /runs
    return ui


def wire(demo: gr.Blocks, ui: SimpleNamespace, session: gr.State, autoload: bool) -> None:
    """Connect the components to the tabs' handlers. Handlers that take the session also return
    it (touching): its time-to-live restarts with every event."""
    run_lists = [ui.runs_df, ui.active, ui.shown, ui.cmp_a, ui.cmp_b, ui.gen_a, ui.gen_b, ui.runs_js]
    refresh_inputs = [session, ui.cmp_a, ui.cmp_b, ui.gen_a, ui.gen_b]
    refresh = touching(live_tab.on_refresh_runs, run_lists)

    def then_refresh(dep):
        return dep.then(refresh, refresh_inputs, [*run_lists, session], **QUIET)

    ui.refresh.click(refresh, refresh_inputs, [*run_lists, session], api_name="runs", queue=False)
    _wire_model(demo, ui, session, autoload, then_refresh)
    _wire_calibration(ui, session, then_refresh)
    _wire_live(ui, session, then_refresh)
    _wire_compare(ui, session)
    _wire_generation_and_perplexity(ui, session)
    _wire_export(ui, session, then_refresh)

    # A closed tab (its heartbeat gone; a gradio_client's close()) releases its session at once,
    # instead of gradio's hour-long grace for closed sessions.
    def on_unload(request: gr.Request) -> None:
        unload(demo, request)

    demo.unload(on_unload)


QUIET = dict(api_visibility="private", show_progress="hidden", queue=False)
# slider-speed events: the latest input wins, a few cuts at once
LIVE = dict(trigger_mode="always_last", concurrency_limit=4, concurrency_id="cut", show_progress="minimal")


def _cut_outputs(ui: SimpleNamespace) -> list:
    return [ui.status, ui.alloc, ui.heat, ui.hist, ui.summary]


def _wire_model(demo, ui, session, autoload: bool, then_refresh) -> None:
    model_outputs = [ui.facts, ui.status, ui.block, ui.mtype, ui.alloc, ui.heat, ui.hist, ui.summary,
                     ui.cmp_block, ui.cmp_mtype]
    model_inputs = [ui.model, ui.dtype, ui.device, ui.offload, session]
    then_refresh(ui.load.click(touching(model_tab.on_load_model, model_outputs, at=4), model_inputs,
                               [*model_outputs, session], api_name="load_model", concurrency_id=HEAVY))
    page_load = model_tab.on_page_load if autoload else model_tab.skip_page_load
    then_refresh(demo.load(touching(page_load, model_outputs, at=4), model_inputs, [*model_outputs, session],
                           api_name="page_load", api_visibility="undocumented", concurrency_id=HEAVY))


def _wire_calibration(ui, session, then_refresh) -> None:
    cut_outputs = _cut_outputs(ui)
    ui.method.change(calibrate_tab.on_method, [ui.method], [ui.method_md, ui.pool_for, *ui.pool], api_name="method",
                     api_visibility="undocumented", queue=False)
    then_refresh(ui.calibrate.click(
        touching(calibrate_tab.on_calibrate, cut_outputs),
        [session, ui.method, ui.source, ui.windows, ui.seqlen, ui.sparsity, ui.pattern, ui.block, ui.mtype,
         ui.params, ui.pool_for, *ui.pool],
        [*cut_outputs, session], api_name="calibrate", concurrency_id=HEAVY))
    ui.cancel.click(calibrate_tab.on_cancel, [session], [ui.status], api_name="cancel", concurrency_limit=None,
                    concurrency_id="cancel")
    gr.on([w.input for w in ui.pool], touching(calibrate_tab.on_params, cut_outputs),
          [session, ui.method, ui.pool_for, ui.sparsity, ui.pattern, ui.block, ui.mtype, *ui.pool],
          [*cut_outputs, session], api_name="params", api_visibility="undocumented", trigger_mode="always_last",
          concurrency_limit=4, concurrency_id="cut", show_progress="minimal")


def _wire_live(ui, session, then_refresh) -> None:
    """The live view: slider, pattern, runs, matrix."""
    cut_outputs = _cut_outputs(ui)
    cut_inputs = [session, ui.sparsity, ui.pattern, ui.block, ui.mtype]
    ui.sparsity.release(touching(live_tab.on_cut, cut_outputs), cut_inputs, [*cut_outputs, session],
                        api_name="cut", **LIVE)
    ui.pattern.input(touching(live_tab.on_cut, cut_outputs), cut_inputs, [*cut_outputs, session], api_name="pattern",
                     api_visibility="undocumented", **LIVE)
    gr.on([ui.block.release, ui.mtype.input], touching(live_tab.on_view, [ui.heat, ui.hist]),
          [session, ui.block, ui.mtype], [ui.heat, ui.hist, session], api_name="view", **LIVE)
    ui.alloc_mode.input(touching(live_tab.on_alloc_mode, [ui.alloc]), [session, ui.alloc_mode, ui.block, ui.mtype],
                        [ui.alloc, session], api_name="alloc_mode", **LIVE)
    ui.active.input(touching(live_tab.on_select_run, cut_outputs), [session, ui.active, ui.block, ui.mtype],
                    [*cut_outputs, session], api_name="select_run", **LIVE)
    then_refresh(ui.shown.input(touching(live_tab.on_show_runs, cut_outputs), [session, ui.shown, ui.block, ui.mtype],
                                [*cut_outputs, session], api_name="show_runs", **LIVE))
    then_refresh(ui.rename.click(touching(live_tab.on_rename_run, cut_outputs),
                                 [session, ui.active, ui.rename_tb, ui.block, ui.mtype], [*cut_outputs, session],
                                 api_name="rename_run", concurrency_id="cut"))
    then_refresh(ui.delete.click(touching(live_tab.on_delete_run, cut_outputs),
                                 [session, ui.active, ui.block, ui.mtype], [*cut_outputs, session],
                                 api_name="delete_run", concurrency_id="cut"))


def _wire_compare(ui, session) -> None:
    cmp_outputs = [ui.agree, ui.jaccard, ui.cmp_md, ui.cmp_js]
    cmp_inputs = [session, ui.cmp_a, ui.cmp_b, ui.cmp_block, ui.cmp_mtype]
    gr.on([ui.compare.click, ui.cmp_a.input, ui.cmp_b.input, ui.cmp_block.release, ui.cmp_mtype.input],
          touching(masks_tab.on_compare, cmp_outputs), cmp_inputs, [*cmp_outputs, session], api_name="compare",
          **LIVE)
    ui.compare_tab.select(touching(masks_tab.on_compare_if_ready, cmp_outputs), cmp_inputs,
                          [*cmp_outputs, session], api_visibility="private", **LIVE)


def _wire_generation_and_perplexity(ui, session) -> None:
    gen = [session, ui.prompt, ui.max_new, ui.sample, ui.temp, ui.seed, ui.chat]
    gen3 = [ui.dense_out, ui.pruned_out, ui.pruned_b_out, ui.rates]
    ui.generate.click(touching(generate_tab.on_generate_runs, gen3), [*gen, ui.gen_a, ui.gen_b], [*gen3, session],
                      api_name="generate_runs", concurrency_id=HEAVY)
    gen2 = [ui.dense_out, ui.pruned_out, ui.rates]
    ui.generate_pair.click(touching(generate_tab.on_generate, gen2), gen, [*gen2, session], api_name="generate",
                           concurrency_id=HEAVY)
    evaluation = [ui.eval_src, ui.eval_seqlen, ui.eval_windows]
    ppl_outputs = [ui.ppl_md, ui.ppl_js, ui.ppl_plot, ui.points]
    ui.ppl.click(touching(perplexity_tab.on_perplexity, ppl_outputs), [session, *evaluation],
                 [*ppl_outputs, session], api_name="perplexity", concurrency_id=HEAVY)
    sweep_outputs = [ui.sweep_md, ui.ppl_plot, ui.points]
    ui.sweep.click(touching(perplexity_tab.on_sweep, sweep_outputs), [session, ui.sweep_tb, *evaluation],
                   [*sweep_outputs, session], api_name="sweep", concurrency_id=HEAVY)
    ui.sweep_all.click(touching(perplexity_tab.on_sweep_runs, sweep_outputs), [session, ui.sweep_tb, *evaluation],
                       [*sweep_outputs, session], api_name="sweep_runs", concurrency_id=HEAVY)


def _wire_export(ui, session, then_refresh) -> None:
    """Export, import, session files."""
    cut_outputs = _cut_outputs(ui)
    ui.exp_masks.click(touching(export_tab.on_export_masks, [ui.masks_file]), [session], [ui.masks_file, session],
                       api_name="export_masks")
    ui.exp_alloc.click(touching(export_tab.on_export_allocation, [ui.alloc_files]), [session],
                       [ui.alloc_files, session], api_name="export_allocation")
    ui.exp_model.click(touching(export_tab.on_export_model, [ui.model_file]), [session], [ui.model_file, session],
                       api_name="export_model", concurrency_id=HEAVY)
    then_refresh(ui.import_.click(touching(export_tab.on_import, cut_outputs),
                                  [session, ui.import_file, ui.block, ui.mtype], [*cut_outputs, session],
                                  api_name="import_masks", concurrency_id=HEAVY))
    ui.save.click(touching(export_tab.on_save_session, [ui.session_out, ui.session_md]), [session],
                  [ui.session_out, ui.session_md, session], api_name="save_session", concurrency_id=HEAVY)
    opened = ui.open.click(touching(export_tab.on_open_session, cut_outputs),
                           [session, ui.session_in, ui.block, ui.mtype], [*cut_outputs, session],
                           api_name="open_session", concurrency_id=HEAVY)
    reopened = [ui.ppl_plot, ui.points, ui.sparsity, ui.pattern, ui.alloc_mode]
    then_refresh(opened).then(touching(export_tab.on_session_opened, reopened), [session], [*reopened, session],
                              **QUIET)


def theme() -> gr.themes.Theme:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")


def css() -> str:
    path = ASSETS / "style.css"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


# Gradio's Plot re-creates its plotly element for every new value, and the old element's effect
# first draws the new figure into the element about to be removed: each update was drawn twice
# (about half the browser's work after a slider move). This defers every Plotly.react to the
# next animation frame (still before that frame is painted) and skips elements that have left
# the page by then. window.Plotly is set when gradio's plotly module first loads: patched then.
PLOTLY_ONCE_JS = """
<script>
(() => {
  const patch = (P) => {
    if (!P || typeof P.react !== "function" || P.__drawOnce) return P;
    const react = P.react;
    P.react = function (gd, ...args) {
      return new Promise((resolve, reject) => requestAnimationFrame(() => {
        const el = typeof gd === "string" ? document.getElementById(gd) : gd;
        if (!el || !el.isConnected) { resolve(el); return; }
        try { Promise.resolve(react.call(P, el, ...args)).then(resolve, reject); } catch (err) { reject(err); }
      }));
    };
    P.__drawOnce = true;
    return P;
  };
  let plotly = patch(window.Plotly);
  Object.defineProperty(window, "Plotly", {configurable: true, enumerable: true,
    get: () => plotly, set: (value) => { plotly = patch(value); }});
})();
</script>
"""


def head() -> str:
    """Extra <head> HTML: the single-draw fix for gradio's plots (PLOTLY_ONCE_JS)."""
    return PLOTLY_ONCE_JS


def launch_kwargs() -> dict:
    """What launch() needs for the look and the plots (gradio 6 takes theme, css and head at launch).

    run_history=False: gradio 6's run history copies every event's inputs and outputs into the
    browser's localStorage (up to 100 runs, re-serialised whole after each event, retried entry
    by entry when the quota is exceeded). With ~0.5 MB of figures per slider move that was about
    a third of the browser's work per move, for a history of slider positions nobody replays."""
    return {"theme": theme(), "css": css(), "head": head(), "run_history": False}
