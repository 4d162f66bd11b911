"""Offload modes: where the transformer's weights live while it runs.

``none`` keeps everything on the GPU; ``model`` keeps one model (transformer,
text encoder, image encoder, VAE) on the GPU at a time (:class:`DeviceVisits`:
one host copy, device copies dropped after each visit); ``sequential`` streams
the transformer's blocks one by one from page-locked host memory
(:class:`BlockStreamer`). The memory each mode needs is ``budget``'s business.

Weight storage (``weights_storage``) is the other memory lever: ``compute``
keeps every weight in the compute dtype; ``float8`` stores the Linear weights
of the transformer's blocks as ``float8_e4m3fn`` and casts each layer to the
compute dtype just for its forward (diffusers' layerwise casting,
:func:`apply_float8_storage`): half the bytes of the blocks' Linear layers, which
are 92% of the transformer's bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch stays out of import time for the CLI
    import torch

    from .wan_transformer import WanTransformer3DModel

#: Offload modes, from fastest to leanest: everything resident; one model (transformer, text
#: encoder, image encoder, VAE) on the GPU at a time; the transformer's blocks streamed one by one.
OFFLOAD_MODES = ("none", "model", "sequential")
#: How the transformer's block weights are stored: in the compute dtype, or as float8 (e4m3) cast up
#: layer by layer for compute. Fastest first.
WEIGHTS_STORAGES = ("compute", "float8")
#: Module-name patterns left in the compute dtype under float8 storage: diffusers' default skip list for
#: layerwise casting (norms, patch and position embeddings, the input/output projections).
FLOAT8_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


class BlockStreamer:
    """Streams the transformer's blocks to ``device`` one ahead of use (``offload="sequential"``).

    The blocks' weights live in CPU memory (page-locked on CUDA, so copies run
    asynchronously). Just before block ``i`` runs, its weights are on the device
    (the compute waits for their copy only) and the copy of block ``i + 1``
    (wrapping to block 0 for the next forward) starts on a separate stream, so
    the transfer overlaps block ``i``'s compute: at most two blocks are on the
    device at a time. After block ``i`` the device copy is dropped, not copied
    back: the CPU weights are unchanged, so leaving costs nothing.
    Everything that is not a block (embeddings, control branch, head) stays
    resident. :meth:`release` drops what is still on the device.
    """

    def __init__(self, model: "WanTransformer3DModel", device: "torch.device"):
        import torch

        self.device = torch.device(device)
        self.blocks = [block for child in model.children() if isinstance(child, torch.nn.ModuleList) for block in child]
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        in_blocks = {id(t) for block in self.blocks for t in (*block.parameters(), *block.buffers())}
        for child in model.children():
            if not isinstance(child, torch.nn.ModuleList):
                child.to(self.device)
        for t in (*model.parameters(recurse=False), *model.buffers(recurse=False)):  # e.g. the head's scale_shift_table
            if id(t) not in in_blocks:
                t.data = t.data.to(self.device)
        # per block: its tensors (parameters and buffers) and their CPU data
        self._tensors = [list(block.parameters()) + list(block.buffers()) for block in self.blocks]
        pin = self._cuda
        for tensors in self._tensors:
            for t in tensors:
                t.data = t.data.to("cpu")
                if pin:
                    try:
                        t.data = t.data.pin_memory()
                    except RuntimeError:  # the system refused more page-locked memory: copy from pageable memory
                        pin = False
        self._host = [[t.data for t in tensors] for tensors in self._tensors]
        self._in_flight: dict[int, object] = {}  # block index -> copy-done event (None off CUDA)
        self.max_on_device = 0  # most blocks on the device at once (a check of the two-block bound)
        self._hooks = []
        for i, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda module, args, i=i: self._before(i)))
            self._hooks.append(block.register_forward_hook(lambda module, args, output, i=i: self._after(i)))

    def _start_copy(self, i: int) -> None:
        import torch

        if i in self._in_flight:
            return
        if self._cuda:
            # the copy stream must not overwrite memory the compute stream is still reading
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                for t, host in zip(self._tensors[i], self._host[i]):
                    t.data = host.to(self.device, non_blocking=True, copy=True)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        else:
            for t, host in zip(self._tensors[i], self._host[i]):
                t.data = host.to(self.device, copy=True)  # a copy even on the CPU, so the streaming is observable
            event = None
        self._in_flight[i] = event
        self.max_on_device = max(self.max_on_device, len(self._in_flight))

    def _before(self, i: int) -> None:
        import torch

        self._start_copy(i)
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self._in_flight[i])
            for t in self._tensors[i]:
                t.data.record_stream(compute)  # allocated on the copy stream, used here: free only after use
        self._start_copy((i + 1) % len(self.blocks))

    def _after(self, i: int) -> None:
        for t, host in zip(self._tensors[i], self._host[i]):
            t.data = host
        self._in_flight.pop(i, None)

    def release(self) -> None:
        """Drop every block's device copy (after the denoising loop: the memory goes to the VAE)."""
        for i in list(self._in_flight):
            self._after(i)

    def remove(self) -> None:
        """Undo the hooks; the blocks stay in (page-locked) CPU memory."""
        self.release()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def enable_sequential_offload(model: "WanTransformer3DModel", device: "torch.device") -> BlockStreamer:
    """Stream ``model``'s blocks to ``device`` (see :class:`BlockStreamer`); the streamer is also kept
    as ``model.block_streamer``."""
    streamer = BlockStreamer(model, device)
    model.block_streamer = streamer
    return streamer


class DeviceVisits:
    """``offload="model"``: a module visits the device for a stage and leaves without a copy back.

    Its parameters and buffers keep one host copy, made once here (page-locked
    on CUDA, so the visits' copies run asynchronously). :meth:`enter` points
    every tensor at a device copy of its host copy; :meth:`leave` points it
    back at the host copy, dropping the device copy: the weights were only
    read, so the host copy is still theirs, and the 35 GB transformer is not
    copied back to the host after every segment (``module.to("cpu")`` did).
    ``host_copies`` counts the host copies made (once, at construction),
    ``visits`` the visits.
    """

    def __init__(self, module: "torch.nn.Module", device: "torch.device", copy: bool = False):
        import torch

        self.module = module
        self.device = torch.device(device)
        self._copy = copy or self.device.type != "cpu"  # on the CPU a visit is free unless asked to copy (tests)
        self._tensors = list(module.parameters()) + list(module.buffers())
        pin = self.device.type == "cuda"
        self.host_copies = 0
        for t in self._tensors:
            if t.data.device.type != "cpu":
                t.data = t.data.to("cpu")
                self.host_copies += 1
            if pin and not t.data.is_pinned():
                try:
                    t.data = t.data.pin_memory()
                    self.host_copies += 1
                except RuntimeError:  # the system refused more page-locked memory: visit from pageable memory
                    pin = False
        self._host = [t.data for t in self._tensors]
        self.visits = 0
        self.on_device = False

    def enter(self) -> None:
        if self.on_device:
            return
        for t, host in zip(self._tensors, self._host):
            t.data = host.to(self.device, non_blocking=True, copy=self._copy)
        self.visits += 1
        self.on_device = True

    def leave(self) -> None:
        for t, host in zip(self._tensors, self._host):
            t.data = host
        self.on_device = False


def float8_storage_modules(model: "WanTransformer3DModel") -> list[tuple[str, "torch.nn.Module"]]:
    """The leaf layers of ``model``'s blocks that float8 storage keeps in float8, with their names
    (``blocks.3.attn1.to_q`` ...): the Linear and convolution layers diffusers' layerwise casting
    supports, minus :data:`FLOAT8_SKIP_PATTERNS`. One list for the casting and the memory estimate."""
    import re

    import torch

    supported = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    chosen = []
    for name, module in model.blocks.named_modules(prefix="blocks"):
        if isinstance(module, supported) and not any(re.search(p, name) for p in FLOAT8_SKIP_PATTERNS):
            chosen.append((name, module))
    return chosen


def apply_float8_storage(model: "WanTransformer3DModel", compute_dtype: "torch.dtype | None" = None) -> int:
    """Store the block layers of :func:`float8_storage_modules` as ``float8_e4m3fn``, cast to
    ``compute_dtype`` (default: the model's, that of its patch embedding) for each layer's forward
    with diffusers' layerwise-casting hook. Works on the meta device. Returns the layers cast.

    The cast is a plain rounding to e4m3 (3 mantissa bits, no per-tensor scale, as diffusers does):
    relative error up to 2^-4 per weight, and values below 2^-9 flush to zero.
    """
    import torch
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    compute_dtype = compute_dtype or model.patch_embedding.weight.dtype
    layers = float8_storage_modules(model)
    for _, module in layers:
        apply_layerwise_casting_hook(module, torch.float8_e4m3fn, compute_dtype, non_blocking=False)
    model.weights_storage = "float8"
    return len(layers)
