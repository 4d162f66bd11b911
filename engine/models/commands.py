"""``keyframe-worlds model ...``: checks on WorldStereo checkpoints.

``model check`` loads a variant folder, runs one transformer forward on given
inputs and writes the result, which is how a download is verified and how
equivalence with the reference implementation is checked on new inputs.
torch is imported inside the handler only.
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


def _load_tensors(path: Path, what: str) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise KeyframeWorldsError(f"{what} not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # a malformed header raises one of several types
        raise KeyframeWorldsError(f"{what} {path} is not a readable safetensors file: {exc}") from None


def run_check(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from .weights import ModelPaths, load_worldstereo

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KeyframeWorldsError(f"device {device!r} was asked for but this torch has no usable CUDA device")
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
    save_file({"output": output}, str(args.out))

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
