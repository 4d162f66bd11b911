"""``keyframe-worlds model ...``: getting WorldStereo checkpoints and checking them.

``model download`` fetches the released variants, the Wan2.1 backbone folder
or a depth model through huggingface_hub, ``model list`` shows which are on
this machine and whether each is complete (``engine/models/hub.py``).

``model check`` loads a variant folder, runs one transformer forward on given
inputs and writes the result, which is how a download is verified and how
equivalence with the reference implementation is checked on new inputs.
``model check-pipeline`` does the same for a whole pipeline call (text and
image encoders, VAE, every denoising step, decoding) on a case folder
(``engine/pipelines/check.py``). Under ``torchrun --nproc_per_node N`` both split the transformer
across the N processes, rank 0 writing the results (``sequence_parallel``). torch is imported inside
the handlers only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...bridge.errors import KeyframeWorldsError
from .offload import OFFLOAD_MODES

#: Input names starting with this are metadata (raw cameras etc.), not forward inputs.
AUX_PREFIX = "aux."


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="download, list and check WorldStereo checkpoints",
                                  description="Download, list and check WorldStereo checkpoints, the Wan2.1 "
                                              "backbone and depth models.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    _add_hub_commands(model_sub)
    check = model_sub.add_parser(
        "check", help="load a variant folder and run one transformer forward on given inputs",
        description="Load a WorldStereo variant folder (config.json + model.safetensors, with the Wan2.1 I2V "
                    "backbone if the file holds only the differing keys), run one transformer forward on the "
                    "tensors in --inputs (names as the forward's arguments; names starting with 'aux.' are "
                    "skipped) and write the result to --out under the name 'output'.",
    )
    check.add_argument("--checkpoint", required=True, type=Path, help="variant folder")
    check.add_argument("--inputs", required=True, type=Path, help="safetensors file of forward inputs")
    check.add_argument("--out", required=True, type=Path, help="safetensors file to write ('output')")
    check.add_argument("--base-model", type=Path, default=None,
                       help="local Wan2.1 image-to-video diffusers folder (default: engine setting / "
                            "$KEYFRAME_WORLDS_WAN_I2V_DIR, base_model as a folder, then the Hugging Face cache)")
    check.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    check.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                       help="auto: bfloat16 on CUDA, float32 on CPU")
    check.add_argument("--offload", default="none", choices=OFFLOAD_MODES,
                       help="GPU offload mode the memory check assumes (sequential streams blocks)")
    check.add_argument("--variant", default=None,
                       help="fail unless the folder holds this variant (worldstereo-camera, -memory, -memory-dmd)")
    check.add_argument("--compare", type=Path, default=None,
                       help="reference outputs (safetensors with 'output'): report the max relative error")
    check.add_argument("--tolerance", type=float, default=1e-4,
                       help="with --compare: exit status 1 if max|diff|/max|reference| exceeds this")
    check.set_defaults(handler=run_check)

    pipeline = model_sub.add_parser(
        "check-pipeline", help="run a whole WorldStereo pipeline call on a case folder and compare every intermediate",
        description="Run the WorldStereo pipeline on a case folder (config.json, model.safetensors, "
                    "[transformer_config.json,] inputs.safetensors with the initial noise, case.json with the call's "
                    "settings; the layout of the shared pipeline goldens) with the Wan2.1 companions of --wan-dir, "
                    "and write every intermediate (prompt_embeds, image_embeds, condition, render_latent, "
                    "reference_latent, step<i>.*, final_latents, decoded_video, frames_uint8, ...) to --out under "
                    "the reference pipelines' names. With --compare, print the largest error of every key relative "
                    "to that key's largest reference magnitude (decoded video and frames: in 8-bit grey levels) and "
                    "exit 1 if any exceeds its tolerance.",
    )
    pipeline.add_argument("case", type=Path, metavar="CASE_DIR", help="case folder")
    pipeline.add_argument("--wan-dir", required=True, type=Path,
                          help="local Wan2.1 image-to-video diffusers folder (tokenizer, text_encoder, image_encoder, "
                               "image_processor, vae, scheduler, transformer/config.json)")
    pipeline.add_argument("--out", required=True, type=Path, help="safetensors file to write")
    pipeline.add_argument("--compare", type=Path, default=None,
                          help="reference outputs (e.g. CASE_DIR/outputs.safetensors) to compare every key with")
    pipeline.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    pipeline.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                          help="precision of every model (default float32, the goldens' precision)")
    pipeline.add_argument("--tolerance", type=float, default=1e-5,
                          help="with --compare: largest allowed max|diff| / max|reference| per key (default 1e-5)")
    pipeline.add_argument("--frame-tolerance", type=float, default=1.0,
                          help="with --compare: largest allowed difference of the decoded video and frames in "
                               "8-bit grey levels (default 1)")
    pipeline.set_defaults(handler=run_check_pipeline)


def _add_hub_commands(model_sub: argparse._SubParsersAction) -> None:
    from .hub import DOWNLOAD_PATTERNS, HUB_MODELS

    table = "; ".join(f"{m.name} ({m.repo_id}" + (f", folder {m.subfolder}" if m.subfolder else "") + ")"
                      for m in HUB_MODELS)
    download = model_sub.add_parser(
        "download", help="fetch WorldStereo variants, the Wan2.1 backbone or a depth model from the Hugging Face Hub",
        description=(
            f"Fetch models through huggingface_hub, from where the released inference scripts take them: {table}; "
            "or any Hugging Face repository id (org/name), e.g. a depth model such as "
            "depth-anything/Depth-Anything-V2-Small-hf. Only files matching "
            f"{' '.join(DOWNLOAD_PATTERNS)} are fetched (safetensors weights, configs and indexes, tokenizers). "
            "An interrupted download resumes when run again. Without --dir the files go to the Hugging Face "
            "cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub); gated or private "
            "repositories need $HF_TOKEN (or `hf auth login`). With HF_HUB_OFFLINE=1, or when the Hub cannot be "
            "reached, the copy in the cache is used (and linked into --dir). Exit status 2 with one line when a "
            "model cannot be had or is incomplete afterwards."),
        epilog="example: keyframe-worlds model download worldstereo-memory-dmd wan2.1-i2v-14b-480p --dir ~/models",
    )
    download.add_argument("names", nargs="+", metavar="NAME",
                          help=f"{', '.join(m.name for m in HUB_MODELS)}, or a repository id (org/name)")
    download.add_argument("--dir", type=Path, default=None, dest="model_dir",
                          help="a plain model folder to put them in (one sub-folder per variant, the backbone and "
                               "a depth model under their repository's name: the add-on's Model Folder layout) "
                               "instead of the Hugging Face cache")
    download.add_argument("--revision", default=None,
                          help="branch, tag or commit of every repository named (default: main)")
    download.add_argument("--json", action="store_true",
                          help="print one JSON object per line on stdout (start, progress twice a second, done, "
                               "error) instead of progress bars: what the add-on reads")
    download.set_defaults(handler=run_download)

    listing = model_sub.add_parser(
        "list", help="show which models are on this machine (model folder and Hugging Face cache), with sizes",
        description="List every model `model download` knows and every other model found in the model folder or "
                    "the Hugging Face cache, with where each copy is, its size and whether it is complete: every "
                    "file its indexes name is present (model_index.json's components, *.safetensors.index.json's "
                    "shards, a variant's config.json and model.safetensors) and every safetensors file is whole. "
                    "The cache is $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.",
    )
    listing.add_argument("--dir", type=Path, default=None, dest="model_dir",
                         help="the model folder (default: $KEYFRAME_WORLDS_WORLDSTEREO_DIR when set)")
    listing.add_argument("--keys", action="store_true",
                         help="also run model check's key check on every complete variant copy: every key of the "
                              "network present with its shape, backbone included (headers only: no tensor is read)")
    listing.add_argument("--json", action="store_true", help="print the list as one JSON object")
    listing.set_defaults(handler=run_list)


def _default_model_dir(given: Path | None) -> Path | None:
    import os

    from ..generators.options import CHECKPOINT_ROOT_ENV

    if given is not None:
        return given.expanduser()
    root = os.environ.get(CHECKPOINT_ROOT_ENV)
    return Path(root).expanduser() if root else None


def _json_line(event: str, **fields) -> None:
    import json

    print(json.dumps({"event": event, **fields}), flush=True)


def run_download(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ...bridge.paths import check_output
    from .hub import download, format_bytes, hub_cache_dir, model_files_bytes, resolve_names

    try:
        models = resolve_names(args.names)
        if args.model_dir is not None:
            check_output(args.model_dir, "--dir", folder=True, create_parents=True)
        if args.json:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        for model in models:
            if args.json:
                _json_line("start", name=model.name, repo_id=model.repo_id, subfolder=model.subfolder)
            else:
                print(f"{model.name}: {model.repo_id}" + (f" ({model.subfolder}/)" if model.subfolder else "")
                      + f" into {args.model_dir if args.model_dir is not None else hub_cache_dir()}", flush=True)
            callback = (lambda p: _json_line("progress", **asdict(p), text=p.describe())) if args.json else None
            folder = download(model, args.model_dir, revision=args.revision, progress=callback)
            size = model_files_bytes(folder)
            if args.json:
                _json_line("done", name=model.name, path=str(folder), size_bytes=size)
            else:
                print(f"{model.name}: complete, {format_bytes(size)} in {folder}", flush=True)
    except KeyframeWorldsError as exc:
        if args.json:
            _json_line("error", message=str(exc))
        raise
    if not args.json and args.model_dir is None and any(m.subfolder for m in models):
        print("the variants' folder in the cache holds one folder per variant: set $KEYFRAME_WORLDS_WORLDSTEREO_DIR "
              "to it (or pass --dir to get a plain model folder)")
    return 0


def run_list(args: argparse.Namespace) -> int:
    import json

    from .hub import KIND_VARIANT, entries_to_json, format_bytes, hub_cache_dir, list_local

    if args.model_dir is not None and not args.model_dir.expanduser().is_dir():
        raise KeyframeWorldsError(f"--dir {args.model_dir}: no such folder")
    model_dir = _default_model_dir(args.model_dir)
    cache = hub_cache_dir()
    entries, warnings = list_local(model_dir, cache)
    if args.keys:
        from ..io.checkpoint_files import CheckpointError
        from .weights import ModelPaths, check_variant_weights

        paths = ModelPaths.from_env()
        for entry in entries:
            for copy in entry.copies:
                if entry.kind == KIND_VARIANT and copy.complete:
                    try:
                        check_variant_weights(copy.path, paths=paths)
                        copy.keys = "ok"
                    except CheckpointError as exc:
                        copy.keys = str(exc)
    if args.json:
        print(json.dumps(entries_to_json(entries, model_dir, cache, warnings), indent=1))
        return 0
    print(f"model folder: {model_dir if model_dir is not None else '(none: --dir, or $KEYFRAME_WORLDS_WORLDSTEREO_DIR)'}")
    print(f"hugging face cache: {cache}")
    width = max(len(e.name) for e in entries)
    for entry in entries:
        state = "complete" if entry.complete else ("incomplete" if entry.copies else "not present")
        print(f"{entry.name:<{width}}  {state:<11}  {entry.repo_id or '-'}")
        for copy in entry.copies:
            where = copy.path + (f" (revision {copy.revision[:12]})" if copy.revision else "")
            verdict = "complete" if copy.complete else "INCOMPLETE: " + "; ".join(copy.problems[:3]) + (
                f" ... ({len(copy.problems) - 3} more)" if len(copy.problems) > 3 else "")
            if copy.keys is not None:
                verdict += ", keys ok" if copy.keys == "ok" else ", KEYS: " + copy.keys.replace("\n", " ")
            print(f"    {copy.source:<12}  {format_bytes(copy.size_bytes):>10}  {verdict}  {where}")
    for warning in warnings:
        print(f"warning: {warning}")
    return 0


def _load_tensors(path: Path, what: str) -> dict:
    from ..pipelines.check import read_safetensors

    return read_safetensors(path, what)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError as exc:
        raise KeyframeWorldsError(f"--device: {exc}") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KeyframeWorldsError(f"device {name!r} was asked for but this torch has no usable CUDA device")
    return name


def run_check(args: argparse.Namespace) -> int:
    """Under ``torchrun`` rank 0 runs the check and writes ``--out``; the other ranks serve the forward
    (``sequence_parallel``)."""
    from .sequence_parallel import run_command

    return run_command(args.device, lambda group: _run_check(args, group), lambda group: _load_checked(args, group))


def _load_checked(args: argparse.Namespace, group=None):
    import torch

    from .weights import ModelPaths, load_worldstereo

    device = str(group.device) if group is not None else _device(args.device)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    return load_worldstereo(args.checkpoint, args.base_model, device=device, dtype=dtype,
                            paths=ModelPaths.from_env(), expect_variant=args.variant, offload=args.offload)


def _run_check(args: argparse.Namespace, group) -> int:
    from ...bridge.paths import check_output

    check_output(args.out, "--out", folder=False, create_parents=True)  # before minutes of loading
    import torch

    from ..run.checkpoint import save_tensors

    inputs = _load_tensors(args.inputs, "inputs file")
    model = _load_checked(args, group)
    forward_inputs = {k: v for k, v in inputs.items() if not k.startswith(AUX_PREFIX)}
    unknown = sorted(set(forward_inputs) - set(model.forward_inputs))
    if unknown:
        raise KeyframeWorldsError(
            f"{args.inputs} holds tensors the {model.variant.model_type} forward does not take: {', '.join(unknown)}. "
            f"Its inputs are: {', '.join(model.forward_inputs)}"
        )
    compute_device = torch.device(model.load_report.device)
    forward_inputs = {k: v.to(compute_device) for k, v in forward_inputs.items()}
    with torch.no_grad():
        output = model(**forward_inputs)
    output = output.float().cpu().contiguous()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({"output": output}, args.out)

    report = model.load_report
    print(f"variant: {report.variant} ({report.keys_from_variant} keys from {report.variant_dir}"
          + (f", {report.keys_from_backbone} from the backbone {report.base_model_dir}" if report.keys_from_backbone
             else "") + ")")
    print(f"ran on {report.device} in {report.dtype}; output {list(output.shape)} written to {args.out}")
    if args.compare is None:
        return 0
    reference = _load_tensors(args.compare, "reference outputs file")
    if "output" not in reference:
        raise KeyframeWorldsError(f"{args.compare} has no tensor named 'output'")
    expected = reference["output"].float()
    if expected.shape != output.shape:
        raise KeyframeWorldsError(f"reference output is {list(expected.shape)}, ours {list(output.shape)}")
    diff = (output - expected).abs().max().item()
    rel = diff / max(expected.abs().max().item(), 1e-30)
    verdict = "match" if rel <= args.tolerance else "MISMATCH"
    print(f"max |diff| {diff:.3e}, relative {rel:.3e} (tolerance {args.tolerance:g}): {verdict}")
    if rel > args.tolerance:
        print(f"keyframe-worlds: output differs from {args.compare}", file=sys.stderr)
        return 1
    return 0


def run_check_pipeline(args: argparse.Namespace) -> int:
    """Under ``torchrun`` rank 0 runs the case and writes ``--out``; the other ranks load the case's
    transformer as the pipeline does and serve its forwards (``sequence_parallel``)."""
    from .sequence_parallel import run_command

    def load_transformer(group):
        import torch

        from ..pipelines.check import read_case
        from .weights import load_worldstereo

        case = read_case(args.case)
        return load_worldstereo(case.path, args.wan_dir, device=group.device, dtype=getattr(torch, args.dtype),
                                expect_variant=case.model_type)

    return run_command(args.device, lambda group: _run_check_pipeline(args, group), load_transformer)


def _run_check_pipeline(args: argparse.Namespace, group) -> int:
    from ...bridge.paths import check_output

    check_output(args.out, "--out", folder=False)  # before the run, not after it
    import torch

    from ..run.checkpoint import save_tensors
    from ..pipelines.check import compare_outputs, format_comparison, read_case, read_safetensors, run_case

    for name in ("tolerance", "frame_tolerance"):
        value = getattr(args, name)
        if not value >= 0 or value == float("inf"):
            raise KeyframeWorldsError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    case = read_case(args.case)
    # read before the run, so a wrong path fails in a second rather than after it
    reference = read_safetensors(args.compare, "reference outputs file") if args.compare is not None else None
    device = str(group.device) if group is not None else _device(args.device)
    outputs = run_case(case, args.wan_dir, device=device, dtype=getattr(torch, args.dtype))
    if args.out.is_dir():
        raise KeyframeWorldsError(f"--out {args.out} is a folder; give a .safetensors file name")
    try:
        save_tensors(outputs, args.out)
    except OSError as exc:
        raise KeyframeWorldsError(f"cannot write {args.out}: {exc}") from None
    print(f"case: {case.describe()}")
    print(f"ran on {device} in {args.dtype}; {len(outputs)} tensors written to {args.out}")
    if reference is None:
        return 0
    rows = compare_outputs(outputs, reference, tolerance=args.tolerance, frame_tolerance=args.frame_tolerance,
                           reference_name=str(args.compare))
    for line in format_comparison(rows):
        print(line)
    failed = [r.key for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)} of {len(rows)} keys within tolerance ({args.tolerance:g} relative, "
          f"{args.frame_tolerance:g} grey levels for the decoded video and frames)")
    if failed:
        print(f"keyframe-worlds: {len(failed)} key(s) differ from {args.compare} beyond tolerance: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0
