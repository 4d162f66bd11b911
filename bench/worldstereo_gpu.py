"""WorldStereo at full size on one GPU: seconds per segment, peak GPU memory per memory mode, MFU per path.

Run: .venv/bin/python bench/worldstereo_gpu.py [--refs 8] [--memory-steps 5] [--modes none,model,sequential]
     [--storages compute,float8] [--attention native,cudnn,flash,sage]

The full-size architecture (Wan2.1-I2V-14B backbone + control branch +
stereo memory, 17.6 G parameters; UMT5-XXL, CLIP ViT-H/14, Wan VAE) is built
with random weights in bfloat16 directly on the GPU (no download, no
checkpoint needed), and the real pipeline runs one segment: 21 keyframes
(an 81-frame segment at the training stride) at 480 x 768 with ``--refs``
retrieved frames, prompt and image encoding, the condition/render/reference
VAE encodes, the denoising loop and the per-frame decode.

- ``dmd_segment_s``: ``worldstereo-memory-dmd``, 4 steps, no guidance, offload none, native attention.
- ``memory_segment_s``: ``worldstereo-memory``, 40 UniPC steps with guidance, prompt and negative
  prompt batched in one call per step; ``memory_segment_s_two_calls`` the same with two calls per step
  (the reference pipelines' way). Only ``--memory-steps`` steps are run (a full run takes minutes); the
  figure is the measured fixed part (encodes + decode) plus 40 times the measured median step.
- ``peak_gb_<offload>_<storage>``, ``dmd_segment_s_<offload>_<storage>``: ``torch.cuda.max_memory_allocated``
  and the time of a DMD segment in each memory mode: offload none (everything resident), model (one
  model on the GPU at a time), sequential (transformer blocks streamed), each with the block weights
  stored in the compute dtype (``compute``) or as float8 (``float8``, layerwise casting); ``peak_gb``
  is the leanest mode's.
- ``mfu``: analytic FLOPs of the denoising forwards (matmuls and attention, see ``forward_flops``) over
  their measured time, divided by the card's dense bf16 peak, for the DMD segment; ``mfu_<backend>``
  per attention backend (``nan`` where the backend cannot run here, with the reason printed);
  ``mfu_guided_batched`` / ``mfu_guided_two_calls`` for the guided steps.
- ``traced_act_gb``, ``traced_need_gb_<offload>[_float8][_pair]``: measured without a GPU, on every
  machine: the full-size forward run on the meta device with every live activation's bytes tracked
  (``engine/models/memory_trace.py``; ``_pair``: a batch of two, batched guidance), plus the weights
  each mode keeps on the GPU and a 2 GiB allowance for the allocator and workspaces; printed as a table
  beside the analytic estimate the engine picks modes with, and which of a 24, 32, 48 and 80 GB card
  each mode fits.

The frames between keyframes (re-projection, ``engine/generators/worldstereo.py``)
are geometry work outside this figure. Without a CUDA GPU the script says so and
prints the RESULT line with every GPU figure ``nan``. ``--tiny`` runs the same code
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


CARDS_GB = (24, 32, 48, 80)


def card_free_bytes(gb: int) -> int:
    """Free bytes on a card sold as ``gb`` GB (10^9 bytes), half a GiB taken by the driver and display."""
    return gb * 10**9 - GIB // 2


def traced_needs(frames: int, height: int, width: int, refs: int) -> tuple[dict, list[str]]:
    """GiB per memory mode (offload x weight storage) and guidance batch from the full-size forward traced
    on the meta device (no GPU needed, ``engine/models/memory_trace.py``) beside the analytic estimate the
    engine checks cards with; returns the figures and the printed table's lines."""
    from keyframe_worlds.engine.models.budget import MEMORY_MODES, estimate_memory
    from keyframe_worlds.engine.models.memory_trace import trace_forward
    from keyframe_worlds.engine.models.offload import apply_float8_storage
    from keyframe_worlds.engine.models.wan_transformer import WanTransformerConfig
    from keyframe_worlds.engine.models.weights import cast_for_inference
    from keyframe_worlds.engine.models.worldstereo import WorldStereoConfig, build_worldstereo

    variant = {"model_type": "worldstereo-memory-dmd", "base_model": "random",
               "controlnet_cfg": {**FULL_CONTROL, **MEMORY_CFG}}

    def meta_net(storage: str):
        with torch.device("meta"):
            net = build_worldstereo(WorldStereoConfig.from_dict(variant), WanTransformerConfig.from_dict(FULL_BACKBONE))
        net = cast_for_inference(net, torch.bfloat16).eval().requires_grad_(False)
        if storage == "float8":
            apply_float8_storage(net, torch.bfloat16)
        return net

    plain = meta_net("compute")
    figures, traced_act = {}, {}
    for storage in ("compute", "float8"):
        net = plain if storage == "compute" else meta_net("float8")
        for batch in (1, 2):
            traced_act[storage, batch] = trace_forward(net, frames, height, width, refs, batch=batch).peak_bytes
    lines = [f"{'offload':>10} {'storage':>8} | {'traced GiB':>10} {'(pair)':>7} | {'estimate':>8} {'(pair)':>7} | "
             f"fits (traced, single / pair)"]
    for batch in (1, 2):
        est = estimate_memory(plain, frames, height, width, refs, batch=batch)
        for offload, storage in MEMORY_MODES:
            # the engine's per-mode sums with the traced activations in place of the analytic ones
            traced = dataclasses.replace(est, activation_bytes=traced_act[storage, batch])
            key = f"traced_need_gb_{offload}" + ("_float8" if storage == "float8" else "") + ("_pair" if batch == 2 else "")
            figures[key] = traced.required(offload, storage) / GIB
            figures["estimated" + key[len("traced"):]] = est.required(offload, storage) / GIB
    for offload, storage in MEMORY_MODES:
        key = f"need_gb_{offload}" + ("_float8" if storage == "float8" else "")
        single, pair = figures[f"traced_{key}"], figures[f"traced_{key}_pair"]
        fits = " ".join(f"{gb}:{'y' if single * GIB <= card_free_bytes(gb) else 'n'}/"
                        f"{'y' if pair * GIB <= card_free_bytes(gb) else 'n'}" for gb in CARDS_GB)
        lines.append(f"{offload:>10} {storage:>8} | {single:10.1f} {pair:7.1f} | {figures[f'estimated_{key}']:8.1f} "
                     f"{figures[f'estimated_{key}_pair']:7.1f} | {fits}")
    figures["traced_act_gb"] = traced_act["compute", 1] / GIB
    figures["traced_act_gb_pair"] = traced_act["compute", 2] / GIB
    figures["estimated_act_gb"] = estimate_memory(plain, frames, height, width, refs).activation_bytes / GIB
    return figures, lines


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


def release_streaming(net) -> None:
    """Undo block streaming (before the weights are re-stored or placed for another mode)."""
    streamer = getattr(net, "block_streamer", None)
    if streamer is not None:
        streamer.remove()
        net.block_streamer = None


def main() -> int:
    from keyframe_worlds.engine.models.names import ATTENTION_BACKENDS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=21, help="keyframes per segment (21 = an 81-frame segment)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--refs", type=int, default=8, help="retrieved reference frames (the reference bank's maximum is 8)")
    parser.add_argument("--memory-steps", type=int, default=5, help="guided steps actually run for the 40-step figure")
    parser.add_argument("--modes", default="none,model,sequential", help="offload modes to measure, in order")
    parser.add_argument("--storages", default="compute,float8", help="weight storages to measure, in order")
    parser.add_argument("--attention", default=",".join(ATTENTION_BACKENDS), help="attention backends to measure")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card, if not in the table")
    parser.add_argument("--tiny", action="store_true", help="check the script on the CPU with the tiny configuration")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    storages = [m for m in args.storages.split(",") if m]
    backends = [m for m in args.attention.split(",") if m]
    nan = float("nan")

    needs, table = traced_needs(args.frames, args.height, args.width, args.refs)
    print(f"full-size forward traced on the meta device ({args.frames} keyframes at {args.height}x{args.width}, "
          f"{args.refs} references): activation peak {needs['traced_act_gb']:.2f} GiB, "
          f"{needs['traced_act_gb_pair']:.2f} GiB for a batch of two (analytic estimate {needs['estimated_act_gb']:.2f} GiB); "
          "GPU need per memory mode, with a 2 GiB allocator/workspace allowance (pair: prompt and negative prompt "
          f"batched); fits: card GB with {GIB // 2 // 2**20} MiB taken")
    for line in table:
        print("  " + line)
    traced = {k: v for k, v in needs.items() if k.startswith(("traced_act_gb", "traced_need_gb_"))}
    if args.tiny:
        device, dtype, name = torch.device("cpu"), torch.float32, "cpu (tiny configuration, not a benchmark)"
        args.frames, args.height, args.width, args.refs = 3, 128, 128, min(args.refs, 2)
        sync = lambda: None  # noqa: E731
    elif not torch.cuda.is_available():
        print("worldstereo_gpu: no CUDA GPU on this machine, so nothing was measured. The benchmark runs the full "
              "17.6 G-parameter WorldStereo architecture and needs a GPU (see DEVELOPERS.md for running it on a lent one); "
              "`--tiny` checks the script on the CPU.")
        figures = dict(dmd_segment_s=nan, memory_segment_s=nan, memory_segment_s_two_calls=nan, peak_gb=nan, mfu=nan)
        figures.update({f"peak_gb_{m}_{s}": nan for m in modes for s in storages})
        figures.update({f"mfu_{b}": nan for b in backends})
        figures.update(mfu_guided_batched=nan, mfu_guided_two_calls=nan)
        print_result(**figures, **traced, device="none")
        return 0
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        name = torch.cuda.get_device_name(device)
        sync = torch.cuda.synchronize

    from keyframe_worlds.engine.models.attention import AttentionBackendError, check_attention_backend
    from keyframe_worlds.engine.models.offload import apply_float8_storage
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
    peak = bf16_peak(name, args.peak_tflops) if device.type == "cuda" else None

    def mfu_of(step_times, forwards_per_step):
        if not peak or not step_times:
            return nan
        return flops * forwards_per_step * len(step_times) / sum(step_times) / peak

    def pipeline(model_type, mode, **kw):
        net.variant = dataclasses.replace(net.variant, model_type=model_type)
        pipe = WorldStereoPipeline(net, companions, device=device, offload=mode, **kw)
        pipe.enable_sequential_offload()
        return pipe

    figures: dict = {}
    peaks, dmd = {}, {}
    for storage in storages:
        if storage == "float8":
            # float8 storage is one-way (the rounding is lossy): the compute-dtype modes are measured first
            release_streaming(net)
            apply_float8_storage(net, dtype)
        for mode in modes:
            release_streaming(net)
            pipe = pipeline("worldstereo-memory-dmd", mode)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            total, steps = run_segment(pipe, cond, None, None, sync)
            peaks[mode, storage] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else nan
            dmd[mode, storage] = (total, steps)
            print(f"offload {mode:>10}, storage {storage:>7}: memory-dmd segment {total:7.2f} s (denoising steps "
                  f"{', '.join(f'{s:.2f}' for s in steps)} s), peak GPU memory {peaks[mode, storage]:.1f} GiB")
            del pipe
        if storage == storages[0]:
            release_streaming(net)
            # per attention backend (offload none when measured, else the first mode): DMD denoising only
            base_mode = "none" if "none" in modes else modes[0]
            for backend in backends:
                try:
                    check_attention_backend(backend, device, dtype)
                except AttentionBackendError as exc:
                    print(f"attention {backend:>7}: not measured: {exc}")
                    figures[f"mfu_{backend}"] = nan
                    continue
                release_streaming(net)
                _, steps = run_segment(pipeline("worldstereo-memory-dmd", base_mode, attention=backend), cond, None,
                                       None, sync)
                figures[f"mfu_{backend}"] = mfu_of(steps, 1)
                print(f"attention {backend:>7}: denoising steps {', '.join(f'{s:.2f}' for s in steps)} s, "
                      f"MFU {figures[f'mfu_{backend}']:.3f}")
            # the 40-step guided variant, batched guidance and two calls per step
            for batched in (True, False):
                release_streaming(net)
                pipe = pipeline("worldstereo-memory", base_mode, batched_guidance=batched)
                m_total, m_steps = run_segment(pipe, cond, args.memory_steps, 5.0, sync)
                del pipe
                fixed = m_total - sum(m_steps)
                step = statistics.median(m_steps)
                key = "memory_segment_s" if batched else "memory_segment_s_two_calls"
                figures[key] = fixed + 40 * step
                figures["mfu_guided_batched" if batched else "mfu_guided_two_calls"] = mfu_of(m_steps, 2)
                print(f"offload {base_mode:>10}: memory, {'batched guidance' if batched else 'two calls per step'}: "
                      f"{args.memory_steps} guided steps took {m_total:.2f} s (fixed part {fixed:.2f} s, median "
                      f"step {step:.2f} s) -> 40 steps: {figures[key]:.1f} s (extrapolated)")

    first = (modes[0], storages[0])
    dmd_total, dmd_steps = dmd[first]
    mfu = mfu_of(dmd_steps, 1)
    if peak:
        print(f"MFU during denoising ({modes[0]}, {storages[0]}): {mfu:.3f} of {peak / 1e12:.0f} TFLOP/s dense bf16")
    result = dict(dmd_segment_s=dmd_total, memory_segment_s=figures.pop("memory_segment_s"),
                  memory_segment_s_two_calls=figures.pop("memory_segment_s_two_calls"),
                  peak_gb=peaks[modes[-1], storages[-1]], mfu=mfu)
    result.update({f"peak_gb_{m}_{s}": peaks[m, s] for m in modes for s in storages})
    result.update({f"dmd_segment_s_{m}_{s}": dmd[m, s][0] for m in modes for s in storages})
    result.update(figures)
    result.update(traced)
    result["device"] = "cpu-tiny" if args.tiny else name
    print_result(**result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
