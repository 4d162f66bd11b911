"""WorldStereo at full size on one GPU: seconds per segment, peak GPU memory per offload mode, MFU.

Run: .venv/bin/python bench/worldstereo_gpu.py [--refs 8] [--memory-steps 5] [--modes none,model,sequential]

The full-size architecture (Wan2.1-I2V-14B backbone + control branch +
stereo memory, 17.6 G parameters; UMT5-XXL, CLIP ViT-H/14, Wan VAE) is built
with random weights in bfloat16 directly on the GPU (no download, no
checkpoint needed), and the real pipeline runs one segment: 21 keyframes
(an 81-frame segment at the training stride) at 480 x 768 with ``--refs``
retrieved frames, prompt and image encoding, the condition/render/reference
VAE encodes, the denoising loop and the per-frame decode.

- ``dmd_segment_s``: ``worldstereo-memory-dmd``, 4 steps, no guidance, offload none.
- ``memory_segment_s``: ``worldstereo-memory``, 40 UniPC steps with guidance (2 forwards
  per step). Only ``--memory-steps`` steps are run (a full run takes minutes); the
  figure is the measured fixed part (encodes + decode) plus 40 times the measured
  median step, and is printed as such.
- ``peak_gb_<mode>``: ``torch.cuda.max_memory_allocated`` over a DMD segment in each
  offload mode (none: everything resident; model: one model on the GPU at a time;
  sequential: transformer blocks streamed); ``peak_gb`` is the leanest mode's.
- ``traced_act_gb``, ``traced_need_gb_<mode>``: measured without a GPU, on every machine:
  the full-size forward run on the meta device with every live activation's bytes
  tracked (``engine/models/memory_trace.py``), plus the weights each mode keeps on the
  GPU and a 2 GiB allowance for the allocator and workspaces; printed beside the
  analytic estimate the engine refuses modes with.
- ``mfu``: analytic FLOPs of the denoising forwards (matmuls and attention, see
  ``forward_flops``) over their measured time, divided by the card's dense bf16 peak.

The frames between keyframes (re-projection, ``engine/generators/worldstereo.py``)
are geometry work outside this figure. Without a CUDA GPU the script says so and
prints the RESULT line with every figure ``nan``. ``--tiny`` runs the same code
path with the tiny test configuration on the CPU (a check of the script, not a
benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import print_result  # noqa: E402

#: Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L40", 181.0), ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0), ("A6000", 155.0),
                    ("RTX 3090", 71.0), ("A10", 125.0))
FULL_BACKBONE = {
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 36,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": 1280,
    "added_kv_proj_dim": 5120, "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
#: The control branch as assumed for the released checkpoints (shared fixtures README, keys_full.json).
FULL_CONTROL = {"conv_out_dim": 5120, "dim": 1024, "num_heads": 16, "ffn_dim": 8192, "time_embed_dim": 5120,
                "num_layers": 20, "add_channels": 7, "mid_channels": 256, "mask_downsample": 1, "interp": False}
MEMORY_CFG = {"update_ref": True, "main_camera_embedding": True, "camera_embedding_dim": 7, "ref_embedding": False}
GIB = 1024**3


def forward_flops(backbone: dict, control: dict, frames: int, height: int, width: int, refs: int,
                  context_tokens: int = 257 + 512) -> float:
    """Matmul + attention FLOPs of one transformer forward (2 per multiply-add; norms, RoPE, embeddings omitted)."""
    d = backbone["num_attention_heads"] * backbone["attention_head_dim"]
    ffn = backbone["ffn_dim"]
    per_frame = (height // 16) * (width // 16)
    tokens, ref_tokens = frames * per_frame, refs * per_frame
    joint = tokens + ref_tokens
    block = (2 * 4 * d * d * joint            # self-attention q, k, v, o on both streams
             + 2 * 2 * joint * joint * d       # QK^T and AV over the joint sequence
             + 2 * 2 * d * d * tokens          # cross-attention q and o (targets only)
             + 2 * 4 * d * d * context_tokens  # text k, v and image k, v
             + 2 * 2 * tokens * context_tokens * d
             + 2 * 2 * d * ffn * joint         # MLP on both streams
             + 2 * 6 * d * d)                  # modulation
    c, cf = control["dim"], control["ffn_dim"]
    control_block = 2 * 4 * c * c * tokens + 2 * 2 * tokens * tokens * c + 2 * 2 * c * cf * tokens + 2 * c * d * tokens
    patch = 2 * 36 * 4 * d * (2 * tokens + ref_tokens) + 2 * 16 * 4 * d * tokens
    return backbone["num_layers"] * block + control["num_layers"] * control_block + patch


def traced_needs(frames: int, height: int, width: int, refs: int) -> dict:
    """GiB per offload mode from the full-size forward traced on the meta device (no GPU needed,
    ``engine/models/memory_trace.py``) beside the analytic estimate the engine checks cards with."""
    from keyframe_worlds.engine.models.weights import cast_for_inference
    from keyframe_worlds.engine.models.budget import estimate_memory
    from keyframe_worlds.engine.models.memory_trace import trace_forward
    from keyframe_worlds.engine.models.wan_transformer import WanTransformerConfig
    from keyframe_worlds.engine.models.worldstereo import WorldStereoConfig, build_worldstereo

    variant = {"model_type": "worldstereo-memory-dmd", "base_model": "random",
               "controlnet_cfg": {**FULL_CONTROL, **MEMORY_CFG}}
    with torch.device("meta"):
        net = build_worldstereo(WorldStereoConfig.from_dict(variant), WanTransformerConfig.from_dict(FULL_BACKBONE))
    net = cast_for_inference(net, torch.bfloat16).eval().requires_grad_(False)
    trace = trace_forward(net, frames, height, width, refs)
    est = estimate_memory(net, frames, height, width, refs)
    traced = dataclasses.replace(est, activation_bytes=trace.peak_bytes)  # the engine's per-mode sums, traced activations
    modes = ("none", "model", "sequential")
    return {"traced_act_gb": trace.peak_bytes / GIB, "estimated_act_gb": est.activation_bytes / GIB,
            **{f"traced_need_gb_{m}": traced.required(m) / GIB for m in modes},
            **{f"estimated_need_gb_{m}": est.required(m) / GIB for m in modes}}


def bf16_peak(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for fragment, tflops in BF16_PEAK_TFLOPS:
        if fragment in name:
            return tflops * 1e12
    return None


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    """The memory network (random weights) and the companions, on ``device``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from keyframe_worlds.engine.models.weights import cast_for_inference
    from keyframe_worlds.engine.models.wan_transformer import WanTransformerConfig
    from keyframe_worlds.engine.models.worldstereo import WorldStereoConfig, build_worldstereo
    from keyframe_worlds.engine.testing import tiny_models as tiny_cfg
    from keyframe_worlds.engine.pipelines.components import WanCompanions, wan_vae_class

    backbone = tiny_cfg.TINY_BACKBONE if tiny else FULL_BACKBONE
    control = tiny_cfg.TINY_CONTROL if tiny else FULL_CONTROL
    variant = {"model_type": "worldstereo-memory-dmd", "base_model": "random", "controlnet_cfg": {**control, **MEMORY_CFG}}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build straight in the compute dtype: no float32 copy of 17.6 G parameters
    try:
        with torch.device(device):
            net = build_worldstereo(WorldStereoConfig.from_dict(variant), WanTransformerConfig.from_dict(backbone))
            if tiny:
                text = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                                   relative_attention_num_buckets=8))
                image = CLIPVisionModel(CLIPVisionConfig(hidden_size=20, intermediate_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=32, patch_size=8))
                vae = wan_vae_class()(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True])
                processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
            else:
                # UMT5-XXL encoder, CLIP ViT-H/14 vision tower, Wan2.1 VAE (diffusers' defaults are Wan2.1's)
                text = UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                                   num_heads=64, relative_attention_num_buckets=32,
                                                   feed_forward_proj="gated-gelu"))
                image = CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                         num_attention_heads=16, image_size=224, patch_size=14,
                                                         hidden_act="gelu", projection_dim=1024))
                vae = wan_vae_class()()
                processor = CLIPImageProcessor()
    finally:
        torch.set_default_dtype(previous)
    cast_for_inference(net, dtype)
    for module in (net, text, image, vae):
        module.eval().requires_grad_(False)
    tokenizer_dir = Path("/tmp") / "keyframe_worlds_bench_tokenizer"
    tiny_cfg._tiny_tokenizer(tokenizer_dir)  # any tokenizer will do: the prompt is zero-padded to 512 tokens
    from transformers import AutoTokenizer

    companions = WanCompanions(AutoTokenizer.from_pretrained(str(tokenizer_dir)), text, image, processor, vae,
                               dict(tiny_cfg.WAN_UNIPC_CONFIG))
    return net, companions, backbone, control


def conditions(frames: int, height: int, width: int, refs: int):
    from keyframe_worlds.engine.pipelines.prep import Reference, prepare_conditions

    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    render = torch.randint(0, 256, (frames, height, width, 3), generator=gen, dtype=torch.uint8)
    covered = torch.rand(frames, height, width, generator=gen) > 0.3
    c2w = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    c2w[:, 0, 3] = torch.linspace(0, 2, frames)
    intr = torch.tensor([[0.9 * width, 0.9 * width, width / 2, height / 2]], dtype=torch.float64).repeat(frames, 1)
    attach = torch.linspace(1, frames - 1, refs).round().long().unique().tolist() if refs else []
    references = [Reference(render[j], c2w[j], j) for j in attach]
    return prepare_conditions(image, render, covered, c2w, intr, (width, height), height, width, memory=True,
                              references=references)


def run_segment(pipe, cond, steps, guidance, sync):
    """Wall time of one pipeline call, and the times of its denoising steps."""
    stamps = []

    def callback(i, n):
        sync()
        stamps.append(time.perf_counter())

    sync()
    t0 = time.perf_counter()
    first_step_start = []

    def before_forward(module, args):
        # the denoising loop starts after the encodes: the time just before the first forward
        if not first_step_start:
            sync()
            first_step_start.append(time.perf_counter())

    hook = pipe.transformer.register_forward_pre_hook(before_forward)
    try:
        pipe(cond, prompt="a quiet street with trees", steps=steps, guidance_scale=guidance, seed=0, callback=callback)
    finally:
        hook.remove()
    sync()
    total = time.perf_counter() - t0
    edges = first_step_start[:1] + stamps
    step_times = [b - a for a, b in zip(edges, edges[1:])]
    return total, step_times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=21, help="keyframes per segment (21 = an 81-frame segment)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--refs", type=int, default=8, help="retrieved reference frames (the reference bank's maximum is 8)")
    parser.add_argument("--memory-steps", type=int, default=5, help="guided steps actually run for the 40-step figure")
    parser.add_argument("--modes", default="none,model,sequential", help="offload modes to measure, in order")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card, if not in the table")
    parser.add_argument("--tiny", action="store_true", help="check the script on the CPU with the tiny configuration")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]

    needs = traced_needs(args.frames, args.height, args.width, args.refs)
    print(f"full-size forward traced on the meta device: activation peak {needs['traced_act_gb']:.2f} GiB "
          f"(analytic estimate {needs['estimated_act_gb']:.2f} GiB)")
    for m in ("none", "model", "sequential"):
        print(f"  offload {m:>10}: needs {needs[f'traced_need_gb_{m}']:5.1f} GiB from the trace, "
              f"{needs[f'estimated_need_gb_{m}']:5.1f} GiB estimated (both with "
              "a 2 GiB allocator/workspace allowance)")
    traced = {k: v for k, v in needs.items() if k == "traced_act_gb" or k.startswith("traced_need_gb_")}
    if args.tiny:
        device, dtype, name = torch.device("cpu"), torch.float32, "cpu (tiny configuration, not a benchmark)"
        args.frames, args.height, args.width, args.refs = 3, 128, 128, min(args.refs, 2)
        sync = lambda: None  # noqa: E731
    elif not torch.cuda.is_available():
        print("worldstereo_gpu: no CUDA GPU on this machine, so nothing was measured. The benchmark runs the full "
              "17.6 G-parameter WorldStereo architecture and needs a GPU (see DEVELOPERS.md for running it on a lent one); "
              "`--tiny` checks the script on the CPU.")
        print_result(dmd_segment_s=float("nan"), memory_segment_s=float("nan"), peak_gb=float("nan"),
                     mfu=float("nan"), **traced, device="none")
        return 0
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        name = torch.cuda.get_device_name(device)
        sync = torch.cuda.synchronize

    from keyframe_worlds.engine.pipelines.worldstereo import WorldStereoPipeline

    print(f"device: {name}; segment: {args.frames} keyframes at {args.height}x{args.width}, {args.refs} references")
    t0 = time.perf_counter()
    net, companions, backbone, control = build(args.tiny, device, dtype)
    params = sum(p.numel() for p in net.parameters())
    print(f"built the memory network ({params / 1e9:.2f} G parameters) and companions with random weights "
          f"in {time.perf_counter() - t0:.0f} s")
    cond = conditions(args.frames, args.height, args.width, args.refs)
    refs = cond.reference_video.shape[2]
    flops = forward_flops(backbone, control, args.frames, args.height, args.width, refs)
    print(f"analytic FLOPs per transformer forward: {flops / 1e15:.3f} PFLOP ({refs} references)")

    results = {}
    peaks = {}
    for mode in modes:
        # a pipeline per mode places the weights as the mode wants them (the next mode only moves them further out)
        net.variant = dataclasses.replace(net.variant, model_type="worldstereo-memory-dmd")
        pipe = WorldStereoPipeline(net, companions, device=device, offload=mode)
        pipe.enable_sequential_offload()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        total, steps = run_segment(pipe, cond, None, None, sync)
        peaks[mode] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")
        results[("dmd", mode)] = (total, steps)
        print(f"offload {mode:>10}: memory-dmd segment {total:7.2f} s (denoising steps "
              f"{', '.join(f'{s:.2f}' for s in steps)} s), peak GPU memory {peaks[mode]:.1f} GiB")
        if mode == modes[0]:
            # the 40-step guided variant: same network weights layout, UniPC + guidance
            net.variant = dataclasses.replace(net.variant, model_type="worldstereo-memory")
            pipe = WorldStereoPipeline(net, companions, device=device, offload=mode)
            m_total, m_steps = run_segment(pipe, cond, args.memory_steps, 5.0, sync)
            fixed = m_total - sum(m_steps)
            step = statistics.median(m_steps)
            results["memory"] = fixed + 40 * step
            print(f"offload {mode:>10}: memory {args.memory_steps} guided steps took {m_total:.2f} s "
                  f"(fixed part {fixed:.2f} s, median step {step:.2f} s) -> 40 steps: {results['memory']:.1f} s "
                  "(extrapolated)")

    dmd_total, dmd_steps = results[("dmd", modes[0])]
    peak = bf16_peak(name, args.peak_tflops) if device.type == "cuda" else None
    mfu = (flops * len(dmd_steps) / sum(dmd_steps)) / peak if peak else float("nan")
    if peak:
        print(f"MFU during denoising ({modes[0]}): {mfu:.3f} of {peak / 1e12:.0f} TFLOP/s dense bf16")
    leanest = modes[-1]
    figures = dict(dmd_segment_s=dmd_total, memory_segment_s=results["memory"], peak_gb=peaks[leanest], mfu=mfu)
    figures.update({f"peak_gb_{m}": peaks[m] for m in modes})
    figures.update({f"dmd_segment_s_{m}": results[("dmd", m)][0] for m in modes[1:]})
    figures.update(traced)
    figures["device"] = "cpu-tiny" if args.tiny else name
    print_result(**figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
