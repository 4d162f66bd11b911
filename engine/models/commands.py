"""``keyframe-worlds model ...``: checks on WorldStereo checkpoints.

``model check`` loads a variant folder, runs one transformer forward on given
inputs and writes the result, which is how a download is verified and how
equivalence with the reference implementation is checked on new inputs.
``model check-pipeline`` does the same for a whole pipeline call (text and
image encoders, VAE, every denoising step, decoding) on a case folder
(``engine/pipelines/check.py``). torch is imported inside the handlers only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ...bridge.errors import KeyframeWorldsError

#: Input names starting with this are metadata (raw cameras etc.), not forward inputs.
AUX_PREFIX = "aux."


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="check WorldStereo checkpoints",
                                  description="Checks on WorldStereo checkpoints (transformer variants).")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
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
    check.add_argument("--offload", default="none", choices=("none", "model", "sequential"),
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
    from ...bridge.paths import check_output

    check_output(args.out, "--out", folder=False, create_parents=True)  # before minutes of loading
    import torch

    from ..run.checkpoint import save_tensors
    from .weights import ModelPaths, load_worldstereo

    device = _device(args.device)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    inputs = _load_tensors(args.inputs, "inputs file")
    model = load_worldstereo(args.checkpoint, args.base_model, device=device, dtype=dtype,
                             paths=ModelPaths.from_env(), expect_variant=args.variant, offload=args.offload)
    forward_inputs = {k: v for k, v in inputs.items() if not k.startswith(AUX_PREFIX)}
    unknown = sorted(set(forward_inputs) - set(model.forward_inputs))
    if unknown:
        raise KeyframeWorldsError(
            f"{args.inputs} holds tensors the {model.variant.model_type} forward does not take: {', '.join(unknown)}. "
            f"Its inputs are: {', '.join(model.forward_inputs)}"
        )
    compute_device = torch.device(device)
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
    device = _device(args.device)
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
