"""The WorldStereo pipelines: keyframe conditions in, keyframe video out, for the three variants.

One class serves the three released variants; what differs is the sampler:

- ``worldstereo-camera`` / ``worldstereo-memory``: UniPC multistep sampling of
  the flow-matching velocity (the backbone folder's ``scheduler/`` config,
  40 steps by default) with classifier-free guidance on the text: each step
  runs the transformer on the prompt and on the negative prompt and moves
  along ``v_neg + g (v_pos - v_neg)`` (g = 5 by default). With
  ``batched_guidance`` the two run as one transformer call on a batch of two
  (prompt first); the reference pipelines make two calls, and the batched one
  equals them within float32 noise (both pass the reference fixtures at 1e-5).
- ``worldstereo-memory-dmd``: the distilled few-step Euler schedule
  (:class:`~..models.dmd_scheduler.DMDScheduler`, 4 steps), no guidance.

Steps of one call (``__call__``), as in the reference pipelines:

1. ``check_inputs``: sizes, frames and the variant's inputs, with specific errors.
2. Text: UMT5 embeddings of the prompt (and the negative prompt when guided).
3. Image: CLIP embedding of the conditioning image (``clip_pixels``: how its
   8-bit pixels are scaled, see ``components``).
4. Latents: the I2V condition (first-frame mask + condition latent), the
   memory render's keyframe latents and, for the memory variants, the
   retrieved frames' keyframe latents as ``[latent | ones(4) | latent]``.
5. Denoising from seeded Gaussian noise; after every step the callback gets
   ``(step, total)`` and ``should_cancel()`` is asked (a True answer raises
   :class:`~keyframe_worlds.bridge.jobs.JobCancelled` before the next step starts).
6. Keyframe decoding (every latent frame on its own) to uint8 frames.

``trace`` (optional) receives every intermediate of a call, named as in the
reference pipelines' golden outputs (:data:`TRACE_KEYS`), which is how
``keyframe-worlds model check-pipeline`` compares a whole call with them.

Offload (``offload``): ``none`` keeps everything on the device; ``model``
keeps every model in CPU memory and lets one at a time visit the device in the
order text encoder -> image encoder -> VAE -> transformer -> VAE (a visit
copies the weights in and drops the device copy after, see
:class:`~..models.offload.DeviceVisits`);
``sequential`` does the same for the companions and streams the transformer's
blocks one by one (the rest of the transformer stays resident), which is what
fits the 14B backbone on a 24 GB card. ``weights_storage="float8"`` (set up by
``from_pretrained``) stores the blocks' Linear weights as float8 and casts
each layer to the compute dtype for its forward; ``attention`` picks the
attention kernel (:data:`~..models.names.ATTENTION_BACKENDS`) for the
transformer's calls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...bridge.errors import KeyframeWorldsError
from ...bridge.jobs import JobCancelled
from ..models.dmd_scheduler import DMDScheduler, DMDSchedulerConfig
from ..models.names import CAMERA_VARIANT, MEMORY_DMD_VARIANT, MEMORY_VARIANT, VARIANTS
from ..models.attention import attention_backend, check_attention_backend
from ..models.names import DEFAULT_ATTENTION_BACKEND
from ..models.offload import (OFFLOAD_MODES, WEIGHTS_STORAGES, DeviceVisits, apply_float8_storage,
                              enable_sequential_offload)
from .components import (CLIP_PIXELS, LATENT_COND_MODES, WanCompanions, clip_pixel_values, condition_latent,
                         encode_pixels, encode_tokens, make_unipc, tokenize_prompts, vae_decode_keyframes,
                         vae_encode_keyframes)
from .prep import SegmentConditions, check_generation_size, video_to_uint8

#: Sampling defaults of the reference scripts.
DEFAULT_STEPS = {CAMERA_VARIANT: 40, MEMORY_VARIANT: 40}
DEFAULT_GUIDANCE = 5.0
MAX_STEPS = 1000

#: What ``trace(name, tensor)`` receives in one call (B = 1; ``step{i}.*`` for every step i; ``negative``
#: and ``uncond`` entries only when guided, ``reference_latent`` only for the memory variants):
TRACE_KEYS = {
    "text.input_ids": "[1, 512] int64 tokens of the cleaned prompt",
    "text.attention_mask": "[1, 512] int64",
    "text.negative_input_ids": "[1, 512] int64 tokens of the cleaned negative prompt",
    "text.negative_attention_mask": "[1, 512] int64",
    "prompt_embeds": "[1, 512, text_dim] UMT5 states, zero after the prompt's tokens",
    "negative_prompt_embeds": "[1, 512, text_dim]",
    "clip.pixel_values": "[1, 3, S, S] CLIP input",
    "image_embeds": "[1, tokens, image_dim] CLIP penultimate states",
    "image_preprocessed": "[1, 3, H, W] conditioning image in [-1, 1]",
    "condition": "[1, 4 + 16, F, h, w] first-frame mask | condition latent",
    "render_latent": "[1, 16, F, h, w] memory render, each keyframe encoded alone",
    "reference_latent": "[1, 36, F_ref, h, w] [latent | ones(4) | latent] of the references",
    "step{i}.latents_in": "[1, 16, F, h, w] latents given to the transformer (beside the condition)",
    "step{i}.timestep": "[1] the step's timestep (UniPC int64, DMD float32)",
    "step{i}.noise_pred_cond": "[1, 16, F, h, w] transformer output with the prompt",
    "step{i}.noise_pred_uncond": "[1, 16, F, h, w] with the negative prompt",
    "step{i}.noise_pred": "[1, 16, F, h, w] what the sampler gets: uncond + g (cond - uncond), or cond",
    "step{i}.latents_out": "[1, 16, F, h, w] latents after the step",
    "final_latents": "[1, 16, F, h, w] the last latents_out, input of decoding",
    "decoded_video": "[1, 3, F, H, W] in [-1, 1], each keyframe decoded alone",
    "frames_uint8": "[F, H, W, 3] uint8, the returned frames (rounded)",
}


@dataclass
class PipelineOutput:
    """frames: ``(F, H, W, 3)`` uint8 keyframes; latents: the final ``[1, 16, F, h, w]`` latents (float32)."""

    frames: torch.Tensor
    latents: torch.Tensor


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class WorldStereoPipeline:
    """See the module docstring. ``transformer`` is a loaded WorldStereo network (``load_worldstereo``)."""

    def __init__(self, transformer: torch.nn.Module, companions: WanCompanions, device: str | torch.device | None = None,
                 offload: str = "none", negative_prompt: str = "", latent_cond_mode: str = "full_vae",
                 dmd_config: DMDSchedulerConfig | None = None, clip_pixels: str = "uint8",
                 attention: str = DEFAULT_ATTENTION_BACKEND, batched_guidance: bool = True):
        if offload not in OFFLOAD_MODES:
            raise KeyframeWorldsError(f"unknown offload mode {offload!r}; expected one of {', '.join(OFFLOAD_MODES)}")
        if latent_cond_mode not in LATENT_COND_MODES:
            raise KeyframeWorldsError(f"latent_cond_mode {latent_cond_mode!r} is not one of {', '.join(LATENT_COND_MODES)}")
        if clip_pixels not in CLIP_PIXELS:
            raise KeyframeWorldsError(f"clip_pixels {clip_pixels!r} is not one of {', '.join(CLIP_PIXELS)}")
        variant = getattr(transformer, "variant", None)
        if variant is None or variant.model_type not in VARIANTS:
            raise KeyframeWorldsError("the transformer is not a WorldStereo network (no variant config)")
        self.transformer = transformer
        self.companions = companions
        self.variant = variant.model_type
        self.device = torch.device(device) if device is not None else _default_device()
        self.offload = offload
        self.negative_prompt = negative_prompt
        self.latent_cond_mode = latent_cond_mode
        self.clip_pixels = clip_pixels
        self.dmd_config = dmd_config or variant.dmd or DMDSchedulerConfig()
        check_attention_backend(attention, self.device, transformer.patch_embedding.weight.dtype)
        self.attention = attention
        self.batched_guidance = bool(batched_guidance)
        self._visits: dict[int, DeviceVisits] = {}
        self._place_initially()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, variant_dir: str | Path, base_model_dir: str | Path | None = None, *,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        offload: str = "none", expect_variant: str | None = None, paths=None,
                        companions_dir: str | Path | None = None, clip_pixels: str | None = None,
                        attention: str = DEFAULT_ATTENTION_BACKEND, weights_storage: str = "compute",
                        batched_guidance: bool | None = None) -> "WorldStereoPipeline":
        """Load a variant folder and the Wan2.1 I2V companions (from ``companions_dir``, else the resolved
        backbone folder). ``dtype`` defaults to bfloat16 on CUDA, float32 elsewhere; ``clip_pixels``
        to the variant config's ``clip_pixels``, else ``"uint8"`` (the released inference's).

        ``weights_storage="float8"``: the blocks' Linear weights stored as float8 (compute in ``dtype``).
        ``batched_guidance``: None picks it: batched, unless on CUDA the doubled activations would not fit
        where two calls would. On CUDA the free memory is checked for the whole set-up (offload, storage,
        guidance batch) before anything is moved there, and a refusal names a set-up that fits."""
        from ..models.weights import load_worldstereo, read_variant_folder, resolve_base_model
        from .components import load_companions

        device = torch.device(device) if device is not None else _default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if weights_storage not in WEIGHTS_STORAGES:
            raise KeyframeWorldsError(f"unknown weights_storage {weights_storage!r}; expected one of "
                                      f"{', '.join(WEIGHTS_STORAGES)}")
        check_attention_backend(attention, device, dtype)  # before minutes of loading
        home = device if offload == "none" else torch.device("cpu")
        # Loaded into CPU memory (no GPU check there) whenever the device copy is not simply the loaded one:
        # model offload, block streaming over float8 blocks, float8 storage (cast on the host, then moved).
        staged = device.type == "cuda" and (offload != "none" or weights_storage == "float8")
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None  # before any weight is there
        transformer = load_worldstereo(variant_dir, base_model_dir, device="cpu" if staged else device,
                                       dtype=dtype, paths=paths, expect_variant=expect_variant,
                                       offload="none" if staged else offload, free_memory_bytes=None)
        if weights_storage == "float8":
            apply_float8_storage(transformer, dtype)
        guided = transformer.variant.model_type != MEMORY_DMD_VARIANT
        if device.type == "cuda":
            from ..models.budget import check_gpu_memory, estimate_memory, pick_batched_guidance

            base_dir = transformer.load_report.base_model_dir
            if batched_guidance is None:
                batched_guidance = pick_batched_guidance(transformer, free, offload, weights_storage, guided,
                                                         base_dir=base_dir)
            check_gpu_memory(estimate_memory(transformer, base_dir=base_dir, batch=2 if guided and batched_guidance
                                             else 1), free, offload, what=transformer.variant.model_type,
                             weights_storage=weights_storage)
            if staged:
                if offload == "none":
                    transformer.to(device)
                elif offload == "sequential":
                    enable_sequential_offload(transformer, device)
        batched_guidance = True if batched_guidance is None else batched_guidance
        if companions_dir is None:
            report = transformer.load_report
            companions_dir = report.base_model_dir or resolve_base_model(read_variant_folder(variant_dir), None, paths)
        companions = load_companions(companions_dir, dtype=dtype, device=home)
        extra = transformer.variant.extra
        pipe = cls(transformer, companions, device=device, offload=offload,
                   negative_prompt=str(extra.get("negative_prompt", "")),
                   latent_cond_mode=str(extra.get("latent_cond_mode", "full_vae")),
                   clip_pixels=clip_pixels or str(extra.get("clip_pixels", "uint8")),
                   attention=attention, batched_guidance=batched_guidance)
        return pipe

    def _place_initially(self) -> None:
        if self.offload == "none":
            self.transformer.to(self.device)
            for module in self.companions.modules().values():
                module.to(self.device)
        else:
            for module in self.companions.modules().values():
                module.to("cpu")
            if self.offload == "model":
                self.transformer.to("cpu")

    def enable_sequential_offload(self) -> None:
        """Stream the transformer's blocks (for a transformer built in memory rather than loaded)."""
        if (self.offload != "sequential" or self.device.type == "cpu"
                or getattr(self.transformer, "block_streamer", None) is not None):  # load_worldstereo set it up
            return
        self.transformer.to("cpu")
        enable_sequential_offload(self.transformer, self.device)

    def visits(self, module: torch.nn.Module) -> DeviceVisits:
        """The :class:`~..models.offload.DeviceVisits` of an offloaded ``module`` (made on its first visit)."""
        key = id(module)
        if key not in self._visits:
            self._visits[key] = DeviceVisits(module, self.device)
        return self._visits[key]

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module, is_transformer: bool = False):
        """Make ``module`` usable on the execution device for the block; when offloading, drop its device
        copy after (its host copy stays what it was: nothing is copied back)."""
        moved = self.offload == "model" or (self.offload == "sequential" and not is_transformer)
        visits = self._visits.get(id(module)) if moved else None  # set up beforehand (tests: copying CPU visits)
        if visits is None and moved and self.device.type != "cpu":
            visits = self.visits(module)
        if visits is not None:
            visits.enter()
        try:
            yield module
        finally:
            streamer = getattr(module, "block_streamer", None) if is_transformer else None
            if streamer is not None:
                streamer.release()  # the block prefetched for a next step: its memory goes to the VAE
            if visits is not None:
                visits.leave()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # -- checks ---------------------------------------------------------------------------------
    @property
    def is_memory(self) -> bool:
        return self.variant in (MEMORY_VARIANT, MEMORY_DMD_VARIANT)

    @property
    def is_dmd(self) -> bool:
        return self.variant == MEMORY_DMD_VARIANT

    def check_inputs(self, cond: SegmentConditions, steps: int, guidance_scale: float) -> None:
        check_generation_size(cond.height, cond.width)
        f, h, w = cond.frames, cond.height, cond.width
        expect = {"render_video": (1, 3, f, h, w), "render_mask": (1, 1, f, h, w), "camera_embedding": (1, 6, f, h, w),
                  "image": (1, 3, h, w)}
        for name, shape in expect.items():
            got = tuple(getattr(cond, name).shape)
            if got != shape:
                raise KeyframeWorldsError(f"{name} must be {list(shape)}, got {list(got)}")
        if self.is_memory:
            if cond.reference_video is None or cond.ref_index is None or cond.camera_qt is None or cond.camera_qt_ref is None:
                raise KeyframeWorldsError(f"{self.variant} needs reference_video, ref_index, camera_qt and camera_qt_ref")
            refs = cond.reference_video.shape[2]
            if tuple(cond.reference_video.shape) != (1, 3, refs, h, w) or tuple(cond.ref_index.shape) != (refs,):
                raise KeyframeWorldsError(f"reference_video must be [1, 3, F_ref, {h}, {w}] with ref_index [F_ref], got "
                                          f"{list(cond.reference_video.shape)} and {list(cond.ref_index.shape)}")
            if refs and (int(cond.ref_index.min()) < 0 or int(cond.ref_index.max()) > f - 2):
                raise KeyframeWorldsError(f"ref_index values must lie in [0, {f - 2}], got {cond.ref_index.tolist()}")
        elif cond.reference_video is not None:
            raise KeyframeWorldsError(f"{self.variant} takes no reference frames (use a memory variant)")
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
            raise KeyframeWorldsError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or not guidance_scale >= 0:
            raise KeyframeWorldsError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")

    # -- the call ---------------------------------------------------------------------------------
    def default_steps(self) -> int:
        return self.dmd_config.steps if self.is_dmd else DEFAULT_STEPS[self.variant]

    @torch.no_grad()
    def __call__(self, cond: SegmentConditions, prompt: str = "", negative_prompt: str | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 callback: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None, latents: torch.Tensor | None = None,
                 latent_cond_mode: str | None = None,
                 trace: Callable[[str, torch.Tensor], None] | None = None) -> PipelineOutput:
        """Generate the ``F`` keyframes of ``cond``; deterministic for ``seed`` on a given device.

        ``latents``: the initial noise ``[1, 16, F, h, w]`` float32 instead of the one ``seed`` draws.
        ``latent_cond_mode``: this call's instead of the pipeline's. ``trace``: see :data:`TRACE_KEYS`.
        """
        if self.is_dmd:
            if steps is not None and steps != self.dmd_config.steps:
                raise KeyframeWorldsError(f"{self.variant} is distilled for {self.dmd_config.steps} steps; got steps={steps}")
            if guidance_scale not in (None, 1, 1.0, 0, 0.0):
                raise KeyframeWorldsError(f"{self.variant} runs without guidance; got guidance_scale={guidance_scale}")
            steps, guidance_scale = self.dmd_config.steps, 1.0
        steps = self.default_steps() if steps is None else steps
        guidance_scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        self.check_inputs(cond, steps, guidance_scale)
        latent_cond_mode = self.latent_cond_mode if latent_cond_mode is None else latent_cond_mode
        if latent_cond_mode not in LATENT_COND_MODES:
            raise KeyframeWorldsError(f"latent_cond_mode {latent_cond_mode!r} is not one of "
                                      f"{', '.join(LATENT_COND_MODES)}")
        guided = guidance_scale > 1.0
        negative_prompt = self.negative_prompt if negative_prompt is None else negative_prompt
        device, comp = self.device, self.companions
        dtype = self.transformer.patch_embedding.weight.dtype  # the compute dtype (block weights may be float8)
        emit = trace if trace is not None else (lambda name, value: None)

        # 2. Text [1 or 2, 512, text_dim]; each prompt encoded on its own, as the reference pipelines do
        texts = [("", "prompt_embeds", prompt)] + ([("negative_", "negative_prompt_embeds", negative_prompt)]
                                                    if guided else [])
        embeds = []
        with self._on_device(comp.text_encoder):
            for prefix, name, text in texts:
                ids, mask = tokenize_prompts(comp.tokenizer, [text])
                emit(f"text.{prefix}input_ids", ids)
                emit(f"text.{prefix}attention_mask", mask)
                embeds.append(encode_tokens(comp.text_encoder, ids, mask))
                emit(name, embeds[-1])
        context = torch.cat(embeds).to(device, dtype)
        # 3. Image [1, 257, image_dim]
        emit("image_preprocessed", cond.image)
        pixel_values = clip_pixel_values(comp.image_processor, cond.image, self.clip_pixels)
        emit("clip.pixel_values", pixel_values)
        with self._on_device(comp.image_encoder):
            image_embeds = encode_pixels(comp.image_encoder, pixel_values).to(device, dtype)
        emit("image_embeds", image_embeds)
        # 4. Latents: condition [1, 20, F, h, w], render [1, 16, F, h, w], references [1, 36, F_ref, h, w]
        frames = cond.frames
        with self._on_device(comp.vae) as vae:
            condition = condition_latent(vae, cond.image, frames, comp.vae_temporal_factor, latent_cond_mode)
            render_latent = vae_encode_keyframes(vae, cond.render_video)
            reference_latent = None
            if self.is_memory:
                ref = vae_encode_keyframes(vae, cond.reference_video)
                reference_latent = torch.cat([ref, torch.ones_like(ref[:, :4]), ref], dim=1)
        emit("condition", condition)
        emit("render_latent", render_latent)
        if reference_latent is not None:
            emit("reference_latent", reference_latent)
        condition = condition.to(device, dtype)
        net_inputs = dict(render_latent=render_latent.to(device, dtype),
                          render_mask=cond.render_mask.to(device, dtype),
                          camera_embedding=cond.camera_embedding.to(device, dtype),
                          encoder_hidden_states_image=image_embeds)
        if self.is_memory:
            net_inputs.update(reference_latent=reference_latent.to(device, dtype), ref_index=cond.ref_index.to(device),
                              camera_qt=cond.camera_qt.to(device, torch.float32),
                              camera_qt_ref=cond.camera_qt_ref.to(device, torch.float32))

        # 5. Denoising; the noise is drawn on the CPU so a seed means the same start on every device
        shape = (1, condition.shape[1] - comp.vae_temporal_factor, frames, *condition.shape[-2:])
        if latents is None:
            latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)), dtype=torch.float32)
        elif tuple(latents.shape) != shape or not latents.is_floating_point():
            raise KeyframeWorldsError(f"latents must be a float tensor {list(shape)}, got {latents.dtype} "
                                      f"{list(latents.shape)}")
        latents = latents.to(device, torch.float32)
        if self.is_dmd:
            sampler = DMDScheduler(self.dmd_config)
            timesteps = sampler.timesteps.to(device)
        else:
            sampler = make_unipc(comp.scheduler_config)
            sampler.set_timesteps(steps, device=device)
            timesteps = sampler.timesteps
        total = len(timesteps)
        batched = guided and self.batched_guidance
        if batched:  # every input twice along the batch: prompt first, negative prompt second
            pair_inputs = {k: v if k == "ref_index" else torch.cat([v, v]) for k, v in net_inputs.items()}
        with self._on_device(self.transformer, is_transformer=True) as net, attention_backend(self.attention):
            for i, t in enumerate(timesteps):
                emit(f"step{i}.latents_in", latents)
                emit(f"step{i}.timestep", t.expand(1))
                x = torch.cat([latents.to(dtype), condition], dim=1)
                if batched:
                    velocity, uncond = net(torch.cat([x, x]), t.expand(2), context, **pair_inputs).float().chunk(2)
                else:
                    velocity = net(x, t.expand(1), context[:1], **net_inputs).float()
                emit(f"step{i}.noise_pred_cond", velocity)
                if guided:
                    if not batched:
                        uncond = net(x, t.expand(1), context[1:], **net_inputs).float()
                    emit(f"step{i}.noise_pred_uncond", uncond)
                    velocity = uncond + guidance_scale * (velocity - uncond)
                emit(f"step{i}.noise_pred", velocity)
                if self.is_dmd:
                    latents = sampler.step(velocity, latents, i)
                else:
                    latents = sampler.step(velocity, t, latents, return_dict=False)[0]
                emit(f"step{i}.latents_out", latents)
                if callback is not None:
                    callback(i + 1, total)
                if i + 1 < total and should_cancel is not None and should_cancel():
                    raise JobCancelled(f"generation cancelled after step {i + 1} of {total}")

        # 6. Keyframe decoding [1, 3, F, H, W] -> (F, H, W, 3) uint8
        emit("final_latents", latents)
        with self._on_device(comp.vae) as vae:
            video = vae_decode_keyframes(vae, latents)
        emit("decoded_video", video)
        out = PipelineOutput(frames=video_to_uint8(video.cpu()), latents=latents.float().cpu())
        emit("frames_uint8", out.frames)
        return out
